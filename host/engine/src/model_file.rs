//! A model written as one safetensors file in its original single-file layout, as its
//! architecture plugin names it (`ldm` for SD, `bfl` for Flux's transformer): a fine-tune's
//! output and `ferrite lora merge`'s; and the pieces of a diffusers folder (`ferrite convert`'s;
//! the fine-tune's folder copies its base with `copy_except_weights` too).

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{DType, ModelInfo, Tensor, plugin::ArchitectureHandle};

/// Writes `arch`'s tensors as they are now, cast to `dtype`, with the model's modelspec
/// architecture and `base` (what it was made from) in the metadata.
pub fn write_single_file(
    arch: &ArchitectureHandle,
    info: &ModelInfo,
    out: &Path,
    dtype: DType,
    base: &str,
) -> Result<(), String> {
    let layout = info
        .single_file_layout
        .as_deref()
        .ok_or("this model has no single-file layout: write a diffusers folder")?;
    let all = arch
        .export(layout)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(n, t)| Ok((n, t.cast(dtype).map_err(|e| e.to_string())?)))
        .collect::<Result<Vec<(String, Tensor)>, String>>()?;
    let named: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut meta = vec![("ferrite_base_model", base)];
    let architecture = info.metadata.modelspec_architecture.as_str();
    if !architecture.is_empty() {
        meta.push(("modelspec.architecture", architecture));
    }
    ferrite_plugin_api::save_safetensors(&out.to_string_lossy(), &named, &meta)
        .map_err(|e| format!("{}: {e}", out.display()))
}

/// A weights file, or the index of a part's shards (`….safetensors.index.json`, the `.fp16`
/// variant's `….safetensors.index.fp16.json`; diffusers' `.bin` files and their indexes).
fn is_weights(p: &Path) -> bool {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    name.ends_with(".safetensors")
        || (name.contains(".safetensors.index") && name.ends_with(".json"))
        || ((name.starts_with("diffusion_pytorch_model") || name.starts_with("pytorch_model"))
            && (name.ends_with(".bin") || name.ends_with(".bin.index.json")))
}

/// Copies a model folder without the weight files in the folders `replaced` (the parts whose
/// tensors are written anew), each file synced (on disk before the folder is renamed into
/// place as complete).
pub fn copy_except_weights(from: &Path, to: &Path, replaced: &[PathBuf]) -> std::io::Result<()> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    };
    std::fs::create_dir_all(to).map_err(at(to))?;
    for e in std::fs::read_dir(from).map_err(at(from))? {
        let p = e.map_err(at(from))?.path();
        let dest = to.join(p.file_name().unwrap_or_default());
        if p.is_dir() {
            copy_except_weights(&p, &dest, replaced)?;
        } else if !(replaced.iter().any(|r| r == from) && is_weights(&p)) {
            std::fs::copy(&p, &dest).map_err(at(&p))?;
            std::fs::File::open(&dest)
                .and_then(|f| f.sync_all())
                .map_err(at(&dest))?;
        }
    }
    Ok(())
}

/// The files of a diffusers folder `arch` is written as: its tensors in the `diffusers` export
/// layout, grouped by component (`unet.…` → `unet/diffusion_pytorch_model.safetensors`, as
/// `info`'s parts name them; the VAE's as diffusers does), each cast to `dtype`.
pub fn write_diffusers_weights(
    arch: &ArchitectureHandle,
    info: &ModelInfo,
    folder: &Path,
    dtype: DType,
) -> Result<Vec<PathBuf>, String> {
    let all = arch.export("diffusers").map_err(|e| e.to_string())?;
    let file_of = |component: &str| -> Option<String> {
        if component == "vae" {
            return Some("vae/diffusion_pytorch_model.safetensors".into());
        }
        info.parts
            .iter()
            .find(|p| p.id == component)
            .and_then(|p| p.diffusers_file.clone())
    };
    let mut groups: std::collections::BTreeMap<String, Vec<(String, Tensor)>> = Default::default();
    for (name, t) in all {
        let Some((component, key)) = name.split_once('.') else {
            return Err(format!("exported tensor `{name}` names no component"));
        };
        let file = file_of(component)
            .ok_or_else(|| format!("no diffusers file for the model's `{component}`"))?;
        groups.entry(file).or_default().push((key.to_string(), t));
    }
    let mut written = Vec::new();
    for (file, tensors) in groups {
        // One component at a time in the output dtype, so only its copies exist at once.
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.cast(dtype).map_err(|e| e.to_string())?)))
            .collect::<Result<Vec<_>, String>>()?;
        let path = folder.join(&file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        ferrite_plugin_api::save_safetensors(&path.to_string_lossy(), &named, &[])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
