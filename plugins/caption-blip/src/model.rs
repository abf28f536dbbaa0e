//! transformers' `BlipForConditionalGeneration`: the BLIP ViT (fused qkv, pre-norm, exact GELU,
//! post layer norm) and the BERT-style text decoder (post-norm self-attention under a causal
//! mask, cross-attention to the image, the LM head), decoded greedily as `generate` does by
//! default. Weight keys are transformers' own.

use std::path::Path;

use ferrite_blocks::key;
use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights,
    nn::{Conv2d, LayerNorm, Linear},
    ops::{self, ConvOptions},
    serde_json,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub bos_token_id: i64,
    pub sep_token_id: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
}

impl Config {
    /// `config.json` over transformers' defaults (BlipVisionConfig's, BlipTextConfig's): a saved
    /// config may leave out what equals them.
    pub fn parse(v: serde_json::Value, source: &Path) -> Result<Self> {
        let defaults = serde_json::json!({
            "vision_config": {"hidden_size": 768, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "patch_size": 16, "layer_norm_eps": 1e-5},
            "text_config": {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12,
                            "num_attention_heads": 8, "layer_norm_eps": 1e-12,
                            "bos_token_id": 30522, "sep_token_id": 102}
        });
        serde_json::from_value(with_defaults(v, &defaults))
            .map_err(|e| Error(format!("blip: {}: {e}", source.display())))
    }
}

/// `given` with what it leaves out of `defaults` filled in, one level into sub-configs.
pub(crate) fn with_defaults(
    mut given: serde_json::Value,
    defaults: &serde_json::Value,
) -> serde_json::Value {
    if let (Some(g), Some(d)) = (given.as_object_mut(), defaults.as_object()) {
        for (k, dv) in d {
            match g.get_mut(k) {
                None | Some(serde_json::Value::Null) => {
                    g.insert(k.clone(), dv.clone());
                }
                Some(gv) if dv.is_object() => *gv = with_defaults(gv.take(), dv),
                Some(_) => {}
            }
        }
    }
    given
}

pub(crate) fn lin(w: &Weights, prefix: &str) -> Result<Linear> {
    Linear::load(w, prefix, DType::F32)
}

pub(crate) fn norm(w: &Weights, prefix: &str, eps: f64) -> Result<LayerNorm> {
    LayerNorm::load(w, prefix, eps, DType::F32)
}

/// Scaled dot-product attention of `[B, L, D]` queries over `[B, S, D]` keys and values in
/// `heads` heads; `mask` (true hides) or none.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, d) = (q.dim(0)? as i64, q.dim(1)? as i64, q.dim(2)? as i64);
    let s = k.dim(1)? as i64;
    let h = heads as i64;
    let split = |t: &Tensor, n: i64| t.reshape(&[b, n, h, d / h])?.transpose(1, 2);
    let o = ops::attention(&split(q, l)?, &split(k, s)?, &split(v, s)?, mask, None)?;
    o.transpose(1, 2)?.reshape(&[b, l, d])
}

/// The `[1, 1, l, l]` mask that hides later tokens (true hides).
pub(crate) fn causal_mask(l: usize) -> Result<Tensor> {
    let causal: Vec<f32> = (0..l * l)
        .map(|k| ((k % l) > (k / l)) as u8 as f32)
        .collect();
    Tensor::from_f32(&causal, &[1, 1, l, l])?.gt_scalar(0.5)
}

/// The greedy choice: the largest logit, the first of equals (as `torch.argmax`).
pub(crate) fn argmax(logits: &[f32]) -> i64 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i as i64)
}

struct VisionLayer {
    qkv: Linear,
    projection: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    heads: usize,
}

impl VisionLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self
            .qkv
            .forward(&self.layer_norm1.forward(x)?)?
            .chunk(3, 2)?;
        let a = attend(&qkv[0], &qkv[1], &qkv[2], self.heads, None)?;
        let x = x.add(&self.projection.forward(&a)?)?;
        let h = self
            .fc2
            .forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?.gelu()?)?;
        x.add(&h)
    }
}

pub(crate) struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
}

