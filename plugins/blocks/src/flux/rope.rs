//! Flux's rotary position embedding over three axes (diffusers' `FluxPosEmbed` and
//! `apply_rotary_emb` with interleaved real/imaginary pairs).

use ferrite_plugin_api::{Error, Result, Tensor};

/// The cosines and sines `[1, 1, S, D]` of a sequence's positions (each `[3]` ids: text tokens
/// all zero, image tokens `(0, row, column)`).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `axes_dim` splits the head dimension between the axes (Flux.1: 16, 56, 56).
    pub fn new(ids: &[[f32; 3]], axes_dim: &[usize], theta: f64) -> Result<Self> {
        if axes_dim.len() != 3 || axes_dim.iter().any(|d| d % 2 != 0) {
            return Err(Error(format!(
                "rope axes {axes_dim:?}: three even widths are needed"
            )));
        }
        let d: usize = axes_dim.iter().sum();
        let (mut cos, mut sin) = (
            Vec::with_capacity(ids.len() * d),
            Vec::with_capacity(ids.len() * d),
        );
        for id in ids {
            for (axis, &width) in axes_dim.iter().enumerate() {
                // In f64, as diffusers computes the frequencies, then f32.
                for j in 0..width / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / width as f64);
                    let angle = id[axis] as f64 * freq;
                    // Each frequency twice: the real and imaginary slots of one pair.
                    cos.extend([angle.cos() as f32; 2]);
                    sin.extend([angle.sin() as f32; 2]);
                }
            }
        }
        let shape = [1, 1, ids.len(), d];
        Ok(Self {
            cos: Tensor::from_f32(&cos, &shape)?,
            sin: Tensor::from_f32(&sin, &shape)?,
        })
    }

    /// Rotates `x` `[B, H, S, D]`: each pair `(a, b)` of the last dimension becomes
    /// `(a·cos − b·sin, b·cos + a·sin)`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape()?;
        let pairs: Vec<i64> = [&s[..3], &[s[3] / 2, 2]]
            .concat()
            .iter()
            .map(|&v| v as i64)
            .collect();
        let p = x.reshape(&pairs)?;
        let (real, imag) = (p.narrow(4, 0, 1)?, p.narrow(4, 1, 1)?);
        let full: Vec<i64> = s.iter().map(|&v| v as i64).collect();
        let rotated = Tensor::cat(&[&imag.neg()?, &real], 4)?.reshape(&full)?;
        x.mul(&self.cos)?.add(&rotated.mul(&self.sin)?)
    }
}
