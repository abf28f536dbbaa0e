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
mod embeddings;
mod encode;
mod groups;
mod intervals;
mod loss;
mod noising;
mod output;
mod parallel;
mod precache;
mod precision;
mod run;
mod samples;
mod schedule;
mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use ferrite_plugin_api::{
    ModelInfo, PartKind, Tensor, family::Objective, plugin::ArchitectureHandle,
};

use crate::adapters::ModelLayers;
use crate::config::{ConceptType, GradientCheckpointing, TrainConfig, TrainingMethod, WeightDtype};
use crate::data::{Dataset, buckets::Buckets};
use crate::plugins::Registry;
use crate::runtime::{Cancel, Device, Scope, WeightFormat};
use crate::train::cache::Caches;
use crate::train::tensorboard::EventWriter;
use crate::train::timesteps::Timesteps;
pub use batch::Probe;
use groups::Group;
use noising::Noising;
pub use parallel::{BUCKET, DataParallel, mean_in_buckets};
pub use precache::Cached;
pub use precision::LossScale;

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
    /// The dynamic loss scale of a float16 run (None: not scaled).
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
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
        /// In a data-parallel run, each process's time for this step (seconds, by rank) before
        /// it waited for the others; empty alone.
        rank_times: Vec<f32>,
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
    /// The caching pass before the first step: `done` of `total` latents or text states
    /// (`what`) encoded and written.
    Caching {
        what: &'static str,
        done: usize,
        total: usize,
    },
    /// The caching pass ended: entries encoded, and those the cache already had.
    Cached(Cached),
    /// Float16 gradients overflowed: optimizer step `step` was skipped and the loss scale
    /// lowered to `loss_scale`.
    Skipped {
        step: u64,
        loss_scale: f32,
    },
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
    /// The same scope computing in the run's `train_dtype`: entered around the training
    /// forward of the denoiser and of trained text encoders only (the VAE, caches and samples
    /// compute in f32).
    mixed: Scope,
    noising: Noising,
    /// The model's family contract.
    info: ModelInfo,
    data: Arc<Dataset>,
    validation: Dataset,
    /// One bucket set per resolution of the config (validation uses the first).
    buckets: Vec<Buckets>,
    groups: Vec<Group>,
    /// Textual-inversion embeddings: the one an embedding run trains first, then the
    /// additional ones.
    embeddings: Vec<embeddings::RunEmbedding>,
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
    /// This process's place in a data-parallel run, and what it knows of the others.
    parallel: Option<DataParallel>,
    peers: parallel::Peers,
    /// Where the step under way started (a failed data-parallel step's backup is written there).
    step_start: Progress,
}

/// Every part of the model has a config table, and every table that says `train` configures a
/// part of this model.
fn check_parts(c: &TrainConfig, info: &ModelInfo) -> Result<()> {
    if let Some(p) = info
        .parts
        .iter()
        .find(|p| c.part(&p.config_table).is_none())
    {
        return Err(TrainError(format!(
            "the model's part `{}` is configured by a `[{}]` table, which Ferrite's config does \
             not have: update Ferrite",
            p.name, p.config_table
        )));
    }
    for (table, pc) in c.part_tables() {
        let here = info.parts.iter().any(|p| p.config_table == table);
        // Configs carry both denoiser tables (OneTrainer's `unet` and `transformer`): a family
        // uses the one it has, and the other's settings are left, as OneTrainer leaves them.
        let other_denoiser = matches!(table, "unet" | "transformer");
        if !here && pc.weight_dtype != WeightDtype::Float32 && !other_denoiser {
            return Err(TrainError(format!(
                "{table}.weight_dtype: this model has no part configured by `[{table}]`; \
                 leave it at float32"
            )));
        }
        if pc.train && !here && !other_denoiser {
            let tables: Vec<&str> = info.parts.iter().map(|p| p.config_table.as_str()).collect();
            return Err(TrainError(format!(
                "{table}.train: this model has no part configured by `[{table}]` (its parts: {}); \
                 set it to false",
                tables.join(", ")
            )));
        }
    }
    Ok(())
}

