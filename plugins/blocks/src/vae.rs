//! diffusers' `AutoencoderKL` (SD 1.x/2.x/SDXL VAE; Flux's with its shift factor), config-driven.

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights,
    nn::{Conv2d, GroupNorm},
    ops::ConvOptions,
};
use serde::Deserialize;

use crate::key;
use crate::layers::{conv2d, group_norm};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetCfg, SpatialSelfAttention, Upsample2D};

/// The fields of `vae/config.json` the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// The VAE must run in f32 even when the model computes in f16 (SDXL's VAE overflows).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error(format!("{source}: not an AutoencoderKL config: {e}")))?;
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error(format!(
                "{source}: block_out_channels, down_block_types and up_block_types must have one entry per block"
            )));
        }
        if let Some(t) = c
            .down_block_types
            .iter()
            .chain(&c.up_block_types)
            .find(|t| !matches!(t.as_str(), "DownEncoderBlock2D" | "UpDecoderBlock2D"))
        {
            return Err(Error(format!(
                "{source}: block type `{t}` is not supported (DownEncoderBlock2D, UpDecoderBlock2D)"
            )));
        }
        if c.block_out_channels
            .iter()
            .any(|ch| !ch.is_multiple_of(c.norm_num_groups))
        {
            return Err(Error(format!(
                "{source}: norm_num_groups {} does not divide every block's channels",
                c.norm_num_groups
            )));
        }
        Ok(c)
    }

    /// Spatial reduction from image to latent (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetCfg {
        ResnetCfg {
            in_channels,
            out_channels,
            groups: self.norm_num_groups,
            eps: 1e-6,
            temb_channels: None,
        }
    }
}

/// `count` resnets `{prefix}.resnets.{j}`, the first taking `first_in` channels.
fn resnet_stack(
    w: &Weights,
    prefix: &str,
    c: &VaeConfig,
    count: usize,
    first_in: usize,
    out: usize,
    dtype: DType,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            let inp = if j == 0 { first_in } else { out };
            ResnetBlock2D::load(
                w,
                &key(prefix, &format!("resnets.{j}")),
                c.resnet(inp, out),
                dtype,
            )
        })
        .collect()
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, optional attention, resnet.
pub struct VaeMidBlock {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn load(w: &Weights, prefix: &str, c: &VaeConfig, ch: usize, dtype: DType) -> Result<Self> {
        let r = |i: usize| {
            ResnetBlock2D::load(
                w,
                &key(prefix, &format!("resnets.{i}")),
                c.resnet(ch, ch),
                dtype,
            )
        };
        Ok(Self {
            resnets: [r(0)?, r(1)?],
            attention: c
                .mid_block_add_attention
                .then(|| {
                    SpatialSelfAttention::load(
                        w,
                        &key(prefix, "attentions.0"),
                        ch,
                        c.norm_num_groups,
                        1e-6,
                        dtype,
                    )
                })
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

struct Stage<S> {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<S>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Stage<Downsample2D>>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<Stage<Upsample2D>>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn tail(
    w: &Weights,
    prefix: &str,
    c: &VaeConfig,
    ch: usize,
    out: usize,
    dtype: DType,
) -> Result<(GroupNorm, Conv2d)> {
    Ok((
        group_norm(
            w,
            &key(prefix, "conv_norm_out"),
            ch,
            c.norm_num_groups,
            1e-6,
            dtype,
        )?,
        conv2d(
            w,
            &key(prefix, "conv_out"),
            out,
            ch,
            3,
            ConvOptions::padding(1),
            dtype,
        )?,
    ))
}

impl Encoder {
    fn load(w: &Weights, prefix: &str, c: &VaeConfig, dtype: DType) -> Result<Self> {
        let ch = &c.block_out_channels;
        let mut prev = ch[0];
        let mut down_blocks = Vec::new();
        for (i, &out) in ch.iter().enumerate() {
            let p = key(prefix, &format!("down_blocks.{i}"));
            let resnets = resnet_stack(w, &p, c, c.layers_per_block, prev, out, dtype)?;
            let sampler = (i + 1 < ch.len())
                .then(|| Downsample2D::load(w, &key(&p, "downsamplers.0"), out, 0, dtype))
                .transpose()?;
            down_blocks.push(Stage { resnets, sampler });
            prev = out;
        }
        let last = ch[ch.len() - 1];
        let (conv_norm_out, conv_out) = tail(w, prefix, c, last, 2 * c.latent_channels, dtype)?;
        Ok(Self {
            conv_in: conv2d(
                w,
                &key(prefix, "conv_in"),
                ch[0],
                c.in_channels,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            down_blocks,
            mid_block: VaeMidBlock::load(w, &key(prefix, "mid_block"), c, last, dtype)?,
            conv_norm_out,
            conv_out,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &b.sampler {
                h = d.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

impl Decoder {
    fn load(w: &Weights, prefix: &str, c: &VaeConfig, dtype: DType) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut prev = rev[0];
        let mut up_blocks = Vec::new();
        for (i, &out) in rev.iter().enumerate() {
            let p = key(prefix, &format!("up_blocks.{i}"));
            let resnets = resnet_stack(w, &p, c, c.layers_per_block + 1, prev, out, dtype)?;
            let sampler = (i + 1 < rev.len())
                .then(|| Upsample2D::load(w, &key(&p, "upsamplers.0"), out, dtype))
                .transpose()?;
            up_blocks.push(Stage { resnets, sampler });
            prev = out;
        }
        let first = c.block_out_channels[0];
        let (conv_norm_out, conv_out) = tail(w, prefix, c, first, c.out_channels, dtype)?;
        Ok(Self {
            conv_in: conv2d(
                w,
                &key(prefix, "conv_in"),
                rev[0],
                c.latent_channels,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            mid_block: VaeMidBlock::load(w, &key(prefix, "mid_block"), c, rev[0], dtype)?,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &b.sampler {
                h = u.forward(&h)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The latent distribution of an image: a diagonal Gaussian.
pub struct LatentDist {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads from keys under `prefix` (empty for a diffusers `vae/` folder).
    pub fn load(w: &Weights, prefix: &str, c: &VaeConfig, dtype: DType) -> Result<Self> {
        let (l, o) = (c.latent_channels, ConvOptions::default());
        Ok(Self {
            encoder: Encoder::load(w, &key(prefix, "encoder"), c, dtype)?,
            decoder: Decoder::load(w, &key(prefix, "decoder"), c, dtype)?,
            quant_conv: c
                .use_quant_conv
                .then(|| conv2d(w, &key(prefix, "quant_conv"), 2 * l, 2 * l, 1, o, dtype))
                .transpose()?,
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| conv2d(w, &key(prefix, "post_quant_conv"), l, l, 1, o, dtype))
                .transpose()?,
            config: c.clone(),
        })
    }

    /// Image `[B, C, H, W]` (values in -1..1) to its latent distribution.
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        let s = x.shape()?;
        let f = self.config.scale_factor();
        if s.len() != 4 || s[1] != self.config.in_channels || s[2] % f != 0 || s[3] % f != 0 {
            return Err(Error(format!(
                "VAE input must be [B, {}, H, W] with H and W multiples of {f}, got {s:?}",
                self.config.in_channels
            )));
        }
        let mut m = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            m = q.forward(&m)?;
        }
        let mut halves = m.chunk(2, 1)?;
        let logvar = halves
            .pop()
            .expect("two halves")
            .clamp(Some(-30.0), Some(20.0))?;
        Ok(LatentDist {
            mean: halves.pop().expect("two halves"),
            logvar,
        })
    }

    /// Latent `[B, latent_channels, h, w]` (unscaled) to an image.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
