//! Every concept image and text option, and every loss option, set alone (over the base setting
//! it needs) changes what it should — the prepared batch (items, pixels, masks, captions,
//! timesteps, loss weights) or the loss — and nothing else. Every option of `ConceptConfig` and of
//! `TrainConfig` must be in the table or in the list of options shown by other tests, so an option
//! added without a row fails here.

use ferrite::config::{
    BalancingStrategy, ConceptType, LossWeightFn, PromptSource, TimestepDistribution,
};
use std::collections::BTreeSet;
use std::path::Path;

use ferrite::config::{ConceptConfig, TrainConfig};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::Trainer;
use ferrite_tests::profile_dir;

/// What a probe of the first batch can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    /// Which items, and which are prior images.
    Batch,
    Pixels,
    Masks,
    Captions,
    Timesteps,
    /// The concepts' loss weights.
    Weights,
    Loss,
}
use Part::*;

#[derive(Debug, PartialEq)]
struct Seen {
    batch: (Vec<usize>, Vec<bool>),
    pixels: Vec<f32>,
    masks: Vec<f32>,
    captions: Vec<String>,
    timesteps: Vec<usize>,
    weights: Vec<f64>,
    loss: f32,
}

impl Seen {
    fn differs(&self, other: &Seen, part: Part) -> bool {
        match part {
            Batch => self.batch != other.batch,
            Pixels => self.pixels != other.pixels,
            Masks => self.masks != other.masks,
            Captions => self.captions != other.captions,
            Timesteps => self.timesteps != other.timesteps,
            Weights => self.weights != other.weights,
            Loss => self.loss != other.loss,
        }
    }
}

type Change = fn(&mut TrainConfig);

enum Row {
    /// Setting the option (`set`) over `base` changes exactly `parts` of the batch of `epoch`
    /// (the loss may follow any changed input).
    Changes {
        key: &'static str,
        base: Change,
        set: Change,
        parts: &'static [Part],
        epoch: u64,
    },
    /// Shown end to end by the named test instead.
    Elsewhere(&'static str, &'static str),
}

fn none(_: &mut TrainConfig) {}

fn c0(c: &mut TrainConfig) -> &mut ConceptConfig {
    &mut c.concepts[0]
}

macro_rules! row {
    ($key:literal, $set:expr, $parts:expr) => {
        row!($key, none, $set, $parts)
    };
    ($key:literal, $base:expr, $set:expr, $parts:expr) => {
        Row::Changes {
            key: $key,
            base: $base,
            set: $set,
            parts: $parts,
            epoch: 0,
        }
    };
}

