//! The kernels at SD 1.5's 512² sizes: one self-attention (`[8 heads, 4096, 40]`), forward and
//! forward+backward, and one 3×3 convolution of 320 channels at 64×64. Prints figures; asserts
//! nothing. PyTorch's on the same shapes: `tests/bench/cpu_kernels.py`.
//!
//!     cargo run -p ferrite-cpu-kernels --example bench_kernels [heads L D iters]

use std::time::Instant;

use ferrite_cpu_kernels::attention::{Dims, backward, forward};
use ferrite_cpu_kernels::conv::{Conv, conv2d};

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("a number"))
        .collect();
    let (bh, l, d, iters) = (
        *a.first().unwrap_or(&8),
        *a.get(1).unwrap_or(&4096),
        *a.get(2).unwrap_or(&40),
        *a.get(3).unwrap_or(&3),
    );
    let n = Dims {
        bh,
        lq: l,
        lk: l,
        d,
        dv: d,
    };
    let mut x = 1u32;
    let mut random = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (q, k, v, g) = (
        random(bh * l * d),
        random(bh * l * d),
        random(bh * l * d),
        random(bh * l * d),
    );
    let scale = 1.0 / (d as f32).sqrt();
    let time = |f: &dyn Fn()| {
        f();
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed().as_secs_f64() * 1000.0 / iters as f64
    };
    let fwd = time(&|| drop(forward(&q, &k, &v, n, scale)));
    let both = time(&|| {
        let (out, lse) = forward(&q, &k, &v, n, scale);
        drop(backward(&q, &k, &v, &out, &lse, &g, n, scale));
    });
    let c = Conv {
        n: 1,
        cin: 320,
        h: 64,
        w: 64,
        cout: 320,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
    };
    let (x, w, b) = (random(320 * 64 * 64), random(320 * 320 * 9), random(320));
    let conv = time(&|| drop(conv2d(&x, &w, Some(&b), c)));
    println!("conv2d 3x3 320->320 at 64x64 forward {conv:.1} ms");
    // The gemm crate alone, the ceiling for both.
    let m = 2048;
    let (a, b2) = (random(m * m), random(m * m));
    let mut dst = vec![0f32; m * m];
    let gemm = time(&|| {
        let mut d = dst.clone();
        // SAFETY: three m×m row-major matrices.
        unsafe {
            gemm::gemm(
                m,
                m,
                m,
                d.as_mut_ptr(),
                1,
                m as isize,
                false,
                a.as_ptr(),
                1,
                m as isize,
                b2.as_ptr(),
                1,
                m as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            )
        }
        drop(d);
    });
    dst.clear();
    println!(
        "gemm 2048^3 {gemm:.1} ms, {:.0} GFLOPS",
        2.0 * (m as f64).powi(3) / gemm / 1e6
    );
    println!(
        "attention [{bh}, {l}, {d}] forward {fwd:.1} ms, forward+backward {both:.1} ms ({} threads)",
        rayon::current_num_threads()
    );
}
