//! The options every Stable Diffusion family plugin takes (`model`, `config`,
//! `text_encoder_layer_skip`, `random_weights`, `embeddings`), their JSON schema and their parsing.

use ferrite_plugin_api::{
    Result, bail, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

use crate::text_embeddings::{self, EmbeddingOption};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    model: String,
    config: Option<String>,
    text_encoder_layer_skip: usize,
    random_weights: bool,
    embeddings: Vec<EmbeddingOption>,
}

/// Parsed options of an architecture component.
pub struct ArchOptions {
    /// A diffusers folder or a single-file checkpoint.
    pub model: std::path::PathBuf,
    /// For a single file: a diffusers folder whose configs and tokenizers to use (diffusers'
    /// `from_single_file(config=...)`).
    pub config: Option<std::path::PathBuf>,
    /// CLIP skip (OneTrainer's `text_encoder_layer_skip`).
    pub layer_skip: usize,
    /// `model` is a diffusers folder of config files only: its weights are random (benchmarks).
    pub random_weights: bool,
    /// Textual-inversion embeddings.
    pub embeddings: Vec<EmbeddingOption>,
}

impl ArchOptions {
    /// The options' schema; `defaults` says whose configs a single file takes without `config`.
    pub fn schema(defaults: &str) -> serde_json::Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["model"],
            "properties": {
                "model": {"type": "string", "description": "diffusers model folder or single-file .safetensors checkpoint"},
                "config": {"type": "string", "description": format!("for a single file: diffusers folder whose configs and tokenizers to use (default: {defaults})")},
                "text_encoder_layer_skip": {"type": "integer", "minimum": 0, "default": 0, "description": "CLIP skip: text states from this many layers before the last (every text encoder)"},
                "random_weights": {"type": "boolean", "default": false, "description": "benchmarks: `model` is a diffusers folder holding only config files; its weights are random"},
                "embeddings": text_embeddings::schema()
            }
        })
    }

    /// Component `id`'s options, checked.
    pub fn parse(id: &str, options: serde_json::Value) -> Result<Self> {
        let defaults = Raw {
            model: String::new(),
            config: None,
            text_encoder_layer_skip: 0,
            random_weights: false,
            embeddings: Vec::new(),
        };
        let o = parse_options(id, defaults, options)?;
        if o.model.is_empty() {
            bail!("{id} needs the `model` option (a diffusers folder or a single-file checkpoint)");
        }
        Ok(Self {
            model: o.model.into(),
            config: o.config.map(Into::into),
            layer_skip: o.text_encoder_layer_skip,
            random_weights: o.random_weights,
            embeddings: o.embeddings,
        })
    }
}
