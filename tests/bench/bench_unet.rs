//! The Rust side of the UNet benchmark: loads the UNet that tests/bench/unet_sd15_level.py saved
//! and prints, through the plugin-api runtime, the times of a forward, a forward+backward with
//! frozen weights (the input's gradient only) and one with every weight's gradient. Prints
//! figures; asserts nothing. `tests/bench/unet.sh` runs it against PyTorch.
//!
//!     cargo run -p ferrite-tests --example bench_unet -- /tmp/unet_bench [iters] [device]

use std::time::Instant;

use ferrite::runtime;
use ferrite_blocks::unet::{UNet2DConditionModel, UNetConfig};
use ferrite_plugin_api::{DType, Generator, Tensor, Weights};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bench_unet UNET_DIR [iters] [device]"))?;
    let iters: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let device = args.next().unwrap_or_else(|| "cpu".into());
    runtime::init(&device)?;
    let cfg_path = format!("{dir}/config.json");
    let config = UNetConfig::from_json(&std::fs::read_to_string(&cfg_path)?, &cfg_path)?;
    let w = Weights::open(&format!("{dir}/diffusion_pytorch_model.safetensors"))?;
    let scoped = w.scoped("unet");
    let unet = UNet2DConditionModel::load(&scoped, "", &config, DType::F32)?;
    let weights = scoped.tensors();
    let rng = Generator::new(0)?;
    let x = Tensor::randn(&[1, 4, 64, 64], &rng)?;
    let t = Tensor::full(&[1], 500.0, DType::F32)?;
    let ctx = Tensor::randn(&[1, 77, 768], &rng)?;
    // One host read per iteration waits for the device, as a logged loss would.
    let forward = || -> anyhow::Result<()> {
        unet.forward(&x, &t, &ctx)?.mean_all()?.item()?;
        Ok(())
    };
    // The gradients of the input and of `params` (each checked to exist).
    let train_step = |params: &[&Tensor]| -> anyhow::Result<()> {
        let x = x.detach()?;
        x.set_requires_grad(true)?;
        let loss = unet.forward(&x, &t, &ctx)?.powf(2.0)?.mean_all()?;
        let grads = loss.backward()?;
        for p in std::iter::once(&&x).chain(params) {
            grads
                .get(p)?
                .ok_or_else(|| anyhow::anyhow!("no gradient"))?;
        }
        grads.get(&x)?.map(|g| g.mean_all()?.item()).transpose()?;
        Ok(())
    };
    let every: Vec<&Tensor> = weights.iter().map(|(_, t)| t).collect();
    let frozen = || train_step(&[]);
    let every_weight = || -> anyhow::Result<()> {
        for t in &every {
            t.set_requires_grad(true)?;
        }
        let r = train_step(&every);
        for t in &every {
            t.set_requires_grad(false)?;
        }
        r
    };
    let only = std::env::var("BENCH_ONLY").ok();
    let names = ["forward", "frozen", "every-weight"];
    if let Some(only) = only.as_deref().filter(|o| !names.contains(o)) {
        anyhow::bail!("BENCH_ONLY={only}: use one of {names:?}");
    }
    println!("device {}", runtime::device_name());
    for (name, f) in [
        ("forward", &forward as &dyn Fn() -> anyhow::Result<()>),
        ("frozen", &frozen),
        ("every-weight", &every_weight),
    ] {
        // BENCH_ONLY=frozen (say) runs one of them, for a profiler.
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        f()?; // warm-up
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        println!(
            "ferrite {name:<17} {:9.1} ms",
            start.elapsed().as_secs_f64() * 1000.0 / iters as f64
        );
    }
    Ok(())
}
