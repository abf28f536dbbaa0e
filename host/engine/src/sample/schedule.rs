//! Noise schedules read from a diffusers `scheduler_config.json`, and the deterministic DDIM and
//! Euler samplers with diffusers' timestep spacings and update rules.

use ferrite_plugin_api::{Error, Generator, Result, Tensor};
use serde::Deserialize;

/// The fields of a diffusers scheduler config this module uses; every one is read, none assumed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// diffusers' default differs by scheduler class (DDIM: leading, Euler: linspace).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// DDIM clips its predicted clean sample to ±`clip_sample_range`: on unless the config says
    /// otherwise, as DDIMScheduler's default (a config written for another scheduler, as
    /// diffusers' EulerDiscreteScheduler saves one, may not say).
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
}

fn one() -> f64 {
    1.0
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn yes() -> bool {
    true
}
fn epsilon() -> String {
    "epsilon".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// Samplers, named in configs as OneTrainer names them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    strum::VariantArray,
    strum::AsRefStr,
    strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Sampler {
    /// DDIM with eta 0.
    Ddim,
    /// Euler (EulerDiscreteScheduler without churn).
    Euler,
    /// Euler ancestral (EulerAncestralDiscreteScheduler): fresh noise each step.
    #[serde(rename = "euler_a")]
    #[strum(serialize = "euler_a")]
    EulerAncestral,
    /// DPM++ 2M with Karras sigmas (DPMSolverMultistepScheduler, dpmsolver++, order 2).
    #[serde(rename = "dpmpp_2m_karras")]
    #[strum(serialize = "dpmpp_2m_karras")]
    DpmPp2mKarras,
}

impl SchedulerConfig {
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error(format!("{source}: not a scheduler config: {e}")))
    }
}

/// Betas and cumulative alphas of the training schedule.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub config: SchedulerConfig,
    pub prediction: Prediction,
    /// ᾱ_t for t in 0..num_train_timesteps, computed in f32 as diffusers does.
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(Error(format!("num_train_timesteps {n} is too small")));
        }
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
                .collect()
        };
        let betas: Vec<f64> = match config.beta_schedule.as_str() {
            "linear" => lin(config.beta_start, config.beta_end),
            "scaled_linear" => lin(config.beta_start.sqrt(), config.beta_end.sqrt())
                .iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => {
                let f = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                    })
                    .collect()
            }
            other => {
                return Err(Error(format!(
                    "beta_schedule `{other}` is not supported (linear, scaled_linear, squaredcos_cap_v2)"
                )));
            }
        };
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => {
                return Err(Error(format!(
                    "prediction_type `{other}` is not supported (epsilon, v_prediction)"
                )));
            }
        };
        let mut acp = Vec::with_capacity(n);
        let mut prod = 1.0f32;
        for b in &betas {
            prod *= 1.0 - *b as f32;
            acp.push(prod);
        }
        if config.rescale_betas_zero_snr {
            acp = zero_terminal_snr(&acp);
        }
        Ok(Self {
            config,
            prediction,
            alphas_cumprod: acp,
        })
    }

    fn spacing(&self, sampler: Sampler) -> &str {
        self.config
            .timestep_spacing
            .as_deref()
            .unwrap_or(match sampler {
                Sampler::Ddim => "leading",
                _ => "linspace",
            })
    }

    /// The timesteps a sampler visits, highest first (fractional for Euler's linspace).
    pub fn timesteps(&self, sampler: Sampler, steps: usize) -> Result<Vec<f64>> {
        let t = self.config.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error(format!("steps must be in 1..={t}, got {steps}")));
        }
        let ts: Vec<f64> = match self.spacing(sampler) {
            "leading" => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| (t as f64 - i as f64 * ratio).round() - 1.0)
                    .collect()
            }
            "linspace" => {
                let lin = (0..steps)
                    .rev()
                    .map(|i| (t - 1) as f64 * i as f64 / (steps - 1).max(1) as f64);
                // DDIM rounds to integer steps; Euler keeps them fractional.
                if sampler == Sampler::Ddim {
                    lin.map(f64::round).collect()
                } else {
                    lin.map(|x| x as f32 as f64).collect()
                }
            }
            other => {
                return Err(Error(format!(
                    "timestep_spacing `{other}` is not supported (leading, trailing, linspace)"
                )));
            }
        };
        Ok(ts)
    }

    fn full_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a as f64) / a as f64).sqrt())
            .collect()
    }

    /// Karras et al.'s schedule (rho 7) between the training schedule's extreme sigmas, and the
    /// (rounded) timesteps those sigmas correspond to, as diffusers' `use_karras_sigmas`.
    fn karras(&self, steps: usize) -> (Vec<f64>, Vec<f64>) {
        let full = self.full_sigmas();
        let (min, max) = (full[0], full[full.len() - 1]);
        let rho = 7.0;
        let (lo, hi) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
        let sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let ramp = if steps == 1 {
                    0.0
                } else {
                    i as f64 / (steps - 1) as f64
                };
                (hi + ramp * (lo - hi)).powf(rho)
            })
            .collect();
        let logs: Vec<f64> = full.iter().map(|s| s.ln()).collect();
        let timesteps = sigmas
            .iter()
            .map(|s| {
                let ls = s.max(1e-10).ln();
                let low = logs
                    .iter()
                    .rposition(|&l| l <= ls)
                    .unwrap_or(0)
                    .min(logs.len() - 2);
                let w = ((logs[low] - ls) / (logs[low] - logs[low + 1])).clamp(0.0, 1.0);
                ((1.0 - w) * low as f64 + w * (low + 1) as f64).round()
            })
            .collect();
        (sigmas, timesteps)
    }

    fn sigma_at(&self, t: f64) -> f64 {
        // Linear interpolation of sigma over integer timesteps (np.interp).
        let sig = |i: usize| {
            let a = self.alphas_cumprod[i] as f64;
            ((1.0 - a) / a).sqrt()
        };
        let lo = (t.floor() as usize).min(self.alphas_cumprod.len() - 1);
        let hi = (lo + 1).min(self.alphas_cumprod.len() - 1);
        let f = t - lo as f64;
        sig(lo) * (1.0 - f) + sig(hi) * f
    }
}

