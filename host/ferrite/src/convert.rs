//! `ferrite convert` (OneTrainer's convert tool): a model as one single-file checkpoint in its
//! original layout, or as a diffusers folder, in the dtype asked for.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, ModelInfo, Weights};

use crate::lora::OutDtype;
use crate::model_args::ModelArgs;

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A diffusers folder (from a diffusers folder).
    Diffusers,
    /// One safetensors file in the model's original layout (SD: the ldm checkpoint with its VAE
    /// and text encoders; Flux: the transformer in Black Forest Labs' layout).
    SingleFile,
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The architecture plugin id of the model (sd15, sd2, sdxl, flux).
    #[arg(long)]
    model_type: String,
    /// The model: a diffusers folder, a single-file checkpoint (.safetensors, .ckpt) or a
    /// Hugging Face repo id.
    #[arg(long)]
    input: PathBuf,
    /// For a single-file input: a diffusers folder whose configs and tokenizer to use.
    #[arg(long)]
    input_config: Option<PathBuf>,
    #[arg(long, value_enum)]
    output_format: OutputFormat,
    /// The dtype of the written weights (integer tensors keep theirs).
    #[arg(long, value_enum, default_value = "float16")]
    output_dtype: OutDtype,
    /// The file or folder to write (not overwritten if it exists).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(settings: &Settings, a: ConvertArgs) -> Result<()> {
    if a.output.exists() {
        bail!(
            "--output {} exists already: not overwriting it",
            a.output.display()
        );
    }
    let dtype = a.output_dtype.dtype();
    // Conversion is file work: the CPU.
    let (device, _) = ferrite::runtime::for_device("cpu")?;
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    let model = ModelArgs {
        model: a.input.clone(),
        model_config: a.input_config.clone(),
        part_files: Vec::new(),
    };
    let name = a.input.to_string_lossy();
    let input = ferrite::hub::fetched_model_path(Path::new(""), &name)?;
    let inside = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    for (flag, dir) in [
        ("--input", Some(input.as_path())),
        ("--input-config", a.input_config.as_deref()),
    ] {
        if let Some(dir) = dir
            && a.output_format == OutputFormat::Diffusers
            && inside(&a.output).starts_with(inside(dir))
        {
            bail!(
                "--output {} is inside {flag}: write it elsewhere",
                a.output.display()
            );
        }
    }
    let config = a.input_config.as_deref();
    if a.output_format == OutputFormat::Diffusers && !input.is_dir() && config.is_none() {
        bail!(
            "--input {}: a single file written as a diffusers folder needs --input-config, a \
             diffusers folder of the same model family whose configs, tokenizers and scheduler \
             the folder takes",
            a.input.display()
        );
    }
    // Loading checks that the input is a model of that type, whatever is written.
    let registry = Registry::discover(&search_dirs(settings), settings);
    let handle = model.open_as("--input", &registry, &a.model_type, serde_json::json!({}))?;
    match a.output_format {
        OutputFormat::SingleFile => {
            let info = ModelInfo::from_json(&handle.model_info()?).map_err(anyhow::Error::msg)?;
            ferrite::model_file::write_single_file(
                &handle,
                &info,
                &a.output,
                dtype,
                &a.input.to_string_lossy(),
            )
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--output {}", a.output.display()))?;
        }
        // A folder: its files, each in the dtype (nothing goes through the model's code).
        OutputFormat::Diffusers if input.is_dir() => {
            drop(handle);
            copy_folder(&input, &a.output, dtype)?;
        }
        // A file: the config folder's configs and tokenizers, and the model's tensors as the
        // plugin names them in diffusers' layout.
        OutputFormat::Diffusers => {
            let info = ModelInfo::from_json(&handle.model_info()?).map_err(anyhow::Error::msg)?;
            let config = config.expect("checked above");
            building(&a.output, |tmp| {
                let replaced: Vec<PathBuf> = std::fs::read_dir(config)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect();
                let written =
                    ferrite::model_file::write_diffusers_weights(&handle, &info, tmp, dtype)
                        .map_err(anyhow::Error::msg)?;
                // The config folder's own weights are the model's now, wherever it wrote some.
                let replaced: Vec<PathBuf> = replaced
                    .into_iter()
                    .filter(|d| {
                        written
                            .iter()
                            .any(|w| w.parent().and_then(|p| p.file_name()) == d.file_name())
                    })
                    .collect();
                ferrite::model_file::copy_except_weights(config, tmp, &replaced)?;
                Ok(())
            })?;
        }
    }
    println!(
        "{}: {} written as {}",
        a.output.display(),
        a.input.display(),
        match a.output_format {
            OutputFormat::SingleFile => "one file",
            OutputFormat::Diffusers => "a diffusers folder",
        }
    );
    Ok(())
}

