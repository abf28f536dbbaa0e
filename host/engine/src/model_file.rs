//! A model written as one safetensors file in its original single-file layout, as its
//! architecture plugin names it (`ldm` for SD, `bfl` for Flux's transformer): a fine-tune's
//! output and `ferrite lora merge`'s.

use std::path::Path;

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
