//! Flux.1 (dev and schnell) from a diffusers folder (`model_index.json`, `transformer/`, `vae/`,
//! `text_encoder/` CLIP-L, `text_encoder_2/` T5, `tokenizer/`, `tokenizer_2/`, `scheduler/`;
//! single or sharded weight files), or a transformer file in Black Forest Labs' layout
//! (`flux1-dev.safetensors`, a ComfyUI checkpoint) with such a folder for the rest, with the
//! flow-matching objective. Any part's weights may come from a file of its own instead
//! (`part_files`: ComfyUI's `clip_l`, `t5xxl` and `ae` files). Adapter files in diffusers',
//! kohya's and ComfyUI's layouts (`names`).

pub mod model;
mod names;
pub mod packing;

use ferrite_blocks::text_embeddings::{self, EmbeddingOption};
use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Plugin, Result, bail, export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use model::{Flux, PartFiles};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    model: String,
    /// With `model` a transformer file: the diffusers folder of the other parts and the configs.
    config: Option<String>,
    /// T5 tokens per prompt (diffusers' `max_sequence_length`); None: 512 for dev, 256 for
    /// schnell.
    max_sequence_length: Option<usize>,
    /// Benchmarks: `model` holds config files only; the weights are random.
    random_weights: bool,
    /// Files holding some parts' weights in place of the folder's.
    part_files: PartFiles,
    /// Textual-inversion embeddings (CLIP-L's).
    embeddings: Vec<EmbeddingOption>,
}

pub struct FluxPlugin;

impl Plugin for FluxPlugin {
    const NAME: &'static str = "flux";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Architecture,
            id: "flux".into(),
            version: Self::VERSION.into(),
            description: "Flux.1 dev and schnell (diffusers folder)".into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "description": "diffusers Flux folder, or a transformer file in Black Forest Labs' layout (flux1-dev.safetensors)"},
                    "config": {"type": "string", "description": "with a transformer file: the diffusers Flux folder of the text encoders, VAE, tokenizers and configs"},
                    "max_sequence_length": {"type": "integer", "minimum": 1, "maximum": 512, "description": "T5 tokens per prompt (default: 512 for dev, 256 for schnell)"},
                    "random_weights": {"type": "boolean", "default": false, "description": "benchmarks: `model` is a diffusers folder holding only config files; its weights are random"},
                    "part_files": {
                        "type": "object",
                        "additionalProperties": false,
                        "description": "files holding parts' weights in place of the folder's (the folder still gives the configs and tokenizers)",
                        "properties": {
                            "transformer": {"type": "string", "description": "the transformer in Black Forest Labs' layout (flux1-dev.safetensors) or diffusers'"},
                            "text_encoder": {"type": "string", "description": "CLIP-L in transformers' layout (ComfyUI's clip_l.safetensors)"},
                            "text_encoder_2": {"type": "string", "description": "T5 in transformers' layout (ComfyUI's t5xxl_fp16.safetensors)"},
                            "vae": {"type": "string", "description": "the VAE in Black Forest Labs' layout (ae.safetensors) or diffusers'"}
                        }
                    },
                    "embeddings": text_embeddings::schema()
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Architecture, "flux") {
            bail!("this library has no {kind} `{id}`");
        }
        let defaults = Options {
            model: String::new(),
            config: None,
            max_sequence_length: None,
            random_weights: false,
            part_files: PartFiles::default(),
            embeddings: Vec::new(),
        };
        let o = parse_options(id, defaults, options)?;
        if o.model.is_empty() {
            bail!("flux needs the `model` option (a diffusers Flux folder)");
        }
        if let Some(n) = o.max_sequence_length.filter(|n| !(1..=512).contains(n)) {
            bail!("flux: max_sequence_length must be 1 to 512, got {n}");
        }
        let path = std::path::Path::new(&o.model);
        if !path.exists() {
            bail!("flux: model {} does not exist", path.display());
        }
        let mut files = o.part_files;
        let dir = match (path.is_file(), &o.config) {
            (true, Some(c)) => {
                if files.transformer.is_some() {
                    bail!(
                        "flux: the model {} (base_model_name; --model) is a transformer file, and \
                         transformer.model_name (--part-file transformer=) names another: give \
                         one of them",
                        path.display()
                    );
                }
                files.transformer = Some(o.model.clone());
                std::path::Path::new(c)
            }
            (true, None) => bail!(
                "{}: a single Flux transformer file needs the diffusers Flux folder of the other \
                 parts too (base_model_config; `ferrite sample --model-config`)",
                path.display()
            ),
            (false, Some(_)) => bail!(
                "flux: `config` goes with a single transformer file, and {} is a folder",
                path.display()
            ),
            (false, None) => path,
        };
        if o.random_weights && files != PartFiles::default() {
            bail!(
                "flux: random weights (random_base_weights) make every weight; leave the parts' \
                 model_name files empty"
            );
        }
        let mut model = Flux::load(dir, &files, o.max_sequence_length, o.random_weights)?;
        model.attach_embeddings(&o.embeddings)?;
        Ok(Component::Architecture(Box::new(model)))
    }
}

export_plugin!(FluxPlugin);
