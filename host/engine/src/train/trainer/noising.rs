//! How a clean latent is noised for training and what the denoiser learns to predict: DDPM's
//! (ᾱ from the model's diffusers schedule; ε or v) or rectified flow's (as OneTrainer's Flux
//! setup: drawn index i is σ = (i + 1) / T, the model is given i and predicts the velocity
//! ε − x).

use ferrite_plugin_api::{Result, Tensor, family::Objective};

use super::{TrainError, err};
use crate::config::{LossWeightFn, TrainConfig};
use crate::sample::flow::FlowMatchConfig;
use crate::sample::{NoiseSchedule, Prediction, SchedulerConfig};
use crate::train::loss::loss_weight;
use crate::train::timesteps::Timesteps;

pub(super) enum Noising {
    Ddpm(NoiseSchedule),
    Flow(FlowMatchConfig),
}

/// One image's noising: its input is `a·x + s·ε`, the model is given `timestep`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Level {
    pub a: f64,
    pub s: f64,
    pub timestep: f64,
}

impl Noising {
    pub fn new(objective: &Objective, c: &TrainConfig) -> super::Result<Self> {
        match objective {
            Objective::Ddpm { scheduler } => {
                let mut config =
                    SchedulerConfig::from_json(&scheduler.to_string(), "the model's scheduler")
                        .map_err(err)?;
                if let Some(p) = c.forced_prediction() {
                    config.prediction_type = p.into();
                }
                Ok(Self::Ddpm(NoiseSchedule::new(config).map_err(err)?))
            }
            Objective::FlowMatch { scheduler } => {
                if c.forced_prediction().is_some() {
                    return Err(TrainError(
                        "force_v_prediction / force_epsilon_prediction: a flow-matching model \
                         predicts the velocity; turn them off"
                            .into(),
                    ));
                }
                if c.loss_weight_fn != LossWeightFn::Constant {
                    return Err(TrainError(format!(
                        "loss_weight_fn {}: SNR weights are for DDPM models; use constant for \
                         a flow-matching model",
                        c.loss_weight_fn.as_ref()
                    )));
                }
                let config = FlowMatchConfig::from_json(scheduler).map_err(err)?;
                if config.num_train_timesteps == 0 {
                    return Err(TrainError(
                        "the model's scheduler has num_train_timesteps 0".into(),
                    ));
                }
                Ok(Self::Flow(config))
            }
        }
    }

    /// The number of timesteps training draws from.
    pub fn timesteps(&self) -> usize {
        match self {
            Self::Ddpm(s) => s.alphas_cumprod.len(),
            Self::Flow(f) => f.num_train_timesteps,
        }
    }

    /// How training draws timesteps: `timestep_shift`, or with `dynamic_timestep_shifting` (a
    /// flow-matching model's) the shift its scheduler gives an image's token count,
    /// `(W / step) · (H / step)` for the model's resolution step (OneTrainer's
    /// `calculate_timestep_shift`).
    pub fn draws(&self, c: &TrainConfig, step: usize) -> super::Result<Timesteps> {
        let t = Timesteps::new(c, self.timesteps());
        match (self, c.dynamic_timestep_shifting) {
            (_, false) => Ok(t),
            (Self::Flow(f), true) if f.max_image_seq_len == f.base_image_seq_len => {
                Err(TrainError(
                    "dynamic_timestep_shifting: the model's scheduler has max_image_seq_len equal \
                     to base_image_seq_len, so no shift follows from the image size"
                        .into(),
                ))
            }
            (Self::Flow(f), true) => {
                let (f, step) = (f.clone(), step.max(1));
                Ok(t.with_dynamic_shift(move |(w, h)| f.mu((w / step) * (h / step)).exp()))
            }
            (Self::Ddpm(_), true) => Err(TrainError(
                "dynamic_timestep_shifting: only flow-matching models (Flux) shift by image \
                 size; use timestep_shift"
                    .into(),
            )),
        }
    }

    /// The noising of drawn index `t`.
    pub fn level(&self, t: usize) -> Level {
        match self {
            Self::Ddpm(schedule) => {
                let acp = schedule.alphas_cumprod[t] as f64;
                Level {
                    a: acp.sqrt(),
                    s: (1.0 - acp).sqrt(),
                    timestep: t as f64,
                }
            }
            Self::Flow(f) => {
                let sigma = (t + 1) as f64 / f.num_train_timesteps as f64;
                Level {
                    a: 1.0 - sigma,
                    s: sigma,
                    timestep: t as f64,
                }
            }
        }
    }

