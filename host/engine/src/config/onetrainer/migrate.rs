//! OneTrainer's config migrations, step by step as its `TrainConfig` runs them on the raw JSON
//! before reading it (`__migration_0` … `__migration_9`, by `__version`), then the later steps,
//! which OneTrainer's branches numbered differently, applied wherever their old keys are present
//! (each is a no-op on a config that already went through it).

use serde_json::{Map, Value, json};

type Dict = Map<String, Value>;

/// The parts migration 9 and 10 walk.
const PARTS: [&str; 12] = [
    "unet",
    "prior",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "text_encoder_4",
    "vae",
    "effnet_encoder",
    "decoder",
    "decoder_text_encoder",
    "decoder_vqgan",
];

/// Migrates a train config from its `__version` to the newest layout; returns the version read.
pub fn train_config(d: &mut Dict) -> u64 {
    let version = d.get("__version").and_then(Value::as_u64).unwrap_or(0);
    let steps: [fn(&mut Dict); 10] = [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9];
    for step in steps.iter().skip(version as usize) {
        step(d);
    }
    later_steps(d, version);
    version
}

/// Optimizer settings into a sub-object (`optimizer_beta1` → `optimizer.beta1`).
fn m0(d: &mut Dict) {
    let mut opt = Dict::new();
    let mut out = Dict::new();
    for (k, v) in std::mem::take(d) {
        if k == "optimizer" {
            opt.insert(k, v);
        } else if k.starts_with("optimizer") {
            let name = k.strip_prefix("optimizer_").unwrap_or(&k).to_string();
            opt.insert(name, v);
        } else {
            out.insert(k, v);
        }
    }
    if let Some(name) = opt
        .get("optimizer")
        .and_then(Value::as_str)
        .map(str::to_string)
    {
        out.insert("optimizer_defaults".into(), json!({ name: opt.clone() }));
        out.insert("optimizer".into(), Value::Object(opt));
    }
    *d = out;
}

/// Migration 1's renames: an old top-level key → (part, key in the part).
const PART_KEYS: [(&str, &str, &str); 23] = [
    ("train_unet", "unet", "train"),
    ("unet_learning_rate", "unet", "learning_rate"),
    ("unet_weight_dtype", "unet", "weight_dtype"),
    ("train_prior", "prior", "train"),
    ("prior_model_name", "prior", "model_name"),
    ("prior_learning_rate", "prior", "learning_rate"),
    ("prior_weight_dtype", "prior", "weight_dtype"),
    ("train_text_encoder", "text_encoder", "train"),
    (
        "text_encoder_learning_rate",
        "text_encoder",
        "learning_rate",
    ),
    ("text_encoder_weight_dtype", "text_encoder", "weight_dtype"),
    ("train_text_encoder_2", "text_encoder_2", "train"),
    (
        "text_encoder_2_learning_rate",
        "text_encoder_2",
        "learning_rate",
    ),
    (
        "text_encoder_2_weight_dtype",
        "text_encoder_2",
        "weight_dtype",
    ),
    ("vae_model_name", "vae", "model_name"),
    ("vae_weight_dtype", "vae", "weight_dtype"),
    ("effnet_encoder_model_name", "effnet_encoder", "model_name"),
    (
        "effnet_encoder_weight_dtype",
        "effnet_encoder",
        "weight_dtype",
    ),
    ("decoder_model_name", "decoder", "model_name"),
    ("decoder_weight_dtype", "decoder", "weight_dtype"),
    (
        "decoder_text_encoder_weight_dtype",
        "decoder_text_encoder",
        "weight_dtype",
    ),
    (
        "decoder_vqgan_weight_dtype",
        "decoder_vqgan",
        "weight_dtype",
    ),
    ("token_count", "embeddings", "token_count"),
    (
        "initial_embedding_text",
        "embeddings",
        "initial_embedding_text",
    ),
];

/// Migration 1's "trained for N epochs" keys → their part.
const EPOCH_KEYS: [(&str, &str); 4] = [
    ("train_unet_epochs", "unet"),
    ("train_prior_epochs", "prior"),
    ("train_text_encoder_epochs", "text_encoder"),
    ("train_text_encoder_2_epochs", "text_encoder_2"),
];

/// Per-part settings into part objects (`train_unet` → `unet.train`, …), and the first
/// embedding's into `embeddings[0]`.
fn m1(d: &mut Dict) {
    let mut out = Dict::new();
    for p in [
        "unet",
        "prior",
        "text_encoder",
        "text_encoder_2",
        "vae",
        "effnet_encoder",
        "decoder",
        "decoder_text_encoder",
        "decoder_vqgan",
    ] {
        out.insert(p.into(), json!({}));
    }
    out.insert("embeddings".into(), json!([{}]));
    let set = |out: &mut Dict, part: &str, key: &str, v: Value| {
        let target = match out.get_mut(part) {
            Some(Value::Array(a)) => a.get_mut(0),
            other => other,
        };
        if let Some(Value::Object(o)) = target {
            o.insert(key.into(), v);
        }
    };
    for (k, v) in std::mem::take(d) {
        if let Some((_, part)) = EPOCH_KEYS.iter().find(|(old, _)| *old == k) {
            set(&mut out, part, "stop_training_after", v);
            set(&mut out, part, "stop_training_after_unit", json!("EPOCH"));
        } else if let Some((_, part, key)) = PART_KEYS.iter().find(|(old, ..)| *old == k) {
            set(&mut out, part, key, v);
        } else if k == "embedding_model_names" && v.as_array().is_some_and(|a| !a.is_empty()) {
            set(&mut out, "embeddings", "model_name", v[0].clone());
        } else {
            out.insert(k, v);
        }
    }
    *d = out;
}

