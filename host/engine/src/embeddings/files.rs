//! Embedding files: A1111's and ComfyUI's single files (`emb_params` for a model with one text
//! encoder; `clip_l`, `clip_g` per encoder), read also as A1111's `.pt` (`string_to_param`) and
//! diffusers' `learned_embeds` (one tensor under the token's name), and embeddings bundled in a
//! LoRA file under `bundle_emb.<placeholder>.` keys. Which key goes to which text encoder is the
//! model's business (its parts' `embedding_key`): files are read by key.

use std::path::Path;

use ferrite_plugin_api::{DType, ModelInfo, Tensor, Weights};

use super::{EmbeddingError, Keyed, Result, Vectors};

/// The model's text encoders that take embeddings: (part id, key in embedding files).
pub fn embedding_parts(info: &ModelInfo) -> Vec<(&str, &str)> {
    info.parts
        .iter()
        .filter_map(|p| Some((p.id.as_str(), p.embedding_key.as_deref()?)))
        .collect()
}

/// A1111's key for an encoder's vectors inside a bundle: `string_to_param.*` where a single
/// file says `emb_params`, otherwise the file's own key.
fn bundle_suffix(key: &str) -> &str {
    if key == "emb_params" {
        "string_to_param.*"
    } else {
        key
    }
}

fn open(path: &Path) -> Result<Weights> {
    Weights::open(&path.to_string_lossy())
        .map_err(|e| EmbeddingError(format!("{}: {e}", path.display())))
}

/// `[tokens, width]` in f32 (a file may hold one vector as `[width]`).
fn vectors_of(w: &Weights, key: &str) -> Result<Tensor> {
    let fail = |e: ferrite_plugin_api::Error| EmbeddingError(format!("{}: `{key}`: {e}", w.path()));
    let t = w.get(key, DType::F32).map_err(fail)?;
    match t.shape().map_err(fail)?.as_slice() {
        [width] => t.reshape(&[1, *width as i64]).map_err(fail),
        [_, _] => Ok(t),
        other => Err(EmbeddingError(format!(
            "{}: `{key}` has shape {other:?}, not [tokens, width]",
            w.path()
        ))),
    }
}

/// An embedding file's vectors by key: float tensors of one or two dimensions (an A1111 `.pt`
/// also holds its token ids; bundled embeddings are left out: see [`read_bundled`]).
pub fn read(path: &Path) -> Result<Keyed> {
    let w = open(path)?;
    let out = w
        .infos()
        .iter()
        .filter(|i| {
            !i.key.starts_with("bundle_emb.")
                && i.dtype.is_float()
                && matches!(i.shape.len(), 1 | 2)
        })
        .map(|i| Ok((i.key.clone(), vectors_of(&w, &i.key)?)))
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        return Err(EmbeddingError(format!(
            "{}: no embedding in it (a LoRA's bundled ones are given with the LoRA)",
            path.display()
        )));
    }
    Ok(out)
}

/// The embeddings bundled in a LoRA file: (placeholder, tensors by key), in key order.
pub fn read_bundled(path: &Path) -> Result<Vec<(String, Keyed)>> {
    let w = open(path)?;
    let mut out: Vec<(String, Keyed)> = Vec::new();
    for i in w.infos() {
        let Some(rest) = i.key.strip_prefix("bundle_emb.") else {
            continue;
        };
        let split = match rest.strip_suffix(".string_to_param.*") {
            Some(name) => Some((name, "string_to_param.*")),
            None => rest.rsplit_once('.'),
        };
        let Some((placeholder, key)) = split else {
            continue;
        };
        let v = vectors_of(&w, &i.key)?;
        match out.iter_mut().find(|(n, _)| n == placeholder) {
            Some((_, vs)) => vs.push((key.into(), v)),
            None => out.push((placeholder.into(), vec![(key.into(), v)])),
        }
    }
    Ok(out)
}

/// The file name part for an embedding: its placeholder without what file names cannot hold.
pub fn file_stem(placeholder: &str) -> String {
    let s: String = placeholder
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if s.is_empty() { "embedding".into() } else { s }
}

/// Where an embedding not bundled in `output` goes: beside it, as
/// `<output stem>_<placeholder>.safetensors`.
pub fn beside(output: &Path, placeholder: &str) -> std::path::PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(format!("{stem}_{}.safetensors", file_stem(placeholder)))
}

/// A bundle's tensors (keys as [`read_bundled`] gives them) under the keys of a single file.
pub fn bundle_as_file(tensors: Keyed) -> Keyed {
    tensors
        .into_iter()
        .map(|(k, t)| match k.as_str() {
            "string_to_param.*" => ("emb_params".into(), t),
            _ => (k, t),
        })
        .collect()
}

/// A bundle's tensors as they are keyed in a LoRA file.
pub fn bundle_keys(placeholder: &str, tensors: Keyed) -> Keyed {
    tensors
        .into_iter()
        .map(|(k, t)| (format!("bundle_emb.{placeholder}.{k}"), t))
        .collect()
}

/// An embedding's tensors under the keys of a single file.
pub fn file_tensors(vectors: &Vectors, info: &ModelInfo) -> Vec<(String, Tensor)> {
    keyed(vectors, info, |k| k.to_string())
}

/// An embedding's tensors under the keys of a LoRA bundle.
pub fn bundle_tensors(
    placeholder: &str,
    vectors: &Vectors,
    info: &ModelInfo,
) -> Vec<(String, Tensor)> {
    bundle_keys(
        placeholder,
        keyed(vectors, info, |k| bundle_suffix(k).to_string()),
    )
}

fn keyed(
    vectors: &Vectors,
    info: &ModelInfo,
    name: impl Fn(&str) -> String,
) -> Vec<(String, Tensor)> {
    let parts = embedding_parts(info);
    vectors
        .iter()
        .filter_map(|(part, t)| {
            let (_, key) = parts.iter().find(|(p, _)| p == part)?;
            Some((name(key), t.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_stems_keep_what_file_names_hold() {
        assert_eq!(super::file_stem("<my-style>"), "my-style");
        assert_eq!(super::file_stem("<>"), "embedding");
        assert_eq!(super::file_stem("a/b c"), "abc");
    }
}
