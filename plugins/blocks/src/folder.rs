//! Diffusers model folders: reading their configs and finding their weight files.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{Error, Result, Weights, serde_json};

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error(format!("cannot read {}: {e}", path.display())))
}

/// `dir/file` (a part's `config.json`) read and parsed by `parse`, which names the file in its
/// errors.
pub fn config<T>(dir: &Path, file: &str, parse: impl Fn(&str, &str) -> Result<T>) -> Result<T> {
    let path = dir.join(file);
    parse(&read(&path)?, &path.to_string_lossy())
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read(path)?).map_err(|e| Error(format!("{}: {e}", path.display())))
}

/// `<stem>.safetensors` in `dir`, else its `.fp16` variant.
pub fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for f in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(f);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Error(format!(
        "{} has no {stem}.safetensors (nor a .fp16 variant)",
        dir.display()
    )))
}

pub fn open(path: &Path) -> Result<Weights> {
    Weights::open(&path.to_string_lossy())
}

/// The weights of a diffusers model folder's `part/` (`diffusion_pytorch_model` or `model`):
/// one file, or the shards its `<stem>.safetensors.index.json` lists (as the published Flux and
/// large SDXL folders are split); with `random`, random weights built from its `config.json`
/// alone (benchmarks).
pub fn part_weights(dir: &Path, part: &str, stem: &str, random: bool) -> Result<Weights> {
    if random {
        return crate::manifest::random_part(dir, part, 0);
    }
    folder_weights(&dir.join(part), stem)
}

/// The weights `<stem>.safetensors` holds in `folder`, or the shards its
/// `<stem>.safetensors.index.json` lists; the full-precision weights first, then the `.fp16`
/// variant's.
pub fn folder_weights(folder: &Path, stem: &str) -> Result<Weights> {
    for (file, index) in [
        (
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ),
        (
            format!("{stem}.fp16.safetensors"),
            format!("{stem}.safetensors.index.fp16.json"),
        ),
    ] {
        if folder.join(&file).exists() {
            return open(&folder.join(file));
        }
        if folder.join(&index).exists() {
            return shards(&folder.join(index));
        }
    }
    // Neither: the error names what was looked for.
    open(&weights_file(folder, stem)?)
}

/// The model a safetensors index splits over its shards (the files its `weight_map` names,
/// next to it).
fn shards(index: &Path) -> Result<Weights> {
    let v = read_json(index)?;
    let map = v["weight_map"].as_object().ok_or_else(|| {
        Error(format!(
            "{} has no weight_map (not a safetensors index)",
            index.display()
        ))
    })?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or_else(|| {
            Error(format!(
                "{}: a weight_map entry is not a file name",
                index.display()
            ))
        })?;
        let path = index.with_file_name(f).to_string_lossy().into_owned();
        if !files.contains(&path) {
            files.push(path);
        }
    }
    let w = Weights::open_shards(&index.to_string_lossy(), &files)?;
    if let Some(k) = map.keys().find(|k| w.info(k).is_none()) {
        return Err(Error(format!(
            "{}: tensor `{k}` is not in its shard",
            index.display()
        )));
    }
    Ok(w)
}

/// A folder's `model_index.json`, or an error saying it is not a diffusers folder.
pub fn model_index(dir: &Path) -> Result<serde_json::Value> {
    let index = dir.join("model_index.json");
    if !index.exists() {
        return Err(Error(format!(
            "{} is not a diffusers model folder (no model_index.json)",
            dir.display()
        )));
    }
    read_json(&index)
}

/// The parts a folder must have, or an error naming the first missing one.
pub fn require_parts(dir: &Path, parts: &[&str], what: &str) -> Result<()> {
    match parts.iter().find(|p| !dir.join(p).is_dir()) {
        Some(p) => Err(Error(format!(
            "model folder {} has no {p}/ (expected a diffusers {what} folder)",
            dir.display()
        ))),
        None => Ok(()),
    }
}
