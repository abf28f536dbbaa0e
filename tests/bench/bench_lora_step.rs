//! The Rust side of the real-size LoRA step benchmark (tests/bench/lora_step.sh): `ferrite`'s
//! trainer on the folder tests/bench/lora_step.py built (SD 1.5's or SDXL base's UNet, random
//! weights),
//! a LoRA of rank 16 (alpha 1) on the `attn-mlp` layers, AdamW, one 512×512 image per step.
//! Prints the mean step time after the first step (which also encodes and caches the image and
//! caption), the process's peak resident memory while loading and, counted afresh from the end
//! of loading, during the steps; asserts nothing.
//!
//!     cargo run -p ferrite-tests --example bench_lora_step -- sd15|sdxl DIR [steps] [device] [key=value ...]
//!
//! `key=value` pairs set config options as `ferrite train --set` does (say
//! `gradient_checkpointing=off`).

use std::path::Path;
use std::time::{Duration, Instant};

use ferrite::config::TrainConfig;
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, Trainer};

/// Starts this process's peak resident memory (VmHWM) afresh from what it holds now.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_gib() -> f64 {
    ferrite_tests::status_gib("VmHWM")
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage =
        || anyhow::anyhow!("usage: bench_lora_step sd15|sdxl DIR [steps] [device] [key=value ...]");
    let family = args.next().ok_or_else(usage)?;
    let dir = args.next().ok_or_else(usage)?;
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let device = args.next().unwrap_or_else(|| "cpu".into());
    let sets: Vec<String> = args.collect();
    ferrite::runtime::init(&device)?;
    let root = Path::new(&dir);
    let images = root.join("images");
    std::fs::create_dir_all(&images)?;
    image::RgbImage::from_fn(512, 512, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    })
    .save(images.join("0.png"))?;
    std::fs::write(images.join("0.txt"), "a photo")?;
    let text = format!(
        r#"
model_type = "{family}"
base_model_name = "{}"
workspace_dir = "ws"
output_model_destination = "out/lora.safetensors"
train_device = "{device}"
resolution = "512"
batch_size = 1
epochs = 1000
learning_rate = 0.0003
lora_rank = 16
lora_alpha = 1.0
lora_layer_preset = "attn-mlp"
latent_caching = true
backup_after_unit = "never"
sample_after_unit = "never"
tensorboard = false
[optimizer]
optimizer = "adamw"
weight_decay = 0.01
[[concepts]]
path = "images"
"#,
        root.join("model").display()
    );
    let p = root.join("bench.toml");
    std::fs::write(&p, text)?;
    let config = TrainConfig::load(Some(&p), None, &sets)?;
    // The first size given (`512`, `512,768`, `1024x768`), for the label.
    let size: usize = config
        .resolution
        .split([',', 'x'])
        .next()
        .unwrap_or_default()
        .trim()
        .parse()?;
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let loading = Instant::now();
    let mut t = Trainer::new(config, root, registry)?;
    println!(
        "ferrite loaded in {:.1} s, {} LoRA tensors, peak memory while loading {:.1} GiB",
        loading.elapsed().as_secs_f64(),
        t.trainable().len(),
        peak_rss_gib()
    );
    // The figure below is the training steps' own (loading reads f32 weights before a
    // `weight_dtype` shrinks them, and the file's pages count while they are read).
    reset_peak();
    let mut times = Vec::new();
    let mut last = Instant::now();
    let cancel = t.controls().cancel.clone();
    t.run(|e| {
        if let Event::Step { step, .. } = e {
            times.push(last.elapsed());
            last = Instant::now();
            if step == steps + 1 {
                cancel.cancel();
            }
        }
    })?;
    let timed = &times[1..];
    let mean = timed.iter().sum::<Duration>() / timed.len().max(1) as u32;
    println!(
        "ferrite LoRA step {size}x{size} ({l}x{l} latent) {}: {:8.1} s, peak memory {:.1} GiB",
        sets.join(" "),
        mean.as_secs_f64(),
        peak_rss_gib(),
        l = size / 8,
    );
    Ok(())
}
