//! diffusers' `Attention` (multi-head, optional cross-attention), `BasicTransformerBlock` with a
//! GEGLU feed-forward, and `Transformer2DModel` (conv or linear projection).

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights, checkpoint,
    nn::{Conv2d, GroupNorm, LayerNorm, Linear},
    ops::{self, ConvOptions},
};

use crate::key;
use crate::layers::{conv2d, group_norm, layer_norm, linear};

pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is the width of the keys' source (the query width for self-attention).
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            to_q: linear(w, &key(prefix, "to_q"), dim, dim, dtype)?,
            to_k: linear(w, &key(prefix, "to_k"), dim, context_dim, dtype)?,
            to_v: linear(w, &key(prefix, "to_v"), dim, context_dim, dtype)?,
            to_out: linear(w, &key(prefix, "to_out.0"), dim, dim, dtype)?,
            heads,
        })
    }

    /// `x` `[B, L, D]`; `context` `[B, S, C]` or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let h = self.heads as i64;
        let split = |t: Tensor| -> Result<Tensor> {
            let s = t.shape()?;
            t.reshape(&[s[0] as i64, s[1] as i64, h, s[2] as i64 / h])?
                .transpose(1, 2)
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(ctx)?)?;
        let v = split(self.to_v.forward(ctx)?)?;
        let o = ops::attention(&q, &k, &v, None, None)?.transpose(1, 2)?;
        let s = o.shape()?;
        self.to_out
            .forward(&o.reshape(&[s[0] as i64, s[1] as i64, -1])?)
    }
}

/// `hidden * gelu(gate)` after one projection to twice the inner width.
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, prefix: &str, dim: usize, dtype: DType) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(w, &key(prefix, "net.0.proj"), 2 * inner, dim, dtype)?,
            out: linear(w, &key(prefix, "net.2"), dim, inner, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut parts = self.proj.forward(x)?.chunk(2, 2)?;
        let gate = parts.pop().expect("two halves");
        self.out
            .forward(&parts.pop().expect("two halves").mul(&gate.gelu()?)?)
    }
}

pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        dtype: DType,
    ) -> Result<Self> {
        let ln = |n: &str| layer_norm(w, &key(prefix, n), dim, 1e-5, dtype);
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::load(w, &key(prefix, "attn1"), dim, dim, heads, dtype)?,
            norm2: ln("norm2")?,
            attn2: Attention::load(w, &key(prefix, "attn2"), dim, context_dim, heads, dtype)?,
            norm3: ln("norm3")?,
            ff: FeedForward::load(w, &key(prefix, "ff"), dim, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = x.add(&self.attn1.forward(&self.norm1.forward(x)?, None)?)?;
        let x = x.add(
            &self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
        )?;
        x.add(&self.ff.forward(&self.norm3.forward(&x)?)?)
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(
        w: &Weights,
        prefix: &str,
        out: usize,
        inp: usize,
        linear_proj: bool,
        dtype: DType,
    ) -> Result<Self> {
        Ok(if linear_proj {
            Projection::Linear(linear(w, prefix, out, inp, dtype)?)
        } else {
            Projection::Conv(conv2d(
                w,
                prefix,
                out,
                inp,
                1,
                ConvOptions::default(),
                dtype,
            )?)
        })
    }
}

/// Sizes of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DCfg {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub depth: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

pub struct Transformer2DModel {
    pub norm: GroupNorm,
    proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn load(w: &Weights, prefix: &str, c: Transformer2DCfg, dtype: DType) -> Result<Self> {
        if c.heads == 0 || !c.channels.is_multiple_of(c.heads) {
            return Err(Error(format!(
                "{prefix}: {} channels do not split into {} heads",
                c.channels, c.heads
            )));
        }
        let ch = c.channels;
        Ok(Self {
            norm: group_norm(w, &key(prefix, "norm"), ch, c.groups, 1e-6, dtype)?,
            proj_in: Projection::load(
                w,
                &key(prefix, "proj_in"),
                ch,
                ch,
                c.use_linear_projection,
                dtype,
            )?,
            transformer_blocks: (0..c.depth)
                .map(|i| {
                    BasicTransformerBlock::load(
                        w,
                        &key(prefix, &format!("transformer_blocks.{i}")),
                        ch,
                        c.context_dim,
                        c.heads,
                        dtype,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Projection::load(
                w,
                &key(prefix, "proj_out"),
                ch,
                ch,
                c.use_linear_projection,
                dtype,
            )?,
        })
    }

    /// `x` `[B, C, H, W]`, `context` `[B, S, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let [b, c, h, wd] = x.shape()?[..] else {
            return Err(Error::msg("Transformer2DModel expects [B, C, H, W]"));
        };
        let (b, c, h, wd) = (b as i64, c as i64, h as i64, wd as i64);
        let to_seq = |t: &Tensor| t.permute(&[0, 2, 3, 1])?.reshape(&[b, h * wd, c]);
        let to_img = |t: &Tensor| t.reshape(&[b, h, wd, c])?.permute(&[0, 3, 1, 2]);
        let n = self.norm.forward(x)?;
        let mut s = match &self.proj_in {
            Projection::Conv(p) => to_seq(&p.forward(&n)?)?,
            Projection::Linear(p) => p.forward(&to_seq(&n)?)?,
        };
        for block in &self.transformer_blocks {
            s = checkpoint(|| block.forward(&s, context))?;
        }
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_img(&s)?)?,
            Projection::Linear(p) => to_img(&p.forward(&s)?)?,
        };
        out.add(x)
    }
}
