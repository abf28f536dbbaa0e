//! transformers' `CLIPSegForImageSegmentation` (CIDAS/clipseg-rd64-refined): the CLIP vision
//! tower run to its last extracted layer, with its position embeddings interpolated (bicubic) to
//! the processor's size at load; the CLIP text tower's projected pooled output as the condition;
//! the decoder (reduce, FiLM at `conditional_layer`, post-norm layers with ReLU) and its
//! transposed convolutions. Weight keys are transformers' own.

use std::path::Path;

use ferrite_blocks::clip::{ClipAttention, ClipEncoderLayer, ClipTextConfig, ClipTextTransformer};
use ferrite_blocks::layers::{layer_norm, linear};
use ferrite_blocks::{expect_shape, key};
use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights,
    nn::{Conv2d, LayerNorm, Linear},
    ops::{self, ConvOptions},
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub text_config: serde_json::Value,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    pub extract_layers: Vec<usize>,
    pub reduce_dim: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_intermediate_size: usize,
    #[serde(default)]
    pub conditional_layer: usize,
    #[serde(default)]
    pub use_complex_transposed_convolution: bool,
}

/// A CLIP layer config with `d` features, `heads` heads and `inner` MLP features.
fn layer_config(d: usize, heads: usize, inner: usize, act: &str, eps: f64) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 0,
        hidden_size: d,
        intermediate_size: inner,
        num_hidden_layers: 0,
        num_attention_heads: heads,
        max_position_embeddings: 0,
        hidden_act: act.into(),
        layer_norm_eps: eps,
        projection_dim: None,
        eos_token_id: 2,
    }
}

