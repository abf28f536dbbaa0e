//! `ferrite lora info|convert`: what an adapter file holds, and the same adapters in another
//! key layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrite::adapters::{ModelLayers, describe::describe, formats::Format};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

#[derive(clap::Subcommand)]
pub enum LoraAction {
    /// Key layout, adapter type, ranks, alphas, modules, the model family and the training
    /// metadata of an adapter file; with --model, how many of that model's layers it adapts.
    Info {
        file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Writes an adapter file's adapters in another key layout (read against --model, whose
    /// layers name every layout's keys).
    Convert {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long, value_enum)]
        format: LoraFormat,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(clap::Args)]
pub struct ModelArgs {
    /// The model the adapters are for (a diffusers folder or single file).
    #[arg(long)]
    model: Option<PathBuf>,
    /// For a single-file model: its diffusers folder of configs.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Architecture plugin id.
    #[arg(long, default_value = "sd15")]
    arch: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LoraFormat {
    Kohya,
    Diffusers,
    Comfy,
}

/// The model's layers, with its adapters scope entered for as long as the guard lives.
fn model_layers(
    settings: &Settings,
    m: &ModelArgs,
) -> Result<Option<(Registry, std::sync::Arc<ModelLayers>)>> {
    let Some(model) = &m.model else {
        return Ok(None);
    };
    let registry = Registry::discover(&search_dirs(settings), settings);
    let mut options = serde_json::json!({ "model": model });
    if let Some(c) = &m.model_config {
        options["config"] = c.to_string_lossy().into();
    }
    let arch = registry
        .architecture(&m.arch, &options.to_string())
        .with_context(|| format!("--model {}", model.display()))?;
    let layers = std::sync::Arc::new(ModelLayers::of(&arch)?);
    Ok(Some((registry, layers)))
}

pub fn run(settings: &Settings, action: LoraAction) -> Result<()> {
    let (device, _) = ferrite::runtime::for_device("cpu")?;
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    match action {
        LoraAction::Info { file, model } => {
            let d = describe(&file)?;
            let list = |s: Vec<String>| {
                if s.is_empty() {
                    "none".to_string()
                } else {
                    s.join(", ")
                }
            };
            println!("{}", file.display());
            println!("  layout: {}", d.layout);
            println!("  type: {}", d.kind);
            println!("  modules: {}", d.modules);
            println!(
                "  ranks: {}",
                list(d.ranks.iter().map(|r| r.to_string()).collect())
            );
            println!(
                "  alphas: {}",
                if d.alphas.is_empty() {
                    "none in the file (alpha = rank, or diffusers' metadata)".into()
                } else {
                    list(d.alphas.into_iter().collect())
                }
            );
            println!(
                "  made for: {}",
                d.family.as_deref().unwrap_or("not told by the file")
            );
            for (k, v) in &d.metadata {
                println!("  {k}: {v}");
            }
            if let Some((registry, layers)) = model_layers(settings, &model)? {
                let n = layers.load(&registry, &file, 1.0)?;
                println!(
                    "  adapts {n} layers of {}",
                    model.model.unwrap_or_default().display()
                );
            }
        }
        LoraAction::Convert {
            input,
            format,
            out,
            model,
        } => {
            let Some((registry, layers)) = model_layers(settings, &model)? else {
                anyhow::bail!(
                    "lora convert needs --model (and --arch): the model's layers name each \
                     layout's keys"
                );
            };
            let n = layers
                .load(&registry, &input, 1.0)
                .with_context(|| format!("--in {}", input.display()))?;
            let format = match format {
                LoraFormat::Kohya => Format::Kohya,
                LoraFormat::Diffusers => Format::Diffusers,
                LoraFormat::Comfy => Format::Comfy,
            };
            // The file's own dtype and training metadata go along.
            let d = describe(&input)?;
            layers
                .save(&out, format, d.dtype, &d.metadata)
                .with_context(|| format!("--out {}", out.display()))?;
            println!("{}: {n} layers written", out.display());
        }
    }
    Ok(())
}