/// The parts' own files (`<part>.model_name`) as the architecture's `part_files` option, if
/// any: a model that takes no part files, or not that part's, is refused naming the key.
fn part_files(
    c: &TrainConfig,
    base: &Path,
    registry: &Registry,
) -> Result<Option<std::collections::BTreeMap<String, PathBuf>>> {
    let files = c.part_files(base);
    if files.is_empty() {
        return Ok(None);
    }
    let kind = ferrite_plugin_api::ComponentKind::Architecture;
    let only = serde_json::json!({ "model": "", "part_files": files });
    for (option, _) in registry.option_problems(kind, &c.model_type, &only) {
        let first = files.keys().next().map_or("", String::as_str);
        match option.as_deref() {
            Some("part_files") => {
                return Err(TrainError(format!(
                    "{first}.model_name: the `{}` architecture takes no part from a file of its \
                     own; it loads every part from base_model_name",
                    c.model_type
                )));
            }
            Some(part) if files.contains_key(part) => {
                return Err(TrainError(format!(
                    "{part}.model_name: the `{}` architecture has no part `{part}` to take from \
                     a file; leave it empty",
                    c.model_type
                )));
            }
            _ => {}
        }
    }
    Ok(Some(files))
}

/// The run's sample definitions against the model, before training (a bad one would stop the
/// run at its first sample): sizes the model samples, and a flow-matching model's one sampler.
fn check_samples(c: &TrainConfig, info: &ModelInfo) -> Result<()> {
    let step = crate::sample::generate::sample_step(info);
    let flow = matches!(info.objective, Objective::FlowMatch { .. });
    for (i, s) in c.samples.iter().enumerate() {
        if s.width == 0 || s.height == 0 || s.width % step != 0 || s.height % step != 0 {
            return Err(TrainError(format!(
                "samples[{i}]: width and height must be positive multiples of {step} for this \
                 model, got {}x{}",
                s.width, s.height
            )));
        }
        if flow && s.sampler != crate::sample::Sampler::Euler {
            return Err(TrainError(format!(
                "samples[{i}].sampler: a flow-matching model samples with euler, not {}",
                s.sampler.as_ref()
            )));
        }
    }
    Ok(())
}

fn weight_format(dtype: WeightDtype) -> Option<WeightFormat> {
    match dtype {
        WeightDtype::Float32 => None,
        WeightDtype::Float16 => Some(WeightFormat::F16),
        WeightDtype::Bfloat16 => Some(WeightFormat::BF16),
        WeightDtype::Float8 => Some(WeightFormat::Float8),
        WeightDtype::Nfloat4 => Some(WeightFormat::Nf4),
    }
}

/// The parts whose weights can be kept as they load, by config table (the id the family
/// plugins load a part under): frozen ones, and in a fine-tune only halves (what
/// [`keep_weights`] allows; it checks and completes the keeping once the model is loaded).
fn keep_at_load(c: &TrainConfig) -> HashMap<String, WeightFormat> {
    c.part_tables()
        .into_iter()
        .filter_map(|(table, p)| {
            let format = weight_format(p.weight_dtype)?;
            let fine_tune = c.training_method == TrainingMethod::FineTune;
            let quantised = matches!(format, WeightFormat::Float8 | WeightFormat::Nf4);
            (!fine_tune || (!p.train && !quantised)).then(|| (table.to_string(), format))
        })
        .collect()
}

