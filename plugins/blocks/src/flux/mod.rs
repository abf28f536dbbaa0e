//! diffusers' `FluxTransformer2DModel` (Flux.1 dev and schnell): the time, guidance and pooled
//! text embedding, double-stream and single-stream blocks over the text tokens and the packed
//! image tokens with 3-axis rotary positions, and the modulated output projection.

pub mod bfl;
mod block;
mod rope;

use ferrite_plugin_api::{DType, Error, Result, Tensor, Weights, checkpoint, nn::Linear};
use serde::Deserialize;

pub use block::{DoubleBlock, SingleBlock};
pub use rope::Rope;

use crate::embeddings::{Mlp, timestep_embedding};
use crate::layers::linear;
use block::{modulate, modulation};

/// The fields of `transformer/config.json` the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    /// Flux.1-dev's distilled guidance (schnell has none).
    #[serde(default)]
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}

/// Width of the sinusoidal time and guidance embeddings.
const TIME_DIM: usize = 256;

impl FluxConfig {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| {
            Error(format!(
                "{source}: not a FluxTransformer2DModel config: {e}"
            ))
        })?;
        if c.patch_size != 1 {
            return Err(Error(format!(
                "{source}: patch_size {} is not supported (Flux.1 packs 2×2 latents into tokens \
                 and has 1)",
                c.patch_size
            )));
        }
        let axes: usize = c.axes_dims_rope.iter().sum();
        if c.axes_dims_rope.len() != 3 || axes != c.attention_head_dim || c.num_attention_heads == 0
        {
            return Err(Error(format!(
                "{source}: axes_dims_rope {:?} must be three widths summing to \
                 attention_head_dim {}",
                c.axes_dims_rope, c.attention_head_dim
            )));
        }
        Ok(c)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

pub struct FluxTransformer2DModel {
    pub config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
    transformer_blocks: Vec<DoubleBlock>,
    single_transformer_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer2DModel {
    /// Loads diffusers' key layout (a `transformer/` folder's file).
    pub fn load(w: &Weights, c: &FluxConfig, dtype: DType) -> Result<Self> {
        let (d, heads, head_dim) = (c.inner_dim(), c.num_attention_heads, c.attention_head_dim);
        let t = "time_text_embed";
        Ok(Self {
            x_embedder: linear(w, "x_embedder", d, c.in_channels, dtype)?,
            context_embedder: linear(w, "context_embedder", d, c.joint_attention_dim, dtype)?,
            timestep_embedder: Mlp::load(w, &format!("{t}.timestep_embedder"), TIME_DIM, d, dtype)?,
            guidance_embedder: c
                .guidance_embeds
                .then(|| Mlp::load(w, &format!("{t}.guidance_embedder"), TIME_DIM, d, dtype))
                .transpose()?,
            text_embedder: Mlp::load(
                w,
                &format!("{t}.text_embedder"),
                c.pooled_projection_dim,
                d,
                dtype,
            )?,
            transformer_blocks: (0..c.num_layers)
                .map(|i| {
                    DoubleBlock::load(
                        w,
                        &format!("transformer_blocks.{i}"),
                        heads,
                        head_dim,
                        dtype,
                    )
                })
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..c.num_single_layers)
                .map(|i| {
                    let p = format!("single_transformer_blocks.{i}");
                    SingleBlock::load(w, &p, heads, head_dim, dtype)
                })
                .collect::<Result<_>>()?,
            norm_out: linear(w, "norm_out.linear", 2 * d, d, dtype)?,
            proj_out: linear(
                w,
                "proj_out",
                c.out_channels.unwrap_or(c.in_channels),
                d,
                dtype,
            )?,
            config: c.clone(),
        })
    }

    /// The conditioning vector `[B, D]`: timesteps `[B]` in 0..1 (and the guidance `[B]` where
    /// the model embeds it), plus the pooled text `[B, pooled_projection_dim]`.
    pub fn conditioning(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let embed = |mlp: &Mlp, v: &Tensor| {
            mlp.forward(&timestep_embedding(
                &v.mul_scalar(1000.0)?,
                TIME_DIM,
                0,
                true,
            )?)
        };
        let mut temb = embed(&self.timestep_embedder, timestep)?;
        match (&self.guidance_embedder, guidance) {
            (Some(g), Some(v)) => temb = temb.add(&embed(g, v)?)?,
            (Some(_), None) => {
                return Err(Error::msg(
                    "this Flux transformer embeds a guidance value (guidance_embeds): give one",
                ));
            }
            _ => {}
        }
        temb.add(&self.text_embedder.forward(pooled)?)
    }

    /// Embeds the packed image tokens `[B, N, in_channels]` and the text states
    /// `[B, L, joint_attention_dim]`.
    pub fn embed(&self, img: &Tensor, txt: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.x_embedder.forward(img)?,
            self.context_embedder.forward(txt)?,
        ))
    }

    pub fn double_blocks(&self) -> &[DoubleBlock] {
        &self.transformer_blocks
    }

    pub fn single_blocks(&self) -> &[SingleBlock] {
        &self.single_transformer_blocks
    }

    /// The rotary embedding of the text ids, then the image ids (diffusers' `txt_ids`,
    /// `img_ids`).
    pub fn rope(&self, txt_ids: &[[f32; 3]], img_ids: &[[f32; 3]]) -> Result<Rope> {
        Rope::new(
            &[txt_ids, img_ids].concat(),
            &self.config.axes_dims_rope,
            10000.0,
        )
    }

    /// The prediction `[B, N, out_channels]` for packed image tokens `img` `[B, N, C]`, text
    /// states `txt` `[B, L, joint_attention_dim]`, pooled text, timesteps in 0..1 and, for dev,
    /// the guidance; each block is a checkpointed block.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        txt_ids: &[[f32; 3]],
        img_ids: &[[f32; 3]],
    ) -> Result<Tensor> {
        let temb = self.conditioning(timestep, guidance, pooled)?;
        let rope = self.rope(txt_ids, img_ids)?;
        let (mut x, mut c) = self.embed(img, txt)?;
        let (l, n) = (c.shape()?[1], x.shape()?[1]);
        if l != txt_ids.len() || n != img_ids.len() {
            return Err(Error(format!(
                "Flux: {l} text and {n} image tokens, but {} text and {} image ids",
                txt_ids.len(),
                img_ids.len()
            )));
        }
        for block in &self.transformer_blocks {
            // One checkpointed output: the two streams joined, split again after.
            let joint = checkpoint(|| {
                let (x, c) = block.forward(&x, &c, &temb, &rope)?;
                Tensor::cat(&[&c, &x], 1)
            })?;
            (c, x) = (joint.narrow(1, 0, l)?, joint.narrow(1, l, n)?);
        }
        let mut h = Tensor::cat(&[&c, &x], 1)?;
        for block in &self.single_transformer_blocks {
            h = checkpoint(|| block.forward(&h, &temb, &rope))?;
        }
        let m = modulation(&self.norm_out, &temb, 2)?;
        // AdaLayerNormContinuous: scale first, then shift.
        let out = modulate(&h.narrow(1, l, n)?, &m[1], &m[0])?;
        self.proj_out.forward(&out)
    }
}
