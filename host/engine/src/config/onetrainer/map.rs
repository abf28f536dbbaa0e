//! OneTrainer's fields onto Ferrite's config. A key missing from the file takes OneTrainer's
//! default (that is what OneTrainer would train with), not Ferrite's; every key read is consumed,
//! so what is left is reported as not imported.

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::source::{Obj, Report};
use super::{ImportError, Paths};
use crate::config::{
    ConceptConfig, ConceptType, EmbeddingConfig, GradientCheckpointing, LayerPreset, OutputFormat,
    PartConfig, SampleConfig, Sampler, TimeUnit, TrainConfig, TrainingMethod, WeightDtype,
};

/// A Ferrite choice from OneTrainer's name of it: its enums are Ferrite's in upper case, and
/// its data types lose their underscore (`FLOAT_32` → `float32`).
fn choice<T: DeserializeOwned>(ot: &str) -> Option<T> {
    let plain = ot.to_ascii_lowercase();
    serde_json::from_value(json!(plain))
        .or_else(|_| serde_json::from_value(json!(plain.replace('_', ""))))
        .ok()
}

/// Reads an enum key: a value Ferrite lacks keeps `default` and is noted.
fn enum_key<T: DeserializeOwned + std::fmt::Debug + Copy>(
    o: &mut Obj,
    key: &str,
    ot_default: T,
    report: &mut Report,
) -> T {
    let Some(v) = o.str(key) else {
        return ot_default;
    };
    choice(&v).unwrap_or_else(|| {
        report.note(format!(
            "{}: {v} has no Ferrite equivalent; {ot_default:?} is used",
            o.key(key)
        ));
        ot_default
    })
}

/// Consumes keys that change nothing in Ferrite while they hold OneTrainer's default; a key
/// set otherwise stays, to be reported as not imported.
fn at_default(o: &mut Obj, defaults: &[(&str, Value)]) {
    for (k, d) in defaults {
        if let Some(v) = o.take(k) {
            let same = match (v.as_f64(), d.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => &v == d,
            };
            if !same {
                o.put(k, v);
            }
        }
    }
}

fn stop_unit(o: &mut Obj, report: &mut Report) -> TimeUnit {
    let unit = enum_key(o, "stop_training_after_unit", TimeUnit::Never, report);
    if unit == TimeUnit::Always {
        report.note(format!(
            "{}: ALWAYS stops nothing in Ferrite; never is used",
            o.key("stop_training_after_unit")
        ));
        return TimeUnit::Never;
    }
    unit
}