/// Keeps each part's frozen weights in its `weight_dtype`: matrices (linear weights and
/// embeddings) and kernels; biases and norm scales are small and stay f32. The quantised
/// formats take matrices; kernels are kept in bfloat16 then.
fn keep_weights(
    c: &TrainConfig,
    info: &ModelInfo,
    arch: &ArchitectureHandle,
    device: &Device,
) -> Result<()> {
    let mut params = None;
    for part in &info.parts {
        let Some(pc) = c.part(&part.config_table) else {
            continue;
        };
        let Some(format) = weight_format(pc.weight_dtype) else {
            continue;
        };
        if c.training_method == TrainingMethod::FineTune && c.trains(part) {
            return Err(TrainError(format!(
                "{}.weight_dtype: a fine-tuned part's weights are trained in float32; set it to \
                 float32 (or freeze the part)",
                part.config_table
            )));
        }
        if c.training_method == TrainingMethod::FineTune
            && matches!(format, WeightFormat::Float8 | WeightFormat::Nf4)
        {
            // A fine-tune saves every part: a frozen one would be written with its weights
            // rounded to the quantised format.
            return Err(TrainError(format!(
                "{}.weight_dtype: a fine-tune saves this part too, and {} would save it \
                 quantised (its weights rounded to 4 or 8 bits); use float32, float16 or \
                 bfloat16",
                part.config_table, pc.weight_dtype
            )));
        }
        if params.is_none() {
            params = Some(arch.parameters().map_err(err)?);
        }
        let prefix = format!("{}.", part.id);
        for (name, t) in params.iter().flatten() {
            let rank = t.rank().map_err(err)?;
            let Some(format) = format.for_rank(rank).filter(|_| name.starts_with(&prefix)) else {
                continue;
            };
            device
                .keep_weight(t.id(), format)
                .map_err(|e| TrainError(format!("{name}: {e}")))?;
        }
    }
    Ok(())
}

