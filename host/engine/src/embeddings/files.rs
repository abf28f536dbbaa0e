//! Embedding files: A1111's and ComfyUI's single files (`emb_params` for a model with one text
//! encoder; `clip_l`, `clip_g` per encoder), read also as A1111's `string_to_param` and
//! diffusers' `learned_embeds` (one tensor under the token's name); and embeddings bundled in a
//! LoRA file under `bundle_emb.<placeholder>.` keys.

use std::path::Path;

use ferrite_plugin_api::{DType, ModelInfo, Tensor, Weights};

use super::{EmbeddingError, Result, Vectors};

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
        .map_err(|e| EmbeddingError(format!("embedding {}: {e}", path.display())))
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

/// An embedding file's vectors for the model's text encoders. A file of one tensor under
/// another name (diffusers' `learned_embeds`, A1111's `string_to_param.*`) is the vectors of
/// a model with one embedding-taking encoder.
pub fn read(path: &Path, info: &ModelInfo) -> Result<Vectors> {
    let w = open(path)?;
    let parts = embedding_parts(info);
    if parts.is_empty() {
        return Err(EmbeddingError(
            "this model has no text encoder that takes embeddings".into(),
        ));
    }
    let mut out = Vec::new();
    for (part, key) in &parts {
        if w.info(key).is_some() {
            out.push((part.to_string(), vectors_of(&w, key)?));
        }
    }
    let keys: Vec<&str> = w.infos().iter().map(|i| i.key.as_str()).collect();
    if out.is_empty() && parts.len() == 1 {
        let only = keys
            .iter()
            .find(|k| k.ends_with("string_to_param.*"))
            .or_else(|| keys.first().filter(|_| keys.len() == 1));
        if let Some(k) = only {
            out.push((parts[0].0.to_string(), vectors_of(&w, k)?));
        }
    }
    if out.is_empty() {
        let wanted: Vec<&str> = parts.iter().map(|(_, k)| *k).collect();
        return Err(EmbeddingError(format!(
            "embedding {}: none of the keys this model's embeddings use ({}); the file holds {}",
            path.display(),
            wanted.join(", "),
            keys.join(", ")
        )));
    }
    Ok(out)
}

/// The embeddings bundled in a LoRA file: (placeholder, vectors), in key order.
pub fn read_bundled(path: &Path, info: &ModelInfo) -> Result<Vec<(String, Vectors)>> {
    let w = open(path)?;
    let mut out: Vec<(String, Vectors)> = Vec::new();
    for i in w.infos() {
        let Some(rest) = i.key.strip_prefix("bundle_emb.") else {
            continue;
        };
        let Some((part, placeholder)) = embedding_parts(info).into_iter().find_map(|(p, k)| {
            let name = rest.strip_suffix(bundle_suffix(k))?.strip_suffix('.')?;
            Some((p, name))
        }) else {
            continue;
        };
        let v = vectors_of(&w, &i.key)?;
        match out.iter_mut().find(|(n, _)| n == placeholder) {
            Some((_, vs)) => vs.push((part.into(), v)),
            None => out.push((placeholder.into(), vec![(part.into(), v)])),
        }
    }
    Ok(out)
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
    keyed(vectors, info, |k| {
        format!("bundle_emb.{placeholder}.{}", bundle_suffix(k))
    })
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
