//! Textual-inversion embeddings on one text encoder: each placeholder in a prompt becomes token
//! ids past the vocabulary (as transformers' `add_tokens` gives them, in order), and those ids
//! are looked up in the embedding's vectors instead of the frozen table.

use ferrite_plugin_api::{Error, Result, Tensor, ops};

pub struct AddedTokens {
    vocab: usize,
    /// (placeholder, its first id, its token count), longest placeholder first so that one
    /// placeholder that begins another does not take its text.
    placeholders: Vec<(String, i64, usize)>,
    /// Each embedding's vectors `[count, width]`, in id order; the host's tensors (training
    /// updates them in place, so they are read at every lookup).
    vectors: Vec<Tensor>,
    /// The vocabulary with the added tokens.
    len: usize,
}

impl AddedTokens {
    /// No added tokens on a vocabulary of `vocab`.
    pub fn none(vocab: usize) -> Self {
        Self {
            vocab,
            placeholders: Vec::new(),
            vectors: Vec::new(),
            len: vocab,
        }
    }

    /// Tokens for `embeddings` ((placeholder, vectors `[tokens, width]`)) on a vocabulary of
    /// `vocab`, ids given in order.
    pub fn new(vocab: usize, embeddings: Vec<(String, Tensor)>) -> Result<Self> {
        let mut added = Self::none(vocab);
        let mut next = vocab as i64;
        for (placeholder, v) in embeddings {
            let n = v.shape()?[0];
            added.placeholders.push((placeholder, next, n));
            next += n as i64;
            added.vectors.push(v);
        }
        added.len = next as usize;
        added
            .placeholders
            .sort_by_key(|(p, ..)| std::cmp::Reverse(p.len()));
        Ok(added)
    }

    /// `text`'s token ids: the text between placeholders through `tokenize`, each placeholder
    /// as its own ids.
    pub fn tokens(
        &self,
        text: &str,
        tokenize: impl Fn(&str) -> Result<Vec<i64>>,
    ) -> Result<Vec<i64>> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            // The earliest placeholder; at one position the longest (the list's order).
            let found = self
                .placeholders
                .iter()
                .filter_map(|p| rest.find(&p.0).map(|at| (at, p)))
                .min_by_key(|(at, _)| *at);
            let Some((at, (placeholder, first, count))) = found else {
                ids.extend(tokenize(rest)?);
                return Ok(ids);
            };
            ids.extend(tokenize(&rest[..at])?);
            ids.extend(*first..*first + *count as i64);
            rest = &rest[at + placeholder.len()..];
        }
    }

    /// The embeddings of `ids` (`shape`, host data): the frozen `table`'s rows, and the added
    /// vectors' (cast to the table's dtype) where an id is past the vocabulary.
    pub fn lookup(&self, table: &Tensor, ids: &[i64], shape: &[usize]) -> Result<Tensor> {
        let vocab = self.vocab as i64;
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= self.len) {
            return Err(Error(format!(
                "token id {bad} outside the vocabulary of {}",
                self.len
            )));
        }
        if self.vectors.is_empty() {
            return ops::embedding(table, &Tensor::from_i64(ids, shape)?);
        }
        // Added ids index the vectors, the others the table; each lookup reads row 0 where
        // the other applies, and is masked off there.
        let frozen_ids: Vec<i64> = ids.iter().map(|&i| if i < vocab { i } else { 0 }).collect();
        let extra_ids: Vec<i64> = ids.iter().map(|&i| (i - vocab).max(0)).collect();
        let frozen = ops::embedding(table, &Tensor::from_i64(&frozen_ids, shape)?)?;
        let dtype = frozen.dtype()?;
        let vectors = Tensor::cat(&self.vectors.iter().collect::<Vec<_>>(), 0)?.cast(dtype)?;
        let extra = ops::embedding(&vectors, &Tensor::from_i64(&extra_ids, shape)?)?;
        let mut mask_shape = shape.to_vec();
        mask_shape.push(1);
        let mask = |added: bool| -> Result<Tensor> {
            let m: Vec<f32> = ids
                .iter()
                .map(|&i| ((i >= vocab) == added) as u8 as f32)
                .collect();
            Tensor::from_f32(&m, &mask_shape)?.cast(dtype)
        };
        frozen.mul(&mask(false)?)?.add(&extra.mul(&mask(true)?)?)
    }
}
