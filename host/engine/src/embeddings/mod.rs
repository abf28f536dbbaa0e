//! Textual-inversion embeddings: given to a model through its `embeddings` option (from files,
//! or new as OneTrainer starts them), its vectors read back from its parameters, the files other
//! tools read and write, and A1111's use of them in prompts.

pub mod files;

use std::path::Path;

use ferrite_plugin_api::{DType, ModelInfo, Tensor};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EmbeddingError(pub String);

pub type Result<T> = std::result::Result<T, EmbeddingError>;

/// One embedding's vectors `[tokens, width]` by text-encoder part id.
pub type Vectors = Vec<(String, Tensor)>;

/// An embedding file's tensors by key (`emb_params`, `clip_l`, ...).
pub type Keyed = Vec<(String, Tensor)>;

/// Where an embedding's vectors come from.
pub enum Source {
    /// An embedding file's (or a bundle's) tensors by key.
    Tensors(Keyed),
    /// New: the text's token embeddings cut to `count` tokens, padded with `*`'s.
    New { text: String, count: usize },
}

/// An embedding to give a model.
pub struct Given {
    /// What errors call it (a config key, `--embedding FILE`).
    pub name: String,
    pub placeholder: String,
    pub source: Source,
}

/// The architecture's `embeddings` option for `given` (whose tensors must live until the model
/// is made: it keeps its own handles).
pub fn option(given: &[Given]) -> serde_json::Value {
    given
        .iter()
        .map(|g| {
            let mut o = serde_json::json!({ "name": g.name, "placeholder": g.placeholder });
            match &g.source {
                Source::Tensors(t) => {
                    o["vectors"] = t
                        .iter()
                        .map(|(k, t)| (k.clone(), serde_json::Value::from(t.id().0)))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
                Source::New { text, count } => {
                    o["initial_text"] = text.as_str().into();
                    o["token_count"] = (*count).into();
                }
            }
            o
        })
        .collect::<Vec<_>>()
        .into()
}

/// The model's embeddings, in the order given: their vectors (parameters
/// `embeddings.<index>.<part id>`) by part.
pub fn of_model(parameters: &[(String, Tensor)], count: usize) -> Vec<Vectors> {
    let mut out: Vec<Vectors> = (0..count).map(|_| Vec::new()).collect();
    for (name, t) in parameters {
        let Some((i, part)) = name
            .strip_prefix("embeddings.")
            .and_then(|r| r.split_once('.'))
        else {
            continue;
        };
        if let Some(v) = i.parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            v.push((part.to_string(), t.clone()));
        }
    }
    out
}

/// Writes one embedding as a single file in A1111's/ComfyUI's layout, in `dtype`.
pub fn write(path: &Path, vectors: &Vectors, info: &ModelInfo, dtype: DType) -> Result<()> {
    write_keyed(path, files::file_tensors(vectors, info), dtype)
}

/// Writes tensors already under a single file's keys, in `dtype`.
pub fn write_keyed(path: &Path, tensors: Keyed, dtype: DType) -> Result<()> {
    let fail = |e: ferrite_plugin_api::Error| EmbeddingError(format!("{}: {e}", path.display()));
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.cast(dtype).map_err(fail)?)))
        .collect::<Result<Vec<_>>>()?;
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| EmbeddingError(format!("{}: {e}", dir.display())))?;
    }
    ferrite_plugin_api::save_safetensors(&path.to_string_lossy(), &named, &[]).map_err(fail)
}

/// The placeholder an embedding called `name` is registered under: `<name>` (a name already
/// in angle brackets stays as it is).
pub fn placeholder_for(name: &str) -> String {
    if name.starts_with('<') && name.ends_with('>') {
        name.to_string()
    } else {
        format!("<{name}>")
    }
}

/// `prompt` with A1111's use of an embedding called `name`, the bare word, written as its
/// placeholder `<name>`: whole words only (`style`, not `stylish`), and `<name>` as it was.
pub fn mark_words(prompt: &str, name: &str) -> String {
    if name.is_empty() || name.starts_with('<') {
        return prompt.to_string();
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(at) = rest.find(name) {
        let before = rest[..at].chars().last().or_else(|| out.chars().last());
        let after = rest[at + name.len()..].chars().next();
        out.push_str(&rest[..at]);
        if word(before) || word(after) || before == Some('<') || after == Some('>') {
            out.push_str(name);
        } else {
            out.push_str(&placeholder_for(name));
        }
        rest = &rest[at + name.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_words_become_placeholders() {
        assert_eq!(
            mark_words(
                "style, a stylish <style> in style_x or (style:1.2)",
                "style"
            ),
            "<style>, a stylish <style> in style_x or (<style>:1.2)"
        );
        assert_eq!(mark_words("style", "style"), "<style>");
        assert_eq!(mark_words("<thing> thing", "<thing>"), "<thing> thing");
        assert_eq!(placeholder_for("<thing>"), "<thing>");
        assert_eq!(placeholder_for("thing"), "<thing>");
    }
}