/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` of a `[g, g, d]` grid
/// (row-major, host data) to `[n, n, d]`: the cubic convolution with A = -0.75, edges clamped.
pub fn bicubic(grid: &[f32], g: usize, d: usize, n: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic = |t: f64| -> [f64; 4] {
        let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
        let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
        [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
    };
    // For each output index: the four source indices and their weights.
    let scale = g as f64 / n as f64;
    let taps: Vec<([usize; 4], [f64; 4])> = (0..n)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let x0 = src.floor();
            let w = cubic(src - x0);
            let idx = [-1i64, 0, 1, 2].map(|k| (x0 as i64 + k).clamp(0, g as i64 - 1) as usize);
            (idx, w)
        })
        .collect();
    let mut out = vec![0f32; n * n * d];
    for (oy, (iy, wy)) in taps.iter().enumerate() {
        for (ox, (ix, wx)) in taps.iter().enumerate() {
            for c in 0..d {
                let mut v = 0.0;
                for (a, &yy) in iy.iter().enumerate() {
                    for (b, &xx) in ix.iter().enumerate() {
                        v += wy[a] * wx[b] * grid[(yy * g + xx) * d + c] as f64;
                    }
                }
                out[(oy * n + ox) * d + c] = v as f32;
            }
        }
    }
    out
}

struct DecoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

impl DecoderLayer {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        // Post-norm, unlike CLIP's encoder layers.
        let x = self
            .layer_norm1
            .forward(&x.add(&self.self_attn.forward(x, mask)?)?)?;
        let h = self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?;
        self.layer_norm2.forward(&x.add(&h)?)
    }
}

pub struct ClipSeg {
    pub config: Config,
    text: ClipTextTransformer,
    patch_embedding: Conv2d,
    /// `[1, 1 + grid², D]`, interpolated to the processor's grid.
    positions: Tensor,
    class_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    film_mul: Linear,
    film_add: Linear,
    reduces: Vec<Linear>,
    decoder: Vec<DecoderLayer>,
    /// The transposed convolution(s), with the strides of the complex variant.
    up: Vec<(Tensor, Tensor, usize)>,
    conv: Option<Conv2d>,
    /// The processor's image side.
    pub size: usize,
}

impl ClipSeg {
    /// The model in `w` (transformers' keys) for images of `size`² pixels.
    pub fn load(w: &Weights, c: Config, size: usize, source: &Path) -> Result<Self> {
        let v = &c.vision_config;
        let (d, p) = (v.hidden_size, v.patch_size);
        if p == 0 || !size.is_multiple_of(p) || c.extract_layers.is_empty() {
            return Err(Error(format!(
                "{}: the processor's size {size} is not a multiple of the patch size {p}, or no \
                 extract_layers",
                source.display()
            )));
        }
        let deepest = *c.extract_layers.iter().max().unwrap_or(&0);
        if deepest >= v.num_hidden_layers {
            return Err(Error(format!(
                "{}: extract_layers reach layer {deepest} of {}",
                source.display(),
                v.num_hidden_layers
            )));
        }
        let text_config = ClipTextConfig::from_json(
            &c.text_config.to_string(),
            &format!("{} (text_config)", source.display()),
        )?;
        let text = ClipTextTransformer::load(
            w,
            "clip.text_model",
            Some("clip.text_projection"),
            &ClipTextConfig {
                projection_dim: Some(c.projection_dim),
                ..text_config
            },
            DType::F32,
        )?;
        let vm = "clip.vision_model";
        let g = v.image_size / p;
        let n = size / p;
        expect_shape(
            w,
            &key(vm, "embeddings.position_embedding.weight"),
            &[g * g + 1, d],
        )?;
        let pos = w
            .get(&key(vm, "embeddings.position_embedding.weight"), DType::F32)?
            .to_vec()?;
        let positions = if n == g {
            pos
        } else {
            let mut out = pos[..d].to_vec();
            out.extend(bicubic(&pos[d..], g, d, n));
            out
        };
        let vision_layer = layer_config(
            d,
            v.num_attention_heads,
            v.intermediate_size,
            &v.hidden_act,
            v.layer_norm_eps,
        );
        let (r, heads) = (c.reduce_dim, c.decoder_num_attention_heads);
        let decoder_layer = layer_config(
            r,
            heads,
            c.decoder_intermediate_size,
            "relu",
            v.layer_norm_eps,
        );
        let decoder = (0..c.extract_layers.len())
            .map(|i| {
                let pre = format!("decoder.layers.{i}");
                Ok(DecoderLayer {
                    self_attn: ClipAttention::load(
                        w,
                        &key(&pre, "self_attn"),
                        &decoder_layer,
                        DType::F32,
                    )?,
                    layer_norm1: layer_norm(
                        w,
                        &key(&pre, "layer_norm1"),
                        r,
                        v.layer_norm_eps,
                        DType::F32,
                    )?,
                    fc1: linear(
                        w,
                        &key(&pre, "mlp.fc1"),
                        c.decoder_intermediate_size,
                        r,
                        DType::F32,
                    )?,
                    fc2: linear(
                        w,
                        &key(&pre, "mlp.fc2"),
                        r,
                        c.decoder_intermediate_size,
                        DType::F32,
                    )?,
                    layer_norm2: layer_norm(
                        w,
                        &key(&pre, "layer_norm2"),
                        r,
                        v.layer_norm_eps,
                        DType::F32,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tc = "decoder.transposed_convolution";
        let (conv, up) = if c.use_complex_transposed_convolution {
            let k = p / 4;
            (
                Some(Conv2d::load(
                    w,
                    &key(tc, "0"),
                    ConvOptions::padding(1),
                    DType::F32,
                )?),
                vec![
                    (
                        w.get(&key(tc, "2.weight"), DType::F32)?,
                        w.get(&key(tc, "2.bias"), DType::F32)?,
                        k,
                    ),
                    (
                        w.get(&key(tc, "4.weight"), DType::F32)?,
                        w.get(&key(tc, "4.bias"), DType::F32)?,
                        k,
                    ),
                ],
            )
        } else {
            (
                None,
                vec![(
                    w.get(&key(tc, "weight"), DType::F32)?,
                    w.get(&key(tc, "bias"), DType::F32)?,
                    p,
                )],
            )
        };
        Ok(Self {
            text,
            patch_embedding: Conv2d::load(
                w,
                &key(vm, "embeddings.patch_embedding"),
                ConvOptions::default().with_stride(p),
                DType::F32,
            )?,
            positions: Tensor::from_f32(&positions, &[1, n * n + 1, d])?,
            class_embedding: w
                .get(&key(vm, "embeddings.class_embedding"), DType::F32)?
                .reshape(&[1, 1, d as i64])?,
            pre_layrnorm: layer_norm(w, &key(vm, "pre_layrnorm"), d, v.layer_norm_eps, DType::F32)?,
            layers: (0..=deepest)
                .map(|i| {
                    ClipEncoderLayer::load(
                        w,
                        &key(vm, &format!("encoder.layers.{i}")),
                        &vision_layer,
                        DType::F32,
                    )
                })
                .collect::<Result<_>>()?,
            film_mul: linear(w, "decoder.film_mul", r, c.projection_dim, DType::F32)?,
            film_add: linear(w, "decoder.film_add", r, c.projection_dim, DType::F32)?,
            reduces: (0..c.extract_layers.len())
                .map(|i| linear(w, &format!("decoder.reduces.{i}"), r, d, DType::F32))
                .collect::<Result<_>>()?,
            decoder,
            up,
            conv,
            size,
            config: c,
        })
    }

    /// Logits `[P, h, w]` for `pixel_values` (`[1, 3, size, size]`, normalised) and the token
    /// ids of P prompts (77 each).
    pub fn logits(&self, pixel_values: &Tensor, ids: &[i64], prompts: usize) -> Result<Tensor> {
        let x = self.patch_embedding.forward(pixel_values)?;
        let x = x.flatten(2, 3)?.transpose(1, 2)?;
        let x = Tensor::cat(&[&self.class_embedding, &x], 1)?.add(&self.positions)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let len = x.dim(1)?;
        let none = Tensor::zeros(&[1, 1, len, len], DType::F32)?.gt_scalar(0.5)?;
        let mut hidden = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &none)?;
            hidden.push(x.clone());
        }
        let text = self.text.forward(ids, prompts, 0)?;
        let cond = text
            .text_embeds
            .ok_or_else(|| Error::msg("clipseg: the text model has no projection"))?;
        let p = prompts as i64;
        let r = self.config.reduce_dim as i64;
        let mut out: Option<Tensor> = None;
        let layers = self
            .config
            .extract_layers
            .iter()
            .rev()
            .zip(&self.decoder)
            .zip(&self.reduces);
        for (i, ((&at, layer), reduce)) in layers.enumerate() {
            let a = reduce
                .forward(&hidden[at + 1])?
                .expand(&[prompts, len, r as usize])?;
            let mut o = match out {
                Some(o) => a.add(&o)?,
                None => a,
            };
            if i == self.config.conditional_layer {
                let mul = self.film_mul.forward(&cond)?.reshape(&[p, 1, r])?;
                let add = self.film_add.forward(&cond)?.reshape(&[p, 1, r])?;
                o = o.mul(&mul)?.add(&add)?;
            }
            out = Some(layer.forward(&o, &none)?);
        }
        let out = out.ok_or_else(|| Error::msg("clipseg: no decoder layers"))?;
        let n = (self.size / self.config.vision_config.patch_size) as i64;
        let mut y = out
            .narrow(1, 1, len - 1)?
            .transpose(1, 2)?
            .reshape(&[p, r, n, n])?;
        if let Some(conv) = &self.conv {
            y = conv.forward(&y)?.relu()?;
        }
        let last = self.up.len() - 1;
        for (i, (weight, bias, k)) in self.up.iter().enumerate() {
            y = ops::conv_transpose2d(
                &y,
                weight,
                Some(bias),
                ConvOptions::default().with_stride(*k),
                [0, 0],
            )?;
            if i != last {
                y = y.relu()?;
            }
        }
        y.squeeze(1)
    }
}