/// The safetensors name diffusers gives a `.bin` weights file's content.
fn safetensors_name(bin: &str) -> Option<&'static str> {
    match bin {
        "diffusion_pytorch_model.bin" => Some("diffusion_pytorch_model.safetensors"),
        "pytorch_model.bin" => Some("model.safetensors"),
        _ => None,
    }
}

/// Builds a folder as `.tmp-<name>` beside `to` with `fill`, syncs it, and renames it into
/// place; on failure only the temporary folder (ours) is removed.
fn building(to: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = to.file_name().unwrap_or_default().to_string_lossy();
    let tmp = to.with_file_name(format!(".tmp-{name}"));
    if tmp.exists() {
        bail!("{} is in the way: move it away", tmp.display());
    }
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        fill(&tmp)?;
        sync_dirs(&tmp)?;
        std::fs::rename(&tmp, to)?;
        if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("--output {}", to.display()))
}

/// `dir` and every folder in it synced (their entries on disk before the rename).
fn sync_dirs(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_dirs(&p)?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `from` (a diffusers folder) as `to`: every weights file rewritten in `dtype` (a component's
/// `.bin` as its `.safetensors`), everything else copied.
fn copy_folder(from: &Path, to: &Path, dtype: DType) -> Result<()> {
    building(to, |tmp| {
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel) = dirs.pop() {
            std::fs::create_dir_all(tmp.join(&rel))?;
            let here = from.join(&rel);
            for e in std::fs::read_dir(&here).with_context(|| here.display().to_string())? {
                let e = e?;
                let (src, file) = (e.path(), e.file_name().to_string_lossy().into_owned());
                if src.is_dir() {
                    dirs.push(rel.join(&file));
                    continue;
                }
                let renamed = safetensors_name(&file);
                if renamed.is_some_and(|r| src.with_file_name(r).exists()) {
                    // The folder has the safetensors too: that one is written.
                    continue;
                }
                if file.ends_with(".bin") && renamed.is_none() {
                    bail!(
                        "{}: only a component's single `.bin` weights file is converted (shards \
                         and other `.bin` files are not); re-save the model as safetensors",
                        src.display()
                    );
                }
                if file.ends_with(".safetensors") || renamed.is_some() {
                    let out = tmp.join(&rel).join(renamed.unwrap_or(&file));
                    rewrite(&src, &out, dtype).with_context(|| src.display().to_string())?;
                } else {
                    let out = tmp.join(&rel).join(&file);
                    std::fs::copy(&src, &out).with_context(|| src.display().to_string())?;
                    std::fs::File::open(&out)?.sync_all()?;
                }
            }
        }
        Ok(())
    })
}

/// One weights file in `dtype` (floating-point tensors; integer ones as they are).
fn rewrite(src: &Path, out: &Path, dtype: DType) -> Result<()> {
    let w = Weights::open(&src.to_string_lossy())?;
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
    let tensors = w
        .infos()
        .iter()
        .map(|i| {
            let d = if float(i.dtype) { dtype } else { i.dtype };
            Ok((i.key.clone(), w.get(&i.key, d)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let named: Vec<(&str, &ferrite_plugin_api::Tensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = w.metadata()?;
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ferrite_plugin_api::save_safetensors(&out.to_string_lossy(), &named, &meta)?;
    Ok(())
}