/// Ferrite's model id for OneTrainer's model type, and the part tables that model has.
fn model(ot: &str) -> Result<(&'static str, &'static [&'static str]), ImportError> {
    Ok(match ot {
        "STABLE_DIFFUSION_15" => ("sd15", &["unet", "text_encoder"]),
        "STABLE_DIFFUSION_20"
        | "STABLE_DIFFUSION_20_BASE"
        | "STABLE_DIFFUSION_21"
        | "STABLE_DIFFUSION_21_BASE" => ("sd2", &["unet", "text_encoder"]),
        "STABLE_DIFFUSION_XL_10_BASE" => ("sdxl", &["unet", "text_encoder", "text_encoder_2"]),
        "FLUX_DEV_1" => ("flux", &["transformer", "text_encoder", "text_encoder_2"]),
        other => {
            return Err(ImportError::Unsupported(format!(
                "model_type {other}: Ferrite trains STABLE_DIFFUSION_15, STABLE_DIFFUSION_20/21 \
                 (and _BASE), STABLE_DIFFUSION_XL_10_BASE and FLUX_DEV_1"
            )));
        }
    })
}

const PART_TABLES: [&str; 4] = ["unet", "transformer", "text_encoder", "text_encoder_2"];

pub fn train_config(
    o: &mut Obj,
    concepts: Vec<Obj>,
    samples: Vec<Obj>,
    paths: &Paths,
    report: &mut Report,
) -> Result<TrainConfig, ImportError> {
    let mut c = TrainConfig::default();
    let ot_method = o
        .str("training_method")
        .unwrap_or_else(|| "FINE_TUNE".into());
    c.training_method = match ot_method.as_str() {
        "LORA" => TrainingMethod::Lora,
        "FINE_TUNE" => TrainingMethod::FineTune,
        "EMBEDDING" => TrainingMethod::Embedding,
        other => {
            return Err(ImportError::Unsupported(format!(
                "training_method {other}: Ferrite trains LORA, FINE_TUNE and EMBEDDING"
            )));
        }
    };
    let ot_model = o
        .str("model_type")
        .unwrap_or_else(|| "STABLE_DIFFUSION_15".into());
    let (model_type, parts) = model(&ot_model)?;
    c.model_type = model_type.into();
    c.base_model_name = paths.model(
        o.str("base_model_name")
            .unwrap_or_else(|| "stable-diffusion-v1-5/stable-diffusion-v1-5".into()),
    );
    c.output_model_destination = paths.file(
        o.str("output_model_destination")
            .unwrap_or_else(|| "models/model.safetensors".into()),
    );
    output_format(o, &mut c, report);
    c.output_dtype = enum_key(o, "output_dtype", c.output_dtype, report);
    c.workspace_dir = paths.file(
        o.str("workspace_dir")
            .unwrap_or_else(|| "workspace/run".into()),
    );
    c.cache_dir = paths.file(
        o.str("cache_dir")
            .unwrap_or_else(|| "workspace-cache/run".into()),
    );
    c.continue_last_backup = o.bool("continue_last_backup").unwrap_or(false);
    c.tensorboard = o.bool("tensorboard").unwrap_or(true);
    c.train_device = match o.str("train_device") {
        Some(d) if d == "cpu" || d.starts_with("cuda") => d,
        Some(d) => {
            report.note(format!(
                "train_device: {d} is not a Ferrite device; auto is used"
            ));
            "auto".into()
        }
        None => "cuda".into(),
    };
    c.dataloader_threads = o.usize("caching_threads").unwrap_or(2).max(1);
    c.multi_gpu = o.bool("multi_gpu").unwrap_or(false);
    c.device_indexes = o.str("device_indexes").unwrap_or_default();

    c.learning_rate = o.f64("learning_rate").unwrap_or(3e-6);
    c.learning_rate_scheduler = enum_key(
        o,
        "learning_rate_scheduler",
        c.learning_rate_scheduler,
        report,
    );
    c.learning_rate_warmup_steps = o.f64("learning_rate_warmup_steps").unwrap_or(200.0);
    if c.learning_rate_scheduler == crate::config::LrScheduler::Adafactor
        && c.learning_rate_warmup_steps > 0.0
    {
        report.note(format!(
            "learning_rate_warmup_steps: OneTrainer applies no warmup to the ADAFACTOR schedule; \
             {} becomes 0",
            c.learning_rate_warmup_steps
        ));
        c.learning_rate_warmup_steps = 0.0;
    }
    c.learning_rate_cycles = o.f64("learning_rate_cycles").unwrap_or(1.0);
    c.learning_rate_min_factor = o.f64("learning_rate_min_factor").unwrap_or(0.0);
    c.epochs = o.usize("epochs").unwrap_or(100);
    c.batch_size = o.usize("batch_size").unwrap_or(1);
    c.gradient_accumulation_steps = o.usize("gradient_accumulation_steps").unwrap_or(1);
    c.learning_rate_scaler = enum_key(o, "learning_rate_scaler", c.learning_rate_scaler, report);
    c.loss_scaler = enum_key(o, "loss_scaler", c.loss_scaler, report);
    // null in OneTrainer: no clipping.
    c.clip_grad_norm = match o.take_raw("clip_grad_norm") {
        None => 1.0,
        Some(Value::Null) => 0.0,
        Some(v) => match v.as_f64() {
            Some(n) => n,
            None => {
                o.put("clip_grad_norm", v);
                1.0
            }
        },
    };
    c.ema = enum_key(o, "ema", c.ema, report);
    c.ema_decay = o.f64("ema_decay").unwrap_or(0.999);
    c.ema_update_step_interval = o.usize("ema_update_step_interval").unwrap_or(5) as u64;
    c.train_dtype = match o.str("train_dtype").as_deref() {
        Some("TFLOAT_32") => {
            report.note("train_dtype: TFLOAT_32 becomes float32 (Ferrite has no TF32 switch)");
            crate::config::TrainDtype::Float32
        }
        Some(v) => choice(v).unwrap_or_else(|| {
            report.note(format!(
                "train_dtype: {v} has no Ferrite equivalent; float16 is used"
            ));
            crate::config::TrainDtype::Float16
        }),
        None => crate::config::TrainDtype::Float16,
    };
    c.fallback_train_dtype = enum_key(o, "fallback_train_dtype", c.fallback_train_dtype, report);
    c.resolution = match o.take("resolution") {
        Some(Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => "512".into(),
    };
    c.aspect_ratio_bucketing = o.bool("aspect_ratio_bucketing").unwrap_or(true);
    c.latent_caching = o.bool("image_caching").unwrap_or(true);
    c.clear_cache_before_training = o.bool("clear_cache_before_training").unwrap_or(true);

    c.timestep_distribution = enum_key(o, "timestep_distribution", c.timestep_distribution, report);
    c.noising_weight = o.f64("noising_weight").unwrap_or(0.0);
    c.noising_bias = o.f64("noising_bias").unwrap_or(0.0);
    c.timestep_shift = o.f64("timestep_shift").unwrap_or(1.0);
    c.dynamic_timestep_shifting = o.bool("dynamic_timestep_shifting").unwrap_or(false);
    c.min_noising_strength = o.f64("min_noising_strength").unwrap_or(0.0);
    c.max_noising_strength = o.f64("max_noising_strength").unwrap_or(1.0);
    c.offset_noise_weight = o.f64("offset_noise_weight").unwrap_or(0.0);
    c.perturbation_noise_weight = o.f64("perturbation_noise_weight").unwrap_or(0.0);
    c.force_v_prediction = o.bool("force_v_prediction").unwrap_or(false);
    c.force_epsilon_prediction = o.bool("force_epsilon_prediction").unwrap_or(false);

    c.masked_training = o.bool("masked_training").unwrap_or(false);
    c.unmasked_probability = o.f64("unmasked_probability").unwrap_or(0.1);
    c.unmasked_weight = o.f64("unmasked_weight").unwrap_or(0.1);
    c.normalize_masked_area_loss = o.bool("normalize_masked_area_loss").unwrap_or(false);
    c.mse_strength = o.f64("mse_strength").unwrap_or(1.0);
    c.mae_strength = o.f64("mae_strength").unwrap_or(0.0);
    c.huber_strength = o.f64("huber_strength").unwrap_or(0.0);
    c.huber_delta = o.f64("huber_delta").unwrap_or(1.0);
    c.log_cosh_strength = o.f64("log_cosh_strength").unwrap_or(0.0);
    c.loss_weight_fn = enum_key(o, "loss_weight_fn", c.loss_weight_fn, report);
    c.loss_weight_strength = o.f64("loss_weight_strength").unwrap_or(5.0);
    c.text_encoder_layer_skip = o.usize("text_encoder_layer_skip").unwrap_or(0);

    model_parts(o, &mut c, parts, &ot_model, paths, report);
    adapter(o, &mut c, paths, report);
    embeddings(o, &mut c, paths, report);
    optimizer(o, &mut c, report);

    c.validation = o.bool("validation").unwrap_or(false);
    c.validate_after = o.f64("validate_after").unwrap_or(1.0);
    c.validate_after_unit = enum_key(o, "validate_after_unit", TimeUnit::Epoch, report);
    c.sample_after = o.f64("sample_after").unwrap_or(10.0);
    c.sample_after_unit = enum_key(o, "sample_after_unit", TimeUnit::Minute, report);
    c.backup_after = o.f64("backup_after").unwrap_or(30.0);
    c.backup_after_unit = enum_key(o, "backup_after_unit", TimeUnit::Minute, report);
    let rolling = o.bool("rolling_backup").unwrap_or(false);
    let count = o.usize("rolling_backup_count").unwrap_or(3);
    c.rolling_backup_count = if rolling {
        count
    } else {
        report.note(
            "rolling_backup is off (OneTrainer keeps every backup); Ferrite always rotates \
             backups, so rolling_backup_count is set to 1000000",
        );
        1_000_000
    };
    c.save_every = o.f64("save_every").unwrap_or(0.0);
    c.save_every_unit = enum_key(o, "save_every_unit", TimeUnit::Never, report);
    c.debug_mode = o.bool("debug_mode").unwrap_or(false);
    c.debug_dir = paths.file(o.str("debug_dir").unwrap_or_else(|| "debug".into()));

    c.concepts = concepts
        .into_iter()
        .map(|mut co| {
            let concept = concept(&mut co, paths, report);
            co.finish(report);
            concept
        })
        .collect();
    c.samples = samples
        .into_iter()
        .filter_map(|mut so| {
            let sample = sample(&mut so, &c.model_type, report);
            so.finish(report);
            sample
        })
        .collect();

    // Settings that change nothing in Ferrite while at OneTrainer's defaults.
    at_default(
        o,
        &[
            ("tensorboard_expose", json!(false)),
            ("tensorboard_always_on", json!(false)),
            ("tensorboard_port", json!(6006)),
            ("prevent_overwrites", json!(false)),
            ("include_train_config", json!("NONE")),
            ("gradient_reduce_precision", json!("FLOAT_32_STOCHASTIC")),
            ("fused_gradient_reduce", json!(true)),
            ("async_gradient_reduce", json!(true)),
            ("async_gradient_reduce_buffer", json!(100)),
            ("async_offloading", json!(true)),
            ("force_circular_padding", json!(false)),
            ("compile", json!(false)),
            ("text_caching", json!(true)),
            ("scheduler_params", json!([])),
            ("prefetch_next_batch", json!(true)),
            ("temp_device", json!("cpu")),
            ("enable_autocast_cache", json!(true)),
            ("only_cache", json!(false)),
            ("frames", json!("25")),
            ("attention_mechanism", json!("SDP")),
            ("vb_loss_strength", json!(1.0)),
            ("generalized_offset_noise", json!(false)),
            ("rescale_noise_scheduler_to_zero_terminal_snr", json!(false)),
            ("cep_gamma", json!(0.0)),
            ("text_encoder_sequence_length", json!(512)),
            ("text_encoder_2_sequence_length", json!(77)),
            ("text_encoder_2_layer_skip", json!(0)),
            ("text_encoder_3_layer_skip", json!(0)),
            ("text_encoder_4_layer_skip", json!(0)),
            ("masked_prior_preservation_weight", json!(0.0)),
            ("custom_conditioning_image", json!(false)),
            ("preserve_embedding_norm", json!(false)),
            ("embedding_weight_dtype", json!("FLOAT_32")),
            ("sample_skip_first", json!(0)),
            ("sample_image_format", json!("JPG")),
            ("sample_video_format", json!("MP4")),
            ("sample_audio_format", json!("MP3")),
            ("samples_to_tensorboard", json!(true)),
            ("non_ema_sampling", json!(true)),
            ("backup_before_save", json!(true)),
            ("save_skip_first", json!(0)),
            ("save_filename_prefix", json!("")),
        ],
    );
    // Migration 1 leaves an empty `embeddings` list in every config from before version 2.
    match o.take_raw("embeddings") {
        Some(v) if v == json!([{}]) => {}
        Some(v) => o.put("embeddings", v),
        None => {}
    }
    // OneTrainer's memory of other optimizers' settings, its cloud runner when off, and its
    // secrets (never printed) have no bearing on the run.
    o.take("optimizer_defaults");
    o.take("secrets");
    if let Some(mut cloud) = o.obj("cloud")
        && cloud.bool("enabled") == Some(true)
    {
        report.note("cloud: OneTrainer's cloud runner is not imported; the run is local");
    }
    Ok(c)
}

fn output_format(o: &mut Obj, c: &mut TrainConfig, report: &mut Report) {
    let Some(ot) = o.str("output_model_format") else {
        return;
    };
    let lora = c.training_method == TrainingMethod::Lora;
    c.output_model_format = match ot.as_str() {
        "SAFETENSORS" | "LEGACY_LORA" | "LEGACY_SAFETENSORS" | "ORIGINAL_SINGLE_FILE" => {
            OutputFormat::Safetensors
        }
        "KOHYA_LORA" => OutputFormat::Kohya,
        "DIFFUSERS" | "DIFFUSERS_LORA" => OutputFormat::Diffusers,
        "COMFY_LORA" => OutputFormat::Comfy,
        "ORIGINAL_LORA" if lora => {
            report.note("output_model_format: ORIGINAL_LORA becomes comfy (the model's own keys)");
            OutputFormat::Comfy
        }
        other => {
            report.note(format!(
                "output_model_format: {other} has no Ferrite equivalent; a single safetensors file is written"
            ));
            OutputFormat::Safetensors
        }
    };
}

fn model_parts(
    o: &mut Obj,
    c: &mut TrainConfig,
    parts: &[&str],
    ot_model: &str,
    paths: &Paths,
    report: &mut Report,
) {
    let fine_tune = c.training_method == TrainingMethod::FineTune;
    let mut checkpointing = Vec::new();
    let mut ignored = Vec::new();
    for table in PART_TABLES {
        let has = parts.contains(&table);
        let Some(mut p) = o.obj(table) else {
            if has {
                set_part(c, table, default_part(table));
            } else {
                set_part(c, table, PartConfig::default());
            }
            continue;
        };
        if !has {
            ignored.push(table);
            set_part(c, table, PartConfig::default());
            continue;
        }
        let mut part = default_part(table);
        part.train = p.bool("train").unwrap_or(true);
        part.learning_rate = p.f64("learning_rate");
        part.stop_training_after = p.f64("stop_training_after").unwrap_or(0.0);
        part.stop_training_after_unit = stop_unit(&mut p, report);
        part.weight_dtype = weight_dtype(&mut p, report);
        if fine_tune && part.train && part.weight_dtype != WeightDtype::Float32 {
            report.note(format!(
                "{table}.weight_dtype: a part trained in a fine-tune is kept in float32 in Ferrite \
                 (OneTrainer: {:?})",
                part.weight_dtype
            ));
            part.weight_dtype = WeightDtype::Float32;
        }
        let dropout = p.f64("dropout_probability").unwrap_or(0.0);
        if table == "text_encoder" {
            part.dropout_probability = dropout;
        } else if dropout != 0.0 {
            p.put("dropout_probability", json!(dropout));
        }
        if table == "transformer" {
            part.guidance_scale = p.f64("guidance_scale").unwrap_or(1.0);
        }
        part.model_name = part_file(&mut p, paths, report);
        checkpointing.push(p.bool("gradient_checkpointing").unwrap_or(true));
        at_default(
            &mut p,
            &[
                ("include", json!(true)),
                ("train_embedding", json!(true)),
                ("attention_mask", json!(false)),
                ("offload_fraction", json!(0.0)),
                ("activation_offloading", json!(false)),
                ("guidance_scale", json!(1.0)),
            ],
        );
        p.finish(report);
        set_part(c, table, part);
    }
    c.gradient_checkpointing = if checkpointing.iter().any(|&on| on) || checkpointing.is_empty() {
        GradientCheckpointing::On
    } else {
        GradientCheckpointing::Off
    };
    if let Some(mut vae) = o.obj("vae") {
        c.vae.model_name = part_file(&mut vae, paths, report);
        // OneTrainer's VAE runs frozen whatever `train` says; its dtype is the runtime's here.
        at_default(
            &mut vae,
            &[
                ("train", json!(true)),
                ("weight_dtype", json!("FLOAT_32")),
                ("include", json!(true)),
                ("train_embedding", json!(true)),
                ("attention_mask", json!(false)),
                ("gradient_checkpointing", json!(true)),
                ("offload_fraction", json!(0.0)),
                ("activation_offloading", json!(false)),
                ("guidance_scale", json!(1.0)),
                ("dropout_probability", json!(0.0)),
                ("stop_training_after_unit", json!("NEVER")),
                ("stop_training_after", json!(0)),
            ],
        );
        vae.finish(report);
    }
    for other in [
        "prior",
        "unconditional_transformer",
        "text_encoder_3",
        "text_encoder_4",
        "effnet_encoder",
        "decoder",
        "decoder_text_encoder",
        "decoder_vqgan",
    ] {
        if o.take(other).is_some() {
            ignored.push(other);
        }
    }
    if !ignored.is_empty() {
        // OneTrainer writes every family's part tables and reads only its model's.
        report.note(format!(
            "the tables of parts {ot_model} does not have are ignored, as OneTrainer ignores \
             them: {}",
            ignored.join(", ")
        ));
    }
}

/// A part's own weights file (`model_name`). OneTrainer also takes a Hugging Face id there;
/// Ferrite reads part files from paths only.
fn part_file(p: &mut Obj, paths: &Paths, report: &mut Report) -> String {
    let Some(name) = p.str("model_name").filter(|n| !n.is_empty()) else {
        return String::new();
    };
    let file = paths.file(name.clone());
    if crate::hub::is_repo_id(&name) && !paths.exists(&file) {
        report.problems.push(format!(
            "{}: `{name}` reads as a Hugging Face id, which Ferrite takes for base_model_name \
             only: download the part's file and give its path",
            p.key("model_name")
        ));
    }
    file
}

/// OneTrainer's defaults of a part table: text encoders stop after 30 epochs.
fn default_part(table: &str) -> PartConfig {
    let mut p = PartConfig {
        train: true,
        ..PartConfig::default()
    };
    if table.starts_with("text_encoder") {
        p.stop_training_after = 30.0;
        p.stop_training_after_unit = TimeUnit::Epoch;
    }
    p
}

fn set_part(c: &mut TrainConfig, table: &str, part: PartConfig) {
    match table {
        "unet" => c.unet = part,
        "transformer" => c.transformer = part,
        "text_encoder" => c.text_encoder = part,
        _ => c.text_encoder_2 = part,
    }
}

fn weight_dtype(p: &mut Obj, report: &mut Report) -> WeightDtype {
    let Some(v) = p.str("weight_dtype") else {
        return WeightDtype::Float32;
    };
    let nearest = match v.as_str() {
        "NONE" => Some(WeightDtype::Float32),
        "FLOAT_8_SVD" | "FLOAT_W8A8" | "FLOAT_W8A8_SVD" => Some(WeightDtype::Float8),
        "NFLOAT_4_SVD" => Some(WeightDtype::Nfloat4),
        _ => None,
    };
    if let Some(d) = choice::<WeightDtype>(&v) {
        return d;
    }
    let d = nearest.unwrap_or(WeightDtype::Float32);
    if v != "NONE" {
        report.note(format!(
            "{}: {v} has no Ferrite equivalent; {} is used",
            p.key("weight_dtype"),
            d.as_ref()
        ));
    }
    d
}

fn adapter(o: &mut Obj, c: &mut TrainConfig, paths: &Paths, report: &mut Report) {
    match o.str("peft_type").as_deref() {
        None | Some("LORA") => c.peft_type = "lora".into(),
        Some("LOHA") => c.peft_type = "loha".into(),
        Some("LOKR") => c.peft_type = "lokr".into(),
        Some("OFT_2") => c.peft_type = "oft".into(),
        Some(other) => {
            report.note(format!(
                "peft_type: {other} is not an adapter Ferrite has yet; LoRA is used"
            ));
            c.peft_type = "lora".into();
        }
    }
    c.lora_rank = o.usize("lora_rank").unwrap_or(16);
    if c.peft_type == "lokr" {
        // OneTrainer's LoKr has its own rank, and LyCORIS' factor options.
        c.lora_rank = o.usize("lokr_dim").unwrap_or(16);
        let factor = o.f64("lokr_decompose_factor").map_or(-1, |f| f as i64);
        c.adapter.insert("factor".into(), factor.into());
        for (ot, ours) in [
            ("lokr_decompose_both", "decompose_both"),
            ("lokr_full_matrix", "full_matrix"),
        ] {
            c.adapter
                .insert(ours.into(), o.bool(ot).unwrap_or(false).into());
        }
    }
    if c.peft_type == "oft" {
        // OFT has neither rank nor alpha: its block options go to the `[adapter]` table.
        let block = o.f64("oft_block_size").map_or(32, |b| b as i64);
        c.adapter.insert("block_size".into(), block.into());
        let coft_eps = o.f64("coft_eps").unwrap_or(1e-4);
        c.adapter.insert("coft_eps".into(), coft_eps.into());
        for (ot, ours) in [("oft_coft", "coft"), ("oft_block_share", "block_share")] {
            c.adapter
                .insert(ours.into(), o.bool(ot).unwrap_or(false).into());
        }
    }
    c.lora_alpha = o.f64("lora_alpha").unwrap_or(1.0);
    c.lora_weight_dtype = enum_key(o, "lora_weight_dtype", c.lora_weight_dtype, report);
    // OneTrainer's dropout is LoRA's and OFT's (its LoHa and LoKr drop nothing Ferrite's can),
    // its weight decomposition LoRA's alone.
    let dropout = o.f64("dropout_probability").unwrap_or(0.0);
    if matches!(c.peft_type.as_str(), "lora" | "oft") {
        c.lora_dropout = dropout;
    } else if dropout != 0.0 {
        report.note(format!(
            "dropout_probability: {dropout} is not used by Ferrite's {}; 0 is used",
            c.peft_type
        ));
    }
    c.lora_decompose = o.bool("lora_decompose").unwrap_or(false) && c.peft_type == "lora";
    c.lora_base_model = o
        .str("lora_model_name")
        .map(|m| paths.file(m))
        .unwrap_or_default();
    c.bundle_additional_embeddings = o.bool("bundle_additional_embeddings").unwrap_or(true);
    // OneTrainer trains the layers `layer_filter` names; its preset only fills that box in the
    // UI. So the filter is imported as it is, as Ferrite's custom filter.
    o.take("layer_filter_preset");
    let filter = o.str("layer_filter").unwrap_or_default();
    c.layer_filter_regex = o.bool("layer_filter_regex").unwrap_or(false);
    let pieces: Vec<&str> = filter.split(',').map(str::trim).collect();
    c.lora_layer_preset = if pieces.iter().any(|p| p.is_empty()) {
        // An empty entry matches every layer in OneTrainer.
        LayerPreset::Full
    } else {
        c.lora_layers = if c.layer_filter_regex {
            // OneTrainer tries each comma-separated pattern on its own.
            pieces
                .iter()
                .map(|p| format!("(?:{p})"))
                .collect::<Vec<_>>()
                .join("|")
        } else {
            pieces.join(",")
        };
        LayerPreset::Custom
    };
    at_default(
        o,
        &[
            ("lora_decompose_norm_epsilon", json!(true)),
            ("lora_decompose_output_axis", json!(false)),
            ("dora_oft", json!(false)),
            ("oft_block_size", json!(32)),
            ("oft_block_share", json!(false)),
            ("oft_coft", json!(false)),
            ("coft_eps", json!(1e-4)),
            ("oft_scaled", json!(false)),
            ("oft_cans", json!(false)),
            ("lokr_dim", json!(16)),
            ("lokr_decompose_both", json!(false)),
            ("lokr_decompose_factor", json!(-1)),
            ("lokr_use_tucker", json!(false)),
            ("lokr_weight_decompose", json!(false)),
            ("lokr_dora_on_output", json!(true)),
            ("lokr_full_matrix", json!(false)),
            ("lokr_vec_trick", json!(true)),
        ],
    );
}

fn embedding(e: &mut Obj, paths: &Paths, report: &mut Report) -> EmbeddingConfig {
    let model_name = e
        .str("model_name")
        .map(|p| paths.file(p))
        .unwrap_or_default();
    let token_count = match e.take_raw("token_count") {
        // null: as many as the file has (with no file, OneTrainer's 1).
        Some(Value::Null) if !model_name.is_empty() => 0,
        Some(v) => {
            e.put("token_count", v);
            e.usize("token_count").unwrap_or(1)
        }
        None => 1,
    };
    let emb = EmbeddingConfig {
        token_count,
        placeholder: e.str("placeholder").unwrap_or_else(|| "<embedding>".into()),
        train: e.bool("train").unwrap_or(true),
        initial_embedding_text: e
            .str("initial_embedding_text")
            .unwrap_or_else(|| "*".into()),
        stop_training_after: e.f64("stop_training_after").unwrap_or(0.0),
        stop_training_after_unit: stop_unit(e, report),
        model_name,
    };
    e.take("uuid");
    at_default(e, &[("is_output_embedding", json!(false))]);
    emb
}

fn embeddings(o: &mut Obj, c: &mut TrainConfig, paths: &Paths, report: &mut Report) {
    c.embedding_learning_rate = o.f64("embedding_learning_rate");
    if let Some(mut e) = o.obj("embedding") {
        c.embedding = embedding(&mut e, paths, report);
        e.finish(report);
    }
    c.additional_embeddings = o
        .objs("additional_embeddings")
        .unwrap_or_default()
        .into_iter()
        .map(|mut e| {
            let emb = embedding(&mut e, paths, report);
            e.finish(report);
            emb
        })
        .collect();
}

fn optimizer(o: &mut Obj, c: &mut TrainConfig, report: &mut Report) {
    let Some(mut opt) = o.obj("optimizer") else {
        return;
    };
    let name = opt.str("optimizer").unwrap_or_else(|| "ADAMW".into());
    let (id, keys): (&str, &[&str]) = match name.as_str() {
        "ADAMW" => ("adamw", &["beta1", "beta2", "eps", "weight_decay"]),
        "ADAM" => ("adam", &["beta1", "beta2", "eps", "weight_decay"]),
        "ADAMW_8BIT" => (
            "adamw_8bit",
            &["beta1", "beta2", "eps", "weight_decay", "min_8bit_size"],
        ),
        "ADAM_8BIT" => (
            "adam_8bit",
            &["beta1", "beta2", "eps", "weight_decay", "min_8bit_size"],
        ),
        "LION_8BIT" => (
            "lion_8bit",
            &["beta1", "beta2", "weight_decay", "min_8bit_size"],
        ),
        "SGD" | "SGD_8BIT" => (
            "sgd",
            &["momentum", "dampening", "nesterov", "weight_decay"],
        ),
        "LION" => ("lion", &["beta1", "beta2", "weight_decay"]),
        "RMSPROP" | "RMSPROP_8BIT" => (
            "rmsprop",
            &["alpha", "eps", "weight_decay", "momentum", "centered"],
        ),
        "ADAGRAD" | "ADAGRAD_8BIT" => (
            "adagrad",
            &[
                "lr_decay",
                "weight_decay",
                "initial_accumulator_value",
                "eps",
            ],
        ),
        "PRODIGY" => (
            "prodigy",
            &[
                "beta1",
                "beta2",
                "beta3",
                "eps",
                "weight_decay",
                "decouple",
                "use_bias_correction",
                "safeguard_warmup",
                "d0",
                "d_coef",
                "growth_rate",
                "slice_p",
            ],
        ),
        "DADAPT_ADAM" => (
            "dadapt_adam",
            &[
                "beta1",
                "beta2",
                "eps",
                "weight_decay",
                "decouple",
                "use_bias_correction",
                "d0",
                "growth_rate",
            ],
        ),
        "ADAFACTOR" => (
            "adafactor",
            &[
                "eps",
                "eps2",
                "clip_threshold",
                "decay_rate",
                "beta1",
                "weight_decay",
                "scale_parameter",
                "relative_step",
                "warmup_init",
            ],
        ),
        "CAME" | "CAME_8BIT" => (
            "came",
            &["beta1", "beta2", "beta3", "eps", "eps2", "weight_decay"],
        ),
        "SCHEDULE_FREE_ADAMW" => (
            "schedule_free_adamw",
            &[
                "beta1",
                "beta2",
                "eps",
                "weight_decay",
                "r",
                "weight_lr_power",
            ],
        ),
        "AdEMAMix" | "AdEMAMix_8BIT" => (
            "ademamix",
            &["beta1", "beta2", "beta3", "eps", "alpha", "weight_decay"],
        ),
        "MUON" => ("muon", &["momentum", "weight_decay"]),
        other => {
            // Not guessed: adaptive optimizers want learning rates ~10⁴ times an AdamW one.
            report.problems.push(format!(
                "optimizer: {other} is not an optimizer Ferrite has yet; AdamW with its defaults \
                 is written, and learning_rate ({}) is the one set for {other}: choose an \
                 optimizer and learning rate",
                c.learning_rate
            ));
            opt.put("optimizer", json!(other));
            opt.finish(report);
            return;
        }
    };
    if name.ends_with("_8BIT") && !id.ends_with("_8bit") {
        report.note(format!(
            "optimizer: {name} becomes {id} with 32-bit state (Ferrite's 8-bit states are \
             AdamW's, Adam's and Lion's)"
        ));
    }
    let mut table = toml::Table::new();
    table.insert("optimizer".into(), id.into());
    if id == "schedule_free_adamw" {
        // OneTrainer runs schedule-free optimizers on a constant schedule and hands them the
        // warmup.
        let warmup = c.learning_rate_warmup_steps;
        if warmup > 1.0 {
            table.insert("warmup_steps".into(), (warmup as i64).into());
        }
        if warmup > 0.0 || c.learning_rate_scheduler != crate::config::LrScheduler::Constant {
            report.note(format!(
                "optimizer: schedule-free runs on a constant schedule, as in OneTrainer; the \
                 warmup ({warmup}) is the optimizer's own"
            ));
        }
        c.learning_rate_scheduler = crate::config::LrScheduler::Constant;
        c.learning_rate_warmup_steps = 0.0;
    }
    if id == "muon" {
        muon(&mut opt, &mut table, report);
    }
    for k in keys {
        if let Some(v) = opt.take(k) {
            let value = match &v {
                // TOML has no null: left out, the plugin's default is null too (beta3: √beta2,
                // growth_rate: no limit, Adafactor's beta1: no first moment).
                Value::Null => continue,
                Value::Bool(b) => Some(toml::Value::Boolean(*b)),
                Value::Number(n) if n.is_i64() => n.as_i64().map(toml::Value::Integer),
                v => v.as_f64().map(toml::Value::Float),
            };
            match value {
                Some(t) => {
                    table.insert((*k).into(), t);
                }
                None => opt.put(k, v),
            }
        }
    }
    at_default(
        &mut opt,
        &[
            ("amsgrad", json!(false)),
            ("maximize", json!(false)),
            ("foreach", json!(false)),
            ("foreach", json!(true)),
            ("fused", json!(true)),
            ("fused", json!(false)),
            ("capturable", json!(false)),
            ("differentiable", json!(false)),
            ("fused_back_pass", json!(false)),
            ("stochastic_rounding", json!(true)),
            ("stochastic_rounding", json!(false)),
            ("use_triton", json!(false)),
            ("log_every", json!(0)),
            ("fsdp_in_use", json!(false)),
            ("optim_bits", json!(32)),
            ("min_8bit_size", json!(4096)),
            ("percentile_clipping", json!(100)),
            ("block_wise", json!(true)),
            ("is_paged", json!(false)),
            ("use_cautious", json!(false)),
        ],
    );
    // The rest of OneTrainer's optimizer fields are other optimizers' (it writes them all);
    // OneTrainer does not pass them to this one either.
    let mut kept = vec![
        "amsgrad",
        "maximize",
        "capturable",
        "differentiable",
        "fused_back_pass",
        "stochastic_rounding",
    ];
    if id.ends_with("_8bit") {
        // bitsandbytes' own, which Ferrite's 8-bit optimizers do not have.
        kept.extend([
            "optim_bits",
            "percentile_clipping",
            "block_wise",
            "is_paged",
        ]);
    }
    if id == "muon" {
        kept.extend(["muon_te1_adam_lr", "muon_te2_adam_lr"]);
    }
    opt.keep_only(&kept);
    c.optimizer = table;
    opt.finish(report);
}

/// OneTrainer's Muon settings: its auxiliary Adam's table (a whole optimizer config, of which
/// Adam's betas, eps and decay apply), its rate and the hidden layers' names.
fn muon(opt: &mut Obj, table: &mut toml::Table, report: &mut Report) {
    if let Some(mut adam) = opt.obj("muon_adam_config") {
        for (k, ours) in [
            ("beta1", "adam_beta1"),
            ("beta2", "adam_beta2"),
            ("eps", "adam_eps"),
            ("weight_decay", "adam_weight_decay"),
        ] {
            if let Some(v) = adam.f64(k) {
                table.insert(ours.into(), v.into());
            }
        }
    }
    if let Some(lr) = opt.f64("muon_adam_lr") {
        table.insert("adam_lr".into(), lr.into());
    }
    if let Some(layers) = opt.str("muon_hidden_layers") {
        let layers: Vec<toml::Value> = layers
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.to_string().into())
            .collect();
        table.insert("hidden_layers".into(), layers.into());
    }
    if opt.bool("muon_adam_regex") == Some(true) {
        report.note(
            "optimizer.muon_adam_regex: Ferrite's hidden_layers are substrings, not regexes"
                .to_string(),
        );
    }
    if opt.bool("MuonWithAuxAdam") == Some(false) {
        report.note(
            "optimizer.MuonWithAuxAdam: off in OneTrainer; Ferrite's Muon always steps vectors \
             with Adam"
                .to_string(),
        );
    }
}

fn concept(co: &mut Obj, paths: &Paths, report: &mut Report) -> ConceptConfig {
    let mut c = ConceptConfig {
        name: co.str("name").unwrap_or_default(),
        path: paths.file(co.str("path").unwrap_or_default()),
        enabled: co.bool("enabled").unwrap_or(true),
        include_subdirectories: co.bool("include_subdirectories").unwrap_or(false),
        image_variations: co.usize("image_variations").unwrap_or(1),
        text_variations: co.usize("text_variations").unwrap_or(1),
        balancing: co.f64("balancing").unwrap_or(1.0),
        loss_weight: co.f64("loss_weight").unwrap_or(1.0),
        ..ConceptConfig::default()
    };
    c.kind = match co.str("type").as_deref() {
        None | Some("STANDARD") => ConceptType::Standard,
        Some("VALIDATION") => ConceptType::Validation,
        Some("PRIOR_PREDICTION") => ConceptType::Prior,
        Some(other) => {
            report.note(format!(
                "{}: {other} is not a concept type; standard is used",
                co.key("type")
            ));
            ConceptType::Standard
        }
    };
    c.balancing_strategy = enum_key(co, "balancing_strategy", c.balancing_strategy, report);
    // The concept's augmentation seed and the UI's dataset statistics.
    co.take("seed");
    co.take("concept_stats");
    if let Some(mut img) = co.obj("image") {
        c.enable_crop_jitter = img.bool("enable_crop_jitter").unwrap_or(true);
        // OneTrainer's default since late 2025 (it was on before).
        c.enable_random_flip = img.bool("enable_random_flip").unwrap_or(false);
        c.enable_fixed_flip = img.bool("enable_fixed_flip").unwrap_or(false);
        macro_rules! aug {
            ($($random:ident, $fixed:ident, $strength:ident);+) => {$(
                c.$random = img.bool(stringify!($random)).unwrap_or(false);
                c.$fixed = img.bool(stringify!($fixed)).unwrap_or(false);
                c.$strength = img.f64(stringify!($strength)).unwrap_or(0.0);
            )+};
        }
        aug!(
            enable_random_rotate, enable_fixed_rotate, random_rotate_max_angle;
            enable_random_brightness, enable_fixed_brightness, random_brightness_max_strength;
            enable_random_contrast, enable_fixed_contrast, random_contrast_max_strength;
            enable_random_saturation, enable_fixed_saturation, random_saturation_max_strength;
            enable_random_hue, enable_fixed_hue, random_hue_max_strength
        );
        at_default(
            &mut img,
            &[
                ("enable_resolution_override", json!(false)),
                ("resolution_override", json!("512")),
                ("enable_random_circular_mask_shrink", json!(false)),
                ("enable_random_mask_rotate_crop", json!(false)),
            ],
        );
        img.finish(report);
    } else {
        c.enable_random_flip = false;
    }
    if let Some(mut t) = co.obj("text") {
        c.prompt_source = enum_key(&mut t, "prompt_source", c.prompt_source, report);
        c.text_file = t
            .str("prompt_path")
            .map(|p| paths.file(p))
            .unwrap_or_default();
        c.enable_tag_shuffling = t.bool("enable_tag_shuffling").unwrap_or(false);
        c.tag_delimiter = t.str("tag_delimiter").unwrap_or_else(|| ",".into());
        c.keep_tags_count = t.usize("keep_tags_count").unwrap_or(1);
        c.tag_dropout_enable = t.bool("tag_dropout_enable").unwrap_or(false);
        c.tag_dropout_probability = t.f64("tag_dropout_probability").unwrap_or(0.0);
        let mode = t.str("tag_dropout_mode").unwrap_or_else(|| "FULL".into());
        if c.tag_dropout_enable && mode != "RANDOM" {
            report.note(format!(
                "{}: {mode} is not imported: Ferrite drops each tag on its own (OneTrainer's RANDOM)",
                t.key("tag_dropout_mode")
            ));
        }
        c.caps_randomize_enable = t.bool("caps_randomize_enable").unwrap_or(false);
        c.caps_randomize_mode = t
            .str("caps_randomize_mode")
            .unwrap_or_else(|| c.caps_randomize_mode.clone());
        c.caps_randomize_probability = t.f64("caps_randomize_probability").unwrap_or(0.0);
        c.caps_randomize_lowercase = t.bool("caps_randomize_lowercase").unwrap_or(false);
        at_default(
            &mut t,
            &[
                ("tag_dropout_special_tags_mode", json!("NONE")),
                ("tag_dropout_special_tags", json!("")),
                ("tag_dropout_special_tags_regex", json!(false)),
            ],
        );
        t.finish(report);
    }
    c
}

fn sample(so: &mut Obj, model_type: &str, report: &mut Report) -> Option<SampleConfig> {
    if so.bool("enabled") == Some(false) {
        report.note(format!("{}: disabled in OneTrainer; left out", so.path));
        // Nothing of a left-out sample is reported key by key.
        *so = Obj::new(so.path.clone(), Default::default());
        return None;
    }
    // OneTrainer's per-model defaults for keys the file leaves out.
    let (size, cfg, sampler) = match model_type {
        "sd2" => (768, 7.5, Sampler::Ddim),
        "sdxl" => (1024, 7.5, Sampler::EulerAncestral),
        "flux" => (1024, 3.5, Sampler::Euler),
        _ => (512, 7.5, Sampler::EulerAncestral),
    };
    let mut s = SampleConfig {
        prompt: so.str("prompt").unwrap_or_default(),
        negative_prompt: so.str("negative_prompt").unwrap_or_default(),
        width: so.usize("width").unwrap_or(size),
        height: so.usize("height").unwrap_or(size),
        diffusion_steps: so.usize("diffusion_steps").unwrap_or(30),
        cfg_scale: so.f64("cfg_scale").unwrap_or(cfg),
        sampler,
        ..SampleConfig::default()
    };
    s.seed = match so.take("seed").map(|v| (v.as_i64(), v)) {
        Some((Some(seed), _)) if seed >= 0 => seed as u64,
        Some((Some(seed), _)) => {
            // Ferrite's seeds are unsigned (and TOML holds up to i64::MAX).
            let positive = seed.unsigned_abs().min(i64::MAX as u64);
            report.note(format!("{}.seed: {seed} becomes {positive}", so.path));
            positive
        }
        Some((None, v)) => {
            so.put("seed", v);
            42
        }
        None => 42,
    };
    if so.bool("random_seed") == Some(true) {
        report.note(format!(
            "{}.random_seed: Ferrite samples with a fixed seed; {} is used",
            so.path, s.seed
        ));
    }
    if let Some(ns) = so.str("noise_scheduler") {
        s.sampler = match ns.as_str() {
            _ if model_type == "flux" => Sampler::Euler,
            "DDIM" => Sampler::Ddim,
            "EULER" => Sampler::Euler,
            "EULER_A" => Sampler::EulerAncestral,
            "DPMPP_KARRAS" => Sampler::DpmPp2mKarras,
            other => {
                let nearest = if other.starts_with("DPMPP") {
                    Sampler::DpmPp2mKarras
                } else {
                    Sampler::Euler
                };
                report.note(format!(
                    "{}.noise_scheduler: {other} becomes {}",
                    so.path,
                    nearest.as_ref()
                ));
                nearest
            }
        };
    }
    at_default(
        so,
        &[
            ("frames", json!(1)),
            ("length", json!(10.0)),
            ("text_encoder_1_layer_skip", json!(0)),
            ("text_encoder_2_layer_skip", json!(0)),
            ("text_encoder_3_layer_skip", json!(0)),
            ("text_encoder_4_layer_skip", json!(0)),
            ("transformer_attention_mask", json!(false)),
            ("force_last_timestep", json!(false)),
            ("sample_inpainting", json!(false)),
            ("base_image_path", json!("")),
            ("mask_image_path", json!("")),
        ],
    );
    Some(s)
}