/// min-SNR gamma into `loss_weight_fn`.
fn m2(d: &mut Dict) {
    let gamma = d
        .remove("min_snr_gamma")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let model = d
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("STABLE_DIFFUSION_15");
    if gamma != 0.0 {
        d.insert("loss_weight_fn".into(), json!("MIN_SNR_GAMMA"));
        d.insert("loss_weight_strength".into(), json!(gamma));
    } else if matches!(model, "WUERSTCHEN_2" | "STABLE_CASCADE_1") {
        d.insert("loss_weight_fn".into(), json!("P2"));
        d.insert("loss_weight_strength".into(), json!(1.0));
    }
}

/// `noising_weight`/`noising_bias` into `timestep_distribution` (the bias re-centred on 0).
fn m3(d: &mut Dict) {
    let weight = d
        .remove("noising_weight")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let bias = d
        .remove("noising_bias")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.5);
    let (dist, weight, bias) = if weight != 0.0 {
        ("SIGMOID", weight, bias - 0.5)
    } else {
        ("UNIFORM", 0.0, 0.0)
    };
    d.insert("timestep_distribution".into(), json!(dist));
    d.insert("noising_weight".into(), json!(weight));
    d.insert("noising_bias".into(), json!(bias));
}

/// `gradient_checkpointing` from a bool to `ON`/`OFF`.
fn m4(d: &mut Dict) {
    let on = match d.remove("gradient_checkpointing") {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(Value::Null) => false,
        Some(v) => v.as_f64() != Some(0.0),
    };
    d.insert(
        "gradient_checkpointing".into(),
        json!(if on { "ON" } else { "OFF" }),
    );
}

fn rename(d: &mut Dict, from: &str, to: &str) {
    if let Some(v) = d.remove(from) {
        d.insert(to.into(), v);
    }
}

fn m5(d: &mut Dict) {
    rename(d, "save_after", "save_every");
    rename(d, "save_after_unit", "save_every_unit");
}

fn m6(d: &mut Dict) {
    if d.get("lora_layer_preset").is_some_and(Value::is_null) {
        d.insert("lora_layer_preset".into(), json!("full"));
    }
}

fn m7(d: &mut Dict) {
    rename(d, "lora_layers", "layer_filter");
    rename(d, "lora_layer_preset", "layer_filter_preset");
    rename(d, "lora_layers_regex", "layer_filter_regex");
}

/// The `prior` part becomes `transformer` for every model but Würstchen and Stable Cascade.
fn m8(d: &mut Dict) {
    let model = d
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("STABLE_DIFFUSION_15");
    if !matches!(model, "STABLE_CASCADE_1" | "WUERSTCHEN_2")
        && let Some(prior) = d.get("prior").cloned()
    {
        d.insert("transformer".into(), prior);
    }
}

/// The global `weight_dtype` fills each part's `NONE`, and goes.
fn m9(d: &mut Dict) {
    let global = d.remove("weight_dtype").unwrap_or(json!("FLOAT_32"));
    for p in PARTS {
        if let Some(Value::Object(part)) = d.get_mut(p)
            && part.get("weight_dtype").and_then(Value::as_str) == Some("NONE")
        {
            part.insert("weight_dtype".into(), global.clone());
        }
    }
}

/// OneTrainer's steps after version 10: per-part gradient checkpointing, the output-format
/// rename, `dataloader_threads` → `caching_threads`, `latent_caching` → image/text caching.
fn later_steps(d: &mut Dict, version: u64) {
    let fan_out = d
        .get("gradient_checkpointing")
        .is_some_and(Value::is_string)
        || [
            "enable_activation_offloading",
            "layer_offload_fraction",
            "enable_async_offloading",
        ]
        .iter()
        .any(|k| d.contains_key(*k));
    if fan_out {
        let gc = d
            .remove("gradient_checkpointing")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "ON".into());
        let activation = d
            .remove("enable_activation_offloading")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let fraction = d.remove("layer_offload_fraction").unwrap_or(json!(0.0));
        let asynchronous = d.remove("enable_async_offloading").unwrap_or(json!(true));
        d.insert("async_offloading".into(), asynchronous);
        for p in PARTS {
            if let Some(Value::Object(part)) = d.get_mut(p) {
                let offloaded = gc == "CPU_OFFLOADED";
                part.insert("gradient_checkpointing".into(), json!(gc != "OFF"));
                part.insert(
                    "activation_offloading".into(),
                    json!(offloaded && activation),
                );
                part.insert(
                    "offload_fraction".into(),
                    if offloaded {
                        fraction.clone()
                    } else {
                        json!(0.0)
                    },
                );
            }
        }
    }
    if (fan_out || version <= 10)
        && d.get("output_model_format").and_then(Value::as_str) == Some("SAFETENSORS")
    {
        match d.get("training_method").and_then(Value::as_str) {
            Some("LORA") => {
                d.insert("output_model_format".into(), json!("LEGACY_LORA"));
            }
            Some("EMBEDDING") => {}
            _ => {
                d.insert("output_model_format".into(), json!("LEGACY_SAFETENSORS"));
            }
        }
    }
    rename(d, "dataloader_threads", "caching_threads");
    if let Some(v) = d.remove("latent_caching") {
        d.insert("image_caching".into(), v.clone());
        d.insert("text_caching".into(), v);
    }
}

