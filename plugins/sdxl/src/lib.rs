//! Stable Diffusion XL from a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; fp32 or
//! `.fp16` weights) or a single-file original checkpoint (`model.diffusion_model.*`,
//! `conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*` in OpenCLIP's
//! layout, `first_stage_model.*`). Tensors are loaded lazily, one at a time, into the same
//! diffusers-named modules either way.

pub mod model;
pub mod names;

use ferrite_blocks::options::ArchOptions;
use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, serde_json,
};

pub use model::Sdxl;

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
            options_schema: ArchOptions::schema("SDXL base 1.0's"),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Architecture, "sdxl") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = ArchOptions::parse(id, options)?;
        let mut model = Sdxl::load(&o.model, o.config.as_deref(), o.random_weights)?;
        model.layer_skip = o.layer_skip;
        model.attach_embeddings(&o.embeddings)?;
        Ok(Component::Architecture(Box::new(model)))
    }
}

export_plugin!(SdxlPlugin);