impl BertAttention {
    /// BERT's attention under `prefix`, its projections under `inner` (BLIP's `self`, the
    /// Q-Former's `attention`).
    pub(crate) fn load_named(w: &Weights, prefix: &str, inner: &str, eps: f64) -> Result<Self> {
        let at = |n: &str| key(prefix, &format!("{inner}.{n}"));
        Ok(Self {
            query: lin(w, &at("query"))?,
            key: lin(w, &at("key"))?,
            value: lin(w, &at("value"))?,
            dense: lin(w, &key(prefix, "output.dense"))?,
            norm: norm(w, &key(prefix, "output.LayerNorm"), eps)?,
        })
    }

    fn load(w: &Weights, prefix: &str, eps: f64) -> Result<Self> {
        Self::load_named(w, prefix, "self", eps)
    }

    /// Post-norm: `LN(x + dense(attention(x, context)))`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let a = attend(
            &self.query.forward(x)?,
            &self.key.forward(context)?,
            &self.value.forward(context)?,
            heads,
            mask,
        )?;
        self.norm.forward(&x.add(&self.dense.forward(&a)?)?)
    }
}

struct TextLayer {
    attention: BertAttention,
    cross: BertAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

/// The BLIP ViT (BLIP-2's too).
pub(crate) struct Vision {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
}

impl Vision {
    pub(crate) fn load(w: &Weights, vc: &VisionConfig) -> Result<Self> {
        let v = "vision_model";
        let layers = (0..vc.num_hidden_layers)
            .map(|i| {
                let p = format!("{v}.encoder.layers.{i}");
                Ok(VisionLayer {
                    qkv: lin(w, &key(&p, "self_attn.qkv"))?,
                    projection: lin(w, &key(&p, "self_attn.projection"))?,
                    layer_norm1: norm(w, &key(&p, "layer_norm1"), vc.layer_norm_eps)?,
                    fc1: lin(w, &key(&p, "mlp.fc1"))?,
                    fc2: lin(w, &key(&p, "mlp.fc2"))?,
                    layer_norm2: norm(w, &key(&p, "layer_norm2"), vc.layer_norm_eps)?,
                    heads: vc.num_attention_heads,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embedding: Conv2d::load(
                w,
                &key(v, "embeddings.patch_embedding"),
                ConvOptions::default().with_stride(vc.patch_size),
                DType::F32,
            )?,
            class_embedding: w.get(&key(v, "embeddings.class_embedding"), DType::F32)?,
            position_embedding: w.get(&key(v, "embeddings.position_embedding"), DType::F32)?,
            layers,
            post_layernorm: norm(w, &key(v, "post_layernorm"), vc.layer_norm_eps)?,
        })
    }

    /// The image's embeddings `[1, 1 + patches, D]` for pixel values `[1, 3, S, S]`.
    pub(crate) fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.patch_embedding.forward(pixel_values)?;
        let x = x.flatten(2, 3)?.transpose(1, 2)?;
        let mut x = Tensor::cat(&[&self.class_embedding, &x], 1)?.add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }
}

pub struct Blip {
    pub config: Config,
    vision: Vision,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    text: Vec<TextLayer>,
    transform: Linear,
    transform_norm: LayerNorm,
    decoder_weight: Tensor,
    decoder_bias: Tensor,
}

impl Blip {
    pub fn load(w: &Weights, c: Config, source: &Path) -> Result<Self> {
        let (vc, tc) = (&c.vision_config, &c.text_config);
        if vc.num_attention_heads == 0 || tc.num_attention_heads == 0 {
            return Err(Error(format!("{}: no attention heads", source.display())));
        }
        let vision = Vision::load(w, vc)?;
        let t = "text_decoder.bert";
        let eps = tc.layer_norm_eps;
        let text = (0..tc.num_hidden_layers)
            .map(|i| {
                let p = format!("{t}.encoder.layer.{i}");
                Ok(TextLayer {
                    attention: BertAttention::load(w, &key(&p, "attention"), eps)?,
                    cross: BertAttention::load(w, &key(&p, "crossattention"), eps)?,
                    intermediate: lin(w, &key(&p, "intermediate.dense"))?,
                    output: lin(w, &key(&p, "output.dense"))?,
                    norm: norm(w, &key(&p, "output.LayerNorm"), eps)?,
                })
            })
            .collect::<Result<_>>()?;
        let words = w.get(&key(t, "embeddings.word_embeddings.weight"), DType::F32)?;
        // The LM head's weight is tied to the word embeddings (a saved file may leave it out).
        let head = "text_decoder.cls.predictions";
        let decoder_weight = match w.info(&key(head, "decoder.weight")) {
            Some(_) => w.get(&key(head, "decoder.weight"), DType::F32)?,
            None => words.clone(),
        };
        let decoder_bias = match w.info(&key(head, "decoder.bias")) {
            Some(_) => w.get(&key(head, "decoder.bias"), DType::F32)?,
            None => w.get(&key(head, "bias"), DType::F32)?,
        };
        Ok(Self {
            vision,
            word_embeddings: words,
            position_embeddings: w
                .get(&key(t, "embeddings.position_embeddings.weight"), DType::F32)?,
            embeddings_norm: norm(w, &key(t, "embeddings.LayerNorm"), eps)?,
            text,
            transform: lin(w, &key(head, "transform.dense"))?,
            transform_norm: norm(w, &key(head, "transform.LayerNorm"), eps)?,
            decoder_weight,
            decoder_bias,
            config: c,
        })
    }

