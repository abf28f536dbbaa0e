//! The CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`):
//! SD 1.x (quick GELU), SD 2.x and SDXL (GELU, projection) from one config.

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, WeightInfo, Weights, checkpoint,
    nn::{Embedding, LayerNorm, Linear},
    ops,
};
use serde::Deserialize;

use crate::added_tokens::AddedTokens;
use crate::layers::{layer_norm, linear};
use crate::{expect_shape, key};

/// The fields of a transformers `CLIPTextConfig` (`text_encoder/config.json`) this model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "eos_token_id")]
    pub eos_token_id: i64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn layer_norm_eps() -> f64 {
    1e-5
}
fn eos_token_id() -> i64 {
    2
}

impl ClipTextConfig {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error(format!("{source}: not a CLIP text config: {e}")))?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error(format!(
                "{source}: hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if !matches!(c.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error(format!(
                "{source}: hidden_act `{}` is not supported (quick_gelu, gelu)",
                c.hidden_act
            )));
        }
        Ok(c)
    }
}

pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    pub fn load(w: &Weights, prefix: &str, c: &ClipTextConfig, dtype: DType) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(w, &key(prefix, "q_proj"), d, d, dtype)?,
            k_proj: linear(w, &key(prefix, "k_proj"), d, d, dtype)?,
            v_proj: linear(w, &key(prefix, "v_proj"), d, d, dtype)?,
            out_proj: linear(w, &key(prefix, "out_proj"), d, d, dtype)?,
            heads: c.num_attention_heads,
        })
    }

    /// `mask`: true hides a key from a query.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let [b, l, d] = x.shape()?[..] else {
            return Err(Error::msg("CLIP attention expects [B, L, D]"));
        };
        let (b, l, d, h) = (b as i64, l as i64, d as i64, self.heads as i64);
        let split = |t: Tensor| t.reshape(&[b, l, h, d / h])?.transpose(1, 2);
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let o = ops::attention(&q, &k, &v, Some(mask), None)?;
        self.out_proj
            .forward(&o.transpose(1, 2)?.reshape(&[b, l, d])?)
    }
}

pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    quick_gelu: bool,
}

impl ClipEncoderLayer {
    /// A layer of `c`'s sizes (a vision tower's too: its config has the same fields).
    pub fn load(w: &Weights, prefix: &str, c: &ClipTextConfig, dtype: DType) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            layer_norm1: layer_norm(w, &key(prefix, "layer_norm1"), d, eps, dtype)?,
            self_attn: ClipAttention::load(w, &key(prefix, "self_attn"), c, dtype)?,
            layer_norm2: layer_norm(w, &key(prefix, "layer_norm2"), d, eps, dtype)?,
            fc1: linear(w, &key(prefix, "mlp.fc1"), c.intermediate_size, d, dtype)?,
            fc2: linear(w, &key(prefix, "mlp.fc2"), d, c.intermediate_size, dtype)?,
            quick_gelu: c.hidden_act == "quick_gelu",
        })
    }

    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = x.add(
            &self
                .self_attn
                .forward(&self.layer_norm1.forward(x)?, mask)?,
        )?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu {
            h.quick_gelu()?
        } else {
            h.gelu()?
        };
        x.add(&self.fc2.forward(&h)?)
    }
}

/// What the text encoder returns.
pub struct ClipTextOutput {
    /// Output of the last layer after `final_layer_norm`, `[B, L, D]`.
    pub last_hidden_state: Tensor,
    /// With clip skip `n`: the output of the layer `n` before the last, through
    /// `final_layer_norm` (diffusers' `clip_skip`, OneTrainer's `text_encoder_layer_skip`); the
    /// same as `last_hidden_state` for 0.
    pub skipped_hidden_state: Tensor,
    /// Output of the next-to-last layer, without the final norm (`hidden_states[-2]`), for
    /// clip skip.
    pub penultimate_hidden_state: Tensor,
    /// transformers' `hidden_states`: the embeddings, then each layer's output (no final norm).
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each sequence's end-of-text token, `[B, D]`.
    pub pooled: Tensor,
    /// `pooled` through `text_projection`, where the model has one, `[B, P]`.
    pub text_embeds: Option<Tensor>,
}

pub struct ClipTextTransformer {
    pub config: ClipTextConfig,
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    pub text_projection: Option<Linear>,
    /// Textual-inversion embeddings' tokens (ids past the vocabulary).
    pub added: AddedTokens,
}

