//! Stable Diffusion XL from a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; fp32 or
//! `.fp16` weights). Tensors are loaded lazily, one at a time, into diffusers-named modules.

pub mod model;
pub mod names;

use std::path::Path;

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Plugin, Result, bail, export_plugin,
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use model::Sdxl;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// A diffusers folder.
    model: String,
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
            description: "Stable Diffusion XL (diffusers folder)".into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "description": "diffusers SDXL model folder"},
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
                dtype: "f32".into(),
                text_encoder_layer_skip: 0,
            },
            options,
        )?;
        if o.model.is_empty() {
            bail!("sdxl needs the `model` option (a diffusers SDXL folder)");
        }
        let dtype = match o.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => bail!("sdxl option dtype `{other}`: use f32, f16 or bf16"),
        };
        let model_path = Path::new(&o.model);
        if !model_path.is_dir() {
            bail!(
                "{}: sdxl loads diffusers folders; single-file SDXL checkpoints are not supported \
                 yet",
                model_path.display()
            );
        }
        let mut model = Sdxl::load(model_path, dtype)?;
        model.layer_skip = o.text_encoder_layer_skip;
        Ok(Component::Architecture(Box::new(model)))
    }
}

export_plugin!(SdxlPlugin);