    /// The image's embeddings `[1, 1 + patches, D]` for pixel values `[1, 3, S, S]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixel_values)
    }

    /// The next token's logits `[vocab]` after `ids`, given the image's embeddings.
    fn next_logits(&self, ids: &[i64], image: &Tensor) -> Result<Tensor> {
        let l = ids.len();
        let tokens = ops::embedding(&self.word_embeddings, &Tensor::from_i64(ids, &[1, l])?)?;
        let positions = self.position_embeddings.narrow(0, 0, l)?.unsqueeze(0)?;
        let mut x = self.embeddings_norm.forward(&tokens.add(&positions)?)?;
        let mask = causal_mask(l)?;
        let heads = self.config.text_config.num_attention_heads;
        for layer in &self.text {
            x = layer.attention.forward(&x, &x, heads, Some(&mask))?;
            x = layer.cross.forward(&x, image, heads, None)?;
            let h = layer
                .output
                .forward(&layer.intermediate.forward(&x)?.gelu()?)?;
            x = layer.norm.forward(&x.add(&h)?)?;
        }
        let last = x.narrow(1, l - 1, 1)?.reshape(&[1, -1])?;
        let h = self
            .transform_norm
            .forward(&self.transform.forward(&last)?.gelu()?)?;
        ops::linear(&h, &self.decoder_weight, Some(&self.decoder_bias))?.reshape(&[-1])
    }

    /// Greedy decoding from `prompt` (the decoder's start token, then the initial caption's
    /// tokens) until the separator or `max_length` tokens in all, as `generate` does.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        prompt: &[i64],
        max_length: usize,
    ) -> Result<Vec<i64>> {
        let image = self.image_embeds(pixel_values)?;
        let mut ids = prompt.to_vec();
        while ids.len() < max_length {
            let next = argmax(&self.next_logits(&ids, &image)?.to_vec()?);
            ids.push(next);
            if next == self.config.text_config.sep_token_id {
                break;
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config shaped as Salesforce/blip-image-captioning-large's (the text config left to its
    /// defaults) resolves to what transformers makes of it (tests/fixtures/gen/blip_configs.py).
    #[test]
    fn a_published_style_config_takes_transformers_defaults() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip_configs.json");
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let want = &all["blip"]["resolved"];
        let c = Config::parse(all["blip"]["given"].clone(), &path).unwrap();
        let (v, t) = (&c.vision_config, &c.text_config);
        assert_eq!(
            serde_json::json!([
                v.hidden_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.patch_size,
                v.layer_norm_eps
            ]),
            want["vision"]
        );
        assert_eq!(
            serde_json::json!([
                t.vocab_size,
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.layer_norm_eps,
                t.bos_token_id,
                t.sep_token_id
            ]),
            want["text"]
        );
    }
}
