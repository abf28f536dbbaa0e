//! transformers' `Blip2ForConditionalGeneration` with an OPT decoder (OneTrainer's BLIP-2:
//! Salesforce/blip2-opt-2.7b): the BLIP ViT, the Q-Former (learned query tokens, BERT-style
//! post-norm self-attention, cross-attention to the image every `cross_attention_frequency`
//! layers, the query feed-forward), the language projection, and OPT (learned positions offset by
//! 2, pre-norm layers, ReLU, the LM head tied to the token embeddings), decoded greedily from
//! the projected queries followed by the prompt's token embeddings, as `generate` does. Weight
//! keys are transformers' own.

use std::path::Path;

use ferrite_blocks::key;
use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights,
    nn::{LayerNorm, Linear},
    ops, serde_json,
};
use serde::Deserialize;

use crate::model::{
    BertAttention, Vision, VisionConfig, argmax, attend, causal_mask, lin, norm, with_defaults,
};

#[derive(Debug, Clone, Deserialize)]
pub struct QFormerConfig {
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub cross_attention_frequency: usize,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub do_layer_norm_before: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vision_config: VisionConfig,
    pub qformer_config: QFormerConfig,
    pub text_config: OptConfig,
    pub num_query_tokens: usize,
    /// The processor's `<image>` token, in the prompt where the queries go.
    pub image_token_index: i64,
}

impl Config {
    /// `config.json` over transformers' defaults (Blip2VisionConfig's ViT-g, Blip2QFormerConfig's,
    /// OPTConfig's): the published config leaves out what equals them.
    pub fn parse(v: serde_json::Value, source: &Path) -> Result<Self> {
        let defaults = serde_json::json!({
            "vision_config": {"hidden_size": 1408, "num_hidden_layers": 39,
                              "num_attention_heads": 16, "patch_size": 14, "layer_norm_eps": 1e-6},
            "qformer_config": {"num_hidden_layers": 12, "num_attention_heads": 12,
                               "cross_attention_frequency": 2, "layer_norm_eps": 1e-12},
            "text_config": {"num_hidden_layers": 12, "num_attention_heads": 12,
                            "bos_token_id": 2, "eos_token_id": 2, "do_layer_norm_before": true},
            "num_query_tokens": 32
        });
        let bad = |why: String| Error(format!("blip2: {}: {why}", source.display()));
        if v.get("image_token_index").is_none() {
            return Err(bad(
                "no `image_token_index`: a download from before the processor's image tokens; \
                 download the model folder again"
                    .into(),
            ));
        }
        let c: Self =
            serde_json::from_value(with_defaults(v, &defaults)).map_err(|e| bad(e.to_string()))?;
        if c.qformer_config.num_attention_heads == 0
            || c.text_config.num_attention_heads == 0
            || c.vision_config.num_attention_heads == 0
            || c.qformer_config.cross_attention_frequency == 0
            || c.num_query_tokens == 0
        {
            return Err(bad(
                "no attention heads, cross-attention or query tokens".into()
            ));
        }
        if !c.text_config.do_layer_norm_before {
            return Err(bad(
                "an OPT with post-norm layers (opt-350m) is not a BLIP-2 decoder".into(),
            ));
        }
        Ok(c)
    }
}