fn table() -> Vec<Row> {
    let at_epoch_1 = |r: Row| match r {
        Row::Changes {
            key,
            base,
            set,
            parts,
            ..
        } => Row::Changes {
            key,
            base,
            set,
            parts,
            epoch: 1,
        },
        other => other,
    };
    vec![
        // ---- concept: what it is and where its images and captions come from ----
        row!("concepts.name", |c| c0(c).name = "another".into(), &[]),
        Row::Elsewhere(
            "concepts.enabled",
            "config validation (an enabled standard concept is required) and Dataset::scan",
        ),
        row!(
            "concepts.type",
            // A standard concept is required; this one adds no images.
            |c| {
                let mut none = c.concepts[0].clone();
                none.balancing_strategy = BalancingStrategy::Samples;
                none.balancing = 0.1;
                c.concepts.push(none);
            },
            |c| c0(c).kind = ConceptType::Prior,
            &[Batch, Loss]
        ),
        Row::Elsewhere(
            "concepts.path",
            "every training test (the images are read from it)",
        ),
        Row::Elsewhere(
            "concepts.include_subdirectories",
            "Dataset::scan (images_in recurses only when set)",
        ),
        row!(
            "concepts.prompt_source",
            |c| c0(c).prompt_source = PromptSource::Filename,
            &[Captions]
        ),
        row!(
            "concepts.text_file",
            |c| {
                c0(c).prompt_source = PromptSource::Concept;
                c0(c).text_file = "alpha.txt".into();
            },
            |c| c0(c).text_file = "beta.txt".into(),
            &[Captions]
        ),
        row!("concepts.balancing", |c| c0(c).balancing = 2.0, &[Batch]),
        row!(
            "concepts.balancing_strategy",
            |c| c0(c).balancing_strategy = BalancingStrategy::Samples,
            &[Batch]
        ),
        row!(
            "concepts.loss_weight",
            |c| c0(c).loss_weight = 2.0,
            &[Weights, Loss]
        ),
        at_epoch_1(row!(
            "concepts.image_variations",
            |c| {
                c.latent_caching = true;
                c0(c).enable_random_flip = true;
                c0(c).enable_crop_jitter = true;
            },
            |c| c0(c).image_variations = 2,
            &[Pixels, Masks]
        )),
        at_epoch_1(row!(
            "concepts.text_variations",
            |c| {
                c.latent_caching = true;
                c0(c).enable_tag_shuffling = true;
            },
            |c| c0(c).text_variations = 2,
            &[Captions]
        )),
        // ---- concept: text ----
        row!(
            "concepts.enable_tag_shuffling",
            |c| c0(c).enable_tag_shuffling = true,
            &[Captions]
        ),
        row!(
            "concepts.tag_delimiter",
            |c| c0(c).enable_tag_shuffling = true,
            |c| c0(c).tag_delimiter = ";".into(),
            &[Captions]
        ),
        row!(
            "concepts.keep_tags_count",
            |c| c0(c).enable_tag_shuffling = true,
            |c| c0(c).keep_tags_count = 3,
            &[Captions]
        ),
        row!(
            "concepts.tag_dropout_enable",
            |c| c0(c).tag_dropout_probability = 0.5,
            |c| c0(c).tag_dropout_enable = true,
            &[Captions]
        ),
        row!(
            "concepts.tag_dropout_probability",
            |c| c0(c).tag_dropout_enable = true,
            |c| c0(c).tag_dropout_probability = 0.7,
            &[Captions]
        ),
        row!(
            "concepts.caps_randomize_enable",
            |c| c0(c).caps_randomize_probability = 1.0,
            |c| c0(c).caps_randomize_enable = true,
            &[Captions]
        ),
        row!(
            "concepts.caps_randomize_mode",
            |c| {
                c0(c).caps_randomize_enable = true;
                c0(c).caps_randomize_probability = 1.0;
            },
            |c| c0(c).caps_randomize_mode = "capslock".into(),
            &[Captions]
        ),
        row!(
            "concepts.caps_randomize_probability",
            |c| c0(c).caps_randomize_enable = true,
            |c| c0(c).caps_randomize_probability = 1.0,
            &[Captions]
        ),
        row!(
            "concepts.caps_randomize_lowercase",
            |c| c0(c).caps_randomize_enable = true,
            |c| c0(c).caps_randomize_lowercase = true,
            &[Captions]
        ),
        // ---- concept: image (flip and rotation move the mask too; colour never does) ----
        row!(
            "concepts.enable_crop_jitter",
            |c| c0(c).enable_crop_jitter = true,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.enable_random_flip",
            |c| c0(c).enable_random_flip = true,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.enable_fixed_flip",
            |c| c0(c).enable_fixed_flip = true,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.enable_random_rotate",
            |c| c0(c).random_rotate_max_angle = 30.0,
            |c| c0(c).enable_random_rotate = true,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.enable_fixed_rotate",
            |c| c0(c).random_rotate_max_angle = 30.0,
            |c| c0(c).enable_fixed_rotate = true,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.random_rotate_max_angle",
            |c| {
                c0(c).enable_fixed_rotate = true;
                c0(c).random_rotate_max_angle = 30.0;
            },
            |c| c0(c).random_rotate_max_angle = 60.0,
            &[Pixels, Masks]
        ),
        row!(
            "concepts.enable_random_brightness",
            |c| c0(c).random_brightness_max_strength = 0.3,
            |c| c0(c).enable_random_brightness = true,
            &[Pixels]
        ),
        row!(
            "concepts.enable_fixed_brightness",
            |c| c0(c).random_brightness_max_strength = 0.3,
            |c| c0(c).enable_fixed_brightness = true,
            &[Pixels]
        ),
        row!(
            "concepts.random_brightness_max_strength",
            |c| c0(c).enable_fixed_brightness = true,
            |c| c0(c).random_brightness_max_strength = 0.3,
            &[Pixels]
        ),
        row!(
            "concepts.enable_random_contrast",
            |c| c0(c).random_contrast_max_strength = 0.3,
            |c| c0(c).enable_random_contrast = true,
            &[Pixels]
        ),
        row!(
            "concepts.enable_fixed_contrast",
            |c| c0(c).random_contrast_max_strength = 0.3,
            |c| c0(c).enable_fixed_contrast = true,
            &[Pixels]
        ),
        row!(
            "concepts.random_contrast_max_strength",
            |c| c0(c).enable_fixed_contrast = true,
            |c| c0(c).random_contrast_max_strength = 0.3,
            &[Pixels]
        ),
        row!(
            "concepts.enable_random_saturation",
            |c| c0(c).random_saturation_max_strength = 0.3,
            |c| c0(c).enable_random_saturation = true,
            &[Pixels]
        ),
        row!(
            "concepts.enable_fixed_saturation",
            |c| c0(c).random_saturation_max_strength = 0.3,
            |c| c0(c).enable_fixed_saturation = true,
            &[Pixels]
        ),
        row!(
            "concepts.random_saturation_max_strength",
            |c| c0(c).enable_fixed_saturation = true,
            |c| c0(c).random_saturation_max_strength = 0.3,
            &[Pixels]
        ),
        row!(
            "concepts.enable_random_hue",
            |c| c0(c).random_hue_max_strength = 0.3,
            |c| c0(c).enable_random_hue = true,
            &[Pixels]
        ),
        row!(
            "concepts.enable_fixed_hue",
            |c| c0(c).random_hue_max_strength = 0.3,
            |c| c0(c).enable_fixed_hue = true,
            &[Pixels]
        ),
        row!(
            "concepts.random_hue_max_strength",
            |c| c0(c).enable_fixed_hue = true,
            |c| c0(c).random_hue_max_strength = 0.3,
            &[Pixels]
        ),
        // ---- data ----
        row!(
            "resolution",
            |c| c.resolution = "8".into(),
            &[Pixels, Masks]
        ),
        row!(
            "aspect_ratio_bucketing",
            |c| c.aspect_ratio_bucketing = true,
            &[Pixels, Masks]
        ),
        row!(
            "text_encoder.dropout_probability",
            |c| c.text_encoder.dropout_probability = 0.9,
            &[Captions]
        ),
        // ---- noise and timesteps ----
        row!(
            "timestep_distribution",
            |c| c.timestep_distribution = TimestepDistribution::LogitNormal,
            &[Timesteps]
        ),
        row!(
            "noising_weight",
            |c| c.timestep_distribution = TimestepDistribution::LogitNormal,
            |c| c.noising_weight = 1.0,
            &[Timesteps]
        ),
        row!(
            "noising_bias",
            |c| c.timestep_distribution = TimestepDistribution::LogitNormal,
            |c| c.noising_bias = 0.5,
            &[Timesteps]
        ),
        row!("timestep_shift", |c| c.timestep_shift = 3.0, &[Timesteps]),
        row!(
            "min_noising_strength",
            |c| c.min_noising_strength = 0.5,
            &[Timesteps]
        ),
        row!(
            "max_noising_strength",
            |c| c.max_noising_strength = 0.5,
            &[Timesteps]
        ),
        row!(
            "offset_noise_weight",
            |c| c.offset_noise_weight = 0.2,
            &[Loss]
        ),
        row!(
            "perturbation_noise_weight",
            |c| c.perturbation_noise_weight = 0.2,
            &[Loss]
        ),
        // ---- loss ----
        row!(
            "masked_training",
            |c| c.unmasked_probability = 0.0,
            |c| c.masked_training = true,
            &[Loss]
        ),
        row!(
            "unmasked_probability",
            |c| {
                c.masked_training = true;
                c.unmasked_probability = 0.0;
            },
            |c| c.unmasked_probability = 1.0,
            &[Masks]
        ),
        row!(
            "unmasked_weight",
            |c| {
                c.masked_training = true;
                c.unmasked_probability = 0.0;
            },
            |c| c.unmasked_weight = 0.6,
            &[Loss]
        ),
        row!(
            "normalize_masked_area_loss",
            |c| {
                c.masked_training = true;
                c.unmasked_probability = 0.0;
            },
            |c| c.normalize_masked_area_loss = true,
            &[Loss]
        ),
        row!("mse_strength", |c| c.mse_strength = 2.0, &[Loss]),
        row!("mae_strength", |c| c.mae_strength = 1.0, &[Loss]),
        row!("huber_strength", |c| c.huber_strength = 1.0, &[Loss]),
        row!(
            "huber_delta",
            |c| c.huber_strength = 1.0,
            |c| c.huber_delta = 0.05,
            &[Loss]
        ),
        row!("log_cosh_strength", |c| c.log_cosh_strength = 1.0, &[Loss]),
        row!(
            "force_v_prediction",
            |c| c.force_v_prediction = true,
            &[Loss]
        ),
        Row::Elsewhere(
            "force_epsilon_prediction",
            "train::a_forced_prediction_type_trains_and_saves_as_that (the test model is epsilon already)",
        ),
        // (min_snr_gamma only changes steps whose SNR is above γ, which a batch may not have.)
        row!(
            "loss_weight_fn",
            |c| c.loss_weight_fn = LossWeightFn::P2,
            &[Loss]
        ),
        row!(
            "loss_weight_strength",
            |c| c.loss_weight_fn = LossWeightFn::MinSnrGamma,
            |c| c.loss_weight_strength = 0.5,
            &[Loss]
        ),
        row!(
            "text_encoder_layer_skip",
            |c| c.text_encoder_layer_skip = 1,
            &[Loss]
        ),
    ]
}

