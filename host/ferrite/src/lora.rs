//! `ferrite lora info|convert|merge`: what an adapter file holds, the same adapters in another
//! key layout, and a model with adapters merged into its weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrite::adapters::{
    ModelLayers,
    describe::describe,
    formats::{Format, Layouts},
};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

use crate::model_args::{ModelArgs, OptionalModel};

#[derive(clap::Subcommand)]
pub enum LoraAction {
    /// Key layout, adapter type, ranks, alphas, modules, the model family and the training
    /// metadata of an adapter file; with --model, how many of that model's layers it adapts.
    Info {
        file: PathBuf,
        #[command(flatten)]
        model: OptionalModel,
        /// Architecture plugin id of --model (default: the family the file names).
        #[arg(long, requires = "model")]
        arch: Option<String>,
    },
    /// Writes an adapter file's adapters in another key layout, in the file's dtype with its
    /// training metadata (read against --model, whose layers name every layout's keys).
    Convert {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long, value_enum)]
        format: LoraFormat,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: OptionalModel,
        /// Architecture plugin id of --model (default: the family the file names).
        #[arg(long, requires = "model")]
        arch: Option<String>,
    },
    /// Merges adapter files into the model's weights and writes the model as one file in its
    /// original layout (SD: the ldm checkpoint; Flux: the transformer in Black Forest Labs'
    /// layout).
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        /// Architecture plugin id of --model (default: the family the first file names).
        #[arg(long)]
        arch: Option<String>,
        /// An adapter file with an optional strength: `FILE` or `FILE:0.8`. May be repeated.
        #[arg(long = "lora", value_name = "FILE[:WEIGHT]", required = true)]
        loras: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// The dtype of the written weights.
        #[arg(long, value_enum, default_value = "float16")]
        dtype: OutDtype,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OutDtype {
    Float32,
    Float16,
    Bfloat16,
}

impl OutDtype {
    pub fn dtype(self) -> ferrite_plugin_api::DType {
        match self {
            Self::Float32 => ferrite_plugin_api::DType::F32,
            Self::Float16 => ferrite_plugin_api::DType::F16,
            Self::Bfloat16 => ferrite_plugin_api::DType::BF16,
        }
    }
}

/// `FILE:WEIGHT` when what follows the last colon is a number, else the whole path at 1.
/// Each bundled embedding as `<out stem>_<placeholder>.safetensors` beside `out`.
fn write_bundled_beside(
    out: &std::path::Path,
    bundled: Vec<(String, ferrite::embeddings::Keyed)>,
    dtype: ferrite_plugin_api::DType,
) -> Result<()> {
    use ferrite::embeddings::{files, write_keyed};
    for (placeholder, tensors) in bundled {
        let path = files::beside(out, &placeholder);
        write_keyed(&path, files::bundle_as_file(tensors), dtype)?;
        println!("{}: the bundled embedding `{placeholder}`", path.display());
    }
    Ok(())
}

