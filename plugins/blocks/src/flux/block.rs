//! Flux's transformer blocks: the double-stream `FluxTransformerBlock` (image and text streams,
//! each modulated, attending jointly) and the single-stream `FluxSingleTransformerBlock`
//! (attention and MLP in parallel on the joint sequence), with `FluxAttention`.

use ferrite_plugin_api::{DType, Result, Tensor, Weights, nn::Linear, ops};

use super::rope::Rope;
use crate::key;
use crate::layers::{linear, norm_weight};

/// `layer_norm(x) · (1 + scale) + shift`, without affine parameters (eps 1e-6), with the
/// modulation `[B, D]` broadcast over the sequence.
pub(super) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    ops::layer_norm(x, None, None, 1e-6)?
        .mul(&scale.add_scalar(1.0)?.unsqueeze(1)?)?
        .add(&shift.unsqueeze(1)?)
}

/// `linear(silu(temb))` cut into `n` modulation vectors `[B, D]` (diffusers' AdaLayerNorm*).
pub(super) fn modulation(linear: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    linear.forward(&temb.silu()?)?.chunk(n, 1)
}

/// Query, key and value projections of one stream with their per-head RMS norms.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
}

impl Qkv {
    fn load(
        w: &Weights,
        p: &str,
        names: [&str; 5],
        dim: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            q: linear(w, &key(p, names[0]), dim, dim, dtype)?,
            k: linear(w, &key(p, names[1]), dim, dim, dtype)?,
            v: linear(w, &key(p, names[2]), dim, dim, dtype)?,
            norm_q: norm_weight(w, &key(p, names[3]), head_dim, dtype)?,
            norm_k: norm_weight(w, &key(p, names[4]), head_dim, dtype)?,
        })
    }

    /// q, k, v `[B, H, L, head_dim]` of `x` `[B, L, D]` (q and k normalised).
    fn project(&self, x: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
        let s = x.shape()?;
        let split = |t: Tensor| {
            t.reshape(&[s[0] as i64, s[1] as i64, heads as i64, -1])?
                .transpose(1, 2)
        };
        Ok([
            ops::rms_norm(&split(self.q.forward(x)?)?, Some(&self.norm_q), 1e-6)?,
            ops::rms_norm(&split(self.k.forward(x)?)?, Some(&self.norm_k), 1e-6)?,
            split(self.v.forward(x)?)?,
        ])
    }
}

/// Rotary-embedded attention over q, k, v `[B, H, S, head_dim]`, back to `[B, S, D]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let o = ops::attention(&rope.apply(q)?, &rope.apply(k)?, v, None, None)?;
    let s = o.shape()?;
    o.transpose(1, 2)?
        .reshape(&[s[0] as i64, s[2] as i64, (s[1] * s[3]) as i64])
}

/// diffusers' `FeedForward` with `gelu-approximate`: `net.2(gelu_tanh(net.0.proj(x)))`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, p: &str, dim: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            proj: linear(w, &key(p, "net.0.proj"), 4 * dim, dim, dtype)?,
            out: linear(w, &key(p, "net.2"), dim, 4 * dim, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(x)?.gelu_tanh()?)
    }
}

/// One stream of a double block: its modulation, projections, output and feed-forward.
struct Stream {
    norm1: Linear,
    qkv: Qkv,
    out: Linear,
    ff: FeedForward,
}

impl Stream {
    /// The stream after attention `attn` `[B, L, D]` (its part of the joint output) and its
    /// feed-forward, given the modulation `m` of [`Self::modulated`].
    fn finish(&self, x: &Tensor, attn: &Tensor, m: &[Tensor]) -> Result<Tensor> {
        let x = x.add(&m[2].unsqueeze(1)?.mul(&self.out.forward(attn)?)?)?;
        let h = modulate(&x, &m[3], &m[4])?;
        x.add(&m[5].unsqueeze(1)?.mul(&self.ff.forward(&h)?)?)
    }

    /// The modulation (shift, scale, gate for attention; shift, scale, gate for the MLP) and
    /// the modulated input.
    fn modulated(&self, x: &Tensor, temb: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let m = modulation(&self.norm1, temb, 6)?;
        let h = modulate(x, &m[0], &m[1])?;
        Ok((m, h))
    }
}

pub struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
}

impl DoubleBlock {
    pub fn load(w: &Weights, p: &str, heads: usize, head_dim: usize, dtype: DType) -> Result<Self> {
        let dim = heads * head_dim;
        let a = key(p, "attn");
        let stream = |norm: &str, names: [&str; 5], out: &str, ff: &str| -> Result<Stream> {
            Ok(Stream {
                norm1: linear(w, &key(p, &format!("{norm}.linear")), 6 * dim, dim, dtype)?,
                qkv: Qkv::load(w, &a, names, dim, head_dim, dtype)?,
                out: linear(w, &key(&a, out), dim, dim, dtype)?,
                ff: FeedForward::load(w, &key(p, ff), dim, dtype)?,
            })
        };
        Ok(Self {
            img: stream(
                "norm1",
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                "to_out.0",
                "ff",
            )?,
            txt: stream(
                "norm1_context",
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                "to_add_out",
                "ff_context",
            )?,
            heads,
        })
    }

    /// The image and text streams `[B, N, D]`, `[B, L, D]` after the block; `rope` covers the
    /// text tokens, then the image tokens.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let (mi, hi) = self.img.modulated(img, temb)?;
        let (mt, ht) = self.txt.modulated(txt, temb)?;
        let [qi, ki, vi] = self.img.qkv.project(&hi, self.heads)?;
        let [qt, kt, vt] = self.txt.qkv.project(&ht, self.heads)?;
        let joint = |t: &Tensor, i: &Tensor| Tensor::cat(&[t, i], 2);
        let o = attend(
            &joint(&qt, &qi)?,
            &joint(&kt, &ki)?,
            &joint(&vt, &vi)?,
            rope,
        )?;
        let l = txt.shape()?[1];
        let n = img.shape()?[1];
        Ok((
            self.img.finish(img, &o.narrow(1, l, n)?, &mi)?,
            self.txt.finish(txt, &o.narrow(1, 0, l)?, &mt)?,
        ))
    }
}

pub struct SingleBlock {
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    pub fn load(w: &Weights, p: &str, heads: usize, head_dim: usize, dtype: DType) -> Result<Self> {
        let dim = heads * head_dim;
        let names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        Ok(Self {
            norm: linear(w, &key(p, "norm.linear"), 3 * dim, dim, dtype)?,
            qkv: Qkv::load(w, &key(p, "attn"), names, dim, head_dim, dtype)?,
            proj_mlp: linear(w, &key(p, "proj_mlp"), 4 * dim, dim, dtype)?,
            proj_out: linear(w, &key(p, "proj_out"), dim, 5 * dim, dtype)?,
            heads,
        })
    }

    /// The joint sequence `[B, L + N, D]` (text, then image) after the block.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = modulation(&self.norm, temb, 3)?;
        let h = modulate(x, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&h)?.gelu_tanh()?;
        let [q, k, v] = self.qkv.project(&h, self.heads)?;
        let attn = attend(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&attn, &mlp], 2)?)?;
        x.add(&m[2].unsqueeze(1)?.mul(&out)?)
    }
}