/// Options of `TrainConfig` that are not about the prepared batch or the loss, and where they
/// are shown.
const ELSEWHERE: &[(&str, &str)] = &[
    (
        "embedding",
        "embeddings: an_embedding_run_trains_only_its_vectors_and_saves_a1111s_file",
    ),
    (
        "additional_embeddings",
        "embeddings: additional_embeddings_train_with_a_lora_and_go_in_its_file_or_beside_it",
    ),
    (
        "bundle_additional_embeddings",
        "embeddings: additional_embeddings_train_with_a_lora_and_go_in_its_file_or_beside_it",
    ),
    (
        "embedding_learning_rate",
        "embeddings: the_embedding_learning_rate_is_the_embeddings_own",
    ),
    ("training_method", "train: fine-tune and LoRA tests"),
    ("model_type", "plugins and train tests"),
    ("base_model_name", "every training test"),
    ("base_model_config", "sd15_single_file"),
    (
        "output_model_destination",
        "train::the_output_never_replaces_what_ferrite_did_not_write",
    ),
    ("output_model_format", "train, check_trained_lora.sh"),
    ("workspace_dir", "train: backups and resume"),
    ("cache_dir", "train: cache tests"),
    ("continue_last_backup", "train: exact resume"),
    ("tensorboard", "check_tensorboard.py"),
    (
        "train_device",
        "train_cli::ctrl_c_... (auto says where and why)",
    ),
    (
        "seed",
        "train: exact resume; a_second_run_with_another_seed_reuses_the_cache",
    ),
    (
        "dataloader_threads",
        "train::loader_threads_do_not_change_the_run",
    ),
    ("learning_rate", "train: lr schedule and training tests"),
    (
        "optimizer",
        "optim_parity, train::adapter_options_are_checked_against_the_plugins_schema",
    ),
    (
        "learning_rate_scheduler",
        "trainer::schedule unit tests, train::the_lr_schedule_reaches_the_optimizer, \
         train::adafactors_schedule_reports_its_relative_step",
    ),
    (
        "learning_rate_warmup_steps",
        "trainer::schedule unit tests, train::the_lr_schedule_reaches_the_optimizer",
    ),
    ("learning_rate_cycles", "trainer::schedule unit tests"),
    (
        "learning_rate_min_factor",
        "trainer::schedule unit tests, train::the_lr_schedule_reaches_the_optimizer",
    ),
    ("epochs", "every training test"),
    ("batch_size", "every training test"),
    ("gradient_accumulation_steps", "train tests"),
    (
        "multi_gpu",
        "data_parallel::multi_gpu_starts_a_process_per_device, \
         gui::the_general_tab_has_the_multi_gpu_options",
    ),
    (
        "device_indexes",
        "data_parallel::multi_gpu_starts_a_process_per_device, multi_gpu unit tests",
    ),
    (
        "learning_rate_scaler",
        "train::the_learning_rate_and_loss_scalers_reach_the_step, config::choices unit tests",
    ),
    (
        "loss_scaler",
        "train::the_learning_rate_and_loss_scalers_reach_the_step, config::choices unit tests",
    ),
    ("clip_grad_norm", "train tests"),
    (
        "ema",
        "train: EMA resume, ema_in_host_memory_matches_ema_on_the_device",
    ),
    ("ema_decay", "train: EMA tests"),
    ("ema_update_step_interval", "train: EMA tests"),
    (
        "output_dtype",
        "train::the_output_dtype_is_the_saved_files_dtype",
    ),
    (
        "gradient_checkpointing",
        "train::gradient_checkpointing_trains_the_same_model, runtime checkpoint tests, \
         tests/bench/lora_step.sh (memory)",
    ),
    (
        "train_dtype",
        "train::train_dtype_trains_near_the_f32_run_and_float16_skips_overflowed_steps, \
         runtime autocast tests",
    ),
    (
        "fallback_train_dtype",
        "flux_train::a_float16_run_computes_t5_in_the_fallback_dtype, \
         train::a_region_without_float16_computes_in_the_fallback_dtype",
    ),
    ("latent_caching", "train: cache tests"),
    ("clear_cache_before_training", "train: cache tests"),
    ("unet", "train: per-part tests"),
    (
        "text_encoder",
        "train: per-part tests (dropout_probability is in the table; weight_dtype: \
         train::frozen_weights_kept_below_f32_train_near_the_f32_run)",
    ),
    (
        "text_encoder_2",
        "sdxl: sdxl_lora_trains_each_part_named_by_its_table",
    ),
    (
        "dynamic_timestep_shifting",
        "flux_train::flux_lora_trains_and_saves_in_diffusers_and_kohya_layouts (the losses change), \
         trainer::noising::shift_tests (bigger images draw noisier timesteps; DDPM refuses it)",
    ),
    (
        "transformer",
        "flux_train::flux_lora_trains_and_saves_in_diffusers_and_kohya_layouts (guidance_scale: \
         the same test's run with another guidance); model_name of every part: \
         flux_train::a_run_takes_parts_from_their_model_name_files",
    ),
    (
        "vae",
        "model_name: flux_train::a_run_takes_parts_from_their_model_name_files",
    ),
    (
        "peft_type",
        "adapters, train::adapter_options_are_checked_against_the_plugins_schema",
    ),
    ("lora_rank", "adapters"),
    (
        "adapter",
        "adapters::fresh_lokr_adapters_follow_their_options, \
         train::a_lokr_run_takes_its_options_from_the_adapter_table, \
         train::an_oft_run_takes_its_block_options, \
         adapters::constrained_oft_projects_its_blocks_as_peft_does",
    ),
    ("lora_alpha", "adapters"),
    (
        "lora_weight_dtype",
        "train::lora_weight_dtype_keeps_and_trains_the_adapters_in_it, runtime autocast tests",
    ),
    (
        "lora_dropout",
        "train::a_resumed_run_with_ema_and_lora_dropout_repeats_the_uninterrupted_one_exactly",
    ),
    ("lora_decompose", "adapters (DoRA)"),
    ("lora_layer_preset", "adapters: layer selection"),
    ("lora_layers", "adapters: layer selection"),
    ("layer_filter_regex", "adapters: layer selection"),
    ("lora_base_model", "train: resume from an adapter file"),
    (
        "validation",
        "train::validation_loss_is_repeatable_and_falls_as_the_lora_learns",
    ),
    ("validate_after", "train: validation"),
    ("validate_after_unit", "train: validation"),
    ("sample_after", "train, demo"),
    ("sample_after_unit", "train, demo"),
    ("samples", "demo, gui"),
    ("backup_after", "train: backups"),
    ("backup_after_unit", "train: backups"),
    ("rolling_backup_count", "train_cli: backups"),
    (
        "save_every",
        "train::a_part_stops_after_its_limit_and_always_and_timed_units_fire",
    ),
    ("save_every_unit", "train: intervals"),
    (
        "debug_mode",
        "train_cli::debug_inputs_show_the_fixed_augmentations",
    ),
    (
        "debug_dir",
        "train_cli::debug_inputs_show_the_fixed_augmentations",
    ),
    (
        "debug_after",
        "train_cli::debug_inputs_show_the_fixed_augmentations",
    ),
    (
        "debug_after_unit",
        "train_cli::debug_inputs_show_the_fixed_augmentations",
    ),
    ("concepts", "the concept rows of the table"),
];

