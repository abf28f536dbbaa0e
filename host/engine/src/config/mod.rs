//! The training configuration, in TOML with OneTrainer's option names (snake_case). A config is
//! read over the defaults; a preset (`presets/<name>.toml`, a partial config) and `--set key=value`
//! overrides go on top. Validation reports every problem at once, each with its key path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod choices;
pub mod onetrainer;

pub use crate::sample::Sampler;
pub use choices::{
    BalancingStrategy, BatchScaler, Choice, ConceptType, EmaMode, FallbackTrainDtype,
    GradientCheckpointing, LayerPreset, LoraWeightDtype, LossWeightFn, LrScheduler, OutputDtype,
    OutputFormat, PromptSource, TimeUnit, TimestepDistribution, TrainDtype, TrainingMethod,
    WeightDtype,
};
/// `VARIANTS`: every value of a choice.
pub use strum::VariantArray;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("the config has {} problem(s):\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Per model part (OneTrainer's `unet`, `text_encoder` sections).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PartConfig {
    /// Train this part (its weights, or its adapters for LoRA).
    pub train: bool,
    /// Overrides the global learning rate for this part.
    pub learning_rate: Option<f64>,
    /// Caption dropout (text encoder): the probability of training on the empty prompt.
    pub dropout_probability: f64,
    /// This part stops training after so many units (step, epoch, second, minute, hour; 0 or
    /// `never`: trains to the end). The run ends when every trained part has stopped.
    pub stop_training_after: f64,
    /// The unit of stop_training_after.
    pub stop_training_after_unit: TimeUnit,
    /// The dtype this part's frozen weights are kept in (float32, float16, bfloat16, float8,
    /// nfloat4): read as f32 by each op, so the results are those of the rounded weights.
    /// Linear layers keep only the kept weight for backward; other ops (convolutions) hold
    /// f32 copies in backward unless their block is checkpointed. Only for frozen parts (a
    /// fine-tuned part is refused); a fine-tune saves its frozen parts too, with their
    /// weights as rounded, so it takes the halves only.
    pub weight_dtype: WeightDtype,
    /// The guidance value a guidance-distilled denoiser (Flux.1-dev's transformer) is given
    /// in training (OneTrainer's `transformer.guidance_scale`); other parts ignore it.
    pub guidance_scale: f64,
    /// A file holding this part's weights in place of the base model's (OneTrainer's
    /// `model_name` of a part: a Flux transformer file; ComfyUI's `clip_l` / `t5xxl` files);
    /// relative to the config file unless absolute. Empty: the base model's.
    pub model_name: String,
}

/// A textual-inversion embedding (OneTrainer's `embedding` and `additional_embeddings`
/// entries): new token vectors for every text encoder of the model that takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// An embedding file to start from (A1111/ComfyUI, `string_to_param` or diffusers'
    /// `learned_embeds`); empty: new vectors from `initial_embedding_text`.
    pub model_name: String,
    /// The text in captions and prompts that stands for the embedding's tokens.
    pub placeholder: String,
    /// Train its vectors (off: used as loaded).
    pub train: bool,
    /// How many tokens (vectors per text encoder) it has.
    pub token_count: usize,
    /// New vectors start as this text's token embeddings (cut to token_count, padded with
    /// `*`'s).
    pub initial_embedding_text: String,
    /// It stops training after so many units (0: trains to the end).
    pub stop_training_after: f64,
    /// The unit of stop_training_after.
    pub stop_training_after_unit: TimeUnit,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            model_name: String::new(),
            placeholder: "<embedding>".into(),
            train: true,
            token_count: 1,
            initial_embedding_text: "*".into(),
            stop_training_after: 0.0,
            stop_training_after_unit: TimeUnit::Never,
        }
    }
}

/// VAE options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    /// A file holding the VAE's weights in place of the base model's (OneTrainer's
    /// `vae.model_name`; Flux's `ae.safetensors`). Empty: the base model's.
    pub model_name: String,
}

impl PartConfig {
    fn trained() -> Self {
        Self {
            train: true,
            ..Self::default()
        }
    }
}

