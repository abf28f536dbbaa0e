//! Stable Diffusion XL from a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; fp32 or
//! `.fp16` weights) or a single-file original checkpoint (`model.diffusion_model.*`,
//! `conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*` in OpenCLIP's
//! layout, `first_stage_model.*`). Tensors are loaded lazily, one at a time, into the same
//! diffusers-named modules either way.

pub mod model;
pub mod names;

use std::path::Path;

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use model::Sdxl;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// A diffusers folder or a single-file checkpoint.
    model: String,
    /// For a single file: a diffusers folder whose configs and tokenizers to use (diffusers'
    /// `from_single_file(config=...)`); without it, SDXL base 1.0's.
    config: Option<String>,
    /// Compute dtype of the weights: f32, f16 or bf16 (the VAE stays f32 where its config
    /// says `force_upcast`).
    dtype: String,
    /// CLIP skip for both text encoders (diffusers' `clip_skip`).
    text_encoder_layer_skip: usize,
}

pub struct SdxlPlugin;

impl Plugin for SdxlPlugin {
    const NAME: &'static str = "sdxl";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Architecture,
            id: "sdxl".into(),
            version: Self::VERSION.into(),
            description: "Stable Diffusion XL (diffusers folder or single-file checkpoint)".into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "description": "diffusers SDXL model folder or single-file .safetensors checkpoint"},
                    "config": {"type": "string", "description": "for a single file: diffusers folder whose configs and tokenizers to use (default: SDXL base 1.0's)"},
                    "dtype": {"type": "string", "enum": ["f32", "f16", "bf16"], "default": "f32"},
                    "text_encoder_layer_skip": {"type": "integer", "minimum": 0, "default": 0, "description": "CLIP skip for both text encoders"}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Architecture, "sdxl") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = parse_options(
            id,
            Options {
                model: String::new(),
                config: None,
                dtype: "f32".into(),
                text_encoder_layer_skip: 0,
            },
            options,
        )?;
        if o.model.is_empty() {
            bail!("sdxl needs the `model` option (a diffusers SDXL folder)");
        }
        let dtype = ferrite_blocks::dtype_option(id, &o.dtype)?;
        let mut model = Sdxl::load(
            Path::new(&o.model),
            o.config.as_deref().map(Path::new),
            dtype,
        )?;
        model.layer_skip = o.text_encoder_layer_skip;
        Ok(Component::Architecture(Box::new(model)))
    }
}

export_plugin!(SdxlPlugin);
