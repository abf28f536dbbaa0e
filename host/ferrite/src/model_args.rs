//! How a command names the model it loads (`sample`, `lora`): the model, its config folder,
//! parts from files of their own; one place builds the architecture plugin's options.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferrite::plugins::Registry;
use ferrite_plugin_api::plugin::ArchitectureHandle;

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Model: a diffusers folder, a single-file checkpoint, or a Hugging Face repo id
    /// (`org/name[@revision]`) in the local Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// For a single-file model: a diffusers folder whose configs and tokenizer to use.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// A file holding one part's weights in place of the model's, by part id (Flux:
    /// `transformer`, `text_encoder` = clip_l, `text_encoder_2` = t5xxl, `vae` = ae). May be
    /// repeated.
    #[arg(long = "part-file", value_name = "PART=FILE")]
    pub part_files: Vec<String>,
}

impl ModelArgs {
    /// The architecture `arch` loads the model as; `extra` options go along (CLIP skip).
    pub fn open(
        &self,
        registry: &Registry,
        arch: &str,
        extra: serde_json::Value,
    ) -> Result<ArchitectureHandle> {
        self.open_as("--model", registry, arch, extra)
    }

    /// [`ModelArgs::open`] for a command whose option naming the model is `flag`.
    pub fn open_as(
        &self,
        flag: &str,
        registry: &Registry,
        arch: &str,
        extra: serde_json::Value,
    ) -> Result<ArchitectureHandle> {
        // A Hugging Face repo id is its snapshot in the local cache (downloaded if need be).
        let name = self.model.to_string_lossy();
        let model = ferrite::hub::fetched_model_path(Path::new(""), &name)?;
        let mut options = serde_json::json!({ "model": model });
        if let Some(c) = &self.model_config {
            options["config"] = c.to_string_lossy().into();
        }
        if let serde_json::Value::Object(extra) = extra {
            for (k, v) in extra {
                options[k] = v;
            }
        }
        for spec in &self.part_files {
            let Some((part, file)) = spec.split_once('=') else {
                anyhow::bail!("--part-file {spec}: give PART=FILE (e.g. vae=ae.safetensors)");
            };
            if options["part_files"].get(part).is_some() {
                anyhow::bail!("--part-file {spec}: `{part}` is given twice");
            }
            options["part_files"][part] = file.into();
        }
        registry
            .architecture(arch, &options.to_string())
            .with_context(|| {
                if self.part_files.is_empty() {
                    format!("{flag} {}", self.model.display())
                } else {
                    format!(
                        "{flag} {} with --part-file {}",
                        self.model.display(),
                        self.part_files.join(" ")
                    )
                }
            })
    }
}

/// [`ModelArgs`] for a command where the model is optional.
#[derive(clap::Args, Clone)]
pub struct OptionalModel {
    /// The model the adapters are for: a diffusers folder or a single-file checkpoint.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// For a single-file model: a diffusers folder whose configs and tokenizer to use.
    #[arg(long, requires = "model")]
    pub model_config: Option<PathBuf>,
    /// A file holding one part's weights in place of the model's (`PART=FILE`).
    #[arg(long = "part-file", value_name = "PART=FILE", requires = "model")]
    pub part_files: Vec<String>,
}

impl OptionalModel {
    pub fn get(self) -> Option<ModelArgs> {
        Some(ModelArgs {
            model: self.model?,
            model_config: self.model_config,
            part_files: self.part_files,
        })
    }
}
