//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x and SDXL, config-driven (block types,
//! widths, heads, linear or conv projections, transformer depth per level, SDXL's added
//! time/text embeddings).

use ferrite_plugin_api::{
    DType, Error, Result, Tensor, Weights,
    nn::{Conv2d, GroupNorm},
    ops::ConvOptions,
};
use serde::Deserialize;

use crate::embeddings::{Mlp, timestep_embedding};
use crate::key;
use crate::layers::{conv2d, group_norm};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetCfg, Upsample2D};
use crate::transformer::{Transformer2DCfg, Transformer2DModel};

/// A config value that is one number for every block or one per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i],
        }
    }
    fn len_ok(&self, n: usize) -> bool {
        matches!(self, PerBlock::One(_)) || matches!(self, PerBlock::Many(v) if v.len() == n)
    }
}

/// The fields of `unet/config.json` the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// diffusers' historical name: for SD 1.x/2.x this is the number of heads per block.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// `text_time` (SDXL): a pooled text vector and six size/crop ids join the time embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time id's sinusoidal embedding (`text_time`).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the added embedding: pooled text width + 6 × addition_time_embed_dim.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

/// Settings of diffusers' UNet whose other values this model does not build, with the value it
/// builds (as JSON; what SD 1.x/2.x and SDXL have). Another value is refused rather than
/// ignored: some change the weights' shapes, and random weights from a config would silently
/// be another model.
const FIXED: [(&str, &str); 16] = [
    ("resnet_time_scale_shift", "\"default\""),
    ("attention_type", "\"default\""),
    ("time_embedding_type", "\"positional\""),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("class_embed_type", "null"),
    ("encoder_hid_dim", "null"),
    ("time_embedding_dim", "null"),
    ("num_class_embeds", "null"),
    ("time_cond_proj_dim", "null"),
    ("timestep_post_act", "null"),
    ("cross_attention_norm", "null"),
    ("dual_cross_attention", "false"),
    ("only_cross_attention", "false"),
    ("resnet_skip_time_act", "false"),
];

fn refuse_unsupported(text: &str, source: &str) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error(format!("{source}: {e}")))?;
    for (name, want) in FIXED {
        let got = &v[name];
        let builds: serde_json::Value = serde_json::from_str(want).unwrap_or_default();
        if !got.is_null() && *got != builds {
            return Err(Error(format!(
                "{source}: {name} {got} is not supported (this UNet builds {want})"
            )));
        }
    }
    Ok(())
}

fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}