struct QFormerLayer {
    attention: BertAttention,
    cross: Option<BertAttention>,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

struct OptLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

pub struct Blip2 {
    pub config: Config,
    vision: Vision,
    query_tokens: Tensor,
    qformer_norm: LayerNorm,
    qformer: Vec<QFormerLayer>,
    language_projection: Linear,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Tensor,
}

/// OPT's learned positions start at this row (its embedding's first rows are padding).
const POSITION_OFFSET: usize = 2;

fn optional_lin(w: &Weights, prefix: &str) -> Result<Option<Linear>> {
    match w.info(&key(prefix, "weight")) {
        Some(_) => Ok(Some(lin(w, prefix)?)),
        None => Ok(None),
    }
}

impl Blip2 {
    pub fn load(w: &Weights, c: Config) -> Result<Self> {
        let (qc, tc) = (&c.qformer_config, &c.text_config);
        let q = "qformer";
        let qformer = (0..qc.num_hidden_layers)
            .map(|i| {
                let p = format!("{q}.encoder.layer.{i}");
                let eps = qc.layer_norm_eps;
                let cross = if i % qc.cross_attention_frequency == 0 {
                    Some(BertAttention::load_named(
                        w,
                        &key(&p, "crossattention"),
                        "attention",
                        eps,
                    )?)
                } else {
                    None
                };
                Ok(QFormerLayer {
                    attention: BertAttention::load_named(
                        w,
                        &key(&p, "attention"),
                        "attention",
                        eps,
                    )?,
                    cross,
                    intermediate: lin(w, &key(&p, "intermediate_query.dense"))?,
                    output: lin(w, &key(&p, "output_query.dense"))?,
                    norm: norm(w, &key(&p, "output_query.LayerNorm"), eps)?,
                })
            })
            .collect::<Result<_>>()?;
        let d = "language_model.model.decoder";
        let layers = (0..tc.num_hidden_layers)
            .map(|i| {
                let p = format!("{d}.layers.{i}");
                Ok(OptLayer {
                    q_proj: lin(w, &key(&p, "self_attn.q_proj"))?,
                    k_proj: lin(w, &key(&p, "self_attn.k_proj"))?,
                    v_proj: lin(w, &key(&p, "self_attn.v_proj"))?,
                    out_proj: lin(w, &key(&p, "self_attn.out_proj"))?,
                    self_attn_layer_norm: norm(w, &key(&p, "self_attn_layer_norm"), 1e-5)?,
                    fc1: lin(w, &key(&p, "fc1"))?,
                    fc2: lin(w, &key(&p, "fc2"))?,
                    final_layer_norm: norm(w, &key(&p, "final_layer_norm"), 1e-5)?,
                })
            })
            .collect::<Result<_>>()?;
        let embed_tokens = w.get(&key(d, "embed_tokens.weight"), DType::F32)?;
        // The LM head is tied to the token embeddings (a saved file may leave it out).
        let lm_head = match w.info("language_model.lm_head.weight") {
            Some(_) => w.get("language_model.lm_head.weight", DType::F32)?,
            None => embed_tokens.clone(),
        };
        let final_layer_norm = match w.info(&key(d, "final_layer_norm.weight")) {
            Some(_) => Some(norm(w, &key(d, "final_layer_norm"), 1e-5)?),
            None => None,
        };
        Ok(Self {
            vision: Vision::load(w, &c.vision_config)?,
            query_tokens: w.get("query_tokens", DType::F32)?,
            qformer_norm: norm(w, &key(q, "layernorm"), qc.layer_norm_eps)?,
            qformer,
            language_projection: lin(w, "language_projection")?,
            embed_tokens,
            embed_positions: w.get(&key(d, "embed_positions.weight"), DType::F32)?,
            project_in: optional_lin(w, &key(d, "project_in"))?,
            project_out: optional_lin(w, &key(d, "project_out"))?,
            layers,
            final_layer_norm,
            lm_head,
            config: c,
        })
    }

    /// The Q-Former's queries projected into the decoder, `[1, num_query_tokens, D]`.
    pub fn image_queries(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let image = self.vision.forward(pixel_values)?;
        let heads = self.config.qformer_config.num_attention_heads;
        let mut x = self.qformer_norm.forward(&self.query_tokens)?;
        for layer in &self.qformer {
            x = layer.attention.forward(&x, &x, heads, None)?;
            if let Some(cross) = &layer.cross {
                x = cross.forward(&x, &image, heads, None)?;
            }
            let h = layer
                .output
                .forward(&layer.intermediate.forward(&x)?.gelu()?)?;
            x = layer.norm.forward(&x.add(&h)?)?;
        }
        self.language_projection.forward(&x)
    }

