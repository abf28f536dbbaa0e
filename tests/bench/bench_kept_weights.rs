//! Frozen weights kept below f32 (`weight_dtype`) on a Flux-size linear stack: the linear
//! layers of real-size Flux.1 double blocks (hidden 3072, MLP 12288: per stream the modulation
//! 3072→18432, qkv 3072→9216, proj 3072→3072, MLP 3072→12288→3072; two streams per block),
//! random weights (N(0, 0.02)). For each format it prints the bytes kept per block, the growth
//! of this process's resident memory per block, the error of the dequantised weights against
//! the f32 ones, and the time of one forward + backward of a token batch through one stream
//! (input gradient, as under a LoRA). Asserts nothing; bitsandbytes' and torch's dequantised
//! values are matched exactly in `host/runtime/tests/kept.rs`.
//!
//!     cargo run -p ferrite-tests --example bench_kept_weights -- [blocks] [tokens]

use std::time::Instant;

use ferrite::runtime::{Device, Scope, WeightFormat};
use ferrite_plugin_api::{Tensor, ops};
use rand::{Rng, SeedableRng};
use rand_distr::Normal;

/// (out, in) of one stream's linear layers.
const STREAM: [(usize, usize); 5] = [
    (18432, 3072),
    (9216, 3072),
    (3072, 3072),
    (12288, 3072),
    (3072, 12288),
];

fn rss_gib() -> f64 {
    ferrite::train::bench::proc_status_mib("VmRSS").map_or(f64::NAN, |mib| mib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let blocks: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let tokens: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let normal = Normal::new(0.0f32, 0.02)?;
    println!(
        "{blocks} Flux double blocks ({} M linear parameters each), {tokens} tokens",
        2 * STREAM.iter().map(|(o, i)| o * i).sum::<usize>() / 1_000_000
    );
    for format in [
        WeightFormat::F32,
        WeightFormat::BF16,
        WeightFormat::Float8,
        WeightFormat::Nf4,
    ] {
        let (device, _) = Device::open("cpu")?;
        let _entered = Scope::new(device.clone()).enter();
        let before = rss_gib();
        let (mut worst, mut sum, mut count, mut kept) = (0f32, 0f64, 0usize, 0usize);
        let mut weights = Vec::new();
        for _ in 0..blocks * 2 {
            for &(o, i) in &STREAM {
                let w: Vec<f32> = (0..o * i).map(|_| rng.sample(normal)).collect();
                let t = Tensor::from_f32(&w, &[o, i]).map_err(anyhow::Error::msg)?;
                device
                    .keep_weight(t.id(), format)
                    .map_err(anyhow::Error::msg)?;
                kept += device.kept_bytes(t.id()).map_err(anyhow::Error::msg)?;
                if weights.len() < STREAM.len() {
                    // The error, on the first stream's weights.
                    let back = t.to_vec().map_err(anyhow::Error::msg)?;
                    for (a, b) in back.iter().zip(&w) {
                        worst = worst.max((a - b).abs());
                        sum += f64::from((a - b).abs());
                    }
                    count += w.len();
                }
                weights.push(t);
            }
        }
        let grown = rss_gib() - before;
        let x = Tensor::from_f32(
            &(0..tokens * 3072)
                .map(|_| rng.sample(normal))
                .collect::<Vec<_>>(),
            &[tokens, 3072],
        )
        .map_err(anyhow::Error::msg)?;
        x.set_requires_grad(true).map_err(anyhow::Error::msg)?;
        let start = Instant::now();
        let stream = &weights[..STREAM.len()];
        let step = || -> ferrite_plugin_api::Result<f32> {
            // Modulation and qkv read x; proj and the MLP chain like the block's.
            let m = ops::linear(&x, &stream[0], None)?;
            let qkv = ops::linear(&x, &stream[1], None)?;
            let a = ops::linear(&qkv.narrow(1, 0, 3072)?, &stream[2], None)?;
            let h = ops::linear(&a, &stream[3], None)?.gelu()?;
            let out = ops::linear(&h, &stream[4], None)?;
            let loss = out.sum_all()?.add(&m.mean_all()?)?;
            let g = loss.backward()?.get(&x)?.expect("x takes part");
            g.abs()?.sum_all()?.item()
        };
        let g = step().map_err(anyhow::Error::msg)?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:>8}: kept {:7.1} MiB per block, resident +{:5.2} GiB per block, weight error \
             max {worst:.2e} mean {:.2e} (std 2e-2), forward+backward of one stream {secs:6.2} s \
             (|dx| {g:.3e})",
            format!("{format:?}"),
            kept as f64 / blocks as f64 / (1 << 20) as f64,
            grown / blocks as f64,
            sum / count as f64,
        );
    }
    Ok(())
}
