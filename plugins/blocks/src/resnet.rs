//! diffusers' `ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the single-head spatial
//! `Attention` of the VAE mid block.

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights, checkpoint,
    nn::{Conv2d, GroupNorm, Linear},
    ops::{self, ConvOptions, InterpolateMode},
};

use crate::key;
use crate::layers::{conv2d, group_norm, linear};
use crate::transformer::Attention;

pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

/// Sizes of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetCfg {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub eps: f64,
    /// Width of the time embedding, when the block takes one (UNet, not VAE).
    pub temb_channels: Option<usize>,
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, prefix: &str, c: ResnetCfg, dtype: DType) -> Result<Self> {
        let (i, o) = (c.in_channels, c.out_channels);
        Ok(Self {
            norm1: group_norm(w, &key(prefix, "norm1"), i, c.groups, c.eps, dtype)?,
            conv1: conv2d(
                w,
                &key(prefix, "conv1"),
                o,
                i,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            time_emb_proj: c
                .temb_channels
                .map(|t| linear(w, &key(prefix, "time_emb_proj"), o, t, dtype))
                .transpose()?,
            norm2: group_norm(w, &key(prefix, "norm2"), o, c.groups, c.eps, dtype)?,
            conv2: conv2d(
                w,
                &key(prefix, "conv2"),
                o,
                o,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            conv_shortcut: (i != o)
                .then(|| {
                    conv2d(
                        w,
                        &key(prefix, "conv_shortcut"),
                        o,
                        i,
                        1,
                        ConvOptions::default(),
                        dtype,
                    )
                })
                .transpose()?,
        })
    }

    /// A unit of gradient checkpointing.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        checkpoint(|| self.compute(x, temb))
    }

    fn compute(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h = h.add(&proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

/// Stride-2 conv. The VAE's (`padding=0`) pads right and bottom by one first, as diffusers does.
pub struct Downsample2D {
    pub conv: Conv2d,
    pad_asymmetric: bool,
}

impl Downsample2D {
    pub fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        padding: usize,
        dtype: DType,
    ) -> Result<Self> {
        let o = ConvOptions::padding(padding).with_stride(2);
        Ok(Self {
            conv: conv2d(w, &key(prefix, "conv"), channels, channels, 3, o, dtype)?,
            pad_asymmetric: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_asymmetric {
            self.conv.forward(&x.pad(&[0, 1, 0, 1], 0.0)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest ×2 then a 3×3 conv.
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(w: &Weights, prefix: &str, channels: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            conv: conv2d(
                w,
                &key(prefix, "conv"),
                channels,
                channels,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape()?;
        let up = ops::interpolate(x, [s[2] * 2, s[3] * 2], InterpolateMode::Nearest)?;
        self.conv.forward(&up)
    }
}

/// Single-head self-attention over the pixels of `[B, C, H, W]` with a residual (the VAE mid
/// block's `Attention`: group_norm, then the same to_q/to_k/to_v/to_out.0 as the UNet's).
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl SpatialSelfAttention {
    pub fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f64,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(w, &key(prefix, "group_norm"), channels, groups, eps, dtype)?,
            attention: Attention::load(w, prefix, channels, channels, 1, dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, wd] = x.shape()?[..] else {
            return Err(Error::msg("spatial attention expects [B, C, H, W]"));
        };
        let (b, c, h, wd) = (b as i64, c as i64, h as i64, wd as i64);
        // [B, C, H, W] -> [B, HW, C] and back.
        let seq = self
            .group_norm
            .forward(x)?
            .reshape(&[b, c, h * wd])?
            .transpose(1, 2)?;
        let o = self.attention.forward(&seq, None)?;
        o.transpose(1, 2)?.reshape(&[b, c, h, wd])?.add(x)
    }
}
