//! Rectified-flow sampling (Flux): the sigmas of diffusers' `FlowMatchEulerDiscreteScheduler`
//! for a step count and image size, and its Euler update.

use ferrite_plugin_api::{Error, Result};
use serde::Deserialize;

/// The fields of a `FlowMatchEulerDiscreteScheduler` config; settings whose other values this
/// sampler does not implement are read to refuse them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "base_shift")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
    #[serde(default = "exponential")]
    pub time_shift_type: String,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
}

fn thousand() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}
fn base_shift() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

impl FlowMatchConfig {
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: Self = serde_json::from_value(v.clone())
            .map_err(|e| Error(format!("the model's flow-matching scheduler config: {e}")))?;
        let unsupported = [
            (
                c.time_shift_type != "exponential",
                "time_shift_type other than exponential",
            ),
            (c.shift_terminal.is_some(), "shift_terminal"),
            (c.invert_sigmas, "invert_sigmas"),
            (c.stochastic_sampling, "stochastic_sampling"),
            (
                c.use_karras_sigmas || c.use_exponential_sigmas || c.use_beta_sigmas,
                "Karras, exponential or beta sigmas",
            ),
        ];
        if c.use_dynamic_shifting && c.max_image_seq_len == c.base_image_seq_len {
            return Err(Error::msg(
                "the model's flow-matching scheduler has max_image_seq_len equal to \
                 base_image_seq_len: dynamic shifting needs two lengths",
            ));
        }
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(Error(format!(
                "the model's flow-matching scheduler asks for {what}, which Ferrite's sampler \
                 does not implement"
            )));
        }
        Ok(c)
    }

    /// diffusers' `calculate_shift`: the log-shift for `image_seq_len` tokens, linear between
    /// (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let slope = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        self.base_shift + slope * (image_seq_len as f64 - self.base_image_seq_len as f64)
    }

    /// σ shifted towards noise: by `e^mu` with dynamic shifting, else by `shift`.
    pub fn shifted(&self, sigma: f64, image_seq_len: usize) -> f64 {
        let s = if self.use_dynamic_shifting {
            self.mu(image_seq_len).exp()
        } else {
            self.shift
        };
        s * sigma / (1.0 + (s - 1.0) * sigma)
    }

    /// The `steps + 1` sigmas of a run from pure noise (σ = 1) to 0: Flux's pipelines start
    /// from `linspace(1, 1/steps, steps)`, shift them, and end at 0.
    pub fn sigmas(&self, steps: usize, image_seq_len: usize) -> Result<Vec<f64>> {
        if steps == 0 {
            return Err(Error::msg("sampling needs at least one step"));
        }
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let lin = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                };
                // diffusers keeps them as f32.
                self.shifted(lin as f32 as f64, image_seq_len) as f32 as f64
            })
            .collect();
        sigmas.push(0.0);
        Ok(sigmas)
    }
}

#[cfg(test)]
mod tests {
    use super::FlowMatchConfig;

    /// diffusers' FlowMatchEulerDiscreteScheduler (Flux.1-dev's config) after
    /// `set_timesteps(sigmas=linspace(1, 1/4, 4), mu=calculate_shift(1024))`:
    /// sigmas printed by diffusers 0.42.
    #[test]
    fn sigmas_match_diffusers_dynamic_shifting() {
        let c = FlowMatchConfig::from_json(&serde_json::json!({
            "shift": 3.0, "use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096
        }))
        .unwrap();
        let s = c.sigmas(4, 1024).unwrap();
        let want = [1.0, 0.849_234_8, 0.652_489_4, 0.384_944_7, 0.0];
        for (g, w) in s.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{s:?}");
        }
        let fixed = FlowMatchConfig::from_json(&serde_json::json!({"shift": 3.0})).unwrap();
        // diffusers with shift 3 and linspace(1, 1/2, 2): [1.0, 0.75, 0.0].
        assert_eq!(fixed.sigmas(2, 1).unwrap(), [1.0, 0.75, 0.0]);
        let e = FlowMatchConfig::from_json(&serde_json::json!({"invert_sigmas": true}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invert_sigmas"), "{e}");
    }
}
