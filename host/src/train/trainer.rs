//! The trainer: LoRA-family adapters or a full fine-tune of the parts marked `train`, one
//! optimizer (plugin) per part with its own learning rate, epsilon or v targets, noise and
//! timesteps drawn from the seed and the step, gradient accumulation and clipping, learning-rate
//! schedules with warmup, samples, rolling backups and exact resume, and the final save.
//!
//! Every random draw at a point of the run comes from (seed, purpose, index), and the data order
//! of an epoch from (seed, epoch): a run resumed from a backup repeats the uninterrupted one.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    DType, Generator, Tensor, Weights,
    plugin::{ArchitectureHandle, OptimizerHandle},
};
use rand::Rng;

use crate::adapters::{self, AdapterOptions, ModelLayers, formats::Format, select};
use crate::data::{self, Dataset, buckets::Buckets};
use crate::plugins::Registry;
use crate::sample::{NoiseSchedule, Prediction, Sampler, SchedulerConfig, generate};
use crate::train::config::{ConceptConfig, TrainConfig};
use crate::train::tensorboard::EventWriter;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrainError(pub String);

type Result<T> = std::result::Result<T, TrainError>;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError(e.to_string())
}

/// The weight of a timestep's loss from its signal-to-noise ratio: `min_snr_gamma` (Hang et al.;
/// strength = γ), `debiased_estimation` (1/√SNR, kohya's), `p2` (1/(1 + SNR)^strength, Choi et al.),
/// else 1.
pub fn loss_weight(function: &str, strength: f64, snr: f64, prediction: Prediction) -> f64 {
    match function {
        "min_snr_gamma" => {
            let m = snr.min(strength);
            match prediction {
                Prediction::Epsilon => m / snr,
                Prediction::VPrediction => m / (snr + 1.0),
            }
        }
        // kohya clamps the SNR at 1000 so the noisiest steps do not dominate.
        "debiased_estimation" => 1.0 / snr.min(1000.0).sqrt(),
        "p2" => 1.0 / (1.0 + snr).powf(strength),
        _ => 1.0,
    }
}

/// The Huber loss of each element: quadratic within `delta`, linear beyond (torch's
/// `huber_loss`, reduction none).
pub fn huber(diff: &Tensor, delta: f64) -> ferrite_plugin_api::Result<Tensor> {
    let abs = diff.abs()?;
    let inside = abs.clamp(None, Some(delta))?;
    inside
        .powf(2.0)?
        .mul_scalar(0.5)?
        .add(&abs.sub(&inside)?.mul_scalar(delta)?)
}

/// Copies a model folder without its UNet and text-encoder weights (the VAE's stay).
fn copy_except_weights(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(err)?;
    for e in std::fs::read_dir(from).map_err(err)? {
        let p = e.map_err(err)?.path();
        let dest = to.join(p.file_name().unwrap_or_default());
        let part = from.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            copy_except_weights(&p, &dest)?;
        } else if !(matches!(part, "unet" | "text_encoder")
            && p.extension().is_some_and(|x| x == "safetensors"))
        {
            std::fs::copy(&p, &dest).map_err(err)?;
        }
    }
    Ok(())
}

/// An image file, a bucket and a variation: one latent cache entry.
type CacheSlot = (PathBuf, (usize, usize), u64);

/// Where the run is; what a backup stores besides the tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Batches of the current epoch already used.
    pub batch_in_epoch: usize,
    /// Batches used in the whole run (indexes the random draws).
    pub batches: u64,
}

/// What the trainer reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        items: usize,
        problems: Vec<String>,
        steps: u64,
    },
    Step {
        step: u64,
        epoch: u64,
        loss: f32,
        lr: f64,
    },
    /// The validation loss of a concept at `step`.
    Validation {
        step: u64,
        concept: String,
        loss: f32,
    },
    Sample(PathBuf),
    Backup(PathBuf),
    Saved(PathBuf),
}

/// Images ready for the loss: pixels (`[3, H, W]` each) and masks (`[H, W]` each),
/// concatenated, with their prompts and loss weights.
#[derive(Default)]
struct Batch {
    bucket: (usize, usize),
    pixels: Vec<f32>,
    /// The VAE's mean and log-variance, when they come from the cache (then `pixels` is empty).
    encoded: Option<(Tensor, Tensor)>,
    masks: Vec<f32>,
    prompts: Vec<String>,
    weights: Vec<f64>,
    /// Per image: a prior concept's, whose target is the model's prediction without adapters.
    prior: Vec<bool>,
}

/// A model part's trainable tensors and their optimizer.
struct Group {
    part: String,
    names: Vec<String>,
    params: Vec<Tensor>,
    optimizer: OptimizerHandle,
    lr: f64,
    /// The moving average of `params`, when EMA is on.
    ema: Option<Vec<Tensor>>,
}

pub struct Trainer {
    pub config: TrainConfig,
    /// The config file's folder: relative paths start there.
    base: PathBuf,
    workspace: PathBuf,
    registry: Registry,
    arch: ArchitectureHandle,
    model: ModelLayers,
    schedule: NoiseSchedule,
    info: serde_json::Value,
    data: Dataset,
    validation: Dataset,
    /// One bucket set per resolution of the config (validation uses the first).
    buckets: Vec<Buckets>,
    groups: Vec<Group>,
    pub progress: Progress,
    batches_per_epoch: usize,
    tensorboard: Option<EventWriter>,
    cache_dir: PathBuf,
    /// Latent cache file and augmentation seed per (image, bucket, variation), once worked out.
    cache_entries: std::sync::Mutex<std::collections::HashMap<CacheSlot, (PathBuf, u64)>>,
    /// What identifies the model for the latent cache: its path, when it changed, its info.
    model_identity: String,
}