/// Six 24×16 images (non-square, so a crop has room to move) with masks and tagged captions.
fn dataset(root: &Path) {
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..6u32 {
        image::RgbImage::from_fn(24, 16, |x, y| {
            image::Rgb([
                (x * 10 + i * 20) as u8,
                (y * 15) as u8,
                if x < 8 { 200 } else { 40 },
            ])
        })
        .save(dir.join(format!("{i}.png")))
        .unwrap();
        image::GrayImage::from_fn(24, 16, |x, y| {
            image::Luma([if x + y < 20 { 255 } else { 30 }])
        })
        .save(dir.join(format!("{i}-masklabel.png")))
        .unwrap();
        std::fs::write(
            dir.join(format!("{i}.txt")),
            format!("Red thing {i}, square, big, Shiny, bright\n"),
        )
        .unwrap();
    }
    std::fs::write(root.join("alpha.txt"), "alpha caption\n").unwrap();
    std::fs::write(root.join("beta.txt"), "beta caption\n").unwrap();
}

/// The base config: nothing random in the images, the whole epoch in one batch, no cache.
fn base_config(root: &Path, name: &str) -> TrainConfig {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let p = root.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"base_model_name = "{}"
workspace_dir = "ws-{name}"
cache_dir = "cache-{name}"
output_model_destination = "out-{name}/lora.safetensors"
resolution = "16"
aspect_ratio_bucketing = false
latent_caching = false
batch_size = 6
epochs = 2
lora_rank = 4
dataloader_threads = 0
tensorboard = false
[[concepts]]
path = "images"
enable_crop_jitter = false
enable_random_flip = false
"#,
            model.display()
        ),
    )
    .unwrap();
    TrainConfig::load(Some(&p), None, &[]).unwrap()
}

