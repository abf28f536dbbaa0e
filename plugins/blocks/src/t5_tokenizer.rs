//! The T5 tokenizer of a Flux folder's `tokenizer_2/tokenizer.json` (its own normaliser,
//! Unigram model and `</s>` post-processor), truncated and padded to `max_sequence_length` as
//! diffusers' Flux pipeline asks transformers' `T5TokenizerFast` to.

use std::path::Path;

use ferrite_plugin_api::{Error, Result};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

pub struct T5Tokenizer {
    inner: Tokenizer,
    pub max_length: usize,
}

impl T5Tokenizer {
    /// `pad_token` comes from `tokenizer_config.json` (`<pad>` without one).
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let err = |e: tokenizers::Error| Error(format!("{}: {e}", path.display()));
        let mut inner = Tokenizer::from_file(&path).map_err(err)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            crate::folder::read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        let pad_token =
            crate::tokenizer::token_text(&config["pad_token"]).unwrap_or_else(|| "<pad>".into());
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            Error(format!(
                "{}: the pad token `{pad_token}` is not in the vocabulary",
                path.display()
            ))
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(err)?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                pad_id,
                pad_token,
                ..Default::default()
            }));
        Ok(Self { inner, max_length })
    }

    /// `max_length` ids, `</s>` after the prompt (cut to fit), then padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>> {
        let e = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error(format!("T5 tokenizer: {e}")))?;
        Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}
