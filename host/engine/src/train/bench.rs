//! `ferrite bench step`: one training configuration as users run it — the whole trainer step
//! (a batch from the cache, noise, forward, loss, backward, AdamW) on one generated image per
//! batch item — timed after a warm-up step, with its peak memory; and `ferrite bench cache`:
//! the caching pass's throughput against the bare VAE encode. Asserts nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::trainer::{Event, Trainer};
use crate::config::TrainConfig;
use crate::plugins::Registry;
use crate::runtime::Device;

/// What to run. The method's layers are OneTrainer's `attn-mlp` preset at rank 16 (LoRA) or the
/// whole denoiser (fine-tune); the optimizer is AdamW.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// Architecture plugin id (`sd15`, `sdxl`).
    pub model_type: String,
    /// A diffusers folder or a single file.
    pub model: PathBuf,
    /// `model` is a folder of config files only: build it with random weights.
    pub random_weights: bool,
    /// `lora` or `fine_tune`.
    pub method: String,
    pub resolution: usize,
    pub batch: usize,
    /// Timed steps after the warm-up step.
    pub steps: u64,
    pub device: String,
    /// Config overrides as `--set` takes them (`train_dtype=bfloat16`, ...).
    pub sets: Vec<String>,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepFigures {
    /// Median of the timed steps.
    pub step_ms: f64,
    /// Peak resident memory of the process during the timed steps (CPU runs; None on a GPU,
    /// whose memory the device harness reads from the driver).
    pub peak_mem_mib: Option<f64>,
    /// Peak resident memory while loading.
    pub load_peak_mib: Option<f64>,
    /// Trained parameters (elements).
    pub trainable: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench step: {0}")]
    Setup(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Train(#[from] super::trainer::TrainError),
    #[error(transparent)]
    Device(#[from] crate::runtime::DeviceError),
}

/// A memory figure of this process's `/proc/self/status` (`VmHWM`: peak resident, `VmRSS`:
/// resident now), in MiB (Linux; None elsewhere).
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM")
}

/// Starts the peak resident memory afresh from what the process holds now (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The run's config: the bench's choices, then `sets`.
fn config(b: &StepBench, dir: &Path) -> Result<TrainConfig, BenchError> {
    let text = format!(
        r#"
model_type = "{model_type}"
base_model_name = {model}
training_method = "{method}"
workspace_dir = "ws"
cache_dir = "cache"
output_model_destination = "out/model.safetensors"
output_model_format = "diffusers"
train_device = "{device}"
resolution = "{res}"
batch_size = {batch}
epochs = {epochs}
learning_rate = 0.0001
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
        model_type = b.model_type,
        model = toml::Value::String(b.model.to_string_lossy().into_owned()),
        method = b.method,
        device = b.device,
        res = b.resolution,
        batch = b.batch,
        // One batch per epoch: the warm-up step, then the timed ones.
        epochs = b.steps.max(1) + 1,
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, text)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
    let mut c = TrainConfig::load(Some(&path), None, &b.sets)?;
    c.random_base_weights = b.random_weights;
    Ok(c)
}

/// A folder of its own under `work` (removed when dropped) with `n` generated images.
fn folder(b: &StepBench, work: &Path, n: usize) -> Result<tempfile::TempDir, BenchError> {
    let setup = |e: std::io::Error| BenchError::Setup(format!("{}: {e}", work.display()));
    let dir = tempfile::Builder::new()
        .prefix("ferrite-bench-")
        .tempdir_in(work)
        .map_err(setup)?;
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).map_err(setup)?;
    for i in 0..n {
        let res = b.resolution as u32;
        image::RgbImage::from_fn(res, res, |x, y| {
            // Distinct images (the cache is keyed by content).
            let i = i as u32;
            image::Rgb([
                ((x + i) % 256) as u8,
                ((y + i / 256) % 256) as u8,
                (40 * i % 256) as u8,
            ])
        })
        .save(images.join(format!("{i}.png")))
        .map_err(|e| BenchError::Setup(format!("writing the bench image: {e}")))?;
        std::fs::write(images.join(format!("{i}.txt")), format!("a photo {i}")).map_err(setup)?;
    }
    Ok(dir)
}

/// Runs the bench in a folder of its own under `work` (made and removed here).
pub fn step(b: &StepBench, work: &Path, registry: Registry) -> Result<StepFigures, BenchError> {
    // One image per batch item, so every step's batch is full.
    let dir = folder(b, work, b.batch.max(1))?;
    let c = config(b, dir.path())?;
    let started = Instant::now();
    let (device, _) = Device::open(&c.train_device)?;
    let mut t = Trainer::on(device, Default::default(), c, dir.path(), registry)?;
    let load_peak_mib = peak_rss_mib();
    // Progress for runs cut short by a time limit (the device harness).
    tracing::info!(
        "bench step: loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let trainable = t
        .trainable()
        .iter()
        .map(|(_, p)| p.shape().map_or(0, |s| s.iter().product::<usize>()))
        .sum();
    // The first step also encodes and caches the images: it is the warm-up, not timed.
    let (mut times, mut last) = (Vec::new(), Instant::now());
    t.run(|e| {
        if let Event::Step { step, .. } = e {
            tracing::info!(
                "bench step: step {step} in {:.1} s",
                last.elapsed().as_secs_f64()
            );
            if step == 1 {
                reset_peak_rss();
            } else {
                times.push(last.elapsed());
            }
            last = Instant::now();
        }
    })?;
    let on_cpu = t.device_name().starts_with("cpu");
    Ok(StepFigures {
        step_ms: median(times).as_secs_f64() * 1e3,
        peak_mem_mib: peak_rss_mib().filter(|_| on_cpu),
        load_peak_mib,
        trainable,
    })
}

/// What `ferrite bench cache` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheFigures {
    pub images: usize,
    /// Through the caching pass: the images read, augmented, encoded and written.
    pub cache_images_per_s: f64,
    /// The VAE alone on tensors of the same size and batch, in the same process.
    pub encode_images_per_s: f64,
    /// The first over the second.
    pub ratio: f64,
}

/// `ferrite bench cache`: the caching pass over `n` generated images (from the start of the run
/// to the end of the pass: hashing, loading, encoding, writing) against the bare VAE encode of
/// as many images in batches of `b.batch`, after a warm-up batch.
pub fn cache(
    b: &StepBench,
    n: usize,
    work: &Path,
    registry: Registry,
) -> Result<CacheFigures, BenchError> {
    let dir = folder(b, work, n)?;
    let c = config(b, dir.path())?;
    let (device, _) = Device::open(&c.train_device)?;
    let mut t = Trainer::on(device, Default::default(), c, dir.path(), registry)?;
    let batch = b.batch.max(1);
    let _scope = t.scope().enter();
    let pixels = ferrite_plugin_api::Tensor::full(
        &[batch, 3, b.resolution, b.resolution],
        0.25,
        ferrite_plugin_api::DType::F32,
    )
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let encode = || -> Result<(), BenchError> {
        let (mean, _) = t.vae_encode(&pixels)?;
        // One host read waits for the device.
        mean.mean_all()
            .and_then(|m| m.item())
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        Ok(())
    };
    encode()?;
    let started = Instant::now();
    let batches = n.div_ceil(batch);
    for _ in 0..batches {
        encode()?;
    }
    let encode_images_per_s = (batches * batch) as f64 / started.elapsed().as_secs_f64();
    let cancel = t.controls().cancel.clone();
    let (started, mut pass) = (Instant::now(), None);
    t.run(|e| {
        if let Event::Cached(c) = e {
            pass = Some((c.latents_encoded, started.elapsed()));
            // The run stops before its first step.
            cancel.cancel();
        }
    })?;
    let (encoded, took) = pass.ok_or_else(|| BenchError::Setup("no caching pass ran".into()))?;
    if encoded != n {
        return Err(BenchError::Setup(format!(
            "the caching pass encoded {encoded} images of {n}"
        )));
    }
    let cache_images_per_s = n as f64 / took.as_secs_f64();
    Ok(CacheFigures {
        images: n,
        cache_images_per_s,
        encode_images_per_s,
        ratio: cache_images_per_s / encode_images_per_s,
    })
}
