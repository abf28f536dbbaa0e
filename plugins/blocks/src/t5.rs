//! transformers' `T5EncoderModel` as Flux uses it (T5 v1.1: gated-GELU feed-forward, RMS norms
//! without bias, relative position buckets in the first block's attention shared by all
//! blocks, unscaled attention scores).

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights, checkpoint,
    host::without_float16,
    nn::{Embedding, Linear},
    ops,
};
use serde::Deserialize;

use crate::key;
use crate::layers::{linear, norm_weight};

/// The fields of a T5 `config.json` the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "gated_gelu")]
    pub feed_forward_proj: String,
}

fn buckets() -> usize {
    32
}
fn max_distance() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn gated_gelu() -> String {
    "gated-gelu".into()
}

impl T5Config {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error(format!("{source}: not a T5 config: {e}")))?;
        if c.feed_forward_proj != "gated-gelu" {
            return Err(Error(format!(
                "{source}: feed_forward_proj `{}` is not supported (T5 v1.1's gated-gelu is)",
                c.feed_forward_proj
            )));
        }
        if c.num_layers == 0 || c.num_heads == 0 || c.relative_attention_num_buckets < 4 {
            return Err(Error(format!(
                "{source}: num_layers and num_heads must be at least 1, \
                 relative_attention_num_buckets at least 4"
            )));
        }
        Ok(c)
    }
}

/// T5's bidirectional relative position bucket of `key − query` (transformers'
/// `_relative_position_bucket`): half the buckets per direction, exact below a quarter of them,
/// logarithmic up to `max_distance`.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> i64 {
    let half = (num_buckets / 2) as i64;
    let base = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    // In f32, as transformers computes it, then truncated.
    let log = (n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln();
    let large = max_exact + (log * (half - max_exact) as f32) as i64;
    base + large.min(half - 1)
}

struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let [b, l, _] = x.shape()?[..] else {
            return Err(Error::msg("T5 attention expects [B, L, D]"));
        };
        let (b, l, h, d) = (b as i64, l as i64, self.heads as i64, self.d_kv as i64);
        let split = |t: Tensor| t.reshape(&[b, l, h, d])?.transpose(1, 2);
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // T5 does not scale its scores; the position bias is added to them.
        let o = ops::attention(&q, &k, &v, Some(bias), Some(1.0))?;
        self.o.forward(&o.transpose(1, 2)?.reshape(&[b, l, h * d])?)
    }
}

struct T5Block {
    attention_norm: Tensor,
    attention: T5Attention,
    ff_norm: Tensor,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl T5Block {
    fn forward(&self, x: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let h = ops::rms_norm(x, Some(&self.attention_norm), eps)?;
        let x = x.add(&self.attention.forward(&h, bias)?)?;
        let h = ops::rms_norm(&x, Some(&self.ff_norm), eps)?;
        let gated = self
            .wi_0
            .forward(&h)?
            .gelu_tanh()?
            .mul(&self.wi_1.forward(&h)?)?;
        x.add(&self.wo.forward(&gated)?)
    }
}

pub struct T5EncoderModel {
    pub config: T5Config,
    shared: Embedding,
    relative_attention_bias: Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: Tensor,
}

impl T5EncoderModel {
    /// Loads transformers' key layout (`shared`, `encoder.block.N.layer.{0,1}`,
    /// `encoder.final_layer_norm`).
    pub fn load(w: &Weights, c: &T5Config, dtype: DType) -> Result<Self> {
        let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
        let norm = |k: &str| norm_weight(w, k, d, dtype);
        let embedding = |k: &str, shape: &[usize]| -> Result<Embedding> {
            crate::expect_shape(w, &key(k, "weight"), shape)?;
            Embedding::load(w, k, dtype)
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            let f = format!("{p}.1.DenseReluDense");
            blocks.push(T5Block {
                attention_norm: norm(&format!("{p}.0.layer_norm"))?,
                attention: T5Attention {
                    q: linear(w, &key(&a, "q"), inner, d, dtype)?,
                    k: linear(w, &key(&a, "k"), inner, d, dtype)?,
                    v: linear(w, &key(&a, "v"), inner, d, dtype)?,
                    o: linear(w, &key(&a, "o"), d, inner, dtype)?,
                    heads: c.num_heads,
                    d_kv: c.d_kv,
                },
                ff_norm: norm(&format!("{p}.1.layer_norm"))?,
                wi_0: linear(w, &key(&f, "wi_0"), c.d_ff, d, dtype)?,
                wi_1: linear(w, &key(&f, "wi_1"), c.d_ff, d, dtype)?,
                wo: linear(w, &key(&f, "wo"), d, c.d_ff, dtype)?,
            });
        }
        Ok(Self {
            shared: embedding("shared", &[c.vocab_size, d])?,
            relative_attention_bias: embedding(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                &[c.relative_attention_num_buckets, c.num_heads],
            )?,
            blocks,
            final_layer_norm: norm("encoder.final_layer_norm")?,
            config: c.clone(),
        })
    }

    /// The position bias `[1, H, L, L]` every block adds to its scores.
    fn position_bias(&self, l: usize) -> Result<Tensor> {
        let c = &self.config;
        let buckets: Vec<i64> = (0..l as i64)
            .flat_map(|q| (0..l as i64).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_position_bucket(
                    k - q,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                )
            })
            .collect();
        let ids = Tensor::from_i64(&buckets, &[l, l])?;
        // [L, L, H] → [1, H, L, L]
        self.relative_attention_bias
            .forward(&ids)?
            .permute(&[2, 0, 1])?
            .unsqueeze(0)
    }

    /// The last hidden state `[B, L, D]` of token ids `[B, L]` (no attention mask: Flux's
    /// pipelines attend to the padding too).
    /// Never in float16: T5's feed-forward activations overflow it (transformers keeps `wo` in
    /// f32 for that), so a float16 run computes it in its fallback dtype, as OneTrainer does.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.shape()?;
        let [_, l] = shape[..] else {
            return Err(Error(format!("T5 expects token ids [B, L], got {shape:?}")));
        };
        without_float16(|| {
            let bias = self.position_bias(l)?;
            let eps = self.config.layer_norm_epsilon;
            let mut x = self.shared.forward(ids)?;
            for block in &self.blocks {
                x = checkpoint(|| block.forward(&x, &bias, eps))?;
            }
            ops::rms_norm(&x, Some(&self.final_layer_norm), eps)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    /// transformers' buckets for 32 buckets, max distance 128 (`T5Attention._relative_position_bucket`).
    #[test]
    fn buckets_match_transformers() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (12, 25),
            (-20, 10),
            (50, 29),
            (-127, 15),
            (500, 31),
        ];
        for (relative, want) in cases {
            assert_eq!(
                relative_position_bucket(relative, 32, 128),
                want,
                "{relative}"
            );
        }
    }
}
