//! The trainer: LoRA-family adapters or a full fine-tune of the parts marked `train`, one
//! optimizer (plugin) per part with its own learning rate, epsilon or v targets, noise and
//! timesteps drawn from the seed and the step, gradient accumulation and clipping, learning-rate
//! schedules with warmup, samples, rolling backups and exact resume, and the final save.
//!
//! Every random draw at a point of the run comes from (seed, purpose, index), and the data order
//! of an epoch from (seed, epoch): a run resumed from a backup repeats the uninterrupted one.

mod backup;
mod batch;
mod debug;
mod ema;
mod output;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrite_plugin_api::{
    Generator, Param, Tensor,
    plugin::{ArchitectureHandle, OptimizerHandle},
};
use rand::Rng;

use crate::adapters::{ModelLayers, select};
use crate::config::TrainConfig;
use crate::data::loader::{self, Prefetch};
use crate::data::{self, Dataset, buckets::Buckets};
use crate::plugins::Registry;
use crate::runtime::{Cancel, Device, Scope};
use crate::sample::{NoiseSchedule, Sampler, SchedulerConfig, generate};
use crate::train::cache::Caches;
use crate::train::tensorboard::EventWriter;
use crate::train::timesteps::Timesteps;
use batch::Batch;
pub use batch::Probe;
use ema::Ema;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrainError(pub String);

type Result<T> = std::result::Result<T, TrainError>;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError(e.to_string())
}

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
        /// How long this step waited for its batches from the data loader.
        data_wait: Duration,
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
    /// The run waits (true) or goes on (false), as [`Controls::pause`] asked.
    Paused(bool),
}

/// Requests to a running trainer from another thread (the GUI, Ctrl-C), seen between steps.
#[derive(Debug, Default)]
pub struct Controls {
    /// Stop: a backup at the step reached and the output model, then the run ends.
    pub cancel: Cancel,
    pub pause: AtomicBool,
    pub sample_now: AtomicBool,
    pub backup_now: AtomicBool,
}

/// A model part's trainable tensors and their optimizer.
struct Group {
    part: String,
    names: Vec<String>,
    params: Vec<Tensor>,
    optimizer: OptimizerHandle,
    lr: f64,
    /// The moving average of `params`, when EMA is on.
    ema: Option<Ema>,
    /// It stopped training (stop_training_after) and keeps its weights from then on.
    stopped: bool,
}

pub struct Trainer {
    pub config: TrainConfig,
    /// The config file's folder: relative paths start there.
    base: PathBuf,
    workspace: PathBuf,
    registry: Registry,
    arch: ArchitectureHandle,
    model: Arc<ModelLayers>,
    /// The runtime, stop flag and adapters the run's plugin calls reach.
    scope: Scope,
    schedule: NoiseSchedule,
    info: serde_json::Value,
    data: Arc<Dataset>,
    validation: Dataset,
    /// One bucket set per resolution of the config (validation uses the first).
    buckets: Vec<Buckets>,
    groups: Vec<Group>,
    pub progress: Progress,
    batches_per_epoch: usize,
    tensorboard: Option<EventWriter>,
    caches: Arc<Caches>,
    timesteps: Arc<Timesteps>,
    /// The text encoder is frozen and latents are cached: its states are cached too.
    text_cached: bool,
    /// When this process started training, and when each timed action last ran.
    started: Instant,
    last_done: std::collections::HashMap<&'static str, Instant>,
    resumed_from: Option<PathBuf>,
    controls: Arc<Controls>,
    /// With debug_mode: what the last batch trained on, for the debug images.
    debug_last: Option<debug::Snapshot>,
}

const RNG_VALIDATION: u64 = 4;
const RNG_DROPOUT: u64 = 6;

/// While it lives, the trained tensors record no autodiff graph (sampling and validation need
/// none, and building it made sampling several times slower).
struct Untracked(Vec<Tensor>);

impl Untracked {
    fn new(groups: &[Group]) -> Result<Self> {
        let tracked: Vec<Tensor> = groups
            .iter()
            .filter(|g| !g.stopped)
            .flat_map(|g| g.params.iter().cloned())
            .collect();
        for p in &tracked {
            p.set_requires_grad(false).map_err(err)?;
        }
        Ok(Self(tracked))
    }
}

