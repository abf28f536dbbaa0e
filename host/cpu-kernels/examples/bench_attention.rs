//! One SD 1.5 self-attention at 512² (`[8 heads, 4096, 40]`): the kernel's forward and
//! forward+backward times. Prints figures; asserts nothing. PyTorch's on the same shapes:
//! `tests/bench/attention.py`.
//!
//!     cargo run -p ferrite-cpu-kernels --example bench_attention [heads L D iters]

use std::time::Instant;

use ferrite_cpu_kernels::attention::{Dims, backward, forward};

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
    println!(
        "attention [{bh}, {l}, {d}] forward {fwd:.1} ms, forward+backward {both:.1} ms ({} threads)",
        rayon::current_num_threads()
    );
}