    /// The next token's logits `[vocab]` after the queries and `ids` (the prompt's tokens after
    /// its image tokens, then those generated).
    fn next_logits(&self, queries: &Tensor, ids: &[i64]) -> Result<Tensor> {
        let words = ops::embedding(&self.embed_tokens, &Tensor::from_i64(ids, &[1, ids.len()])?)?;
        let x = Tensor::cat(&[queries, &words], 1)?;
        let x = match &self.project_in {
            Some(p) => p.forward(&x)?,
            None => x,
        };
        let l = x.dim(1)?;
        let positions = self
            .embed_positions
            .narrow(0, POSITION_OFFSET, l)
            .map_err(|_| {
                Error(format!(
                    "blip2: {l} tokens are more than the decoder's {} positions: lower \
                     max_new_tokens or shorten the initial caption",
                    self.embed_positions
                        .dim(0)
                        .unwrap_or(0)
                        .saturating_sub(POSITION_OFFSET)
                ))
            })?
            .unsqueeze(0)?;
        let mut x = x.add(&positions)?;
        let mask = causal_mask(l)?;
        let heads = self.config.text_config.num_attention_heads;
        for layer in &self.layers {
            let h = layer.self_attn_layer_norm.forward(&x)?;
            let a = attend(
                &layer.q_proj.forward(&h)?,
                &layer.k_proj.forward(&h)?,
                &layer.v_proj.forward(&h)?,
                heads,
                Some(&mask),
            )?;
            x = x.add(&layer.out_proj.forward(&a)?)?;
            let h = layer.final_layer_norm.forward(&x)?;
            x = x.add(&layer.fc2.forward(&layer.fc1.forward(&h)?.relu()?)?)?;
        }
        let mut last = x.narrow(1, l - 1, 1)?.reshape(&[1, -1])?;
        if let Some(n) = &self.final_layer_norm {
            last = n.forward(&last)?;
        }
        if let Some(p) = &self.project_out {
            last = p.forward(&last)?;
        }
        ops::linear(&last, &self.lm_head, None)?.reshape(&[-1])
    }

    /// Greedy decoding from `prompt` (the processor's image tokens, then the tokenized initial
    /// caption) for at most `max_new_tokens` tokens or until the end token; the ids returned
    /// start with the prompt, as `generate`'s do.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        prompt: &[i64],
        max_new_tokens: usize,
    ) -> Result<Vec<i64>> {
        let n = self.config.num_query_tokens;
        let image_token = self.config.image_token_index;
        if prompt.len() < n || prompt[..n].iter().any(|&t| t != image_token) {
            return Err(Error(format!(
                "blip2: the prompt does not start with {n} image tokens"
            )));
        }
        let vocab = self.embed_tokens.dim(0)? as i64;
        if let Some(t) = prompt[n..].iter().find(|&&t| !(0..vocab).contains(&t)) {
            return Err(Error(format!(
                "blip2: token {t} is beyond the model's {vocab}: tokenizer.json is not this \
                 model's"
            )));
        }
        let queries = self.image_queries(pixel_values)?;
        let mut ids = prompt.to_vec();
        for _ in 0..max_new_tokens {
            let next = argmax(&self.next_logits(&queries, &ids[n..])?.to_vec()?);
            ids.push(next);
            if next == self.config.text_config.eos_token_id {
                break;
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config shaped as Salesforce/blip2-opt-2.7b's (the vision tower and Q-Former left to
    /// their defaults) resolves to what transformers makes of it (tests/fixtures/gen/blip_configs.py).
    #[test]
    fn a_published_style_config_takes_transformers_defaults() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip_configs.json");
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let want = &all["blip2"]["resolved"];
        let c = Config::parse(all["blip2"]["given"].clone(), &path).unwrap();
        let (v, q, t) = (&c.vision_config, &c.qformer_config, &c.text_config);
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
                q.num_hidden_layers,
                q.num_attention_heads,
                q.cross_attention_frequency,
                q.layer_norm_eps
            ]),
            want["qformer"]
        );
        assert_eq!(
            serde_json::json!([
                t.num_hidden_layers,
                t.num_attention_heads,
                t.bos_token_id,
                t.eos_token_id,
                t.do_layer_norm_before
            ]),
            want["text"]
        );
        assert_eq!(c.num_query_tokens, want["num_query_tokens"]);
        assert_eq!(c.image_token_index, want["image_token_index"]);

        let mut old = all["blip2"]["given"].clone();
        old.as_object_mut().unwrap().remove("image_token_index");
        let e = Config::parse(old, &path).unwrap_err().to_string();
        assert!(
            e.contains("image_token_index") && e.contains("blip_configs.json"),
            "{e}"
        );
    }
}
