//! `ferrite lora info|convert`: what an adapter file holds, and the same adapters in another
//! key layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrite::adapters::{ModelLayers, describe::describe, formats::Format};
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
    Some(if f.contains("flux") {
        "flux"
    } else if f.contains("xl") {
        "sdxl"
    } else if f.contains("v2") || f.contains("2.") {
        "sd2"
    } else if f.contains("sd") || f.contains("v1") {
        "sd15"
    } else {
        return None;
    })
}

/// The model's layers, loaded as `arch` (or the file's family's architecture).
fn model_layers(
    settings: &Settings,
    m: &ModelArgs,
    arch: Option<&str>,
    file: &Path,
    family: Option<&str>,
) -> Result<(Registry, Arc<ModelLayers>)> {
    let Some(arch) = arch.or(arch_of(family)) else {
        anyhow::bail!(
            "{}: the file does not say which model family it is for: give --arch",
            file.display()
        );
    };
    let registry = Registry::discover(&search_dirs(settings), settings);
    let handle = m.open(&registry, arch, serde_json::json!({}))?;
    let layers = ModelLayers::of(&handle).with_context(|| format!("--model as {arch}"))?;
    Ok((registry, Arc::new(layers)))
}

pub fn run(settings: &Settings, action: LoraAction) -> Result<()> {
    let (device, _) = ferrite::runtime::for_device("cpu")?;
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    match action {
        LoraAction::Info { file, model, arch } => {
            let d = describe(&file)?;
            let join = |v: Vec<String>| v.join(", ");
            println!("{}", file.display());
            println!("  layout: {}", d.layout);
            println!("  type: {}", d.kind);
            println!("  modules: {}", d.modules);
            println!(
                "  ranks: {}",
                join(d.ranks.iter().map(|r| r.to_string()).collect())
            );
            println!(
                "  alphas: {}",
                if d.alphas.is_empty() {
                    "none in the file (alpha = rank, or diffusers' metadata)".into()
                } else {
                    join(d.alphas.iter().map(|a| a.to_string()).collect())
                }
            );
            println!(
                "  made for: {}",
                d.family.as_deref().unwrap_or("not told by the file")
            );
            if d.other_tensors.0 > 0 {
                println!(
                    "  other tensors: {} (e.g. {})",
                    d.other_tensors.0,
                    d.other_tensors.1.join(", ")
                );
            }
            for (k, v) in &d.metadata {
                // Dataset listings and tag counts run to kilobytes.
                match v.char_indices().nth(120) {
                    Some((at, _)) => println!("  {k}: {}… ({} bytes)", &v[..at], v.len()),
                    None => println!("  {k}: {v}"),
                }
            }
            if let Some(m) = model.get() {
                let (registry, layers) =
                    model_layers(settings, &m, arch.as_deref(), &file, d.family.as_deref())?;
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
            let d = describe(&input).with_context(|| format!("--in {}", input.display()))?;
            let Some(m) = model.get() else {
                anyhow::bail!(
                    "lora convert needs --model: the model's layers name each layout's keys"
                );
            };
            let (registry, layers) =
                model_layers(settings, &m, arch.as_deref(), &input, d.family.as_deref())?;
            let n = layers
                .load(&registry, &input, 1.0)
                .with_context(|| format!("--in {}", input.display()))?;
            let format = match format {
                LoraFormat::Kohya => Format::Kohya,
                LoraFormat::Diffusers => Format::Diffusers,
                LoraFormat::Comfy => Format::Comfy,
            };
            layers
                .save(&out, format, d.dtype, &d.metadata)
                .with_context(|| format!("--out {}", out.display()))?;
            println!("{}: the adapters of {n} layers written", out.display());
        }
    }
    Ok(())
}