impl Drop for Untracked {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Err(e) = p.set_requires_grad(true) {
                tracing::error!("re-enabling gradients: {e}");
            }
        }
    }
}

/// Where `after` and `stop_parts` are called: after an optimizer step or an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    Step,
    Epoch,
}
/// Timesteps per validation image, evenly spread over the noising range.
const VALIDATION_TIMESTEPS: usize = 8;

impl Trainer {
    /// A run on the current runtime ([`crate::runtime::init`]'s, unless the thread entered
    /// another), stopped through its own [`Controls`].
    pub fn new(config: TrainConfig, base: &Path, registry: Registry) -> Result<Self> {
        let device = Device::current().ok_or_else(|| {
            TrainError("no compute device selected (runtime::init was not called)".into())
        })?;
        Self::on(device, Default::default(), config, base, registry)
    }

    /// Loads the model onto `device`, makes the trainable tensors and optimizers, reads the
    /// data, and resumes from the last backup when `continue_last_backup` is set. `controls`
    /// may be shared before the run starts (a stop asked for while loading is seen at once).
    pub fn on(
        device: Device,
        controls: Arc<Controls>,
        config: TrainConfig,
        base: &Path,
        registry: Registry,
    ) -> Result<Self> {
        let mut scope = Scope::new(device).with_cancel(controls.cancel.clone());
        let _loading = scope.enter();
        let c = &config;
        c.validate_plugin_options(&registry).map_err(err)?;
        let workspace = TrainConfig::path(base, &c.workspace_dir);
        std::fs::create_dir_all(&workspace)
            .map_err(|e| TrainError(format!("workspace_dir {}: {e}", workspace.display())))?;
        crate::fsutil::write_atomic(&workspace.join("config.toml"), c.to_toml().as_bytes())
            .map_err(err)?;

        let mut options = serde_json::json!({
            "model": TrainConfig::path(base, &c.base_model_name),
        });
        // CLIP skip is the model's business (training, validation and samples all encode
        // through it); only asked for when set, as not every architecture has it.
        if c.text_encoder_layer_skip > 0 {
            options["text_encoder_layer_skip"] = c.text_encoder_layer_skip.into();
        }
        if !c.base_model_config.is_empty() {
            options["config"] = TrainConfig::path(base, &c.base_model_config)
                .to_string_lossy()
                .into();
        }
        let arch = registry
            .architecture(&c.model_type, &options.to_string())
            .map_err(err)?;
        let info = arch.model_info().map_err(err)?;
        let mut scheduler =
            SchedulerConfig::from_json(&info["scheduler"].to_string(), "the model's scheduler")
                .map_err(err)?;
        if let Some(p) = c.forced_prediction() {
            scheduler.prediction_type = p.into();
        }
        let schedule = NoiseSchedule::new(scheduler).map_err(err)?;
        let model = Arc::new(ModelLayers::of(&arch).map_err(err)?);
        scope = scope.with_adapters(model.clone());
        let _scope = scope.enter();

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
        let caches = Caches::new(
            TrainConfig::path(base, &c.cache_dir),
            &TrainConfig::path(base, &c.base_model_name),
            &info,
            c.seed,
            c.text_encoder_layer_skip,
        );
        let timesteps = Timesteps::new(c, schedule.alphas_cumprod.len());
        let mut t = Self {
            caches: Arc::new(caches),
            timesteps: Arc::new(timesteps),
            text_cached: c.latent_caching && !c.text_encoder.train,
            started: Instant::now(),
            last_done: Default::default(),
            resumed_from: None,
            controls,
            scope,
            debug_last: None,
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
            data: Arc::new(data),
            validation,
            buckets,
        };
        t.check_destination()?;
        // Emptied only once the run is sure to start.
        if t.config.clear_cache_before_training {
            t.caches.clear();
        }
        t.batches_per_epoch = data::plan_epoch(&t.data, &t.config, &t.buckets, 0).len();
        t.groups = t.make_groups()?;
        if t.config.continue_last_backup
            && let Some(b) = t.last_backup()
        {
            t.restore(&b)?;
            t.resumed_from = Some(b);
        }
        Ok(t)
    }

