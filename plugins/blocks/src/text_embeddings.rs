//! Textual-inversion embeddings given to a model (its `embeddings` option): each one's vectors
//! for every text encoder that takes them, from the host's tensors (an embedding file's, keyed
//! by part id or by the file's key) or new as OneTrainer starts them; the encoders' added
//! tokens; and the vectors as the model's parameters `embeddings.<index>.<part id>`, which is
//! how the host trains them.

use std::collections::BTreeMap;

use ferrite_plugin_api::{
    Error, Result, Tensor, TensorId,
    family::EmbeddingInfo,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

use crate::added_tokens::AddedTokens;
use crate::clip::ClipTextTransformer;
use crate::tokenizer::ClipTokenizer;

/// One entry of the `embeddings` option.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingOption {
    /// What errors call it (the config key; `--embedding FILE`).
    pub name: String,
    /// The prompt text that stands for its tokens.
    pub placeholder: String,
    /// Its vectors `[tokens, width]` as host tensor ids, keyed by text-encoder part id or by
    /// embedding-file key (`emb_params`, `clip_l`, `clip_g`; with one text encoder also
    /// `string_to_param.*` or the file's only tensor).
    #[serde(default)]
    pub vectors: BTreeMap<String, u64>,
    /// Without vectors: new ones, this text's token embeddings cut to `token_count` and padded
    /// with `*`'s (OneTrainer's start).
    #[serde(default)]
    pub initial_text: String,
    #[serde(default)]
    pub token_count: usize,
}

/// The option's JSON schema.
pub fn schema() -> serde_json::Value {
    json!({
        "type": "array",
        "description": "textual-inversion embeddings: each placeholder in prompts stands for its vectors",
        "items": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "placeholder"],
            "properties": {
                "name": {"type": "string"},
                "placeholder": {"type": "string"},
                "vectors": {"type": "object", "additionalProperties": {"type": "integer"}},
                "initial_text": {"type": "string"},
                "token_count": {"type": "integer", "minimum": 0}
            }
        }
    })
}

/// A text encoder that takes embeddings.
pub struct Encoder<'a> {
    pub part: &'a str,
    /// Its key in embedding files.
    pub key: &'a str,
    pub tokenizer: &'a ClipTokenizer,
    pub model: &'a mut ClipTextTransformer,
}

/// What the model keeps of its embeddings: the vectors as parameters and what it tells the host.
#[derive(Default)]
pub struct Embeddings {
    pub parameters: Vec<(String, Tensor)>,
    pub info: Vec<EmbeddingInfo>,
}

impl Embeddings {
    /// The model's own `parameters`, then the embeddings' vectors.
    pub fn after(&self, parameters: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        parameters.iter().chain(&self.parameters).cloned().collect()
    }
}

/// OneTrainer's new vectors: the text's tokens cut to `count`, then `*`'s.
fn initial(e: &Encoder<'_>, text: &str, count: usize) -> Result<Tensor> {
    let mut ids = e.tokenizer.tokens(text)?;
    ids.truncate(count);
    let star = *e
        .tokenizer
        .tokens("*")?
        .first()
        .ok_or_else(|| Error::msg("the tokenizer has no token for `*`"))?;
    ids.resize(count, star);
    e.model.token_embeddings(&ids)
}

/// The option's vectors for encoder `e`: by part id, by file key, or (one encoder) an A1111
/// `.pt`'s `string_to_param.*` or a file's only tensor.
fn given(o: &EmbeddingOption, e: &Encoder<'_>, encoders: usize) -> Option<u64> {
    let v = &o.vectors;
    v.get(e.part).or_else(|| v.get(e.key)).copied().or_else(|| {
        (encoders == 1)
            .then(|| {
                v.get("string_to_param.*")
                    .or_else(|| v.values().next().filter(|_| v.len() == 1))
            })
            .flatten()
            .copied()
    })
}

/// Gives `options`' embeddings to `encoders`.
pub fn attach(options: &[EmbeddingOption], encoders: &mut [Encoder<'_>]) -> Result<Embeddings> {
    let mut out = Embeddings::default();
    let mut per_encoder: Vec<Vec<(String, Tensor)>> = encoders.iter().map(|_| Vec::new()).collect();
    let n = encoders.len();
    for (i, o) in options.iter().enumerate() {
        let name = &o.name;
        if o.placeholder.trim().is_empty() {
            return Err(Error(format!("{name}: the placeholder is empty")));
        }
        if options[..i].iter().any(|p| p.placeholder == o.placeholder) {
            return Err(Error(format!(
                "{name}: the placeholder `{}` is another embedding's too",
                o.placeholder
            )));
        }
        if !o.vectors.is_empty() && encoders.iter().all(|e| given(o, e, n).is_none()) {
            let wanted: Vec<&str> = encoders.iter().map(|e| e.key).collect();
            let held: Vec<&str> = o.vectors.keys().map(String::as_str).collect();
            return Err(Error(format!(
                "{name}: none of the keys this model's embeddings use ({}); it holds {}",
                wanted.join(", "),
                held.join(", ")
            )));
        }
        if o.vectors.is_empty() && o.token_count == 0 {
            return Err(Error(format!(
                "{name}: give its vectors, or a token_count for new ones"
            )));
        }
        for (e, list) in encoders.iter().zip(&mut per_encoder) {
            let width = e.model.config.hidden_size;
            let v = if o.vectors.is_empty() {
                initial(e, &o.initial_text, o.token_count)?
            } else {
                let id = given(o, e, n).ok_or_else(|| {
                    Error(format!("{name}: no vectors for {} (`{}`)", e.part, e.key))
                })?;
                Tensor::borrow_raw(TensorId(id)).try_clone()?
            };
            let shape = v.shape()?;
            if shape.len() != 2 || shape[0] == 0 || shape[1] != width {
                return Err(Error(format!(
                    "{name}: {} takes vectors [tokens, {width}], got {shape:?}",
                    e.part
                )));
            }
            out.parameters
                .push((format!("embeddings.{i}.{}", e.part), v.clone()));
            list.push((o.placeholder.clone(), v));
        }
        let plain = encoders
            .first()
            .map(|e| e.tokenizer.tokens(&o.placeholder).map(|t| t.len()))
            .transpose()?
            .unwrap_or(0);
        out.info.push(EmbeddingInfo {
            placeholder: o.placeholder.clone(),
            plain_tokens: plain,
        });
    }
    for (e, list) in encoders.iter_mut().zip(per_encoder) {
        e.model.added = AddedTokens::new(e.model.config.vocab_size, list)?;
    }
    Ok(out)
}
