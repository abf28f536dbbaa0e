//! Textual-inversion embeddings: new ones from a text (as OneTrainer starts them), the files
//! other tools read and write, and handing them to the model.

pub mod files;

use std::path::Path;

use ferrite_plugin_api::{DType, ModelInfo, Tensor, TextEmbedding, plugin::ArchitectureHandle};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EmbeddingError(pub String);

pub type Result<T> = std::result::Result<T, EmbeddingError>;

/// One embedding's vectors `[tokens, width]` by text-encoder part id.
pub type Vectors = Vec<(String, Tensor)>;

fn err(e: impl std::fmt::Display) -> EmbeddingError {
    EmbeddingError(e.to_string())
}

/// New vectors as OneTrainer makes them: the token embeddings of `text` cut to `count` tokens
/// and padded with those of `*`, for every text encoder of the model that takes embeddings.
pub fn initial(arch: &ArchitectureHandle, text: &str, count: usize) -> Result<Vectors> {
    if count == 0 {
        return Err(EmbeddingError("token_count must be at least 1".into()));
    }
    let tokens = arch.token_embeddings(text).map_err(err)?;
    let pad = arch.token_embeddings("*").map_err(err)?;
    tokens
        .into_iter()
        .map(|(part, t)| {
            let n = t.shape().map_err(err)?[0].min(count);
            let star = pad
                .iter()
                .find(|(p, _)| *p == part)
                .map(|(_, t)| t.narrow(0, 0, 1))
                .transpose()
                .map_err(err)?
                .ok_or_else(|| EmbeddingError(format!("{part}: `*` has no token")))?;
            let mut rows = Vec::new();
            if n > 0 {
                rows.push(t.narrow(0, 0, n).map_err(err)?);
            }
            rows.extend(std::iter::repeat_n(star, count - n));
            let v = Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)
                .and_then(|v| v.cast(DType::F32)?.detach())
                .map_err(err)?;
            Ok((part, v))
        })
        .collect()
}

/// Hands `embeddings` ((placeholder, vectors)) to the model: prompts use them from now on.
pub fn attach(arch: &mut ArchitectureHandle, embeddings: &[(String, Vectors)]) -> Result<()> {
    let list: Vec<TextEmbedding> = embeddings
        .iter()
        .map(|(placeholder, vectors)| TextEmbedding {
            placeholder: placeholder.clone(),
            vectors: vectors.clone(),
        })
        .collect();
    arch.set_embeddings(&list).map_err(err)
}

/// Writes one embedding as a single file in A1111's/ComfyUI's layout, in `dtype`.
pub fn write(path: &Path, vectors: &Vectors, info: &ModelInfo, dtype: DType) -> Result<()> {
    let tensors = files::file_tensors(vectors, info)
        .into_iter()
        .map(|(k, t)| Ok((k, t.cast(dtype).map_err(err)?)))
        .collect::<Result<Vec<_>>>()?;
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| EmbeddingError(format!("{}: {e}", dir.display())))?;
    }
    ferrite_plugin_api::save_safetensors(&path.to_string_lossy(), &named, &[])
        .map_err(|e| EmbeddingError(format!("{}: {e}", path.display())))
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