impl Trainer {
    /// A run on the current runtime ([`crate::runtime::init`]'s, unless the thread entered
    /// another), stopped through its own [`Controls`].
    pub fn new(config: TrainConfig, base: &Path, registry: Registry) -> Result<Self> {
        let device = Device::current().ok_or_else(|| {
            TrainError("no compute device selected: give train_device (runtime::init)".into())
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
        let mut scope = Scope::new(device)
            .with_cancel(controls.cancel.clone())
            .with_keep_at_load(keep_at_load(&config));
        let _loading = scope.enter();
        let c = &config;
        c.validate_plugin_options(&registry).map_err(err)?;
        crate::hub::fetch_if_missing(base, &c.base_model_name)
            .map_err(|e| TrainError(format!("base_model_name: {e}")))?;
        let workspace = TrainConfig::path(base, &c.workspace_dir);
        std::fs::create_dir_all(&workspace)
            .map_err(|e| TrainError(format!("workspace_dir {}: {e}", workspace.display())))?;
        crate::fsutil::write_atomic(&workspace.join("config.toml"), c.to_toml().as_bytes())
            .map_err(err)?;

        let mut options = serde_json::json!({
            "model": c.base_model_path(base),
        });
        // CLIP skip is the model's business (training, validation and samples all encode
        // through it); only asked for when set, as not every architecture has it.
        if c.text_encoder_layer_skip > 0 {
            options["text_encoder_layer_skip"] = c.text_encoder_layer_skip.into();
        }
        if c.random_base_weights {
            options["random_weights"] = true.into();
        }
        if !c.base_model_config.is_empty() {
            options["config"] = TrainConfig::path(base, &c.base_model_config)
                .to_string_lossy()
                .into();
        }
        if let Some(files) = part_files(c, base, &registry)? {
            options["part_files"] = serde_json::json!(files);
        }
        // Kept until the model is made: it takes its own handles to the files' tensors.
        let given = embeddings::given(c, base)?;
        if !given.is_empty() {
            options["embeddings"] = crate::embeddings::option(&given);
            let kind = ferrite_plugin_api::ComponentKind::Architecture;
            let only = serde_json::json!({ "model": "", "embeddings": [] });
            if registry
                .option_problems(kind, &c.model_type, &only)
                .iter()
                .any(|(o, _)| o.as_deref() == Some("embeddings"))
            {
                return Err(TrainError(format!(
                    "{}: the `{}` architecture takes no textual-inversion embeddings (its \
                     plugin predates them): update the plugin",
                    given[0].name, c.model_type
                )));
            }
        }
        let arch = registry
            .architecture(&c.model_type, &options.to_string())
            .map_err(err)?;
        let model = Arc::new(ModelLayers::of(&arch).map_err(err)?);
        let info = model.info.clone();
        check_parts(c, &info)?;
        check_samples(c, &info)?;
        keep_weights(c, &info, &arch, &scope.device)?;
        let embeddings = embeddings::of_model(c, &arch, &info)?;
        drop(given);
        let noising = Noising::new(&info.objective, c)?;
        scope = scope
            .with_adapters(model.clone())
            .with_checkpointing(c.gradient_checkpointing == GradientCheckpointing::On);
        let _scope = scope.enter();
        let mixed = scope
            .clone()
            .with_train_dtype(c.train_dtype.into())
            .with_fallback_dtype(c.fallback_train_dtype.into());

        let mut data = Dataset::scan(c, base, &[ConceptType::Standard, ConceptType::Prior]);
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
        data.problems
            .extend(embeddings::problems(&embeddings, &data, &info));
        let validation = Dataset::scan(c, base, &[ConceptType::Validation]);
        let step = info.resolution_step;
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
            &c.model_paths(base),
            &info.to_json(),
            c.seed,
            c.text_encoder_layer_skip,
        );
        let timesteps = noising.draws(c, info.resolution_step)?;
        let mut t = Self {
            caches: Arc::new(caches),
            timesteps: Arc::new(timesteps),
            // Prompts with embeddings encode through their vectors, trained or not.
            text_cached: c.latent_caching
                && embeddings.is_empty()
                && !info
                    .parts
                    .iter()
                    .any(|p| p.kind == PartKind::TextEncoder && c.trains(p)),
            started: Instant::now(),
            last_done: Default::default(),
            resumed_from: None,
            controls,
            scope,
            mixed,
            debug_last: None,
            parallel: None,
            peers: parallel::Peers::default(),
            step_start: Progress::default(),
            tensorboard,
            groups: Vec::new(),
            embeddings,
            batches_per_epoch: 0,
            progress: Progress::default(),
            config: config.clone(),
            base: base.into(),
            workspace,
            registry,
            arch,
            model,
            noising,
            info,
            data: Arc::new(data),
            validation,
            buckets,
        };
        t.check_output_format()?;
        t.check_destination()?;
        t.check_embedding_files()?;
        // Emptied only once the run is sure to start.
        if t.config.clear_cache_before_training {
            t.caches.clear();
        }
        t.batches_per_epoch = t.plan(0).len();
        t.groups = t.make_groups()?;
        if t.config.continue_last_backup
            && let Some(b) = t.last_backup()
        {
            t.restore(&b)?;
            t.resumed_from = Some(b);
        }
        Ok(t)
    }

    /// Where another thread asks this run to pause, sample or back up.
    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    /// The backup this run continues from, when it does.
    pub fn resumed_from(&self) -> Option<&Path> {
        self.resumed_from.as_deref()
    }

    /// The run's scope: tensors made on the caller's thread outside `run` need it entered.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// (latents, text states) encoded in this run because the cache did not have them.
    pub fn cache_encoded(&self) -> (usize, usize) {
        self.caches.encoded()
    }

    /// The model being trained, with its adapters.
    pub fn model(&self) -> &Arc<ModelLayers> {
        &self.model
    }

    /// The runtime's device (`cpu`, `cuda:0`).
    pub fn device_name(&self) -> &str {
        self.scope.device.name()
    }

    /// Replaces the run's adapters with those of an adapter file at strength `weight` (what
    /// `ferrite loss-report --lora` measures); returns how many layers it adapts.
    pub fn use_adapter_file(&self, path: &Path, weight: f64) -> Result<usize> {
        let _scope = self.scope.enter();
        self.model.clear();
        self.model
            .load(&self.registry, path, weight)
            .map_err(|e| TrainError(format!("{}: {e}", path.display())))
    }

    /// The model's own tensors by name (for tests and tools).
    pub fn model_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.arch.parameters().map_err(err)
    }

    /// The trainable tensors by name (for tests and tools).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.groups
            .iter()
            .flat_map(|g| g.names.iter().cloned().zip(g.params.iter().cloned()))
            .collect()
    }
}