    fn make_groups(&self) -> Result<Vec<Group>> {
        let c = &self.config;
        let named: Vec<(String, Tensor)> = if c.training_method == "lora" {
            self.model.clear();
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
            self.model
                .create(&self.registry, &layers, &c.adapter_options())
                .map_err(err)?;
            if !c.lora_base_model.is_empty() {
                self.model
                    .resume(&TrainConfig::path(&self.base, &c.lora_base_model))
                    .map_err(err)?;
            }
            self.model.set_training(true).map_err(err)?;
            self.model.parameters().map_err(err)?
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
            let ema = match c.ema.as_str() {
                "off" => None,
                on => Some(Ema::new(&params, on == "cpu").map_err(err)?),
            };
            groups.push(Group {
                part: part.into(),
                names,
                params,
                optimizer,
                lr: pc.learning_rate.unwrap_or(c.learning_rate),
                ema,
                stopped: false,
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

    /// The data loader's view of this run.
    fn loader_context(&self) -> Arc<loader::Context> {
        Arc::new(loader::Context {
            data: self.data.clone(),
            config: Arc::new(self.config.clone()),
            caches: self.caches.clone(),
            timesteps: self.timesteps.clone(),
            text_cached: self.text_cached,
        })
    }

    /// Trains to the end (or until cancelled), reporting through `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        let _scope = self.scope.enter();
        on_event(Event::Started {
            items: self.data.items.len(),
            problems: self.data.problems.clone(),
            steps: self.total_steps(),
        });
        let accum = self.config.gradient_accumulation_steps;
        let mut acc: Vec<Vec<Option<Tensor>>> = Vec::new();
        let mut acc_loss = 0.0f32;
        let mut in_accum = 0;
        let mut data_wait = Duration::ZERO;
        let context = self.loader_context();
        'epochs: while (self.progress.epoch as usize) < self.config.epochs {
            let plan =
                data::plan_epoch(&self.data, &self.config, &self.buckets, self.progress.epoch);
            let mut batches = Prefetch::start(
                context.clone(),
                plan,
                self.progress.batch_in_epoch,
                self.progress.batches,
                self.config.dataloader_threads,
            );
            loop {
                // Stopping keeps the work (between steps only): a backup at the step reached,
                // and the output model as it is, as OneTrainer saves at the end of a stopped run.
                if in_accum == 0 && self.controls.cancel.is_cancelled() {
                    if self.last_backup() != Some(self.backups_dir().join(self.backup_name())) {
                        on_event(Event::Backup(self.backup()?));
                    }
                    // (Not when no step was taken: nothing would replace a previous output.)
                    if self.progress.step > 0 {
                        on_event(Event::Saved(self.save_output()?));
                    }
                    return Ok(());
                }
                if in_accum == 0 {
                    self.serve_controls(&mut on_event)?;
                }
                let waiting = Instant::now();
                let Some(loaded) = batches.next_batch() else {
                    break;
                };
                data_wait += waiting.elapsed();
                let loaded = loaded.map_err(TrainError)?;
                // Where tests make a step fail or panic.
                fail::fail_point!("train-step", |m| Err(TrainError(m.unwrap_or_default())));
                // Dropout masks come from the run's seed and the batch: a resumed run repeats them.
                self.scope.seed_dropout(
                    data::rng(self.config.seed, RNG_DROPOUT, self.progress.batches).random(),
                );
                let (batch, loss, forward) = self.batch_loss(&loaded)?;
                if self.config.debug_mode {
                    self.debug_last = Some(debug::Snapshot::new(self, &loaded, &batch, &forward)?);
                }
                drop((batch, forward));
                let grads = loss.backward().map_err(err)?;
                // The logged figure: one host read per batch.
                acc_loss += loss.item().map_err(err)?;
                let mut new = Vec::new();
                for (gi, g) in self.groups.iter().enumerate() {
                    let mut row = Vec::new();
                    for (pi, p) in g.params.iter().enumerate() {
                        let grad = if g.stopped {
                            None
                        } else {
                            grads.get(p).map_err(err)?
                        };
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
                    data_wait: std::mem::take(&mut data_wait),
                });
                acc_loss = 0.0;
                in_accum = 0;
                self.after(Moment::Step, &mut on_event)?;
                if self.stop_parts(Moment::Step)? {
                    break 'epochs;
                }
            }
            self.progress.epoch += 1;
            self.progress.batch_in_epoch = 0;
            self.after(Moment::Epoch, &mut on_event)?;
            if self.stop_parts(Moment::Epoch)? {
                break;
            }
        }
        let out = self.save_output()?;
        on_event(Event::Saved(out));
        Ok(())
    }

    /// Waits while paused; samples or backs up when asked.
    fn serve_controls(&mut self, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let controls = self.controls.clone();
        if controls.pause.load(Ordering::Relaxed) {
            on_event(Event::Paused(true));
            while controls.pause.load(Ordering::Relaxed) && !controls.cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
            on_event(Event::Paused(false));
        }
        if controls.sample_now.swap(false, Ordering::Relaxed) {
            for p in self.sample()? {
                on_event(Event::Sample(p));
            }
        }
        if controls.backup_now.swap(false, Ordering::Relaxed) {
            on_event(Event::Backup(self.backup()?));
        }
        Ok(())
    }

    /// Where another thread asks this run to pause, sample or back up.
    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    /// Whether something set to happen every `every` `unit`s is due at `at` (`key` names it
    /// for the timed units, which count from when it last ran or from the start).
    fn due(&mut self, key: &'static str, every: f64, unit: &str, at: Moment) -> bool {
        let count = match at {
            Moment::Step => self.progress.step,
            Moment::Epoch => self.progress.epoch,
        };
        let seconds = match unit {
            "second" => 1.0,
            "minute" => 60.0,
            "hour" => 3600.0,
            "always" => return at == Moment::Step,
            "step" => {
                return at == Moment::Step && every >= 1.0 && count.is_multiple_of(every as u64);
            }
            "epoch" => {
                return at == Moment::Epoch && every >= 1.0 && count.is_multiple_of(every as u64);
            }
            _ => return false,
        };
        if at != Moment::Step || every <= 0.0 {
            return false;
        }
        let since = *self.last_done.get(key).unwrap_or(&self.started);
        let due = since.elapsed().as_secs_f64() >= every * seconds;
        if due {
            self.last_done.insert(key, Instant::now());
        }
        due
    }

    /// Stops the parts whose stop_training_after has come; true when no part trains any more.
    fn stop_parts(&mut self, at: Moment) -> Result<bool> {
        let c = &self.config;
        let (step, epoch) = (self.progress.step as f64, self.progress.epoch as f64);
        let elapsed = self.started.elapsed().as_secs_f64();
        for g in &mut self.groups {
            let pc = if g.part == "unet" {
                &c.unet
            } else {
                &c.text_encoder
            };
            let after = pc.stop_training_after;
            let reached = after > 0.0
                && match (pc.stop_training_after_unit.as_str(), at) {
                    ("step", Moment::Step) => step >= after,
                    ("epoch", Moment::Epoch) => epoch >= after,
                    ("second", _) => elapsed >= after,
                    ("minute", _) => elapsed >= after * 60.0,
                    ("hour", _) => elapsed >= after * 3600.0,
                    _ => false,
                };
            if reached && !g.stopped {
                tracing::info!("{} stops training at step {step}", g.part);
                g.stopped = true;
                for p in &g.params {
                    p.set_requires_grad(false).map_err(err)?;
                }
            }
        }
        Ok(self.groups.iter().all(|g| g.stopped))
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
            if g.stopped {
                continue;
            }
            // Every parameter goes by name; one without a gradient is skipped by the
            // optimizer with its state kept.
            let scaled: Vec<Option<Tensor>> = row
                .into_iter()
                .map(|grad| match (grad, &scale) {
                    (Some(grad), Some(s)) => grad.mul(s).map(Some),
                    (grad, _) => Ok(grad),
                })
                .collect::<ferrite_plugin_api::Result<_>>()
                .map_err(err)?;
            let params: Vec<Param<'_>> = g
                .names
                .iter()
                .zip(&g.params)
                .zip(&scaled)
                .map(|((name, tensor), grad)| Param {
                    name,
                    tensor,
                    grad: grad.as_ref(),
                })
                .collect();
            g.optimizer.step(&params, g.lr * lr_factor).map_err(err)?;
        }
        Ok(())
    }

    /// ema ← d·ema + (1 − d)·param, with d warming up as (1 + step)/(10 + step) towards
    /// `ema_decay` (OneTrainer's and diffusers' rule).
    fn update_ema(&mut self) -> Result<()> {
        let s = self.progress.step as f64;
        let d = self.config.ema_decay.min((1.0 + s) / (10.0 + s));
        for g in &mut self.groups {
            if let Some(ema) = &mut g.ema {
                ema.update(&g.params, d).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the EMA weights in place of the trained ones (when EMA is on).
    fn with_ema_weights<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut kept = Vec::new();
        for g in &self.groups {
            let Some(ema) = &g.ema else { continue };
            for (e, p) in ema.tensors().map_err(err)?.iter().zip(&g.params) {
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
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
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
            let fixed = concept.without_random_augmentation();
            let mut total = 0.0;
            for (ii, item) in &items {
                let mut r = data::rng(c.seed, RNG_VALIDATION, *ii as u64);
                let bucket = self.buckets[0].nearest(item.width as usize, item.height as usize);
                let p = data::prepare(item, &fixed, bucket, &mut r).map_err(err)?;
                let t = timesteps.len();
                let image =
                    Tensor::from_f32(&p.pixels, &[1, 3, bucket.1, bucket.0]).map_err(err)?;
                let (mean, logvar) = self.arch.vae_encode(&image).map_err(err)?;
                let repeat = |x: &Tensor| Tensor::cat(&vec![x; t], 0).map_err(err);
                let batch = Batch {
                    bucket,
                    mean: repeat(&mean)?,
                    logvar: repeat(&logvar)?,
                    masks: (0..t).flat_map(|_| p.mask.iter().copied()).collect(),
                    text: repeat(&self.text_states(&item.captions[..1])?)?,
                    weights: vec![1.0; t],
                    prior: vec![false; t],
                };
                let noise = Generator::new(r.random::<u64>()).map_err(err)?;
                let f = self.forward(&batch, &timesteps, &noise)?;
                let loss = self.loss(&batch, &f)?;
                total += loss.item().map_err(err)? * c.gradient_accumulation_steps as f32;
            }
            out.push((concept.name.clone(), total / items.len() as f32));
        }
        Ok(out)
    }

    /// Validation, samples, backups and saves due at `at`.
    fn after(&mut self, at: Moment, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let c = self.config.clone();
        if c.debug_mode
            && self.due("debug", c.debug_after, &c.debug_after_unit, at)
            && let Some(s) = &self.debug_last
        {
            self.write_debug(s)?;
        }
        let (validate, sample, backup, save) = (
            c.validation && self.due("validate", c.validate_after, &c.validate_after_unit, at),
            self.due("sample", c.sample_after, &c.sample_after_unit, at),
            self.due("backup", c.backup_after, &c.backup_after_unit, at),
            self.due("save", c.save_every, &c.save_every_unit, at),
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
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
        self.model.set_training(false).map_err(err)?;
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
                prediction_type: self.config.forced_prediction().map(str::to_string),
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
        self.model.set_training(true).map_err(err)?;
        Ok(out)
    }

    /// The backup this run continues from, when it does.
    pub fn resumed_from(&self) -> Option<&Path> {
        self.resumed_from.as_deref()
    }

    /// (latents, text states) encoded in this run because the cache did not have them.
    pub fn cache_encoded(&self) -> (usize, usize) {
        self.caches.encoded()
    }

    /// The model being trained, with its adapters.
    pub fn model(&self) -> &Arc<ModelLayers> {
        &self.model
    }

    /// The trainable tensors by name (for tests and tools).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.groups
            .iter()
            .flat_map(|g| g.names.iter().cloned().zip(g.params.iter().cloned()))
            .collect()
    }
}