pub fn lora_spec(spec: &str) -> (PathBuf, f64) {
    match spec.rsplit_once(':') {
        Some((p, w)) if w.parse::<f64>().is_ok() => (p.into(), w.parse().unwrap_or(1.0)),
        _ => (spec.into(), 1.0),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LoraFormat {
    Kohya,
    Diffusers,
    Comfy,
}

/// The architecture plugin for the family an adapter file names.
fn arch_of(family: Option<&str>) -> Option<&'static str> {
    let f = family?.to_lowercase();
    Some(if f == "sd 1.x/2.x" {
        // Keys alone do not tell SD 2 from SD 1 (`--arch sd2` for an SD 2 LoRA).
        "sd15"
    } else if f.contains("flux") {
        "flux"
    } else if f.contains("xl") {
        "sdxl"
    } else if f.contains("v2") || f.contains("_2") {
        "sd2"
    } else if f.contains("sd") || f.contains("v1") {
        "sd15"
    } else {
        return None;
    })
}

/// The model's layers, loaded as `arch` (or the file's family's architecture).
fn model_layers(
    registry: &Registry,
    m: &ModelArgs,
    arch: Option<&str>,
    file: &Path,
    family: Option<&str>,
) -> Result<Arc<ModelLayers>> {
    let Some(arch) = arch.or(arch_of(family)) else {
        anyhow::bail!(
            "{}: the file does not say which model family it is for: give --arch",
            file.display()
        );
    };
    let handle = m.open(registry, arch, serde_json::json!({}))?;
    let layers = ModelLayers::of(&handle).with_context(|| format!("--model as {arch}"))?;
    Ok(Arc::new(layers))
}

pub fn run(settings: &Settings, action: LoraAction) -> Result<()> {
    let (device, _) = ferrite::runtime::for_device("cpu")?;
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    // The adapter plugins say which tensors are whose.
    let registry = Registry::discover(&search_dirs(settings), settings);
    let layouts = Layouts::of(registry.components());
    match action {
        LoraAction::Info { file, model, arch } => {
            let d = describe(&file, &layouts)?;
            println!("{}", file.display());
            let mut lines = d.lines();
            let bundled = ferrite::embeddings::files::read_bundled(&file)?;
            if !bundled.is_empty() {
                let each: Vec<String> = bundled
                    .iter()
                    .map(|(p, t)| {
                        let keys: Vec<String> = t
                            .iter()
                            .map(|(k, v)| format!("{k} {:?}", v.shape().unwrap_or_default()))
                            .collect();
                        format!("{p} ({})", keys.join(", "))
                    })
                    .collect();
                // After the module count, where it stood.
                lines.insert(3, format!("bundled embeddings: {}", each.join(", ")));
            }
            for l in lines {
                println!("  {l}");
            }
            if let Some(m) = model.get() {
                let layers =
                    model_layers(&registry, &m, arch.as_deref(), &file, d.family.as_deref())?;
                let n = layers
                    .load(&registry, &file, 1.0)
                    .with_context(|| format!("{} on --model", file.display()))?;
                println!("  adapts {n} layers of {}", m.model.display());
            }
        }
        LoraAction::Convert {
            input,
            format,
            out,
            model,
            arch,
        } => {
            let d =
                describe(&input, &layouts).with_context(|| format!("--in {}", input.display()))?;
            let Some(m) = model.get() else {
                anyhow::bail!(
                    "lora convert needs --model: the model's layers name each layout's keys"
                );
            };
            let layers = model_layers(&registry, &m, arch.as_deref(), &input, d.family.as_deref())?;
            let n = layers
                .load(&registry, &input, 1.0)
                .with_context(|| format!("--in {}", input.display()))?;
            let format = match format {
                LoraFormat::Kohya => Format::Kohya,
                LoraFormat::Diffusers => Format::Diffusers,
                LoraFormat::Comfy => Format::Comfy,
            };
            // Bundled embeddings stay in a kohya file (A1111's bundles); other layouts hold
            // none, so each goes beside it as a file of its own.
            let bundled = ferrite::embeddings::files::read_bundled(&input)
                .with_context(|| format!("--in {}", input.display()))?;
            let inside = format == Format::Kohya;
            let keys: Vec<(String, ferrite_plugin_api::Tensor)> = if inside {
                bundled
                    .iter()
                    .flat_map(|(p, t)| ferrite::embeddings::files::bundle_keys(p, t.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            layers
                .save_with(&out, format, d.dtype, &d.metadata, &keys)
                .with_context(|| format!("--out {}", out.display()))?;
            println!("{}: the adapters of {n} layers written", out.display());
            if !inside {
                write_bundled_beside(&out, bundled, d.dtype)?;
            }
        }
        LoraAction::Merge {
            model,
            arch,
            loras,
            out,
            dtype,
        } => {
            let first = lora_spec(&loras[0]).0;
            let family = describe(&first, &layouts)
                .with_context(|| format!("--lora {}", loras[0]))?
                .family;
            let Some(arch) = arch.as_deref().or(arch_of(family.as_deref())) else {
                anyhow::bail!(
                    "{}: the file does not say which model family it is for: give --arch",
                    first.display()
                );
            };
            let handle = model.open(&registry, arch, serde_json::json!({}))?;
            let layers = ModelLayers::of(&handle)?;
            for spec in &loras {
                let (path, weight) = lora_spec(spec);
                layers
                    .load(&registry, &path, weight)
                    .with_context(|| format!("--lora {spec}"))?;
            }
            // The file holds only some parts (Flux: the transformer): an adapter on another
            // would be lost.
            let held = &layers.info.single_file_parts;
            let outside = |n: &&String| !held.iter().any(|p| n.starts_with(&format!("{p}.")));
            if let Some(l) = layers
                .adapted()
                .iter()
                .find(outside)
                .filter(|_| !held.is_empty())
            {
                anyhow::bail!(
                    "the merged file holds only {}, and the adapters change `{l}`: merge those \
                     LoRAs without their other parts",
                    held.join(", ")
                );
            }
            layers.merge()?;
            layers.clear();
            let dtype = dtype.dtype();
            let base = model.model.to_string_lossy();
            ferrite::model_file::write_single_file(&handle, &layers.info, &out, dtype, &base)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--out {}", out.display()))?;
            println!("{}: {} merged into {base}", out.display(), loras.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::arch_of;

    /// The families `lora info` names and the metadata kohya and modelspec write.
    #[test]
    fn architectures_of_families() {
        for (family, arch) in [
            ("SD 1.x/2.x", Some("sd15")),
            ("SDXL", Some("sdxl")),
            ("Flux", Some("flux")),
            ("sd_v1", Some("sd15")),
            ("sd_v2", Some("sd2")),
            ("sdxl_base_v1-0", Some("sdxl")),
            ("flux1", Some("flux")),
            ("stable-diffusion-v1/lora", Some("sd15")),
            ("stable-diffusion-v2-768-v/lora", Some("sd2")),
            ("stable-diffusion-xl-v1-base/lora", Some("sdxl")),
            ("something", None),
        ] {
            assert_eq!(arch_of(Some(family)), arch, "{family}");
        }
    }
}