/// A concept's migrations: `repeats` → `balancing`, then `validation_concept` → `type`.
pub fn concept(d: &mut Dict) {
    let version = d.get("__version").and_then(Value::as_u64).unwrap_or(0);
    if version < 1 {
        rename(d, "repeats", "balancing");
    }
    if version < 2 {
        let validation = d
            .remove("validation_concept")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        d.insert(
            "type".into(),
            json!(if validation { "VALIDATION" } else { "STANDARD" }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migrated(v: Value) -> Dict {
        let mut d = v.as_object().unwrap().clone();
        train_config(&mut d);
        d
    }

    #[test]
    fn a_version_0_config_goes_through_every_step() {
        let d = migrated(json!({
            "optimizer": "ADAMW", "optimizer_beta1": 0.8, "optimizer_weight_decay": 0.05,
            "train_unet": true, "unet_learning_rate": 2e-4, "train_text_encoder_epochs": 5,
            "min_snr_gamma": 5.0, "noising_weight": 1.5, "noising_bias": 0.75,
            "gradient_checkpointing": false, "save_after": 3, "save_after_unit": "EPOCH",
            "lora_layers": "attn", "lora_layer_preset": null, "lora_layers_regex": true,
            "model_type": "STABLE_DIFFUSION_15", "weight_dtype": "BFLOAT_16",
            "unet_weight_dtype": "NONE", "latent_caching": false, "dataloader_threads": 4,
            "training_method": "LORA", "output_model_format": "SAFETENSORS",
        }));
        assert_eq!(
            d["optimizer"],
            json!({"optimizer": "ADAMW", "beta1": 0.8, "weight_decay": 0.05})
        );
        assert_eq!(d["unet"]["train"], json!(true));
        assert_eq!(d["unet"]["learning_rate"], json!(2e-4));
        // The global dtype fills the part's NONE (migration 9).
        assert_eq!(d["unet"]["weight_dtype"], json!("BFLOAT_16"));
        assert_eq!(d["text_encoder"]["stop_training_after"], json!(5));
        assert_eq!(
            d["text_encoder"]["stop_training_after_unit"],
            json!("EPOCH")
        );
        assert_eq!(d["loss_weight_fn"], json!("MIN_SNR_GAMMA"));
        assert_eq!(d["loss_weight_strength"], json!(5.0));
        assert_eq!(d["timestep_distribution"], json!("SIGMOID"));
        assert_eq!(d["noising_bias"], json!(0.25));
        assert_eq!(d["save_every"], json!(3));
        assert_eq!(d["layer_filter"], json!("attn"));
        assert_eq!(d["layer_filter_preset"], json!("full"));
        assert_eq!(d["layer_filter_regex"], json!(true));
        // Checkpointing off fans out to every part; the prior became the transformer.
        assert_eq!(d["unet"]["gradient_checkpointing"], json!(false));
        assert!(d.contains_key("transformer"));
        assert_eq!(d["image_caching"], json!(false));
        assert_eq!(d["caching_threads"], json!(4));
        assert_eq!(d["output_model_format"], json!("LEGACY_LORA"));
        assert!(!d.contains_key("weight_dtype") && !d.contains_key("gradient_checkpointing"));
    }

    #[test]
    fn a_current_config_is_left_as_it_is() {
        let current = json!({
            "__version": 11, "training_method": "LORA", "output_model_format": "KOHYA_LORA",
            "unet": {"gradient_checkpointing": true, "weight_dtype": "FLOAT_16"},
            "noising_weight": 0.0, "timestep_distribution": "LOGIT_NORMAL",
        });
        assert_eq!(Value::Object(migrated(current.clone())), current);
    }

    #[test]
    fn old_concepts_get_balancing_and_a_type() {
        let mut c = json!({"repeats": 3.0, "validation_concept": true})
            .as_object()
            .unwrap()
            .clone();
        concept(&mut c);
        assert_eq!(
            Value::Object(c),
            json!({"balancing": 3.0, "type": "VALIDATION"})
        );
    }
}
