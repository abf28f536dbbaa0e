//! The training-loop benchmark: a LoRA on the tiny SD 1.5 pipeline (tests/fixtures/pipeline)
//! over generated 768×512 JPEG photos-to-be (decoded, cover-scaled, cropped and flipped every
//! step, latent caching off so the data loader has real work), once with the data loader on the
//! trainer's thread and once with `dataloader_threads` workers. Prints steady-state step time
//! and data-loader wait per step (the first steps are left out); asserts nothing.
//!
//!     cargo run --release -p ferrite-tests --example bench_train -- [steps] [threads] [device]

use std::path::Path;
use std::time::Duration;

use ferrite::config::TrainConfig;
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, Trainer};

/// Steps left out of the figures while caches and allocators warm up.
const WARMUP: usize = 3;

fn photos(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        let img = image::RgbImage::from_fn(768, 512, |x, y| {
            let v = ((x * 7 + y * 13 + i as u32 * 31) % 256) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        img.save(dir.join(format!("{i}.jpg")))?;
        std::fs::write(dir.join(format!("{i}.txt")), format!("photo number {i}"))?;
    }
    Ok(())
}

/// (mean step time, mean data wait per step) after the warm-up steps.
fn run(
    root: &Path,
    steps: usize,
    threads: usize,
    device: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let text = format!(
        r#"
base_model_name = "{}"
workspace_dir = "ws{threads}"
output_model_destination = "out{threads}/lora.safetensors"
train_device = "{device}"
resolution = "64"
batch_size = 4
epochs = 1000
lora_rank = 8
latent_caching = false
dataloader_threads = {threads}
backup_after_unit = "never"
sample_after_unit = "never"
tensorboard = false
[[concepts]]
path = "photos"
"#,
        model.display()
    );
    let p = root.join(format!("bench{threads}.toml"));
    std::fs::write(&p, text)?;
    let config = TrainConfig::load(Some(&p), None, &[])?;
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let mut t = Trainer::new(config, root, registry)?;
    let (mut times, mut waits) = (Vec::new(), Vec::new());
    let mut last = std::time::Instant::now();
    let cancel = t.controls().cancel.clone();
    t.run(|e| {
        if let Event::Step {
            step, data_wait, ..
        } = e
        {
            times.push(last.elapsed());
            waits.push(data_wait);
            last = std::time::Instant::now();
            if step as usize == steps {
                cancel.cancel();
            }
        }
    })?;
    let n = (times.len() - WARMUP) as u32;
    let mean = |v: &[Duration]| v[WARMUP..].iter().sum::<Duration>() / n;
    Ok((mean(&times), mean(&waits)))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(30);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let device = args.next().unwrap_or_else(|| "cpu".into());
    anyhow::ensure!(steps > WARMUP, "run more than {WARMUP} steps");
    ferrite::runtime::init(&device)?;
    let dir = tempfile::tempdir()?;
    photos(&dir.path().join("photos"), 32)?;
    println!(
        "tiny SD 1.5 LoRA, batch 4 of 768x512 JPEGs to 64x64 buckets, {steps} steps ({WARMUP} warm-up left out), {device}"
    );
    println!(
        "{:<28} {:>12} {:>16}",
        "data loader", "step time", "data wait/step"
    );
    let (base_step, base_wait) = run(dir.path(), steps, 0, &device)?;
    println!(
        "{:<28} {:>12.1?} {:>16.1?}",
        "on the trainer's thread", base_step, base_wait
    );
    let (step, wait) = run(dir.path(), steps, threads, &device)?;
    println!(
        "{:<28} {:>12.1?} {:>16.1?}",
        format!("{threads} worker threads"),
        step,
        wait
    );
    println!(
        "step time {:.2}x of the baseline; data wait {:.1}% of the step (baseline {:.1}%)",
        step.as_secs_f64() / base_step.as_secs_f64(),
        100.0 * wait.as_secs_f64() / step.as_secs_f64(),
        100.0 * base_wait.as_secs_f64() / base_step.as_secs_f64(),
    );
    Ok(())
}