/// Rescales ᾱ so the last step has zero SNR (Lin et al. 2023), as diffusers' `rescale_betas_zero_snr`.
fn zero_terminal_snr(acp: &[f32]) -> Vec<f32> {
    let s: Vec<f64> = acp.iter().map(|&a| (a as f64).sqrt()).collect();
    let (first, last) = (s[0], s[s.len() - 1]);
    let scaled: Vec<f64> = s
        .iter()
        .map(|x| (x - last) * first / (first - last))
        .collect();
    scaled.iter().map(|x| (x * x) as f32).collect()
}

/// One deterministic sampling run: call [`SamplerRun::model_input`] to get what the denoiser
/// sees at each step, then [`SamplerRun::step`] with its prediction.
pub struct SamplerRun<'a> {
    schedule: &'a NoiseSchedule,
    sampler: Sampler,
    pub timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    rng: Option<Generator>,
    /// DPM++ 2M's previous data prediction.
    previous_x0: Option<Tensor>,
}

impl<'a> SamplerRun<'a> {
    /// `rng` supplies the fresh noise of ancestral samplers (unused by the others).
    pub fn new(
        schedule: &'a NoiseSchedule,
        sampler: Sampler,
        steps: usize,
        rng: Option<Generator>,
    ) -> Result<Self> {
        let (timesteps, mut sigmas) = if sampler == Sampler::DpmPp2mKarras {
            if steps == 0 {
                return Err(Error::msg("steps must be at least 1"));
            }
            let (s, t) = schedule.karras(steps);
            (t, s)
        } else {
            let t = schedule.timesteps(sampler, steps)?;
            let s = t.iter().map(|&t| schedule.sigma_at(t)).collect();
            (t, s)
        };
        sigmas.push(0.0);
        if sampler == Sampler::EulerAncestral && rng.is_none() {
            return Err(Error::msg("Euler ancestral needs a random generator"));
        }
        Ok(Self {
            schedule,
            sampler,
            timesteps,
            sigmas,
            steps,
            rng,
            previous_x0: None,
        })
    }