const RNG_BATCH: u64 = 2;
const RNG_NOISE: u64 = 3;
const RNG_VALIDATION: u64 = 4;
/// Timesteps per validation image, evenly spread over the noising range.
const VALIDATION_TIMESTEPS: usize = 8;

impl Trainer {
    /// Loads the model, makes the trainable tensors and optimizers, reads the data, and
    /// resumes from the last backup when `continue_last_backup` is set.
    pub fn new(config: TrainConfig, base: &Path, registry: Registry) -> Result<Self> {
        let c = &config;
        let workspace = TrainConfig::path(base, &c.workspace_dir);
        std::fs::create_dir_all(&workspace)
            .map_err(|e| TrainError(format!("workspace_dir {}: {e}", workspace.display())))?;
        crate::fsutil::write_atomic(&workspace.join("config.toml"), c.to_toml().as_bytes())
            .map_err(err)?;

        let mut options = serde_json::json!({
            "model": TrainConfig::path(base, &c.base_model_name),
        });
        if !c.base_model_config.is_empty() {
            options["config"] = TrainConfig::path(base, &c.base_model_config)
                .to_string_lossy()
                .into();
        }
        let arch = registry
            .architecture(&c.model_type, &options.to_string())
            .map_err(err)?;
        let info = arch.model_info().map_err(err)?;
        let schedule = NoiseSchedule::new(
            SchedulerConfig::from_json(&info["scheduler"].to_string(), "the model's scheduler")
                .map_err(err)?,
        )
        .map_err(err)?;
        let model = ModelLayers::of(&arch).map_err(err)?;

        let data = Dataset::scan(c, base, &["standard", "prior"]);
        if data.items.is_empty() {
            return Err(TrainError(format!(
                "no training images found{}",
                if data.problems.is_empty() {
                    String::new()
                } else {
                    format!(":\n  {}", data.problems.join("\n  "))
                }
            )));
        }
        let validation = Dataset::scan(c, base, &["validation"]);
        let step = info["resolution_step"].as_u64().unwrap_or(8) as usize;
        let buckets: Vec<Buckets> = c
            .resolutions()
            .map_err(err)?
            .into_iter()
            .map(|res| Buckets::new(res, step, c.aspect_ratio_bucketing))
            .collect();

        let tensorboard = if c.tensorboard {
            Some(
                EventWriter::create(&workspace.join("tensorboard")).map_err(|e| {
                    TrainError(format!("tensorboard: {}: {e}", workspace.display()))
                })?,
            )
        } else {
            None
        };
        let cache_dir = TrainConfig::path(base, &c.cache_dir);
        if c.clear_cache_before_training {
            let _ = std::fs::remove_dir_all(cache_dir.join("latents"));
        }
        let model_path = TrainConfig::path(base, &c.base_model_name);
        let modified = std::fs::metadata(&model_path)
            .and_then(|m| m.modified())
            .map(|t| format!("{t:?}"))
            .unwrap_or_default();
        let mut identity = info.clone();
        if let Some(o) = identity.as_object_mut() {
            o.remove("adaptable_layers");
        }
        let model_identity = format!("{} {modified} {identity}", model_path.display());
        let mut t = Self {
            cache_entries: Default::default(),
            cache_dir,
            model_identity,
            tensorboard,
            groups: Vec::new(),
            batches_per_epoch: 0,
            progress: Progress::default(),
            config: config.clone(),
            base: base.into(),
            workspace,
            registry,
            arch,
            model,
            schedule,
            info,
            data,
            validation,
            buckets,
        };
        t.batches_per_epoch = data::plan_epoch(&t.data, &t.config, &t.buckets, 0).len();
        t.groups = t.make_groups()?;
        if t.config.continue_last_backup
            && let Some(b) = t.last_backup()
        {
            t.restore(&b)?;
        }
        Ok(t)
    }

    fn make_groups(&self) -> Result<Vec<Group>> {
        let c = &self.config;
        let named: Vec<(String, Tensor)> = if c.training_method == "lora" {
            adapters::clear();
            let filter = select::LayerFilter::new(
                &c.lora_layer_preset,
                &c.lora_layers,
                c.layer_filter_regex,
            )
            .map_err(err)?;
            let layers: Vec<_> = select::select(&self.model.layers, &filter, c.text_encoder.train)
                .into_iter()
                .filter(|l| c.unet.train || !l.name.starts_with("unet."))
                .collect();
            let opts = AdapterOptions {
                kind: c.peft_type.clone(),
                rank: c.lora_rank,
                alpha: c.lora_alpha,
                dropout: c.lora_dropout,
                dora: c.lora_decompose,
                seed: c.seed,
            };
            adapters::create(&self.registry, &self.model, &layers, &opts).map_err(err)?;
            if !c.lora_base_model.is_empty() {
                adapters::resume(
                    &self.model,
                    &TrainConfig::path(&self.base, &c.lora_base_model),
                )
                .map_err(err)?;
            }
            adapters::set_training(true);
            adapters::parameters().map_err(err)?
        } else {
            let all = self.arch.parameters().map_err(err)?;
            for (_, t) in &all {
                t.set_requires_grad(false).map_err(err)?;
            }
            all
        };
        let (opt_id, opt_options) = c.optimizer_options();
        let mut groups = Vec::new();
        for (part, pc) in [("unet", &c.unet), ("text_encoder", &c.text_encoder)] {
            if !pc.train {
                continue;
            }
            let (names, params): (Vec<String>, Vec<Tensor>) = named
                .iter()
                .filter(|(n, _)| n.starts_with(&format!("{part}.")))
                .map(|(n, t)| (n.clone(), t.clone()))
                .unzip();
            if params.is_empty() {
                continue;
            }
            for p in &params {
                p.set_requires_grad(true).map_err(err)?;
            }
            let optimizer = self
                .registry
                .optimizer(&opt_id, &opt_options.to_string())
                .map_err(err)?;
            let ema = if c.ema == "off" {
                None
            } else {
                Some(
                    params
                        .iter()
                        .map(|p| p.detach())
                        .collect::<ferrite_plugin_api::Result<Vec<_>>>()
                        .map_err(err)?,
                )
            };
            groups.push(Group {
                part: part.into(),
                names,
                params,
                optimizer,
                lr: pc.learning_rate.unwrap_or(c.learning_rate),
                ema,
            });
        }
        if groups.is_empty() {
            return Err(TrainError(
                "nothing to train: no parameters in the parts marked train".into(),
            ));
        }
        Ok(groups)
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        (self.config.epochs * self.batches_per_epoch / self.config.gradient_accumulation_steps)
            as u64
    }