fn seen(c: TrainConfig, root: &Path, epoch: u64) -> Seen {
    c.validate()
        .unwrap_or_else(|e| panic!("the row's config is invalid: {e}"));
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let t = Trainer::new(c, root, registry).unwrap();
    let p = t.probe(epoch, 0).unwrap();
    let pixels = p
        .loaded
        .images
        .iter()
        .flat_map(|i| match i {
            ferrite::data::loader::Image::Pixels(v)
            | ferrite::data::loader::Image::Miss { pixels: v, .. } => v.clone(),
            ferrite::data::loader::Image::Cached { mean, .. } => mean.clone(),
        })
        .collect();
    Seen {
        batch: (p.items, p.loaded.prior),
        pixels,
        masks: p.loaded.masks,
        captions: p.loaded.prompts,
        timesteps: p.loaded.timesteps,
        weights: p.loaded.weights,
        loss: p.loss,
    }
}

/// The top-level keys of a serialised value.
fn keys(v: impl serde::Serialize) -> BTreeSet<String> {
    serde_json::to_value(v)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn every_data_and_loss_option_changes_what_it_should_and_nothing_else() {
    let table = table();
    let in_table: BTreeSet<String> = table
        .iter()
        .map(|r| match r {
            Row::Changes { key, .. } | Row::Elsewhere(key, _) => key.to_string(),
        })
        .collect();
    let concept_keys: BTreeSet<String> = keys(ConceptConfig::default())
        .into_iter()
        .map(|k| format!("concepts.{k}"))
        .collect();
    let missing: Vec<&String> = concept_keys.difference(&in_table).collect();
    assert!(
        missing.is_empty(),
        "concept options without a row: {missing:?}"
    );
    let elsewhere: BTreeSet<String> = ELSEWHERE.iter().map(|(k, _)| k.to_string()).collect();
    let unplaced: Vec<String> = keys(TrainConfig::default())
        .into_iter()
        .filter(|k| !in_table.contains(k) && !elsewhere.contains(k))
        .collect();
    assert!(
        unplaced.is_empty(),
        "options neither in the table nor in ELSEWHERE: {unplaced:?}"
    );

    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    dataset(root);
    let mut failures = Vec::new();
    for (n, row) in table.iter().enumerate() {
        let (key, base, set, parts, epoch) = match row {
            Row::Changes {
                key,
                base,
                set,
                parts,
                epoch,
            } => (key, base, set, parts, epoch),
            Row::Elsewhere(key, by) => {
                println!("{key}: shown by {by}");
                continue;
            }
        };
        let mut before = base_config(root, &format!("r{n}a"));
        base(&mut before);
        let mut after = base_config(root, &format!("r{n}b"));
        base(&mut after);
        set(&mut after);
        let (a, b) = (seen(before, root, *epoch), seen(after, root, *epoch));
        let changed: Vec<Part> = [Batch, Pixels, Masks, Captions, Timesteps, Weights, Loss]
            .into_iter()
            .filter(|&p| a.differs(&b, p))
            .collect();
        let inputs_changed = changed.iter().any(|&p| p != Loss);
        // A different batch changes everything in it; a changed input may change the loss.
        let ok = parts.iter().all(|p| changed.contains(p))
            && changed.iter().all(|p| {
                parts.contains(p) || parts.contains(&Batch) || (*p == Loss && inputs_changed)
            });
        println!("{key}: changed {changed:?} (expected {parts:?})");
        if !ok {
            failures.push(format!("{key}: changed {changed:?}, expected {parts:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