impl Default for PartConfig {
    fn default() -> Self {
        Self {
            train: false,
            learning_rate: None,
            dropout_probability: 0.0,
            stop_training_after: 0.0,
            stop_training_after_unit: TimeUnit::Never,
            weight_dtype: WeightDtype::Float32,
            guidance_scale: 1.0,
            model_name: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ConceptConfig {
    /// A name for the concept (shown in reports and validation figures).
    pub name: String,
    /// Whether the concept is used.
    pub enabled: bool,
    /// `standard`, `prior` (trained towards the model's own prediction without the adapter, to
    /// keep what it knew: OneTrainer's prior prediction) or `validation`.
    #[serde(rename = "type")]
    pub kind: ConceptType,
    /// The folder holding the images (relative to the config file unless absolute).
    pub path: String,
    /// `sample` (per-image .txt), `concept` (one text file: `text_file`), `filename`.
    pub prompt_source: PromptSource,
    /// prompt_source `concept`: the text file whose lines are the captions.
    pub text_file: String,
    /// Also read images in sub-folders of path.
    pub include_subdirectories: bool,
    /// Repeats per epoch (`repeats`: floor(n·balancing)) or images per epoch (`samples`).
    pub balancing: f64,
    /// repeats: floor(images × balancing) per epoch; samples: exactly balancing images per epoch, drawn at random.
    pub balancing_strategy: BalancingStrategy,
    /// Multiplies this concept's loss.
    pub loss_weight: f64,
    /// With latent caching: how many differently augmented versions of each image are cached
    /// (epoch e uses version e mod n).
    pub image_variations: usize,
    /// How many differently drawn captions (line, tag shuffle/dropout, capitalisation) each image
    /// has: epoch e uses version e mod n (so the text-embedding cache holds n per image).
    pub text_variations: usize,
    /// Tags (split at `tag_delimiter`) after the first `keep_tags_count` are shuffled each time
    /// an image is used, and/or dropped with `tag_dropout_probability` each.
    pub enable_tag_shuffling: bool,
    /// What separates tags in a caption.
    pub tag_delimiter: String,
    /// The first tags kept in place (never shuffled or dropped).
    pub keep_tags_count: usize,
    /// Drop tags at random (after the kept ones).
    pub tag_dropout_enable: bool,
    /// The chance that each tag is dropped.
    pub tag_dropout_probability: f64,
    /// Capitalisation randomised per tag with `caps_randomize_probability`, one of the
    /// comma-separated modes: capslock, title, first, random; after lower-casing the whole
    /// caption first when `caps_randomize_lowercase`.
    pub caps_randomize_enable: bool,
    /// Comma-separated modes drawn from: capslock, title, first, random.
    pub caps_randomize_mode: String,
    /// The chance that a tag's capitalisation is changed.
    pub caps_randomize_probability: f64,
    /// Lower-case the whole caption first.
    pub caps_randomize_lowercase: bool,
    /// Random horizontal flip (half of the time).
    pub enable_random_flip: bool,
    /// Flip every image horizontally.
    pub enable_fixed_flip: bool,
    /// Random crop offset inside the bucket's cover-scaled image (else centred).
    pub enable_crop_jitter: bool,
    /// Rotation by up to `random_rotate_max_angle` degrees either way (random), or by exactly
    /// that (fixed); the mask turns with the image, uncovered corners are black (and masked out).
    pub enable_random_rotate: bool,
    /// Rotate every image by exactly random_rotate_max_angle.
    pub enable_fixed_rotate: bool,
    /// Degrees of rotation: the most either way (random) or the angle (fixed).
    pub random_rotate_max_angle: f64,
    /// Brightness, contrast, saturation: a random factor in 1 ± strength, or exactly 1 +
    /// strength (fixed), as torchvision's adjust_*; hue: a shift of up to ± strength/2 turns
    /// (fixed: strength/2). The image only, never the mask.
    pub enable_random_brightness: bool,
    /// Change brightness by exactly the strength.
    pub enable_fixed_brightness: bool,
    /// Brightness: the most either way (random) or the change (fixed), as a factor offset.
    pub random_brightness_max_strength: f64,
    /// A random contrast change of up to the strength either way.
    pub enable_random_contrast: bool,
    /// Change contrast by exactly the strength.
    pub enable_fixed_contrast: bool,
    /// Contrast change: the most either way (random) or the change (fixed).
    pub random_contrast_max_strength: f64,
    /// A random saturation change of up to the strength either way.
    pub enable_random_saturation: bool,
    /// Change saturation by exactly the strength.
    pub enable_fixed_saturation: bool,
    /// Saturation change: the most either way (random) or the change (fixed).
    pub random_saturation_max_strength: f64,
    /// A random hue shift of up to half the strength (a fraction of a turn) either way.
    pub enable_random_hue: bool,
    /// Shift hue by exactly the strength.
    pub enable_fixed_hue: bool,
    /// Hue: twice the largest shift in turns (random), or twice the shift (fixed), as OneTrainer.
    pub random_hue_max_strength: f64,
}

impl Default for ConceptConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            enabled: true,
            kind: ConceptType::Standard,
            path: String::new(),
            prompt_source: PromptSource::Sample,
            text_file: String::new(),
            include_subdirectories: false,
            balancing: 1.0,
            balancing_strategy: BalancingStrategy::Repeats,
            loss_weight: 1.0,
            image_variations: 1,
            text_variations: 1,
            enable_tag_shuffling: false,
            tag_delimiter: ",".into(),
            keep_tags_count: 1,
            tag_dropout_enable: false,
            tag_dropout_probability: 0.0,
            caps_randomize_enable: false,
            caps_randomize_mode: "capslock, title, first, random".into(),
            caps_randomize_probability: 0.0,
            caps_randomize_lowercase: false,
            enable_random_flip: true,
            enable_fixed_flip: false,
            enable_crop_jitter: true,
            enable_random_rotate: false,
            enable_fixed_rotate: false,
            random_rotate_max_angle: 0.0,
            enable_random_brightness: false,
            enable_fixed_brightness: false,
            random_brightness_max_strength: 0.0,
            enable_random_contrast: false,
            enable_fixed_contrast: false,
            random_contrast_max_strength: 0.0,
            enable_random_saturation: false,
            enable_fixed_saturation: false,
            random_saturation_max_strength: 0.0,
            enable_random_hue: false,
            enable_fixed_hue: false,
            random_hue_max_strength: 0.0,
        }
    }
}

impl ConceptConfig {
    /// Whether any image option draws at random (then a prepared image depends on the seed).
    pub fn random_image_augmentation(&self) -> bool {
        self.enable_crop_jitter
            || self.enable_random_flip
            || self.enable_random_rotate
            || self.enable_random_brightness
            || self.enable_random_contrast
            || self.enable_random_saturation
            || self.enable_random_hue
    }