    /// The learning-rate factor at `step`: warmup, then the schedule.
    pub fn lr_factor(&self, step: u64) -> f64 {
        let c = &self.config;
        let total = self.total_steps().max(1) as f64;
        let warmup = if c.learning_rate_warmup_steps <= 1.0 {
            c.learning_rate_warmup_steps * total
        } else {
            c.learning_rate_warmup_steps
        };
        let s = step as f64;
        if s < warmup {
            return (s + 1.0) / warmup;
        }
        let p = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
        let pi = std::f64::consts::PI;
        match c.learning_rate_scheduler.as_str() {
            "linear" => 1.0 - p,
            "cosine" => 0.5 * (1.0 + (pi * p).cos()),
            "cosine_with_restarts" => {
                0.5 * (1.0 + (pi * ((c.learning_rate_cycles * p) % 1.0)).cos())
            }
            _ => 1.0,
        }
    }

    /// The loss of one batch (divided by the accumulation steps), on the device.
    fn batch_loss(&self, plan: &data::BatchPlan, index: u64) -> Result<Tensor> {
        let c = &self.config;
        let mut r = data::rng(c.seed, RNG_BATCH, index);
        let mut batch = Batch {
            bucket: plan.bucket,
            ..Batch::default()
        };
        let mut encoded = Vec::new();
        for &i in &plan.items {
            let item = &self.data.items[i];
            let concept = &c.concepts[item.concept];
            let p = if c.latent_caching {
                let variation = plan.epoch % concept.image_variations as u64;
                let (mean, logvar, mask) = self.cached(item, concept, plan.bucket, variation)?;
                encoded.push((mean, logvar));
                data::Prepared {
                    pixels: Vec::new(),
                    mask,
                }
            } else {
                data::prepare(item, concept, plan.bucket, &mut r).map_err(err)?
            };
            batch.pixels.extend(p.pixels);
            // Now and then a step sees the whole image, as OneTrainer's unmasked_probability.
            if c.masked_training && r.random_bool(c.unmasked_probability) {
                batch.masks.extend(std::iter::repeat_n(1.0, p.mask.len()));
            } else {
                batch.masks.extend(p.mask);
            }
            let caption = data::vary_caption(
                &item.captions[r.random_range(0..item.captions.len())],
                concept,
                &mut r,
            );
            let dropped = r.random_bool(c.text_encoder.dropout_probability);
            batch
                .prompts
                .push(if dropped { String::new() } else { caption });
            batch.weights.push(concept.loss_weight);
            batch.prior.push(concept.kind == "prior");
        }
        if !encoded.is_empty() {
            let cat = |f: fn(&(Tensor, Tensor)) -> &Tensor| {
                Tensor::cat(&encoded.iter().map(f).collect::<Vec<_>>(), 0)
            };
            batch.encoded = Some((cat(|e| &e.0).map_err(err)?, cat(|e| &e.1).map_err(err)?));
        }
        let n = self.schedule.alphas_cumprod.len();
        let (lo, hi) = (
            (c.min_noising_strength * n as f64) as usize,
            ((c.max_noising_strength * n as f64) as usize).clamp(1, n),
        );
        let timesteps: Vec<usize> = (0..plan.items.len())
            .map(|_| match c.timestep_distribution.as_str() {
                "logit_normal" => {
                    let z: f64 =
                        rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut r);
                    let u = 1.0 / (1.0 + (-z).exp());
                    (lo + (u * (hi - lo) as f64) as usize).min(hi - 1)
                }
                _ => r.random_range(lo..hi),
            })
            .collect();
        let noise_rng =
            Generator::new(data::rng(c.seed, RNG_NOISE, index).random::<u64>()).map_err(err)?;
        self.loss(&batch, &timesteps, &noise_rng)
    }

    /// The loss of a batch noised to `timesteps` with noise from `noise_rng`, divided by the
    /// accumulation steps.
    fn loss(&self, batch: &Batch, timesteps: &[usize], noise_rng: &Generator) -> Result<Tensor> {
        let c = &self.config;
        let Batch {
            bucket: (w, h),
            pixels,
            encoded,
            masks,
            prompts,
            weights,
            prior,
        } = batch;
        let (w, h) = (*w, *h);
        let b = prompts.len();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let text = self.arch.encode_text(&refs).map_err(err)?.remove(0);

        let (mean, logvar) = match encoded {
            Some((m, l)) => (m.clone(), l.clone()),
            None => {
                let images = Tensor::from_f32(pixels, &[b, 3, h, w]).map_err(err)?;
                self.arch.vae_encode(&images).map_err(err)?
            }
        };
        let scaling = self.info["scaling_factor"].as_f64().unwrap_or(1.0);
        let shift = self.info["shift_factor"].as_f64().unwrap_or(0.0);
        let shape = mean.shape().map_err(err)?;
        let latents = (|| {
            mean.add(
                &logvar
                    .mul_scalar(0.5)?
                    .exp()?
                    .mul(&Tensor::randn(&shape, noise_rng)?)?,
            )?
            .sub_scalar(shift)?
            .mul_scalar(scaling)?
            .detach()
        })()
        .map_err(err)?;
        let mut noise = Tensor::randn(&shape, noise_rng).map_err(err)?;
        if c.offset_noise_weight > 0.0 {
            let offset = Tensor::randn(&[b, shape[1], 1, 1], noise_rng)
                .and_then(|o| o.mul_scalar(c.offset_noise_weight))
                .map_err(err)?;
            noise = noise.add(&offset).map_err(err)?;
        }

        let acp: Vec<f64> = timesteps
            .iter()
            .map(|&t| self.schedule.alphas_cumprod[t] as f64)
            .collect();
        let column = |v: Vec<f32>| Tensor::from_f32(&v, &[b, 1, 1, 1]);
        let a = column(acp.iter().map(|x| x.sqrt() as f32).collect()).map_err(err)?;
        let s = column(acp.iter().map(|x| (1.0 - x).sqrt() as f32).collect()).map_err(err)?;
        let tt = Tensor::from_f32(
            &timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            &[b],
        )
        .map_err(err)?;

        let loss = (|| {
            // Input perturbation (Ning et al.): the model sees extra noise it is not asked to
            // predict.
            let noisy = if c.perturbation_noise_weight > 0.0 {
                let extra =
                    Tensor::randn(&shape, noise_rng)?.mul_scalar(c.perturbation_noise_weight)?;
                latents.mul(&a)?.add(&noise.add(&extra)?.mul(&s)?)?
            } else {
                latents.mul(&a)?.add(&noise.mul(&s)?)?
            };
            let pred = self.arch.denoise(&noisy, &tt, &[&text])?;
            let mut target = match self.schedule.prediction {
                Prediction::Epsilon => noise.clone(),
                Prediction::VPrediction => noise.mul(&a)?.sub(&latents.mul(&s)?)?,
            };
            if prior.iter().any(|&p| p) {
                // Prior images learn to predict what the model predicts without its adapter.
                let base = adapters::without_adapters(|| self.arch.denoise(&noisy, &tt, &[&text]))?
                    .detach()?;
                let m = Tensor::from_f32(
                    &prior
                        .iter()
                        .map(|&p| if p { 1.0 } else { 0.0 })
                        .collect::<Vec<f32>>(),
                    &[b, 1, 1, 1],
                )?;
                target = base
                    .mul(&m)?
                    .add(&target.mul(&m.neg()?.add_scalar(1.0)?)?)?;
            }
            let mut diff = pred.sub(&target)?;
            let mut area = None;
            if c.masked_training {
                // The mask at latent size (mean over each f×f patch), as a loss weight between
                // unmasked_weight and 1.
                let f = self.info["vae_scale_factor"].as_u64().unwrap_or(1) as i64;
                let (lh, lw) = (h as i64 / f, w as i64 / f);
                let m = Tensor::from_f32(masks, &[b, 1, h, w])?
                    .reshape(&[b as i64, 1, lh, f, lw, f])?
                    .mean(&[3, 5], false)?;
                let weight = m
                    .mul_scalar(1.0 - c.unmasked_weight)?
                    .add_scalar(c.unmasked_weight)?;
                // The square root, so the squared error is weighted by the mask itself.
                diff = diff.mul(&weight.sqrt()?)?;
                area = Some(m.mean(&[1, 2, 3], false)?.clamp(Some(1e-6), None)?);
            }
            let mut per = diff
                .powf(2.0)?
                .mean(&[1, 2, 3], false)?
                .mul_scalar(c.mse_strength)?;
            if let (Some(a), true) = (&area, c.normalize_masked_area_loss) {
                per = per.div(a)?;
            }
            if c.mae_strength > 0.0 {
                per = per.add(
                    &diff
                        .abs()?
                        .mean(&[1, 2, 3], false)?
                        .mul_scalar(c.mae_strength)?,
                )?;
            }
            if c.huber_strength > 0.0 {
                per = per.add(
                    &huber(&diff, c.huber_delta)?
                        .mean(&[1, 2, 3], false)?
                        .mul_scalar(c.huber_strength)?,
                )?;
            }
            // Timestep loss weights, and the concepts' loss weights.
            let w: Vec<f32> = acp
                .iter()
                .zip(weights)
                .map(|(&x, &cw)| {
                    let lw = loss_weight(
                        &c.loss_weight_fn,
                        c.loss_weight_strength,
                        x / (1.0 - x),
                        self.schedule.prediction,
                    );
                    (lw * cw) as f32
                })
                .collect();
            per.mul(&Tensor::from_f32(&w, &[b])?)?
                .mean_all()?
                .div_scalar(c.gradient_accumulation_steps as f64)
        })()
        .map_err(err)?;
        Ok(loss)
    }

    /// Trains to the end (or until cancelled), reporting through `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        on_event(Event::Started {
            items: self.data.items.len(),
            problems: self.data.problems.clone(),
            steps: self.total_steps(),
        });
        let accum = self.config.gradient_accumulation_steps;
        let mut acc: Vec<Vec<Option<Tensor>>> = Vec::new();
        let mut acc_loss = 0.0f32;
        let mut in_accum = 0;
        while (self.progress.epoch as usize) < self.config.epochs {
            let plan =
                data::plan_epoch(&self.data, &self.config, &self.buckets, self.progress.epoch);
            while self.progress.batch_in_epoch < plan.len() {
                // Stopping keeps the work: a backup at the step reached (between steps only).
                if in_accum == 0 && crate::runtime::is_cancelled() {
                    if self.last_backup() != Some(self.backups_dir().join(self.backup_name())) {
                        on_event(Event::Backup(self.backup()?));
                    }
                    return Ok(());
                }
                let batch = &plan[self.progress.batch_in_epoch];
                let loss = self.batch_loss(batch, self.progress.batches)?;
                let grads = loss.backward().map_err(err)?;
                // The logged figure: one host read per batch.
                acc_loss += loss.item().map_err(err)?;
                let mut new = Vec::new();
                for (gi, g) in self.groups.iter().enumerate() {
                    let mut row = Vec::new();
                    for (pi, p) in g.params.iter().enumerate() {
                        let grad = grads.get(p).map_err(err)?;
                        let prev = acc.get(gi).and_then(|r| r.get(pi)).cloned().flatten();
                        row.push(match (prev, grad) {
                            (Some(a), Some(b)) => Some(a.add(&b).map_err(err)?),
                            (a, b) => b.or(a),
                        });
                    }
                    new.push(row);
                }
                acc = new;
                self.progress.batch_in_epoch += 1;
                self.progress.batches += 1;
                in_accum += 1;
                if in_accum < accum {
                    continue;
                }
                if !acc_loss.is_finite() {
                    return Err(TrainError(format!(
                        "the loss became {acc_loss} at step {} (epoch {}): stopping; {}",
                        self.progress.step,
                        self.progress.epoch,
                        match self.last_backup() {
                            Some(b) => format!("the last good backup is {}", b.display()),
                            None => "there is no backup yet".into(),
                        }
                    )));
                }
                let lr_factor = self.lr_factor(self.progress.step);
                self.apply(std::mem::take(&mut acc), lr_factor)?;
                self.progress.step += 1;
                if self
                    .progress
                    .step
                    .is_multiple_of(self.config.ema_update_step_interval)
                {
                    self.update_ema()?;
                }
                let lr = self.config.learning_rate * lr_factor;
                self.log_scalar("loss/train", acc_loss);
                self.log_scalar("learning_rate", lr as f32);
                on_event(Event::Step {
                    step: self.progress.step,
                    epoch: self.progress.epoch,
                    loss: acc_loss,
                    lr,
                });
                acc_loss = 0.0;
                in_accum = 0;
                self.after("step", self.progress.step, &mut on_event)?;
            }
            self.progress.epoch += 1;
            self.progress.batch_in_epoch = 0;
            self.after("epoch", self.progress.epoch, &mut on_event)?;
        }
        let out = self.save_output()?;
        on_event(Event::Saved(out));
        Ok(())
    }

    /// Clips the accumulated gradients and steps each part's optimizer.
    fn apply(&mut self, grads: Vec<Vec<Option<Tensor>>>, lr_factor: f64) -> Result<()> {
        let clip = self.config.clip_grad_norm;
        let scale = if clip > 0.0 {
            let mut sq: Option<Tensor> = None;
            for g in grads.iter().flatten().flatten() {
                let s = g.powf(2.0).and_then(|x| x.sum_all()).map_err(err)?;
                sq = Some(match sq {
                    Some(acc) => acc.add(&s).map_err(err)?,
                    None => s,
                });
            }
            // min(1, clip / (‖g‖ + 1e-6)), on the device.
            sq.map(|s| {
                s.sqrt()?
                    .add_scalar(1e-6)?
                    .powf(-1.0)?
                    .mul_scalar(clip)?
                    .clamp(None, Some(1.0))
            })
            .transpose()
            .map_err(err)?
        } else {
            None
        };
        for (g, row) in self.groups.iter_mut().zip(grads) {
            let (mut params, mut gs) = (Vec::new(), Vec::new());
            for (p, grad) in g.params.iter().zip(row) {
                if let Some(grad) = grad {
                    let grad = match &scale {
                        Some(s) => grad.mul(s).map_err(err)?,
                        None => grad,
                    };
                    params.push(p);
                    gs.push(grad);
                }
            }
            let grefs: Vec<&Tensor> = gs.iter().collect();
            g.optimizer
                .step(&params, &grefs, g.lr * lr_factor)
                .map_err(err)?;
        }
        Ok(())
    }

    /// ema ← d·ema + (1 − d)·param, with d warming up as (1 + step)/(10 + step) towards
    /// `ema_decay` (OneTrainer's and diffusers' rule).
    fn update_ema(&mut self) -> Result<()> {
        let s = self.progress.step as f64;
        let d = self.config.ema_decay.min((1.0 + s) / (10.0 + s));
        for g in &self.groups {
            let Some(ema) = &g.ema else { continue };
            for (e, p) in ema.iter().zip(&g.params) {
                let next = e
                    .mul_scalar(d)
                    .and_then(|x| x.add(&p.detach()?.mul_scalar(1.0 - d)?))
                    .map_err(err)?;
                e.assign(&next).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the EMA weights in place of the trained ones (when EMA is on).
    fn with_ema_weights<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut kept = Vec::new();
        for g in &self.groups {
            let Some(ema) = &g.ema else { continue };
            for (e, p) in ema.iter().zip(&g.params) {
                kept.push((p.clone(), p.detach().map_err(err)?));
                p.assign(e).map_err(err)?;
            }
        }
        let out = f();
        for (p, v) in kept {
            p.assign(&v).map_err(err)?;
        }
        out
    }

    /// The encoded image (VAE mean and log-variance, `[1, C, h, w]`) and its prepared mask for
    /// one variation, from the cache or encoded and cached now (see [`Trainer::cache_entry`]).
    fn cached(
        &self,
        item: &data::Item,
        concept: &ConceptConfig,
        bucket: (usize, usize),
        variation: u64,
    ) -> Result<(Tensor, Tensor, Vec<f32>)> {
        let (path, seed) = self.cache_entry(item, concept, bucket, variation)?;
        let (w, hgt) = bucket;
        if let Ok(f) = Weights::open(&path.to_string_lossy()) {
            let get = |k: &str| f.get(k, DType::F32);
            if let (Ok(m), Ok(l), Ok(mask)) = (get("mean"), get("logvar"), get("mask")) {
                return Ok((m, l, mask.to_vec().map_err(err)?));
            }
        }
        let p = data::prepare(item, concept, bucket, &mut data::rng(seed, 0, 0)).map_err(err)?;
        let images = Tensor::from_f32(&p.pixels, &[1, 3, hgt, w]).map_err(err)?;
        let (mean, logvar) = self.arch.vae_encode(&images).map_err(err)?;
        let (mean, logvar) = (mean.detach().map_err(err)?, logvar.detach().map_err(err)?);
        let mask = Tensor::from_f32(&p.mask, &[hgt, w]).map_err(err)?;
        std::fs::create_dir_all(path.parent().expect("cache folder")).map_err(err)?;
        ferrite_plugin_api::save_safetensors(
            &path.to_string_lossy(),
            &[("mean", &mean), ("logvar", &logvar), ("mask", &mask)],
            &[],
        )
        .map_err(err)?;
        Ok((mean, logvar, p.mask))
    }

    /// The cache file of one image variation and the seed of its augmentation, both from a hash
    /// of the image and mask files, the bucket, the concept's image settings, the variation, the
    /// seed and the model, so a change to any of them re-encodes that image only. Worked out once
    /// per run: the files are read for it the first time only.
    fn cache_entry(
        &self,
        item: &data::Item,
        concept: &ConceptConfig,
        bucket: (usize, usize),
        variation: u64,
    ) -> Result<(PathBuf, u64)> {
        use sha2::{Digest, Sha256};
        let memo_key = (item.path.clone(), bucket, variation);
        let mut memo = self.cache_entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = memo.get(&memo_key) {
            return Ok(entry.clone());
        }
        let mut image_settings = serde_json::to_value(concept).map_err(err)?;
        if let Some(o) = image_settings.as_object_mut() {
            // What does not change the encoded image.
            for k in [
                "name",
                "enabled",
                "type",
                "path",
                "include_subdirectories",
                "prompt_source",
                "text_file",
                "balancing",
                "balancing_strategy",
                "loss_weight",
            ] {
                o.remove(k);
            }
        }
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| TrainError(format!("{}: {e}", p.display())));
        let mut h = Sha256::new();
        h.update(b"ferrite latent cache v1\0");
        h.update(read(&item.path)?);
        if let Some(m) = &item.mask {
            h.update(read(m)?);
        }
        h.update(
            format!(
                "{bucket:?} {image_settings} {variation} {} {}",
                self.config.seed, self.model_identity
            )
            .as_bytes(),
        );
        let digest = h.finalize();
        let key: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let entry = (
            self.cache_dir
                .join("latents")
                .join(format!("{key}.safetensors")),
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")),
        );
        memo.insert(memo_key, entry.clone());
        Ok(entry)
    }

    /// Writes a scalar to the TensorBoard file; a failure is logged, not fatal.
    fn log_scalar(&mut self, tag: &str, v: f32) {
        let step = self.progress.step;
        if let Some(tb) = &mut self.tensorboard
            && let Err(e) = tb.scalar(tag, step, v)
        {
            tracing::warn!("tensorboard {}: {e}", tb.path().display());
        }
    }

    /// The loss of each validation concept at fixed timesteps and noise, so that the figures of
    /// one run can be compared with each other: (concept name, mean loss).
    pub fn validate(&self) -> Result<Vec<(String, f32)>> {
        let c = &self.config;
        let n = self.schedule.alphas_cumprod.len() as f64;
        let (lo, hi) = (c.min_noising_strength * n, c.max_noising_strength * n);
        let timesteps: Vec<usize> = (0..VALIDATION_TIMESTEPS)
            .map(|k| (lo + (k as f64 + 0.5) * (hi - lo) / VALIDATION_TIMESTEPS as f64) as usize)
            .collect();
        let mut out = Vec::new();
        for (ci, concept) in c.concepts.iter().enumerate() {
            let items: Vec<_> = self
                .validation
                .items
                .iter()
                .enumerate()
                .filter(|(_, it)| it.concept == ci)
                .collect();
            if items.is_empty() {
                continue;
            }
            let fixed = ConceptConfig {
                enable_crop_jitter: false,
                enable_random_flip: false,
                ..concept.clone()
            };
            let mut total = 0.0;
            for (ii, item) in &items {
                let mut r = data::rng(c.seed, RNG_VALIDATION, *ii as u64);
                let bucket = self.buckets[0].nearest(item.width as usize, item.height as usize);
                let p = data::prepare(item, &fixed, bucket, &mut r).map_err(err)?;
                let t = timesteps.len();
                let batch = Batch {
                    bucket,
                    encoded: None,
                    pixels: (0..t).flat_map(|_| p.pixels.iter().copied()).collect(),
                    masks: (0..t).flat_map(|_| p.mask.iter().copied()).collect(),
                    prompts: vec![item.captions[0].clone(); t],
                    weights: vec![1.0; t],
                    prior: vec![false; t],
                };
                let noise = Generator::new(r.random::<u64>()).map_err(err)?;
                let loss = self.loss(&batch, &timesteps, &noise)?;
                total += loss.item().map_err(err)? * c.gradient_accumulation_steps as f32;
            }
            out.push((concept.name.clone(), total / items.len() as f32));
        }
        Ok(out)
    }

    /// Samples, backups and saves due after `count` units of `unit`.
    fn after(&mut self, unit: &str, count: u64, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let c = &self.config;
        let due =
            |every: f64, u: &str| u == unit && every >= 1.0 && count.is_multiple_of(every as u64);
        let (validate, sample, backup, save) = (
            c.validation && due(c.validate_after, &c.validate_after_unit),
            due(c.sample_after, &c.sample_after_unit),
            due(c.backup_after, &c.backup_after_unit),
            due(c.save_every, &c.save_every_unit),
        );
        if validate {
            for (concept, loss) in self.validate()? {
                self.log_scalar(&format!("loss/validation/{concept}"), loss);
                on_event(Event::Validation {
                    step: self.progress.step,
                    concept,
                    loss,
                });
            }
        }
        if sample {
            for p in self.sample()? {
                on_event(Event::Sample(p));
            }
        }
        if backup {
            on_event(Event::Backup(self.backup()?));
        }
        if save {
            on_event(Event::Saved(self.save_output()?));
        }
        Ok(())
    }

    /// Writes a PNG per configured sample under `workspace/samples/<n>-<prompt>/<step>.png`.
    pub fn sample(&mut self) -> Result<Vec<PathBuf>> {
        adapters::set_training(false);
        let mut out = Vec::new();
        for (i, s) in self.config.samples.iter().enumerate() {
            let sampler = match s.sampler.as_str() {
                "ddim" => Sampler::Ddim,
                "euler_a" => Sampler::EulerAncestral,
                "dpmpp_2m_karras" => Sampler::DpmPp2mKarras,
                _ => Sampler::Euler,
            };
            let req = generate::SampleRequest {
                prompt: s.prompt.clone(),
                negative_prompt: s.negative_prompt.clone(),
                steps: s.diffusion_steps,
                cfg: s.cfg_scale,
                seed: s.seed,
                width: s.width,
                height: s.height,
                sampler,
                init_noise: None,
            };
            let rgb = generate::generate(&self.arch, &req, || {}).map_err(err)?;
            let slug: String = s
                .prompt
                .chars()
                .map(|ch| {
                    if ch.is_alphanumeric() {
                        ch.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .take(40)
                .collect();
            let path = self
                .workspace
                .join("samples")
                .join(format!("{i}-{slug}"))
                .join(format!("{:06}.png", self.progress.step));
            std::fs::create_dir_all(path.parent().expect("sample folder")).map_err(err)?;
            generate::write_png(&path, s.width, s.height, rgb).map_err(err)?;
            if let Some(tb) = &mut self.tensorboard {
                let tag = format!("samples/{i}-{slug}");
                let written = std::fs::read(&path).and_then(|png| {
                    tb.image(
                        &tag,
                        self.progress.step,
                        s.width as u32,
                        s.height as u32,
                        &png,
                    )
                });
                if let Err(e) = written {
                    tracing::warn!("tensorboard {}: {e}", tb.path().display());
                }
            }
            out.push(path);
        }
        adapters::set_training(true);
        Ok(out)
    }

    fn backup_name(&self) -> String {
        format!("backup-{:09}", self.progress.step)
    }

    fn backups_dir(&self) -> PathBuf {
        self.workspace.join("backup")
    }

    /// The newest complete backup.
    pub fn last_backup(&self) -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.backups_dir())
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
                    && p.join("state.json").exists()
            })
            .collect();
        dirs.sort();
        dirs.pop()
    }

    /// Writes the full state (trainable tensors, optimizer states, progress, config) to a new
    /// backup folder: built under a temporary name, then renamed; older ones beyond
    /// `rolling_backup_count` are removed.
    pub fn backup(&mut self) -> Result<PathBuf> {
        let dir = self.backups_dir();
        let name = self.backup_name();
        let tmp = dir.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(err)?;
        for g in &self.groups {
            let named: Vec<(&str, &Tensor)> = g
                .names
                .iter()
                .map(String::as_str)
                .zip(g.params.iter())
                .collect();
            let p = tmp.join(format!("{}.safetensors", g.part));
            ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[]).map_err(err)?;
            let state = g.optimizer.state().map_err(err)?;
            let named: Vec<(&str, &Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let p = tmp.join(format!("{}-optimizer.safetensors", g.part));
            ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[]).map_err(err)?;
            if let Some(ema) = &g.ema {
                let named: Vec<(&str, &Tensor)> =
                    g.names.iter().map(String::as_str).zip(ema.iter()).collect();
                let p = tmp.join(format!("{}-ema.safetensors", g.part));
                ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[])
                    .map_err(err)?;
            }
        }
        crate::fsutil::write_atomic(&tmp.join("config.toml"), self.config.to_toml().as_bytes())
            .map_err(err)?;
        let state = serde_json::to_vec_pretty(&self.progress).map_err(err)?;
        crate::fsutil::write_atomic(&tmp.join("state.json"), &state).map_err(err)?;
        let path = dir.join(&name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::rename(&tmp, &path).map_err(err)?;
        let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
            })
            .collect();
        all.sort();
        let keep = self.config.rolling_backup_count.max(1);
        for old in all.iter().take(all.len().saturating_sub(keep)) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(path)
    }

    /// Loads a backup written by [`Trainer::backup`] into this run.
    fn restore(&mut self, dir: &Path) -> Result<()> {
        let shown = dir.display();
        for g in &mut self.groups {
            let w = Weights::open(
                &dir.join(format!("{}.safetensors", g.part))
                    .to_string_lossy(),
            )
            .map_err(err)?;
            for (name, p) in g.names.iter().zip(&g.params) {
                let t = w.get(name, DType::F32).map_err(|e| {
                    TrainError(format!(
                        "backup {shown}: {e} (the config's trained layers changed since the backup?)"
                    ))
                })?;
                let (want, got) = (p.shape().map_err(err)?, t.shape().map_err(err)?);
                if want != got {
                    return Err(TrainError(format!(
                        "backup {shown}: `{name}` has shape {got:?} but this config makes {want:?} \
                         (lora_rank or the model changed since the backup)"
                    )));
                }
                p.assign(&t).map_err(err)?;
            }
            let ow = Weights::open(
                &dir.join(format!("{}-optimizer.safetensors", g.part))
                    .to_string_lossy(),
            )
            .map_err(err)?;
            let state = ow
                .infos()
                .iter()
                .map(|i| Ok((i.key.to_string(), ow.get(&i.key, DType::F32)?)))
                .collect::<ferrite_plugin_api::Result<Vec<_>>>()
                .map_err(err)?;
            g.optimizer.load_state(&state).map_err(err)?;
            if let Some(ema) = &g.ema {
                let ew = Weights::open(
                    &dir.join(format!("{}-ema.safetensors", g.part))
                        .to_string_lossy(),
                )
                .map_err(|e| TrainError(format!("backup {shown}: {e} (EMA was off then?)")))?;
                for (name, e) in g.names.iter().zip(ema) {
                    e.assign(&ew.get(name, DType::F32).map_err(err)?)
                        .map_err(err)?;
                }
            }
        }
        let text = std::fs::read_to_string(dir.join("state.json")).map_err(err)?;
        self.progress = serde_json::from_str(&text)
            .map_err(|e| TrainError(format!("backup {shown}: state.json: {e}")))?;
        tracing::info!("resumed from {shown} at step {}", self.progress.step);
        Ok(())
    }

    /// The trained adapter (kohya/diffusers/comfy) or, for a fine-tune, the trained parts'
    /// tensors under their diffusers names.
    pub fn save_output(&self) -> Result<PathBuf> {
        self.with_ema_weights(|| self.write_output())
    }

    fn write_output(&self) -> Result<PathBuf> {
        let c = &self.config;
        let path = TrainConfig::path(&self.base, &c.output_model_destination);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        if c.training_method == "lora" {
            let format: Format = c.output_model_format.parse().map_err(err)?;
            let meta = [
                ("ss_learning_rate", c.learning_rate.to_string()),
                (
                    "ss_unet_lr",
                    c.unet.learning_rate.unwrap_or(c.learning_rate).to_string(),
                ),
                (
                    "ss_text_encoder_lr",
                    c.text_encoder
                        .learning_rate
                        .unwrap_or(c.learning_rate)
                        .to_string(),
                ),
                ("ss_epoch", self.progress.epoch.to_string()),
                ("ss_steps", self.progress.step.to_string()),
                ("ss_max_train_steps", self.total_steps().to_string()),
                ("ss_num_train_images", self.data.items.len().to_string()),
                ("ss_batch_size_per_device", c.batch_size.to_string()),
                (
                    "ss_gradient_accumulation_steps",
                    c.gradient_accumulation_steps.to_string(),
                ),
                ("ss_lr_scheduler", c.learning_rate_scheduler.clone()),
                (
                    "ss_lr_warmup_steps",
                    c.learning_rate_warmup_steps.to_string(),
                ),
                ("ss_optimizer", c.optimizer_options().0),
                ("ss_seed", c.seed.to_string()),
                ("ss_resolution", c.resolution.clone()),
                ("ss_noise_offset", c.offset_noise_weight.to_string()),
                ("ss_max_grad_norm", c.clip_grad_norm.to_string()),
                (
                    "ss_caption_dropout_rate",
                    c.text_encoder.dropout_probability.to_string(),
                ),
                ("ss_training_comment", "trained with Ferrite".into()),
            ]
            .map(|(k, v)| (k.to_string(), v));
            adapters::save(&path, format, "sd_v1", &meta).map_err(err)?;
        } else {
            self.save_diffusers_folder(&path)?;
        }
        Ok(path)
    }

    /// A fine-tune as a diffusers folder: the base folder's configs, tokenizer, scheduler and
    /// VAE, with the model's UNet and text-encoder tensors as they are now.
    fn save_diffusers_folder(&self, out: &Path) -> Result<()> {
        let base = TrainConfig::path(&self.base, &self.config.base_model_name);
        if !base.is_dir() {
            return Err(TrainError(format!(
                "saving a fine-tune of {} needs a diffusers folder as the base model (saving \
                 single-file checkpoints is not built yet)",
                base.display()
            )));
        }
        copy_except_weights(&base, out)?;
        let all = self.arch.parameters().map_err(err)?;
        for (prefix, file) in [
            ("unet.", "unet/diffusion_pytorch_model.safetensors"),
            ("text_encoder.", "text_encoder/model.safetensors"),
        ] {
            let named: Vec<(&str, &Tensor)> = all
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k, t)))
                .collect();
            ferrite_plugin_api::save_safetensors(&out.join(file).to_string_lossy(), &named, &[])
                .map_err(err)?;
        }
        Ok(())
    }

    /// The trainable tensors by name (for tests and tools).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.groups
            .iter()
            .flat_map(|g| g.names.iter().cloned().zip(g.params.iter().cloned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huber_is_quadratic_then_linear() {
        crate::runtime::init("cpu").unwrap();
        let d = [-3.0f32, -1.0, -0.5, 0.0, 0.25, 2.0];
        let t = Tensor::from_f32(&d, &[6]).unwrap();
        let got = huber(&t, 1.0).unwrap().to_vec().unwrap();
        let want: Vec<f32> = d
            .iter()
            .map(|&x| {
                if x.abs() <= 1.0 {
                    0.5 * x * x
                } else {
                    x.abs() - 0.5
                }
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn timestep_weights() {
        let e = Prediction::Epsilon;
        assert_eq!(loss_weight("constant", 5.0, 3.0, e), 1.0);
        assert_eq!(loss_weight("min_snr_gamma", 5.0, 10.0, e), 0.5);
        assert_eq!(loss_weight("min_snr_gamma", 5.0, 2.0, e), 1.0);
        assert_eq!(
            loss_weight("min_snr_gamma", 5.0, 10.0, Prediction::VPrediction),
            5.0 / 11.0
        );
        assert_eq!(loss_weight("debiased_estimation", 0.0, 4.0, e), 0.5);
        assert_eq!(loss_weight("p2", 1.0, 3.0, e), 0.25);
    }
}