impl UNetConfig {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error(format!("{source}: not a UNet2DConditionModel config: {e}")))?;
        refuse_unsupported(text, source)?;
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error(format!(
                "{source}: block_out_channels and the block type lists must have one entry per block"
            )));
        }
        if !c.heads().len_ok(n) || !c.transformer_layers_per_block.len_ok(n) {
            return Err(Error(format!(
                "{source}: per-block lists must have {n} entries"
            )));
        }
        let known = [
            "CrossAttnDownBlock2D",
            "DownBlock2D",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        ];
        if let Some(t) = c
            .down_block_types
            .iter()
            .chain(&c.up_block_types)
            .find(|t| !known.contains(&t.as_str()))
        {
            return Err(Error(format!(
                "{source}: block type `{t}` is not supported"
            )));
        }
        // The sinusoids need an even width with room for the shift.
        let sizes_given = c.projection_class_embeddings_input_dim.is_some()
            && c.addition_time_embed_dim
                .is_some_and(|d| d % 2 == 0 && d / 2 > c.freq_shift);
        match c.addition_embed_type.as_deref() {
            None => Ok(c),
            Some("text_time") if sizes_given => Ok(c),
            Some("text_time") => Err(Error(format!(
                "{source}: addition_embed_type text_time needs an even addition_time_embed_dim \
                 (above twice freq_shift) and projection_class_embeddings_input_dim"
            ))),
            Some(t) => Err(Error(format!(
                "{source}: addition_embed_type `{t}` is not supported (text_time is)"
            ))),
        }
    }

    /// Heads per block (`num_attention_heads`, or `attention_head_dim` as diffusers reads it).
    fn heads(&self) -> &PerBlock {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
    }

    pub(crate) fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetCfg {
        ResnetCfg {
            in_channels,
            out_channels,
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            temb_channels: Some(4 * self.block_out_channels[0]),
        }
    }

    pub(crate) fn transformer(&self, channels: usize, block: usize) -> Transformer2DCfg {
        Transformer2DCfg {
            channels,
            heads: self.heads().get(block),
            context_dim: self.cross_attention_dim,
            depth: self.transformer_layers_per_block.get(block),
            groups: self.norm_num_groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

struct Block<S> {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    sampler: Option<S>,
}

impl<S> Block<S> {
    fn step(&self, j: usize, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.resnets[j].forward(x, Some(temb))?;
        match self.attentions.get(j) {
            Some(a) => a.forward(&h, context),
            None => Ok(h),
        }
    }
}

/// SDXL's conditioning beside the text states: the pooled text vector `[B, D]` and the six
/// ids `[B, 6]` (original height, width, crop top, left, target height, width).
pub struct AddedCond<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    time_embedding: Mlp,
    /// `add_embedding` (text_time).
    add_embedding: Option<Mlp>,
    conv_in: Conv2d,
    down_blocks: Vec<Block<Downsample2D>>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Transformer2DModel,
    up_blocks: Vec<Block<Upsample2D>>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Loads from keys under `prefix` (empty for a diffusers `unet/` folder).
    pub fn load(w: &Weights, prefix: &str, c: &UNetConfig, dtype: DType) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let k = |name: &str| key(prefix, name);

        let mut down_blocks = Vec::new();
        let mut out = ch[0];
        for (i, &width) in ch.iter().enumerate() {
            let (inp, p) = (out, k(&format!("down_blocks.{i}")));
            out = width;
            let cross = c.down_block_types[i].starts_with("CrossAttn");
            let mut b = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
                sampler: None,
            };
            for j in 0..c.layers_per_block {
                let rin = if j == 0 { inp } else { out };
                b.resnets.push(ResnetBlock2D::load(
                    w,
                    &key(&p, &format!("resnets.{j}")),
                    c.resnet(rin, out),
                    dtype,
                )?);
                if cross {
                    b.attentions.push(Transformer2DModel::load(
                        w,
                        &key(&p, &format!("attentions.{j}")),
                        c.transformer(out, i),
                        dtype,
                    )?);
                }
            }
            if i + 1 < n {
                b.sampler = Some(Downsample2D::load(
                    w,
                    &key(&p, "downsamplers.0"),
                    out,
                    c.downsample_padding,
                    dtype,
                )?);
            }
            down_blocks.push(b);
        }

        let last = ch[n - 1];
        let mid = |j: usize| {
            ResnetBlock2D::load(
                w,
                &k(&format!("mid_block.resnets.{j}")),
                c.resnet(last, last),
                dtype,
            )
        };
        let mid_resnets = [mid(0)?, mid(1)?];
        let mid_attention = Transformer2DModel::load(
            w,
            &k("mid_block.attentions.0"),
            c.transformer(last, n - 1),
            dtype,
        )?;

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let inp = rev[(i + 1).min(n - 1)];
            let p = k(&format!("up_blocks.{i}"));
            let cross = c.up_block_types[i].starts_with("CrossAttn");
            let layers = c.layers_per_block + 1;
            let mut b = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
                sampler: None,
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { inp } else { out };
                let rin = if j == 0 { prev } else { out };
                b.resnets.push(ResnetBlock2D::load(
                    w,
                    &key(&p, &format!("resnets.{j}")),
                    c.resnet(rin + skip, out),
                    dtype,
                )?);
                if cross {
                    b.attentions.push(Transformer2DModel::load(
                        w,
                        &key(&p, &format!("attentions.{j}")),
                        c.transformer(out, n - 1 - i),
                        dtype,
                    )?);
                }
            }
            if i + 1 < n {
                b.sampler = Some(Upsample2D::load(w, &key(&p, "upsamplers.0"), out, dtype)?);
            }
            up_blocks.push(b);
        }

        let add_embedding = match c.projection_class_embeddings_input_dim {
            Some(width) if c.addition_embed_type.is_some() => {
                Some(Mlp::load(w, &k("add_embedding"), width, temb, dtype)?)
            }
            _ => None,
        };
        Ok(Self {
            add_embedding,
            time_embedding: Mlp::load(w, &k("time_embedding"), ch[0], temb, dtype)?,
            conv_in: conv2d(
                w,
                &k("conv_in"),
                ch[0],
                c.in_channels,
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            down_blocks,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: group_norm(
                w,
                &k("conv_norm_out"),
                ch[0],
                c.norm_num_groups,
                c.norm_eps,
                dtype,
            )?,
            conv_out: conv2d(
                w,
                &k("conv_out"),
                c.out_channels,
                ch[0],
                3,
                ConvOptions::padding(1),
                dtype,
            )?,
            config: c.clone(),
        })
    }

    /// diffusers' sinusoidal `Timesteps` embedding of `t` `[N]`, `[N, dim]`.
    fn time_proj(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let c = &self.config;
        timestep_embedding(t, dim, c.freq_shift, c.flip_sin_to_cos)
    }

    /// Predicts from noisy latents `[B, C, H, W]`, timesteps `[B]` and text states `[B, S, D]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// The time embedding `[B, 4·C]`, with SDXL's added embedding when the model has one.
    fn time_embedding(&self, timesteps: &Tensor, added: Option<&AddedCond>) -> Result<Tensor> {
        let t = self.time_proj(timesteps, self.config.block_out_channels[0])?;
        let temb = self.time_embedding.forward(&t)?;
        let Some(add_embedding) = &self.add_embedding else {
            return Ok(temb);
        };
        let a = added.ok_or_else(|| {
            Error::msg("this UNet (addition_embed_type text_time) needs text_embeds and time_ids")
        })?;
        let ids = a.time_ids.shape()?;
        let b = timesteps.shape()?.first().copied().unwrap_or(0);
        if ids != [b, 6] {
            return Err(Error(format!("time_ids must be [{b}, 6], got {ids:?}")));
        }
        let dim = self.config.addition_time_embed_dim.unwrap_or_default();
        let time_embeds = self
            .time_proj(&a.time_ids.reshape(&[-1])?, dim)?
            .reshape(&[b as i64, -1])?;
        let joined = Tensor::cat(&[a.text_embeds, &time_embeds], 1)?;
        temb.add(&add_embedding.forward(&joined)?)
    }

    /// [`UNet2DConditionModel::forward`] with SDXL's added conditioning.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let s = sample.shape()?;
        let f = 1 << (self.config.block_out_channels.len() - 1);
        if s.len() != 4 || s[1] != self.config.in_channels || s[2] % f != 0 || s[3] % f != 0 {
            return Err(Error(format!(
                "UNet input must be [B, {}, H, W] with H and W multiples of {f}, got {s:?}",
                self.config.in_channels
            )));
        }
        let temb = self.time_embedding(timesteps, added)?;
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for b in &self.down_blocks {
            for j in 0..b.resnets.len() {
                x = b.step(j, &x, &temb, context)?;
                skips.push(x.clone());
            }
            if let Some(d) = &b.sampler {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, Some(&temb))?;
        x = self.mid_attention.forward(&x, context)?;
        x = self.mid_resnets[1].forward(&x, Some(&temb))?;
        for b in &self.up_blocks {
            for j in 0..b.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::msg("UNet skip connections out of step"))?;
                x = b.step(j, &Tensor::cat(&[&x, &skip], 1)?, &temb, context)?;
            }
            if let Some(u) = &b.sampler {
                x = u.forward(&x)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}
