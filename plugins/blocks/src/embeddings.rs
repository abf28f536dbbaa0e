//! diffusers' `embeddings`: the sinusoidal timestep embedding (`Timesteps`) and the small MLP
//! that embeds it (`TimestepEmbedding`, also PixArt's text projection: linear, SiLU, linear).

use ferrite_plugin_api::{DType, Result, Tensor, Weights, nn::Linear};

use crate::key;
use crate::layers::linear;

/// `get_timestep_embedding` of `t` `[N]`: `[N, dim]`, sines then cosines (cosines first with
/// `flip_sin_to_cos`), frequencies `exp(−ln(10000)·i / (dim/2 − shift))`.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    shift: usize,
    flip_sin_to_cos: bool,
) -> Result<Tensor> {
    let half = dim / 2;
    if half <= shift {
        return Err(ferrite_plugin_api::Error(format!(
            "a timestep embedding of width {dim} cannot have a frequency shift of {shift}"
        )));
    }
    let denom = (half - shift) as f64;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
        .collect();
    let args = t
        .unsqueeze(1)?
        .mul(&Tensor::from_f32(&freqs, &[1, half])?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)
    } else {
        Tensor::cat(&[&sin, &cos], 1)
    }
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection` (act `silu`).
pub struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    pub fn load(w: &Weights, prefix: &str, inp: usize, out: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            linear_1: linear(w, &key(prefix, "linear_1"), out, inp, dtype)?,
            linear_2: linear(w, &key(prefix, "linear_2"), out, out, dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
