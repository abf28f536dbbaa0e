//! One batch's forward pass: on the device, noised to its timesteps, the model's prediction and
//! its target (a prior image's is the model's own prediction without adapters).

use ferrite_plugin_api::{Generator, Tensor};

use super::encode::Batch;
use super::noising::{Level, Noising};
use super::{Result, TrainError, Trainer, err};
use crate::data::loader::Loaded;

impl Trainer {
    /// A loaded batch on the device, its loss (divided by the accumulation steps) and its
    /// forward pass.
    pub(super) fn batch_loss(&self, loaded: &Loaded) -> Result<(Batch, Tensor, Forward)> {
        let batch = self.to_device(loaded)?;
        let noise = Noise::new(loaded.noise_seed, loaded.rows)?;
        let f = self.forward(&batch, &loaded.timesteps, &noise)?;
        let loss = self.loss(&batch, &f)?;
        Ok((batch, loss, f))
    }

    /// Batch `index` of `epoch` as the trainer sees it (for tests): what the loader made, its
    /// loss (not divided by accumulation) and the model's prediction.
    pub fn probe(&self, epoch: u64, index: usize) -> Result<Probe> {
        let _scope = self.scope.enter();
        let plan = crate::data::plan_epoch(&self.data, &self.config, &self.buckets, epoch);
        let p = plan
            .get(index)
            .ok_or_else(|| TrainError(format!("epoch {epoch} has no batch {index}")))?;
        let loaded = self
            .loader_context()
            .load(p, index as u64)
            .map_err(TrainError)?;
        let (_, loss, f) = self.batch_loss(&loaded)?;
        let loss = loss.item().map_err(err)? * self.config.gradient_accumulation_steps as f32;
        Ok(Probe {
            items: p.items.clone(),
            loaded,
            loss,
            prediction: f.pred,
        })
    }

    /// Noises the batch to `timesteps` with `noise` and runs the model: its prediction, and the
    /// target (a prior image's is the model's prediction without adapters).
    pub(super) fn forward(
        &self,
        batch: &Batch,
        timesteps: &[usize],
        noise: &Noise,
    ) -> Result<Forward> {
        let c = &self.config;
        let Batch {
            mean,
            logvar,
            prior,
            ..
        } = batch;
        let cond = batch.cond();
        let b = prior.len();
        let scaling = self.info.scaling_factor;
        let shift = self.info.shift_factor.unwrap_or(0.0);
        (|| {
            let shape = mean.shape()?;
            let latents = mean
                .add(&logvar.mul_scalar(0.5)?.exp()?.mul(&noise.randn(&shape)?)?)?
                .sub_scalar(shift)?
                .mul_scalar(scaling)?
                .detach()?;
            let mut noise_draw = noise.randn(&shape)?;
            if c.offset_noise_weight > 0.0 {
                let offset = noise
                    .randn(&[b, shape[1], 1, 1])?
                    .mul_scalar(c.offset_noise_weight)?;
                noise_draw = noise_draw.add(&offset)?;
            }
            let levels: Vec<Level> = timesteps.iter().map(|&t| self.noising.level(t)).collect();
            let column = |f: fn(&Level) -> f64| {
                let v: Vec<f32> = levels.iter().map(|l| f(l) as f32).collect();
                Tensor::from_f32(&v, &[b, 1, 1, 1])
            };
            let (a, s) = (column(|l| l.a)?, column(|l| l.s)?);
            let tt = Tensor::from_f32(
                &levels.iter().map(|l| l.timestep as f32).collect::<Vec<_>>(),
                &[b],
            )?;
            // Input perturbation (Ning et al.): the model sees extra noise it is not asked to
            // predict.
            let noisy = if c.perturbation_noise_weight > 0.0 {
                let extra = noise
                    .randn(&shape)?
                    .mul_scalar(c.perturbation_noise_weight)?;
                latents.mul(&a)?.add(&noise_draw.add(&extra)?.mul(&s)?)?
            } else {
                latents.mul(&a)?.add(&noise_draw.mul(&s)?)?
            };
            let pred = self.in_train_dtype(|| self.arch.denoise(&noisy, &tt, &cond))?;
            let mut target = self.noising.target(&latents, &noise_draw, &a, &s)?;
            if prior.iter().any(|&p| p) {
                // Prior images learn to predict what the model predicts without its adapter.
                let base = self
                    .model
                    .without_adapters(|| {
                        self.in_train_dtype(|| self.arch.denoise(&noisy, &tt, &cond))
                    })?
                    .detach()?;
                let m = Tensor::from_f32(
                    &prior
                        .iter()
                        .map(|&p| if p { 1.0 } else { 0.0 })
                        .collect::<Vec<f32>>(),
                    &[b, 1, 1, 1],
                )?;
                target = base
                    .mul(&m)?
                    .add(&target.mul(&m.neg()?.add_scalar(1.0)?)?)?;
            }
            Ok::<_, ferrite_plugin_api::Error>(Forward {
                noisy,
                pred,
                target,
                a,
                s,
                levels,
            })
        })()
        .map_err(err)
    }
}

/// A batch's noise, drawn for the whole batch it is a share of (`rows`: its first row there and
/// that batch's rows) and cut to its rows: a data-parallel process draws what one process
/// training the whole batch would.
pub(super) struct Noise {
    rng: Generator,
    rows: (usize, usize),
}

impl Noise {
    pub(super) fn new(seed: u64, rows: (usize, usize)) -> Result<Self> {
        Ok(Self {
            rng: Generator::new(seed).map_err(err)?,
            rows,
        })
    }

    fn randn(&self, shape: &[usize]) -> ferrite_plugin_api::Result<Tensor> {
        let (first, total) = self.rows;
        if first == 0 && shape.first() == Some(&total) {
            return Tensor::randn(shape, &self.rng);
        }
        let mut whole = shape.to_vec();
        whole[0] = total;
        Tensor::randn(&whole, &self.rng)?.narrow(0, first, shape[0])
    }
}

/// A batch as the trainer sees it: see [`Trainer::probe`].
pub struct Probe {
    /// The dataset items in the batch.
    pub items: Vec<usize>,
    pub loaded: Loaded,
    pub loss: f32,
    pub prediction: Tensor,
}

/// One forward pass over a batch.
pub(super) struct Forward {
    /// The model's input.
    pub noisy: Tensor,
    pub pred: Tensor,
    pub target: Tensor,
    /// The noising coefficients per image, `[B, 1, 1, 1]`: the input is `a·x + s·ε`.
    pub a: Tensor,
    pub s: Tensor,
    pub levels: Vec<Level>,
}

impl Forward {
    /// The clean latents that `x` (a prediction or target) implies for the noisy input.
    pub fn x0(&self, x: &Tensor, noising: &Noising) -> ferrite_plugin_api::Result<Tensor> {
        noising.x0(&self.noisy, x, &self.a, &self.s)
    }
}