    /// How much to scale unit-variance noise to start from.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.sampler {
            // DPM-Solver works in the variance-preserving parametrisation.
            Sampler::Ddim | Sampler::DpmPp2mKarras => 1.0,
            Sampler::Euler | Sampler::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                match self.schedule.spacing(self.sampler) {
                    "linspace" | "trailing" => max,
                    _ => (max * max + 1.0).sqrt(),
                }
            }
        }
    }

    /// The denoiser's input at step `i` (Euler scales by 1/sqrt(σ²+1)).
    pub fn model_input(&self, i: usize, latents: &Tensor) -> Result<Tensor> {
        match self.sampler {
            Sampler::Ddim | Sampler::DpmPp2mKarras => Ok(latents.clone()),
            Sampler::Euler | Sampler::EulerAncestral => {
                latents.div_scalar((self.sigmas[i].powi(2) + 1.0).sqrt())
            }
        }
    }

    /// The latents after step `i` given the model's prediction there.
    pub fn step(&mut self, i: usize, model_output: &Tensor, latents: &Tensor) -> Result<Tensor> {
        match self.sampler {
            Sampler::Ddim => self.ddim_step(i, model_output, latents),
            Sampler::Euler => self.euler_step(i, model_output, latents, false),
            Sampler::EulerAncestral => self.euler_step(i, model_output, latents, true),
            Sampler::DpmPp2mKarras => self.dpmpp_2m_step(i, model_output, latents),
        }
    }

    /// DPM-Solver++ (2M): data prediction, first order on the first and last steps, second
    /// order (midpoint) in between.
    fn dpmpp_2m_step(&mut self, i: usize, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        // (alpha, sigma) of the variance-preserving form for a Karras sigma.
        let vp = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let (a_s0, s_s0) = vp(self.sigmas[i]);
        let x0 = match self.schedule.prediction {
            Prediction::Epsilon => x.sub(&out.mul_scalar(s_s0)?)?.div_scalar(a_s0)?,
            Prediction::VPrediction => x.mul_scalar(a_s0)?.sub(&out.mul_scalar(s_s0)?)?,
        };
        let next = self.sigmas[i + 1];
        let result = if next == 0.0 {
            // The final step lands on the data prediction.
            x0.clone()
        } else {
            let (a_t, s_t) = vp(next);
            let lambda = |a: f64, s: f64| a.ln() - s.ln();
            let h = lambda(a_t, s_t) - lambda(a_s0, s_s0);
            let coeff = -a_t * ((-h).exp() - 1.0);
            let base = x.mul_scalar(s_t / s_s0)?;
            match &self.previous_x0 {
                Some(m1) if i > 0 => {
                    let (a_s1, s_s1) = vp(self.sigmas[i - 1]);
                    let r0 = (lambda(a_s0, s_s0) - lambda(a_s1, s_s1)) / h;
                    let d1 = x0.sub(m1)?.div_scalar(r0)?;
                    base.add(&x0.mul_scalar(coeff)?)?
                        .add(&d1.mul_scalar(0.5 * coeff)?)?
                }
                _ => base.add(&x0.mul_scalar(coeff)?)?,
            }
        };
        self.previous_x0 = Some(x0);
        Ok(result)
    }

    fn ddim_step(&self, i: usize, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        let acp = &self.schedule.alphas_cumprod;
        let t = self.timesteps[i] as usize;
        let prev = t as i64 - (self.schedule.config.num_train_timesteps / self.steps) as i64;
        let a_t = acp[t] as f64;
        let a_prev = if prev >= 0 {
            acp[prev as usize] as f64
        } else if self.schedule.config.set_alpha_to_one {
            1.0
        } else {
            acp[0] as f64
        };
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (x0, eps) = match self.schedule.prediction {
            Prediction::Epsilon => (x.sub(&out.mul_scalar(sb)?)?.div_scalar(sa)?, out.clone()),
            Prediction::VPrediction => (
                x.mul_scalar(sa)?.sub(&out.mul_scalar(sb)?)?,
                out.mul_scalar(sa)?.add(&x.mul_scalar(sb)?)?,
            ),
        };
        let c = &self.schedule.config;
        let x0 = if c.clip_sample {
            x0.clamp(Some(-c.clip_sample_range), Some(c.clip_sample_range))?
        } else {
            x0
        };
        x0.mul_scalar(a_prev.sqrt())?
            .add(&eps.mul_scalar((1.0 - a_prev).sqrt())?)
    }

    fn euler_step(&self, i: usize, out: &Tensor, x: &Tensor, ancestral: bool) -> Result<Tensor> {
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        // Ancestral: step down to sigma_down, then add fresh noise of sigma_up.
        let (s_down, s_up) = if ancestral {
            let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
            ((s_next * s_next - up * up).sqrt(), up)
        } else {
            (s_next, 0.0)
        };
        let x0 = match self.schedule.prediction {
            Prediction::Epsilon => x.sub(&out.mul_scalar(s)?)?,
            Prediction::VPrediction => {
                let c = s * s + 1.0;
                out.mul_scalar(-s / c.sqrt())?.add(&x.div_scalar(c)?)?
            }
        };
        let derivative = x.sub(&x0)?.div_scalar(s)?;
        let stepped = x.add(&derivative.mul_scalar(s_down - s)?)?;
        match &self.rng {
            Some(rng) if s_up > 0.0 => {
                stepped.add(&Tensor::randn(&x.shape()?, rng)?.mul_scalar(s_up)?)
            }
            _ => Ok(stepped),
        }
    }
}

/// Runs a sampler from `noise` with classifier-free guidance: `denoise` gets the model input for
/// the unconditional and conditional halves stacked on the batch dimension, and the timestep, and
/// returns its prediction for both halves in the same order.
pub fn sample_cfg(
    run: &mut SamplerRun,
    noise: &Tensor,
    guidance_scale: f64,
    mut denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut latents = noise.mul_scalar(run.init_noise_sigma())?;
    for (i, t) in run.timesteps.clone().into_iter().enumerate() {
        let input = run.model_input(i, &latents)?;
        let pred = denoise(&Tensor::cat(&[&input, &input], 0)?, t)?;
        if pred.shape()?
            != input
                .shape()?
                .iter()
                .enumerate()
                .map(|(d, &n)| if d == 0 { 2 * n } else { n })
                .collect::<Vec<_>>()
        {
            return Err(Error(format!(
                "the denoiser returned shape {:?} for a doubled batch of {:?}",
                pred.shape()?,
                input.shape()?
            )));
        }
        let b = input.dim(0)?;
        let (uncond, cond) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
        let guided = uncond.add(&cond.sub(&uncond)?.mul_scalar(guidance_scale)?)?;
        latents = run.step(i, &guided, &latents)?;
    }
    Ok(latents)
}