    /// What the model learns to predict for clean `latents` noised with `noise` by `a`, `s`
    /// (`[B, 1, 1, 1]`).
    pub fn target(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        a: &Tensor,
        s: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Self::Ddpm(schedule) => match schedule.prediction {
                Prediction::Epsilon => Ok(noise.clone()),
                Prediction::VPrediction => noise.mul(a)?.sub(&latents.mul(s)?),
            },
            Self::Flow(_) => noise.sub(latents),
        }
    }

    /// The clean latents a prediction (or target) `x` implies for the input `noisy`.
    pub fn x0(&self, noisy: &Tensor, x: &Tensor, a: &Tensor, s: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ddpm(schedule) => match schedule.prediction {
                Prediction::Epsilon => noisy.sub(&x.mul(s)?)?.div(a),
                Prediction::VPrediction => noisy.mul(a)?.sub(&x.mul(s)?),
            },
            Self::Flow(_) => noisy.sub(&x.mul(s)?),
        }
    }

    /// The timestep loss weight of an image noised to `level` (flow-matching models take the
    /// constant weight, checked in [`Noising::new`]).
    pub fn loss_weight(&self, c: &TrainConfig, level: Level) -> f64 {
        match self {
            Self::Ddpm(schedule) => {
                let snr = level.a * level.a / (level.s * level.s);
                loss_weight(
                    c.loss_weight_fn,
                    c.loss_weight_strength,
                    snr,
                    schedule.prediction,
                )
            }
            Self::Flow(_) => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_f32(v, &[v.len(), 1, 1, 1]).unwrap()
    }

    /// Flow: index i noises to σ = (i+1)/T, the model is told i; the target is ε − x, and the
    /// clean latents come back from the target and the noisy input.
    #[test]
    fn flow_levels_target_and_clean_latents() {
        crate::runtime::init("cpu").unwrap();
        let flow = Noising::Flow(FlowMatchConfig::from_json(&serde_json::json!({})).unwrap());
        let l = flow.level(249);
        assert_eq!((l.a, l.s, l.timestep), (0.75, 0.25, 249.0));
        assert_eq!(flow.level(999).s, 1.0);
        let (x, e) = (t(&[1.0, -2.0]), t(&[0.5, 0.5]));
        let (a, s) = (t(&[0.75, 0.75]), t(&[0.25, 0.25]));
        let target = flow.target(&x, &e, &a, &s).unwrap();
        assert_eq!(target.to_vec().unwrap(), [-0.5, 2.5]);
        let noisy = x.mul(&a).unwrap().add(&e.mul(&s).unwrap()).unwrap();
        let back = flow.x0(&noisy, &target, &a, &s).unwrap();
        assert_eq!(back.to_vec().unwrap(), x.to_vec().unwrap());
        assert_eq!(flow.loss_weight(&TrainConfig::default(), l), 1.0);
    }
}

#[cfg(test)]
mod shift_tests {
    use super::*;

    /// Dynamic shifting: a bigger image draws noisier timesteps (its shift, e^mu, is larger);
    /// DDPM models refuse it.
    #[test]
    fn dynamic_shifting_follows_the_image_size() {
        let flow = Noising::Flow(
            FlowMatchConfig::from_json(&serde_json::json!({"use_dynamic_shifting": true})).unwrap(),
        );
        let c = TrainConfig {
            dynamic_timestep_shifting: true,
            ..TrainConfig::default()
        };
        let t = flow.draws(&c, 16).unwrap();
        let mean = |size| {
            let mut r = crate::data::rng(0, 0, 0);
            (0..4000)
                .map(|_| t.draw_for(&mut r, size) as f64)
                .sum::<f64>()
                / 4000.0
        };
        let (small, big) = (mean((256, 256)), mean((1024, 1024)));
        assert!(big > small + 50.0, "{small} {big}");
        let fixed = flow.draws(&TrainConfig::default(), 16).unwrap();
        let mut r = crate::data::rng(0, 0, 0);
        let plain: f64 = (0..4000)
            .map(|_| fixed.draw_for(&mut r, (1024, 1024)) as f64)
            .sum();
        assert!((plain / 4000.0 - 500.0).abs() < 20.0, "{plain}");
    }
}
