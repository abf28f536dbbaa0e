//! The CLIP BPE tokenizer (as transformers' `CLIPTokenizer`) built with the `tokenizers` crate
//! from an SD `tokenizer/` folder: `tokenizer.json` where present, else `vocab.json` + `merges.txt`;
//! or OpenAI CLIP's vocabulary built in, for single-file checkpoints (which carry no tokenizer).

use std::path::Path;

use ferrite_plugin_api::{Error, Result};

use crate::added_tokens::AddedTokens;
use tokenizers::{
    AddedToken, SplitDelimiterBehavior, Tokenizer,
    models::bpe::{BPE, BpeBuilder, Vocab},
    normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers},
    pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence as PreTokenizers, split::Split},
};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's word pattern: the two special tokens, English contractions, letters, single digits,
/// other non-space runs.
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
    /// Sequence length including BOS and EOS (77).
    pub max_length: usize,
}

/// A special token as `tokenizer_config.json` gives it: a string, or an object with `content`.
pub fn token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(str::to_string)
}

fn tk_err(source: &Path) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error(format!("{}: {e}", source.display()))
}

impl ClipTokenizer {
    /// Loads a `tokenizer/` folder; `tokenizer_config.json`'s `pad_token` and `model_max_length`
    /// are read where present (SD 2's pad with `!`, SD 1's with the end token).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| Error(format!("{}: {e}", json.display())))?
        } else {
            Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let config: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(t) => serde_json::from_str(&t).map_err(|e| {
                    Error(format!(
                        "{}: {e}",
                        dir.join("tokenizer_config.json").display()
                    ))
                })?,
                Err(_) => serde_json::Value::Null,
            };
        let pad = token_text(&config["pad_token"]).unwrap_or_else(|| EOS.into());
        let max_length = config["model_max_length"]
            .as_u64()
            .filter(|&m| m <= 4096)
            .unwrap_or(77) as usize;
        Self::new(inner, &pad, max_length, dir)
    }

    /// OpenAI CLIP's tokenizer (SD 1.x, and SDXL's and Flux's CLIP-L): 77 tokens, padded with
    /// the end token.
    pub fn openai_clip() -> Result<Self> {
        Self::openai_clip_padded(EOS)
    }

    /// [`ClipTokenizer::openai_clip`] padding with `pad` (SD 2.x's and SDXL's OpenCLIP
    /// tokenizer pads with `!`).
    pub fn openai_clip_padded(pad: &str) -> Result<Self> {
        let source = Path::new("built-in CLIP vocabulary");
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(include_str!("../vocab/clip_vocab.json"))
                .map_err(|e| Error(format!("{}: {e}", source.display())))?;
        let merges = include_str!("../vocab/clip_merges.txt")
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.is_empty())
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BPE::builder().vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges);
        Self::new(Self::with_pipeline(bpe, source)?, pad, 77, source)
    }

    fn from_files(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        for f in [vocab, merges] {
            if !f.exists() {
                return Err(Error(format!(
                    "{} is missing (a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)",
                    f.display()
                )));
            }
        }
        let to_str = |p: &Path| p.to_string_lossy().into_owned();
        Self::with_pipeline(BPE::from_file(&to_str(vocab), &to_str(merges)), vocab)
    }

    /// CLIP's normalisation and word splitting around a BPE model.
    fn with_pipeline(bpe: BpeBuilder, vocab: &Path) -> Result<Tokenizer> {
        let bpe = bpe
            .unk_token(EOS.into())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(tk_err(vocab))?;
        let mut t = Tokenizer::new(bpe);
        let ws = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tk_err(vocab))?;
        t.with_normalizer(Some(Normalizers::new(vec![
            NFC.into(),
            ws.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tk_err(vocab))?;
        t.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        t.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        Ok(t)
    }

    fn new(inner: Tokenizer, pad: &str, max_length: usize, source: &Path) -> Result<Self> {
        let id = |tok: &str| {
            inner.token_to_id(tok).map(i64::from).ok_or_else(|| {
                Error(format!(
                    "{}: the vocabulary has no `{tok}` token",
                    source.display()
                ))
            })
        };
        if max_length < 3 {
            return Err(Error(format!(
                "{}: model_max_length {max_length} is too short",
                source.display()
            )));
        }
        Ok(Self {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: id(pad)?,
            max_length,
            inner,
        })
    }

    /// The prompt's token ids, without BOS/EOS and without any length limit.
    pub fn tokens(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error(format!("tokenizing `{text}`: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    fn frame(&self, body: &[i64]) -> Vec<i64> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// `max_length` ids: BOS, the tokens (truncated to fit), EOS, padding — as
    /// `CLIPTokenizer(text, padding="max_length", truncation=True)`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_added(text, &AddedTokens::none(0))
    }

    /// [`ClipTokenizer::encode`] with the placeholders of `added` as their own tokens.
    pub fn encode_added(&self, text: &str, added: &AddedTokens) -> Result<Vec<i64>> {
        let t = added.tokens(text, |piece| self.tokens(piece))?;
        Ok(self.frame(&t[..t.len().min(self.max_length - 2)]))
    }
}