    /// The concept with its random image options off (the fixed ones stay): validation images.
    pub fn without_random_augmentation(&self) -> Self {
        Self {
            enable_crop_jitter: false,
            enable_random_flip: false,
            enable_random_rotate: false,
            enable_random_brightness: false,
            enable_random_contrast: false,
            enable_random_saturation: false,
            enable_random_hue: false,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (classifier-free guidance).
    pub negative_prompt: String,
    /// Image width in pixels (a multiple of the model's step).
    pub width: usize,
    /// Image height in pixels (a multiple of the model's step).
    pub height: usize,
    /// The seed of the initial noise: the same seed gives comparable samples over a run.
    pub seed: u64,
    /// Sampler steps.
    pub diffusion_steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// ddim, euler, euler_a, dpmpp_2m_karras.
    pub sampler: Sampler,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            seed: 42,
            diffusion_steps: 20,
            cfg_scale: 7.0,
            sampler: Sampler::Euler,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// `lora` or `fine_tune`.
    pub training_method: TrainingMethod,
    /// The architecture plugin id.
    pub model_type: String,
    /// The model to train: a diffusers folder or a single-file .safetensors checkpoint.
    pub base_model_name: String,
    /// For a single-file base model: a diffusers folder to take configs and tokenizer from.
    pub base_model_config: String,
    /// Benchmarks only (`ferrite bench step --model-config`): the base model is a diffusers
    /// folder of config files, and its weights are random. Never read from or written to a
    /// config file.
    #[serde(skip)]
    pub random_base_weights: bool,
    /// Where the trained model (or LoRA) is written.
    pub output_model_destination: String,
    /// LoRA: `safetensors` (kohya's layout, what A1111 and ComfyUI read), `kohya`, `diffusers`
    /// or `comfy`. Fine-tune: `safetensors` (one file in the original checkpoint layout) or
    /// `diffusers` (a model folder).
    pub output_model_format: OutputFormat,
    /// The dtype the output is saved in (float32, float16, bfloat16: half the file).
    pub output_dtype: OutputDtype,
    /// Samples, backups, TensorBoard files and the effective config go here.
    pub workspace_dir: String,
    /// The latent and text-embedding caches.
    pub cache_dir: String,
    /// Resume from the newest backup in the workspace (exactly where it stopped).
    pub continue_last_backup: bool,
    /// TensorBoard event files (loss, learning rate, validation loss, samples) under
    /// `workspace/tensorboard/`.
    pub tensorboard: bool,
    /// Where to compute: auto (the first CUDA device when this build has CUDA and a driver is
    /// found, else the CPU), cpu, cuda or cuda:N.
    pub train_device: String,
    /// Train on several devices of this machine at once (OneTrainer's multi-GPU mode): one
    /// process per device of `device_indexes`, each with `batch_size` images of every batch.
    pub multi_gpu: bool,
    /// With multi_gpu, the devices, e.g. "0,1,3" (CUDA indexes; with `train_device = "cpu"`,
    /// one CPU process per index).
    pub device_indexes: String,
    /// Seeds every random draw (data order, augmentation, noise, timesteps).
    pub seed: u64,
    /// Threads that decode and augment images ahead of the trainer (0: the trainer does it).
    pub dataloader_threads: usize,

    /// The learning rate (each part can set its own).
    pub learning_rate: f64,
    /// The optimizer plugin id and its options (any other keys of this table).
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub optimizer: toml::Table,
    /// constant, linear, cosine, cosine_with_restarts, cosine_with_hard_restarts, rex.
    pub learning_rate_scheduler: LrScheduler,
    /// Steps, or a fraction of all steps when at most 1.
    pub learning_rate_warmup_steps: f64,
    /// The restart schedules: how many cycles over the run.
    pub learning_rate_cycles: f64,
    /// The floor the decaying schedules fall to, as a fraction of the learning rate (0.1: the
    /// last steps run at a tenth of it).
    pub learning_rate_min_factor: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Images per step (one bucket per batch).
    pub batch_size: usize,
    /// Batches whose gradients add up to one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Multiplies every learning rate by the square root of none, batch, global_batch,
    /// gradient_accumulation, both (batch × accumulation) or global_both (OneTrainer's).
    pub learning_rate_scaler: BatchScaler,
    /// Multiplies the loss (and so the gradients) by the same choices, without the root.
    pub loss_scaler: BatchScaler,
    /// 0 turns clipping off.
    pub clip_grad_norm: f64,
    /// Exponential moving average of the trained weights: off, gpu (kept on the training device)
    /// or cpu (kept in host memory, updated there every `ema_update_step_interval` steps). The
    /// saved model is the EMA one.
    pub ema: EmaMode,
    /// How slowly the average follows the weights (warmed up from 0).
    pub ema_decay: f64,
    /// Steps between EMA updates.
    pub ema_update_step_interval: u64,

    /// Recompute the marked blocks in backward instead of keeping their activations (on:
    /// OneTrainer's default).
    pub gradient_checkpointing: GradientCheckpointing,
    /// Mixed precision: the dtype matmul, linear, convolutions and attention compute in
    /// (float16 scales the loss dynamically).
    pub train_dtype: TrainDtype,
    /// With train_dtype float16: what parts that overflow in float16 (Flux's T5) compute in.
    pub fallback_train_dtype: FallbackTrainDtype,

    /// `512`, several (`512,768`: one drawn per image and epoch) or `WxH`.
    pub resolution: String,
    /// OneTrainer's aspect buckets (1:1 to 1:4 and transposes); off: square crops.
    pub aspect_ratio_bucketing: bool,
    /// Encoded images cached on disk under cache_dir, keyed by a hash of everything that
    /// changes them (so a changed image or setting re-encodes that image only).
    pub latent_caching: bool,
    /// Empty the caches when a run starts (off: entries are reused; their keys already change
    /// with whatever changes them).
    pub clear_cache_before_training: bool,

    /// uniform, logit_normal, heavy_tail (continuous); sigmoid, cos_map, inverted_parabola
    /// (weights over the timesteps). `noising_weight`/`noising_bias` shape them as OneTrainer's.
    pub timestep_distribution: TimestepDistribution,
    /// Shapes the timestep distribution (logit_normal: spread − 1; heavy_tail: tail weight; sigmoid/inverted_parabola: steepness).
    pub noising_weight: f64,
    /// Moves the timestep distribution towards noisy (>0) or clean (<0) timesteps.
    pub noising_bias: f64,
    /// Shifts timesteps towards the noisy end (>1) or the clean end (<1); 1 leaves them.
    pub timestep_shift: f64,
    /// Flow-matching models (Flux): each batch's shift from its image token count, as the
    /// model's scheduler shifts when sampling (in place of timestep_shift).
    pub dynamic_timestep_shifting: bool,
    /// The least noise trained on, as a fraction of the schedule.
    pub min_noising_strength: f64,
    /// The most noise trained on, as a fraction of the schedule.
    pub max_noising_strength: f64,
    /// Adds per-channel constant noise (helps very dark or bright images).
    pub offset_noise_weight: f64,
    /// Extra noise in the model's input that it is not asked to predict (input perturbation).
    pub perturbation_noise_weight: f64,
    /// Weighs the loss by each image's `<stem>-masklabel.png` (white = train).
    pub masked_training: bool,
    /// The chance that a step sees the whole image anyway.
    pub unmasked_probability: f64,
    /// The weight of the area outside the mask.
    pub unmasked_weight: f64,
    /// Divides each image's loss by its mask's area.
    pub normalize_masked_area_loss: bool,
    /// Weight of the mean squared error.
    pub mse_strength: f64,
    /// Weight of the mean absolute error.
    pub mae_strength: f64,
    /// Huber loss (quadratic within huber_delta, linear beyond).
    pub huber_strength: f64,
    /// Where the Huber loss turns from quadratic to linear.
    pub huber_delta: f64,
    /// log(cosh(prediction − target)).
    pub log_cosh_strength: f64,
    /// Train (and sample) as v-prediction or epsilon-prediction whatever the model's scheduler
    /// says (for models whose config does not say what they were trained as).
    pub force_v_prediction: bool,
    /// Train (and sample) as epsilon-prediction whatever the scheduler says.
    pub force_epsilon_prediction: bool,
    /// constant, min_snr_gamma (strength = γ), debiased_estimation, p2 (strength = exponent).
    pub loss_weight_fn: LossWeightFn,
    /// γ for min_snr_gamma, the exponent for p2.
    pub loss_weight_strength: f64,

    /// UNet options (Stable Diffusion).
    pub unet: PartConfig,
    /// Transformer options (Flux).
    pub transformer: PartConfig,
    /// Text encoder options.
    pub text_encoder: PartConfig,
    /// Second text encoder options (SDXL's OpenCLIP ViT-bigG, Flux's T5).
    pub text_encoder_2: PartConfig,
    /// VAE options.
    pub vae: VaeConfig,

    /// The embedding a `training_method = "embedding"` run trains.
    pub embedding: EmbeddingConfig,
    /// Embeddings trained (or used) alongside a LoRA or fine-tune (a trigger word learned with
    /// it).
    pub additional_embeddings: Vec<EmbeddingConfig>,
    /// The embeddings' learning rate (empty: learning_rate).
    pub embedding_learning_rate: Option<f64>,
    /// LoRA in kohya's layout: the additional embeddings go inside the LoRA file (A1111's
    /// `bundle_emb.` keys, which A1111 and Forge read; ComfyUI warns of them and diffusers
    /// refuses the file); off, another layout or a fine-tune: each is a file of its own beside
    /// the output.
    pub bundle_additional_embeddings: bool,

    /// The adapter plugin: lora, loha, lokr, ...
    pub peft_type: String,
    /// The adapter plugin's own options beyond rank, alpha, dropout and DoRA (LoKr's `factor`,
    /// `decompose_both`, `full_matrix`), checked against its schema.
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub adapter: toml::Table,
    /// The rank of each adapter.
    pub lora_rank: usize,
    /// Scales the adapter by alpha / rank.
    pub lora_alpha: f64,
    /// The dtype adapter parameters are kept and trained in.
    pub lora_weight_dtype: LoraWeightDtype,
    /// Dropout on the adapter input while training.
    pub lora_dropout: f64,
    /// DoRA.
    pub lora_decompose: bool,
    /// attn-only, attn-mlp, full, custom.
    pub lora_layer_preset: LayerPreset,
    /// custom: comma-separated module name parts, or a regex with `layer_filter_regex`.
    pub lora_layers: String,
    /// lora_layers is a regular expression.
    pub layer_filter_regex: bool,
    /// Resume the adapter from this file.
    pub lora_base_model: String,

    /// Loss on the validation concepts at fixed timesteps and noise, comparable over the run.
    pub validation: bool,
    /// How often validation runs.
    pub validate_after: f64,
    /// step, epoch, second, minute, hour, always (every step), never.
    pub validate_after_unit: TimeUnit,

    /// How often samples are made.
    pub sample_after: f64,
    /// step, epoch, second, minute, hour, always (every step), never.
    pub sample_after_unit: TimeUnit,
    /// The sample prompts.
    pub samples: Vec<SampleConfig>,

    /// How often a full backup is written.
    pub backup_after: f64,
    /// step, epoch, second, minute, hour, always (every step), never.
    pub backup_after_unit: TimeUnit,
    /// Backups kept (older ones are removed).
    pub rolling_backup_count: usize,
    /// How often the output model is written during the run (besides the end).
    pub save_every: f64,
    /// step, epoch, second, minute, hour, always, never.
    pub save_every_unit: TimeUnit,

    /// Text-encoder layers skipped from the end (CLIP skip; 1 = the penultimate layer's states,
    /// as anime models expect), for training, validation and samples.
    pub text_encoder_layer_skip: usize,

    /// Writes what each debug step trained on under debug_dir: per image of the batch the input
    /// after every augmentation, its mask, and the target and the prediction decoded as images.
    pub debug_mode: bool,
    /// Where debug images go (relative to the config file unless absolute).
    pub debug_dir: String,
    /// How often debug images are written.
    pub debug_after: f64,
    /// step, epoch, second, minute, hour, always (every step), never.
    pub debug_after_unit: TimeUnit,

    /// The training data.
    pub concepts: Vec<ConceptConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let mut optimizer = toml::Table::new();
        optimizer.insert("optimizer".into(), "adamw".into());
        Self {
            training_method: TrainingMethod::Lora,
            model_type: "sd15".into(),
            base_model_name: String::new(),
            base_model_config: String::new(),
            random_base_weights: false,
            output_model_destination: "workspace/run/save/model.safetensors".into(),
            output_model_format: OutputFormat::Safetensors,
            output_dtype: OutputDtype::Float32,
            workspace_dir: "workspace/run".into(),
            cache_dir: "workspace-cache/run".into(),
            continue_last_backup: false,
            tensorboard: true,
            train_device: "auto".into(),
            multi_gpu: false,
            device_indexes: String::new(),
            seed: 42,
            dataloader_threads: 2,
            learning_rate: 1e-4,
            embedding: EmbeddingConfig::default(),
            additional_embeddings: Vec::new(),
            embedding_learning_rate: None,
            bundle_additional_embeddings: true,
            optimizer,
            learning_rate_scheduler: LrScheduler::Constant,
            learning_rate_warmup_steps: 0.0,
            learning_rate_cycles: 1.0,
            learning_rate_min_factor: 0.0,
            epochs: 100,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            learning_rate_scaler: BatchScaler::None,
            loss_scaler: BatchScaler::None,
            clip_grad_norm: 1.0,
            ema: EmaMode::Off,
            ema_decay: 0.999,
            ema_update_step_interval: 5,
            gradient_checkpointing: GradientCheckpointing::On,
            train_dtype: TrainDtype::Float32,
            fallback_train_dtype: FallbackTrainDtype::Bfloat16,
            resolution: "512".into(),
            aspect_ratio_bucketing: true,
            latent_caching: true,
            clear_cache_before_training: false,
            timestep_distribution: TimestepDistribution::Uniform,
            noising_weight: 0.0,
            noising_bias: 0.0,
            timestep_shift: 1.0,
            dynamic_timestep_shifting: false,
            min_noising_strength: 0.0,
            max_noising_strength: 1.0,
            offset_noise_weight: 0.0,
            perturbation_noise_weight: 0.0,
            masked_training: false,
            unmasked_probability: 0.1,
            unmasked_weight: 0.1,
            normalize_masked_area_loss: false,
            mse_strength: 1.0,
            mae_strength: 0.0,
            huber_strength: 0.0,
            huber_delta: 1.0,
            log_cosh_strength: 0.0,
            force_v_prediction: false,
            force_epsilon_prediction: false,
            loss_weight_fn: LossWeightFn::Constant,
            loss_weight_strength: 5.0,
            unet: PartConfig::trained(),
            transformer: PartConfig::trained(),
            text_encoder: PartConfig::default(),
            text_encoder_2: PartConfig::default(),
            vae: VaeConfig::default(),
            peft_type: "lora".into(),
            adapter: toml::Table::new(),
            lora_rank: 16,
            lora_alpha: 1.0,
            lora_weight_dtype: LoraWeightDtype::Float32,
            lora_dropout: 0.0,
            lora_decompose: false,
            lora_layer_preset: LayerPreset::AttnMlp,
            lora_layers: String::new(),
            layer_filter_regex: false,
            lora_base_model: String::new(),
            validation: false,
            validate_after: 1.0,
            validate_after_unit: TimeUnit::Epoch,
            sample_after: 10.0,
            sample_after_unit: TimeUnit::Epoch,
            samples: Vec::new(),
            backup_after: 30.0,
            backup_after_unit: TimeUnit::Epoch,
            rolling_backup_count: 3,
            save_every: 0.0,
            save_every_unit: TimeUnit::Never,
            text_encoder_layer_skip: 0,
            debug_mode: false,
            debug_dir: "debug".into(),
            debug_after: 1.0,
            debug_after_unit: TimeUnit::Epoch,
            concepts: Vec::new(),
        }
    }
}

/// The capitalisation changes `caps_randomize_mode` lists (comma-separated, as OneTrainer).
pub const CAPS_MODES: &[&str] = &["capslock", "title", "first", "random"];

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.into(),
        message: e.to_string(),
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Read {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Overlays `top` on `base`, table by table (arrays and values replace).
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `a.b=value`: the value as TOML (a number, bool, array...), else as a string.
fn set(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |m: &str| ConfigError::Invalid(vec![format!("--set {assignment}: {m}")]);
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected key=value"))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts
        .pop()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("empty key"))?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{p}` is not a table")))?;
    }
    // A text option given a number (`resolution=1024`) takes it as written.
    let value = match (t.get(last), value) {
        (Some(toml::Value::String(_)), toml::Value::Integer(_) | toml::Value::Float(_)) => {
            toml::Value::String(raw.trim().to_string())
        }
        (_, v) => v,
    };
    t.insert(last.to_string(), value);
    Ok(())
}

/// The folder holding the bundled presets: `presets/` beside the executable's workspace, or
/// `$FERRITE_PRESETS`.
pub fn presets_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRITE_PRESETS") {
        return d.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets")
}

/// The bundled presets' names, sorted.
pub fn preset_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(presets_dir())
        .map(|d| {
            d.filter_map(|e| {
                let p = e.ok()?.path();
                let stem = p.file_stem()?.to_string_lossy().into_owned();
                (p.extension()? == "toml").then_some(stem)
            })
            .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl TrainConfig {
    /// Reads `config` (if any) over the defaults, then `preset` (a name in [`presets_dir`] or a
    /// path), then each `key=value` of `sets`; validates the result.
    pub fn load(config: Option<&Path>, preset: Option<&str>, sets: &[String]) -> Result<Self> {
        let c = Self::load_unchecked(config, preset, sets)?;
        c.validate()?;
        Ok(c)
    }

    /// As [`TrainConfig::load`], without the validation (the GUI shows problems at the fields),
    /// except for choices: a value outside an option's set cannot be held, so it fails the load
    /// (with every other problem of the config, to fix them in one go).
    pub fn load_unchecked(
        config: Option<&Path>,
        preset: Option<&str>,
        sets: &[String],
    ) -> Result<Self> {
        let mut table =
            toml::Table::try_from(TrainConfig::default()).expect("the defaults serialise to TOML");
        if let Some(p) = config {
            merge(&mut table, read_toml(p)?);
        }
        if let Some(name) = preset {
            let path = if Path::new(name).is_file() {
                PathBuf::from(name)
            } else {
                presets_dir().join(format!("{name}.toml"))
            };
            merge(&mut table, read_toml(&path)?);
        }
        for s in sets {
            set(&mut table, s)?;
        }
        let source = config.map_or_else(|| "the config".into(), |p| p.display().to_string());
        let mut bad_choices = choices::check_choices(&mut table);
        let c: TrainConfig = match serde_path_to_error::deserialize(toml::Value::Table(table)) {
            Ok(c) => c,
            Err(e) => {
                bad_choices.push(format!("{source}: {}: {}", e.path(), e.inner()));
                return Err(ConfigError::Invalid(bad_choices));
            }
        };
        if !bad_choices.is_empty() {
            // A bad choice has no typed value: the config cannot be used, but everything else
            // wrong with it is said in the same breath.
            let mut all = bad_choices;
            if let Err(ConfigError::Invalid(more)) = c.validate() {
                all.extend(more);
            }
            return Err(ConfigError::Invalid(all));
        }
        Ok(c)
    }

    /// What `ferrite init` writes: a LoRA config with one concept (`images/`) and one sample, the
    /// model left to fill in.
    pub fn starter() -> Self {
        Self {
            base_model_name: "path/to/model (a diffusers folder or a .safetensors checkpoint)"
                .into(),
            workspace_dir: "workspace".into(),
            cache_dir: "workspace-cache".into(),
            output_model_destination: "output/lora.safetensors".into(),
            concepts: vec![ConceptConfig {
                name: "my concept".into(),
                path: "images".into(),
                ..Default::default()
            }],
            samples: vec![SampleConfig {
                prompt: "a photo of my concept".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Writes [`TrainConfig::starter`] as `dir/config.toml` with an empty `dir/images/`; refuses
    /// to overwrite a config.
    pub fn write_starter(dir: &Path) -> Result<PathBuf> {
        let path = dir.join("config.toml");
        let fail = |message: String| ConfigError::Read {
            path: path.clone(),
            message,
        };
        if path.exists() {
            return Err(fail("exists already: not overwriting it".into()));
        }
        std::fs::create_dir_all(dir.join("images")).map_err(|e| fail(e.to_string()))?;
        crate::fsutil::write_atomic(&path, Self::starter().to_toml().as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        Ok(path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises to TOML")
    }

    /// Every problem, each with its key path.
    pub fn validate(&self) -> Result<()> {
        let mut e = Vec::new();
        let mut one_of = |key: &str, v: &str, allowed: &[&str]| {
            if !allowed.contains(&v) {
                e.push(format!("{key}: `{v}` is not one of {}", allowed.join(", ")));
            }
        };
        // The enums are checked when the config is read; what is left is a value valid on
        // its own but not with the rest.
        let formats: Vec<&str> = OutputFormat::allowed(self.training_method)
            .iter()
            .map(AsRef::as_ref)
            .collect();
        one_of(
            "output_model_format",
            self.output_model_format.as_ref(),
            &formats,
        );
        // peft_type is an adapter plugin's id: checked against the registry (plugins extend
        // the set) in `validate_plugin_options`.
        let stops: Vec<&str> = TimeUnit::STOPS.iter().map(AsRef::as_ref).collect();
        for (part, pc) in self.part_tables() {
            one_of(
                &format!("{part}.stop_training_after_unit"),
                pc.stop_training_after_unit.as_ref(),
                &stops,
            );
        }
        for (i, c) in self.concepts.iter().enumerate() {
            for mode in c.caps_randomize_mode.split(',') {
                one_of(
                    &format!("concepts[{i}].caps_randomize_mode"),
                    mode.trim(),
                    CAPS_MODES,
                );
            }
        }
        if self.multi_gpu
            && let Err(m) = crate::train::multi_gpu::device_indexes(&self.device_indexes)
        {
            e.push(format!("device_indexes: {m}"));
        }
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                e.push(msg.to_string());
            }
        };
        check(
            !self.base_model_name.is_empty(),
            "base_model_name: give a model folder or file",
        );
        check(self.learning_rate > 0.0, "learning_rate: must be above 0");
        check(self.batch_size >= 1, "batch_size: must be at least 1");
        check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps: must be at least 1",
        );
        check(self.epochs >= 1, "epochs: must be at least 1");
        check(
            (0.0..=1.0).contains(&self.learning_rate_min_factor),
            "learning_rate_min_factor: must be in [0, 1]",
        );
        check(
            self.learning_rate_scheduler != LrScheduler::Adafactor
                || self.optimizer_options().0 == "adafactor",
            "learning_rate_scheduler: adafactor is the adafactor optimizer's own rate; choose \
             optimizer = \"adafactor\" or another scheduler",
        );
        check(
            self.learning_rate_cycles > 0.0 && self.learning_rate_warmup_steps >= 0.0,
            "learning_rate_cycles, learning_rate_warmup_steps: need cycles above 0 and warmup 0 or more",
        );
        check(
            self.clip_grad_norm >= 0.0,
            "clip_grad_norm: must be 0 (off) or more",
        );
        check(
            (0.0..=1.0).contains(&self.min_noising_strength)
                && (0.0..=1.0).contains(&self.max_noising_strength)
                && self.min_noising_strength < self.max_noising_strength,
            "min_noising_strength, max_noising_strength: need 0 <= min < max <= 1",
        );
        check(self.lora_rank >= 1, "lora_rank: must be at least 1");
        check(
            !(self.force_v_prediction && self.force_epsilon_prediction),
            "force_v_prediction, force_epsilon_prediction: choose one",
        );
        check(self.timestep_shift > 0.0, "timestep_shift: must be above 0");
        check(
            (0.0..=1.0).contains(&self.unmasked_probability)
                && (0.0..=1.0).contains(&self.unmasked_weight),
            "unmasked_probability, unmasked_weight: must be in [0, 1]",
        );
        check(
            (0.0..1.0).contains(&self.ema_decay) && self.ema_update_step_interval >= 1,
            "ema_decay, ema_update_step_interval: need 0 <= decay < 1 and an interval of at least 1",
        );
        check(
            (0.0..1.0).contains(&self.lora_dropout),
            "lora_dropout: must be in [0, 1)",
        );
        check(
            self.training_method == TrainingMethod::Embedding
                || self.part_tables().iter().any(|(_, p)| p.train),
            "unet.train, transformer.train, text_encoder.train, text_encoder_2.train: train at \
             least one part",
        );
        check(
            self.training_method != TrainingMethod::Embedding || self.embedding.train,
            "embedding.train: an embedding run trains its embedding; set it to true",
        );
        check(
            (0.0..1.0).contains(&self.text_encoder.dropout_probability),
            "text_encoder.dropout_probability: must be in [0, 1)",
        );
        // Caption dropout drops the whole prompt, for every text encoder at once.
        for (table, pc) in [
            ("unet", &self.unet),
            ("text_encoder_2", &self.text_encoder_2),
        ] {
            check(
                pc.dropout_probability == 0.0,
                &format!(
                    "{table}.dropout_probability: caption dropout is \
                     text_encoder.dropout_probability (for every text encoder)"
                ),
            );
        }
        check(
            self.optimizer
                .get("optimizer")
                .and_then(|v| v.as_str())
                .is_some(),
            "optimizer.optimizer: name the optimizer plugin (adamw, adam, sgd, ...)",
        );
        check(
            self.concepts
                .iter()
                .any(|c| c.enabled && c.kind == ConceptType::Standard),
            "concepts: add at least one enabled standard concept",
        );
        let embeddings = self.embeddings();
        for (i, (what, e)) in embeddings.iter().enumerate() {
            check(
                !e.placeholder.trim().is_empty(),
                &format!("{what}.placeholder: give the text that stands for the embedding"),
            );
            check(
                !e.model_name.is_empty() || e.token_count > 0,
                &format!("{what}.token_count: a new embedding has at least one token"),
            );
            check(
                !embeddings[..i]
                    .iter()
                    .any(|(_, o)| o.placeholder == e.placeholder),
                &format!(
                    "{what}.placeholder: `{}` is used by another embedding; give each its own",
                    e.placeholder
                ),
            );
        }
        for (i, c) in self.concepts.iter().enumerate() {
            check(
                !(c.enabled
                    && c.kind == ConceptType::Prior
                    && self.training_method != TrainingMethod::Lora),
                &format!(
                    "concepts[{i}].type: a prior concept trains towards the model without its \
                     adapter, and a fine-tune or an embedding has none: use it with training_method = \
                     \"lora\", or make it a standard concept"
                ),
            );
            check(
                !c.path.is_empty(),
                &format!("concepts[{i}].path: give the image folder"),
            );
            check(
                c.balancing > 0.0,
                &format!("concepts[{i}].balancing: must be above 0"),
            );
            for (key, v) in [
                ("random_rotate_max_angle", c.random_rotate_max_angle),
                (
                    "random_brightness_max_strength",
                    c.random_brightness_max_strength,
                ),
                (
                    "random_contrast_max_strength",
                    c.random_contrast_max_strength,
                ),
                (
                    "random_saturation_max_strength",
                    c.random_saturation_max_strength,
                ),
                ("random_hue_max_strength", c.random_hue_max_strength),
            ] {
                check(
                    v.is_finite(),
                    &format!("concepts[{i}].{key}: must be a finite number"),
                );
            }
            check(
                c.image_variations >= 1 && c.text_variations >= 1,
                &format!("concepts[{i}].image_variations, text_variations: at least 1"),
            );
        }
        if let Err(m) = self.resolutions() {
            e.push(format!("resolution: {m}"));
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(e))
        }
    }

    /// `512`, `512,768` (one chosen at random per image and epoch) or `WxH`, as (width, height)
    /// targets.
    pub fn resolutions(&self) -> std::result::Result<Vec<(usize, usize)>, String> {
        let parse = |s: &str| -> std::result::Result<usize, String> {
            let v: usize = s
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a number"))?;
            if v < 8 {
                return Err(format!("{v} is too small"));
            }
            Ok(v)
        };
        self.resolution
            .split(',')
            .map(|r| match r.split_once('x') {
                Some((w, h)) => Ok((parse(w)?, parse(h)?)),
                None => parse(r).map(|v| (v, v)),
            })
            .collect()
    }

    /// The per-part tables by OneTrainer's names.
    pub fn part_tables(&self) -> [(&'static str, &PartConfig); 4] {
        [
            ("unet", &self.unet),
            ("transformer", &self.transformer),
            ("text_encoder", &self.text_encoder),
            ("text_encoder_2", &self.text_encoder_2),
        ]
    }

    /// The table a model part is configured by (its `config_table`), if the config has it.
    pub fn part(&self, table: &str) -> Option<&PartConfig> {
        self.part_tables()
            .into_iter()
            .find(|(t, _)| *t == table)
            .map(|(_, p)| p)
    }

    /// The run's embeddings with their config keys: `embedding` in an embedding run, then the
    /// additional ones.
    pub fn embeddings(&self) -> Vec<(String, &EmbeddingConfig)> {
        let main = (self.training_method == TrainingMethod::Embedding)
            .then(|| ("embedding".to_string(), &self.embedding));
        main.into_iter()
            .chain(
                self.additional_embeddings
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("additional_embeddings[{i}]"), e)),
            )
            .collect()
    }

    /// Whether this run trains a model part (it can be, and its table says so); an embedding
    /// run trains none.
    pub fn trains(&self, part: &ferrite_plugin_api::Part) -> bool {
        self.training_method != TrainingMethod::Embedding
            && part.trainable
            && self.part(&part.config_table).is_some_and(|t| t.train)
    }

    /// `v_prediction` or `epsilon` when one is forced.
    pub fn forced_prediction(&self) -> Option<&'static str> {
        if self.force_v_prediction {
            Some("v_prediction")
        } else if self.force_epsilon_prediction {
            Some("epsilon")
        } else {
            None
        }
    }

    /// The optimizer plugin id and its options (the table without `optimizer`).
    pub fn optimizer_options(&self) -> (String, serde_json::Value) {
        let mut t = self.optimizer.clone();
        let id = t
            .remove("optimizer")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        (id, serde_json::to_value(t).unwrap_or_default())
    }

    /// The adapter's options as its plugin receives them (LoRA training).
    pub fn adapter_options(&self) -> crate::adapters::AdapterOptions {
        crate::adapters::AdapterOptions {
            kind: self.peft_type.clone(),
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            dora: self.lora_decompose,
            seed: self.seed,
            extra: serde_json::to_value(&self.adapter)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default(),
        }
    }

    /// The adapter's and the optimizer's options checked against their plugins' own schemas,
    /// each problem naming the config key (e.g. LoHa has no dropout: `lora_dropout`).
    pub fn validate_plugin_options(&self, registry: &crate::plugins::Registry) -> Result<()> {
        use ferrite_plugin_api::ComponentKind;
        let mut e = Vec::new();
        if self.training_method == TrainingMethod::Lora {
            // The options the host sets from its own fields, or itself.
            for key in self.adapter.keys().filter(|k| {
                matches!(
                    k.as_str(),
                    "rank"
                        | "alpha"
                        | "dropout"
                        | "dora"
                        | "seed"
                        | "multiplier"
                        | "layer"
                        | "file_shapes"
                )
            }) {
                e.push(format!(
                    "adapter.{key}: set by lora_rank, lora_alpha, lora_dropout, lora_decompose, \
                     seed or the host, not in [adapter]"
                ));
            }
            let a = self.adapter_options();
            let json = a.for_plugin(registry);
            for (option, problem) in
                registry.option_problems(ComponentKind::Adapter, &a.kind, &json)
            {
                let key = match option.as_deref() {
                    Some("rank") => "lora_rank",
                    Some("alpha") => "lora_alpha",
                    Some("dropout") => "lora_dropout",
                    Some("dora") => "lora_decompose",
                    Some("seed") => "seed",
                    Some(other) if self.adapter.contains_key(other) => {
                        e.push(format!("adapter.{other}: {problem}"));
                        continue;
                    }
                    _ => "peft_type",
                };
                e.push(format!("{key}: {problem}"));
            }
        }
        let (id, options) = self.optimizer_options();
        if self.optimizer.contains_key("learning_rate") {
            e.push(
                "optimizer.learning_rate: set by learning_rate (and each part's), not in \
                 [optimizer]"
                    .into(),
            );
        }
        for (option, problem) in registry.option_problems(ComponentKind::Optimizer, &id, &options) {
            let key = option.map_or_else(
                || "optimizer.optimizer".into(),
                |o| format!("optimizer.{o}"),
            );
            e.push(format!("{key}: {problem}"));
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(e))
        }
    }

    /// The files that hold parts' weights in place of the base model's (`<part>.model_name`,
    /// `vae.model_name`) by part id, as the architecture's `part_files` option takes them.
    pub fn part_files(&self, base: &Path) -> std::collections::BTreeMap<String, PathBuf> {
        self.part_tables()
            .into_iter()
            .map(|(t, p)| (t, p.model_name.as_str()))
            .chain([("vae", self.vae.model_name.as_str())])
            .filter(|(_, f)| !f.is_empty())
            .map(|(t, f)| (t.to_string(), Self::path(base, f)))
            .collect()
    }

    /// The base model's path: relative to `base` unless absolute, or a Hugging Face repo id's
    /// snapshot in the local cache ([`crate::hub`]).
    pub fn base_model_path(&self, base: &Path) -> PathBuf {
        crate::hub::model_path(base, &self.base_model_name)
    }

    /// Every file or folder the model is read from: the base model, its config folder and the
    /// parts' own files.
    pub fn model_paths(&self, base: &Path) -> Vec<PathBuf> {
        let mut out = vec![self.base_model_path(base)];
        if !self.base_model_config.is_empty() {
            out.push(Self::path(base, &self.base_model_config));
        }
        out.extend(self.part_files(base).into_values());
        out
    }

    /// A path from the config, relative to `base` (the config file's folder) unless absolute.
    pub fn path(base: &Path, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.into()
        } else {
            base.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const MINIMAL: &str = r#"
base_model_name = "model"
[[concepts]]
path = "images"
"#;

    #[test]
    fn presets_and_sets_go_over_the_config() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "c.toml",
            &format!("learning_rate = 0.5\nlora_rank = 4\n{MINIMAL}"),
        );
        let preset = write(
            d.path(),
            "p.toml",
            "lora_rank = 8\n[unet]\nlearning_rate = 0.25\n",
        );
        let sets = [
            "epochs=3".to_string(),
            "optimizer.weight_decay=0.0".to_string(),
            "text_encoder.train=true".to_string(),
            // A text option given a number.
            "resolution=1024".to_string(),
        ];
        let c = TrainConfig::load(Some(&cfg), Some(preset.to_str().unwrap()), &sets).unwrap();
        assert_eq!(c.resolution, "1024");
        // Only numbers: a list given to a text option is still refused.
        let e = TrainConfig::load(Some(&cfg), None, &["resolution=[512]".to_string()]);
        assert!(e.is_err());
        assert_eq!(c.learning_rate, 0.5);
        assert_eq!(c.lora_rank, 8, "the preset wins over the file");
        assert_eq!(c.unet.learning_rate, Some(0.25));
        assert!(c.unet.train, "defaults stay where nothing overrides them");
        assert_eq!(c.epochs, 3);
        assert!(c.text_encoder.train);
        let (id, opts) = c.optimizer_options();
        assert_eq!(
            (id.as_str(), opts["weight_decay"].as_f64()),
            ("adamw", Some(0.0))
        );
        // Round trip through TOML.
        let again = write(d.path(), "again.toml", &c.to_toml());
        assert_eq!(TrainConfig::load(Some(&again), None, &[]).unwrap(), c);
    }

    #[test]
    fn every_bundled_preset_loads_over_a_minimal_config() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(d.path(), "c.toml", MINIMAL);
        let names = preset_names();
        assert_eq!(
            names,
            [
                "demo",
                "flux-dev-lora",
                "flux-dev-lora-24gb",
                "sd15-embedding",
                "sd15-finetune",
                "sd15-lora",
                "sd2-lora",
                "sdxl-embedding",
                "sdxl-finetune",
                "sdxl-lora"
            ]
        );
        for name in &names {
            let c = TrainConfig::load(Some(&cfg), Some(name), &[]);
            assert!(c.is_ok(), "{name}: {}", c.unwrap_err());
        }
        let ft = TrainConfig::load(Some(&cfg), Some("sd15-finetune"), &[]).unwrap();
        assert_eq!(
            (ft.training_method, ft.text_encoder.learning_rate),
            (TrainingMethod::FineTune, Some(5e-6))
        );
        // OneTrainer's "#sdxl 1.0 LoRA" values.
        let xl = TrainConfig::load(Some(&cfg), Some("sdxl-lora"), &[]).unwrap();
        assert_eq!(
            (
                xl.model_type.as_str(),
                xl.resolution.as_str(),
                xl.learning_rate,
                xl.batch_size,
                xl.offset_noise_weight,
                xl.learning_rate_warmup_steps,
                xl.text_encoder_2.train,
            ),
            ("sdxl", "1024", 3e-4, 4, 0.05, 200.0, false)
        );
    }

    #[test]
    fn caption_dropout_is_the_first_text_encoders_table_only() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(d.path(), "c.toml", MINIMAL);
        let sets = ["text_encoder_2.dropout_probability=0.5".to_string()];
        let e = TrainConfig::load(Some(&cfg), None, &sets).unwrap_err();
        assert!(
            e.to_string()
                .contains("text_encoder_2.dropout_probability: caption dropout is"),
            "{e}"
        );
    }

    #[test]
    fn a_prior_concept_in_a_fine_tune_is_refused_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "c.toml",
            &format!(
                "training_method = \"fine_tune\"\n{MINIMAL}\n[[concepts]]\npath = \"p\"\ntype = \"prior\"\n"
            ),
        );
        let e = TrainConfig::load(Some(&cfg), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("concepts[1].type") && e.contains("a fine-tune or an embedding has none"),
            "{e}"
        );
        let lora = write(
            d.path(),
            "l.toml",
            &format!("{MINIMAL}\n[[concepts]]\npath = \"p\"\ntype = \"prior\"\n"),
        );
        TrainConfig::load(Some(&lora), None, &[]).unwrap();
    }

    #[test]
    fn a_part_can_stop_after_every_unit_but_always() {
        let mut all: Vec<TimeUnit> = TimeUnit::VARIANTS.to_vec();
        all.retain(|u| *u != TimeUnit::Always);
        assert_eq!(TimeUnit::STOPS, all);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "c.toml",
            r#"
learning_rate = -1
batch_size = 0
resolution = "abc"
learning_rate_scheduler = "sometimes"
[unet]
stop_training_after_unit = "fortnight"
[text_encoder]
stop_training_after_unit = "always"
[[concepts]]
path = ""
prompt_source = "dreams"
[[samples]]
sampler = "magic"
"#,
        );
        let e = TrainConfig::load(Some(&cfg), None, &[])
            .unwrap_err()
            .to_string();
        for needle in [
            "base_model_name",
            "learning_rate: must be above 0",
            "batch_size",
            "resolution: `abc`",
            "learning_rate_scheduler: `sometimes`",
            "concepts[0].prompt_source: `dreams`",
            "concepts[0].path",
            "unet.stop_training_after_unit: `fortnight`",
            "samples[0].sampler: `magic` is not one of ddim, euler, euler_a, dpmpp_2m_karras",
            "text_encoder.stop_training_after_unit: `always`",
        ] {
            assert!(e.contains(needle), "`{needle}` missing from:\n{e}");
        }
        let typo = write(d.path(), "t.toml", &format!("learning_rat = 1\n{MINIMAL}"));
        let e = TrainConfig::load(Some(&typo), None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rat"), "{e}");
        let wrong_type = write(
            d.path(),
            "w.toml",
            &format!("ema = \"sometimes\"\n{MINIMAL}\n[unet]\ntrain = \"yes\"\n"),
        );
        let e = TrainConfig::load(Some(&wrong_type), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unet.train") && e.contains("ema: `sometimes`"),
            "{e}"
        );
    }
}