impl ClipTextTransformer {
    /// Loads from keys under `prefix` (`text_model` in transformers' layout); `projection_key`
    /// names the projection weight (`text_projection`) for models that have one.
    pub fn load(
        w: &Weights,
        prefix: &str,
        projection_key: Option<&str>,
        c: &ClipTextConfig,
        dtype: DType,
    ) -> Result<Self> {
        let d = c.hidden_size;
        let emb = |name: &str, rows: usize| -> Result<Embedding> {
            let p = key(prefix, &format!("embeddings.{name}"));
            expect_shape(w, &key(&p, "weight"), &[rows, d])?;
            Embedding::load(w, &p, dtype)
        };
        // The file decides whether there is a projection (CLIPTextModel configs carry a
        // projection_dim too); the config gives its size.
        let text_projection = match projection_key.filter(|k| w.info(&key(k, "weight")).is_some()) {
            Some(k) => {
                let p = c.projection_dim.ok_or_else(|| {
                    Error(format!(
                        "{}: `{k}` present but the config has no projection_dim",
                        w.path()
                    ))
                })?;
                expect_shape(w, &key(k, "weight"), &[p, d])?;
                Some(Linear::load(w, k, dtype)?)
            }
            None => None,
        };
        Ok(Self {
            token_embedding: emb("token_embedding", c.vocab_size)?,
            position_embedding: emb("position_embedding", c.max_position_embeddings)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| {
                    ClipEncoderLayer::load(
                        w,
                        &key(prefix, &format!("encoder.layers.{i}")),
                        c,
                        dtype,
                    )
                })
                .collect::<Result<_>>()?,
            final_layer_norm: layer_norm(
                w,
                &key(prefix, "final_layer_norm"),
                d,
                c.layer_norm_eps,
                dtype,
            )?,
            text_projection,
            added: AddedTokens::none(c.vocab_size),
            config: c.clone(),
        })
    }

    /// The tensors of a text-encoder file under transformers' `text_model.` level, which
    /// transformers 5 leaves out of the `CLIPTextModel` files it saves.
    pub fn with_text_model_level(w: Weights) -> Result<Weights> {
        if Self::detect_prefix(&w) == "text_model" {
            return Ok(w);
        }
        w.view(|i| {
            Some(WeightInfo {
                key: format!("text_model.{}", i.key),
                ..i.clone()
            })
        })
    }

    /// The key prefix of the transformer in a text-encoder file: `text_model` as most checkpoints
    /// (and transformers' `CLIPTextModelWithProjection`) have it, or none as transformers 5
    /// saves a `CLIPTextModel`.
    pub fn detect_prefix(w: &Weights) -> &'static str {
        if w.info("text_model.embeddings.token_embedding.weight")
            .is_some()
        {
            "text_model"
        } else {
            ""
        }
    }

    /// Where each sequence's pooled output is read: transformers' rule (the highest id for the
    /// legacy eos id 2, otherwise the first eos token).
    fn eos_positions(&self, ids: &[i64], len: usize) -> Vec<usize> {
        ids.chunks(len)
            .map(|row| {
                if self.config.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                        .map_or(0, |(i, _)| i)
                } else {
                    row.iter()
                        .position(|&v| v == self.config.eos_token_id)
                        .unwrap_or(len - 1)
                }
            })
            .collect()
    }

    /// The frozen table's rows for `ids` (`[n, width]`, f32, no graph).
    pub fn token_embeddings(&self, ids: &[i64]) -> Result<Tensor> {
        ops::embedding(
            &self.token_embedding.weight,
            &Tensor::from_i64(ids, &[ids.len()])?,
        )?
        .cast(DType::F32)?
        .detach()
    }

    /// Encodes token ids (`batch` rows of equal length, host data from the tokenizer); `skip`
    /// layers from the end give `skipped_hidden_state`.
    pub fn forward(&self, ids: &[i64], batch: usize, skip: usize) -> Result<ClipTextOutput> {
        if skip >= self.layers.len() {
            return Err(Error(format!(
                "clip skip {skip}: the text encoder has only {} layers",
                self.layers.len()
            )));
        }
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(Error(format!(
                "{} token ids do not split into {batch} sequences",
                ids.len()
            )));
        }
        let len = ids.len() / batch;
        if len > self.config.max_position_embeddings {
            return Err(Error(format!(
                "{len} tokens exceed the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let tokens = self
            .added
            .lookup(&self.token_embedding.weight, ids, &[batch, len])?;
        let pos = Tensor::arange(0, len as i64, 1, DType::I64)?.reshape(&[1, len as i64])?;
        let mut x = tokens.add(&self.position_embedding.forward(&pos)?)?;
        // Causal mask: position i sees 0..=i (true hides).
        let causal: Vec<f32> = (0..len * len)
            .map(|k| ((k % len) > (k / len)) as u8 as f32)
            .collect();
        let mask = Tensor::from_f32(&causal, &[1, 1, len, len])?.gt_scalar(0.5)?;
        let mut penultimate = x.clone();
        let mut skipped = None;
        let mut hidden_states = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = checkpoint(|| layer.forward(&x, &mask))?;
            hidden_states.push(x.clone());
            if skip > 0 && i + 1 + skip == self.layers.len() {
                skipped = Some(self.final_layer_norm.forward(&x)?);
            }
        }
        let last = self.final_layer_norm.forward(&x)?;
        let rows: Vec<i64> = self
            .eos_positions(ids, len)
            .iter()
            .enumerate()
            .map(|(b, &p)| (b * len + p) as i64)
            .collect();
        let d = self.config.hidden_size as i64;
        let pooled = last
            .reshape(&[-1, d])?
            .index_select(0, &Tensor::from_i64(&rows, &[batch])?)?;
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&pooled))
            .transpose()?;
        Ok(ClipTextOutput {
            skipped_hidden_state: skipped.unwrap_or_else(|| last.clone()),
            last_hidden_state: last,
            penultimate_hidden_state: penultimate,
            hidden_states,
            pooled,
            text_embeds,
        })
    }
}
