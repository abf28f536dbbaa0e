//! One batch on the device: images encoded (or read from the latent cache), text states (or read
//! from the text cache), noised to its timesteps, the model's prediction and target, and the loss.

use ferrite_plugin_api::{DType, Generator, Tensor, Weights};

use super::{Result, TrainError, Trainer, err};
use crate::data::loader::{Image, Loaded};
use crate::sample::Prediction;
use crate::train::loss::{huber, log_cosh, loss_weight};

/// A batch on the device, ready for the loss.
pub(super) struct Batch {
    pub bucket: (usize, usize),
    /// The VAE's mean and log-variance, `[B, C, h, w]`.
    pub mean: Tensor,
    pub logvar: Tensor,
    /// `[H, W]` per image, concatenated.
    pub masks: Vec<f32>,
    /// Text-encoder states, `[B, tokens, width]`.
    pub text: Tensor,
    pub weights: Vec<f64>,
    /// Per image: a prior concept's, whose target is the model's prediction without adapters.
    pub prior: Vec<bool>,
}

impl Trainer {
    /// Text-encoder states for `prompts`, `[B, tokens, width]`; from the text cache when it is
    /// on (prompts not in it are encoded together and written).
    pub(super) fn text_states(&self, prompts: &[String]) -> Result<Tensor> {
        let encode = |ps: &[&str]| -> Result<Tensor> {
            let mut out = self.arch.encode_text(ps).map_err(err)?;
            if out.is_empty() {
                return Err(TrainError(
                    "the model's encode_text returned nothing".into(),
                ));
            }
            Ok(out.swap_remove(0))
        };
        if !self.text_cached {
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            return encode(&refs);
        }
        let mut states: Vec<Option<Tensor>> = Vec::new();
        let mut missing = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let entry = self.caches.text_entry(p);
            let hit = Weights::open(&entry.to_string_lossy())
                .and_then(|w| w.get("states", DType::F32))
                .ok();
            if hit.is_none() {
                missing.push((i, entry));
            }
            states.push(hit);
        }
        if !missing.is_empty() {
            let refs: Vec<&str> = missing.iter().map(|(i, _)| prompts[*i].as_str()).collect();
            let encoded = encode(&refs)?.detach().map_err(err)?;
            for (k, (i, entry)) in missing.iter().enumerate() {
                let one = encoded.narrow(0, k, 1).map_err(err)?;
                std::fs::create_dir_all(entry.parent().expect("cache folder")).map_err(err)?;
                ferrite_plugin_api::save_safetensors(
                    &entry.to_string_lossy(),
                    &[("states", &one)],
                    &[],
                )
                .map_err(|e| TrainError(format!("text cache {}: {e}", entry.display())))?;
                self.caches
                    .texts_encoded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                states[*i] = Some(one);
            }
        }
        let states: Vec<Tensor> = states.into_iter().flatten().collect();
        Tensor::cat(&states.iter().collect::<Vec<_>>(), 0).map_err(err)
    }

    /// A loaded batch on the device: images encoded (cache misses are encoded and written
    /// now) and text states.
    pub(super) fn to_device(&self, loaded: &Loaded) -> Result<Batch> {
        let (w, h) = loaded.bucket;
        let mut pixels = Vec::new();
        let mut encoded = Vec::new();
        for image in &loaded.images {
            match image {
                Image::Pixels(p) => pixels.extend_from_slice(p),
                Image::Cached {
                    shape,
                    mean,
                    logvar,
                } => encoded.push((
                    Tensor::from_f32(mean, shape).map_err(err)?,
                    Tensor::from_f32(logvar, shape).map_err(err)?,
                )),
                Image::Miss {
                    pixels,
                    mask,
                    entry,
                } => {
                    // Loaded ahead: an earlier batch may have written the entry since.
                    let written = Weights::open(&entry.to_string_lossy()).and_then(|f| {
                        Ok((f.get("mean", DType::F32)?, f.get("logvar", DType::F32)?))
                    });
                    if let Ok(pair) = written {
                        encoded.push(pair);
                        continue;
                    }
                    let images = Tensor::from_f32(pixels, &[1, 3, h, w]).map_err(err)?;
                    let (mean, logvar) = self.arch.vae_encode(&images).map_err(err)?;
                    let (mean, logvar) =
                        (mean.detach().map_err(err)?, logvar.detach().map_err(err)?);
                    let mask = Tensor::from_f32(mask, &[h, w]).map_err(err)?;
                    std::fs::create_dir_all(entry.parent().expect("cache folder")).map_err(err)?;
                    ferrite_plugin_api::save_safetensors(
                        &entry.to_string_lossy(),
                        &[("mean", &mean), ("logvar", &logvar), ("mask", &mask)],
                        &[],
                    )
                    .map_err(|e| TrainError(format!("latent cache {}: {e}", entry.display())))?;
                    self.caches
                        .latents_encoded
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    encoded.push((mean, logvar));
                }
            }
        }
        let b = loaded.prompts.len();
        let (mean, logvar) = if encoded.is_empty() {
            let images = Tensor::from_f32(&pixels, &[b, 3, h, w]).map_err(err)?;
            self.arch.vae_encode(&images).map_err(err)?
        } else {
            let cat = |f: fn(&(Tensor, Tensor)) -> &Tensor| {
                Tensor::cat(&encoded.iter().map(f).collect::<Vec<_>>(), 0).map_err(err)
            };
            (cat(|e| &e.0)?, cat(|e| &e.1)?)
        };
        Ok(Batch {
            bucket: loaded.bucket,
            mean,
            logvar,
            masks: loaded.masks.clone(),
            text: self.text_states(&loaded.prompts)?,
            weights: loaded.weights.clone(),
            prior: loaded.prior.clone(),
        })
    }

    /// A loaded batch on the device, its loss (divided by the accumulation steps) and its
    /// forward pass.
    pub(super) fn batch_loss(&self, loaded: &Loaded) -> Result<(Batch, Tensor, Forward)> {
        let batch = self.to_device(loaded)?;
        let noise = Generator::new(loaded.noise_seed).map_err(err)?;
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

    /// Noises the batch to `timesteps` with noise from `noise_rng` and runs the model: its
    /// prediction, and the target (a prior image's is the model's prediction without adapters).
    pub(super) fn forward(
        &self,
        batch: &Batch,
        timesteps: &[usize],
        noise_rng: &Generator,
    ) -> Result<Forward> {
        let c = &self.config;
        let Batch {
            mean,
            logvar,
            text,
            prior,
            ..
        } = batch;
        let b = prior.len();
        let scaling = self.info["scaling_factor"].as_f64().unwrap_or(1.0);
        let shift = self.info["shift_factor"].as_f64().unwrap_or(0.0);
        (|| {
            let shape = mean.shape()?;
            let latents = mean
                .add(
                    &logvar
                        .mul_scalar(0.5)?
                        .exp()?
                        .mul(&Tensor::randn(&shape, noise_rng)?)?,
                )?
                .sub_scalar(shift)?
                .mul_scalar(scaling)?
                .detach()?;
            let mut noise = Tensor::randn(&shape, noise_rng)?;
            if c.offset_noise_weight > 0.0 {
                let offset = Tensor::randn(&[b, shape[1], 1, 1], noise_rng)?
                    .mul_scalar(c.offset_noise_weight)?;
                noise = noise.add(&offset)?;
            }
            let acp: Vec<f64> = timesteps
                .iter()
                .map(|&t| self.schedule.alphas_cumprod[t] as f64)
                .collect();
            let column = |v: Vec<f32>| Tensor::from_f32(&v, &[b, 1, 1, 1]);
            let a = column(acp.iter().map(|x| x.sqrt() as f32).collect())?;
            let s = column(acp.iter().map(|x| (1.0 - x).sqrt() as f32).collect())?;
            let tt = Tensor::from_f32(
                &timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
                &[b],
            )?;
            // Input perturbation (Ning et al.): the model sees extra noise it is not asked to
            // predict.
            let noisy = if c.perturbation_noise_weight > 0.0 {
                let extra =
                    Tensor::randn(&shape, noise_rng)?.mul_scalar(c.perturbation_noise_weight)?;
                latents.mul(&a)?.add(&noise.add(&extra)?.mul(&s)?)?
            } else {
                latents.mul(&a)?.add(&noise.mul(&s)?)?
            };
            let pred = self.arch.denoise(&noisy, &tt, &[text])?;
            let mut target = match self.schedule.prediction {
                Prediction::Epsilon => noise.clone(),
                Prediction::VPrediction => noise.mul(&a)?.sub(&latents.mul(&s)?)?,
            };
            if prior.iter().any(|&p| p) {
                // Prior images learn to predict what the model predicts without its adapter.
                let base = self
                    .model
                    .without_adapters(|| self.arch.denoise(&noisy, &tt, &[text]))?
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
                acp,
            })
        })()
        .map_err(err)
    }

    /// The loss of a forward pass, divided by the accumulation steps.
    pub(super) fn loss(&self, batch: &Batch, f: &Forward) -> Result<Tensor> {
        let c = &self.config;
        let Batch {
            bucket: (w, h),
            masks,
            weights,
            ..
        } = batch;
        let (w, h) = (*w, *h);
        let b = weights.len();
        let loss = (|| {
            let mut diff = f.pred.sub(&f.target)?;
            let mut area = None;
            if c.masked_training {
                // The mask at latent size (mean over each f×f patch), as a loss weight between
                // unmasked_weight and 1.
                let f = self.info["vae_scale_factor"].as_u64().unwrap_or(1) as i64;
                let (lh, lw) = (h as i64 / f, w as i64 / f);
                let m = Tensor::from_f32(masks, &[b, 1, h, w])?
                    .reshape(&[b as i64, 1, lh, f, lw, f])?
                    .mean(&[3, 5], false)?;
                let weight = m
                    .mul_scalar(1.0 - c.unmasked_weight)?
                    .add_scalar(c.unmasked_weight)?;
                // The square root, so the squared error is weighted by the mask itself.
                diff = diff.mul(&weight.sqrt()?)?;
                area = Some(m.mean(&[1, 2, 3], false)?.clamp(Some(1e-6), None)?);
            }
            let mut per = diff
                .powf(2.0)?
                .mean(&[1, 2, 3], false)?
                .mul_scalar(c.mse_strength)?;
            if let (Some(a), true) = (&area, c.normalize_masked_area_loss) {
                per = per.div(a)?;
            }
            if c.mae_strength > 0.0 {
                per = per.add(
                    &diff
                        .abs()?
                        .mean(&[1, 2, 3], false)?
                        .mul_scalar(c.mae_strength)?,
                )?;
            }
            if c.log_cosh_strength > 0.0 {
                per = per.add(
                    &log_cosh(&diff)?
                        .mean(&[1, 2, 3], false)?
                        .mul_scalar(c.log_cosh_strength)?,
                )?;
            }
            if c.huber_strength > 0.0 {
                per = per.add(
                    &huber(&diff, c.huber_delta)?
                        .mean(&[1, 2, 3], false)?
                        .mul_scalar(c.huber_strength)?,
                )?;
            }
            // Timestep loss weights, and the concepts' loss weights.
            let w: Vec<f32> = f
                .acp
                .iter()
                .zip(weights)
                .map(|(&x, &cw)| {
                    let lw = loss_weight(
                        c.loss_weight_fn,
                        c.loss_weight_strength,
                        x / (1.0 - x),
                        self.schedule.prediction,
                    );
                    (lw * cw) as f32
                })
                .collect();
            per.mul(&Tensor::from_f32(&w, &[b])?)?
                .mean_all()?
                .div_scalar(c.gradient_accumulation_steps as f64)
        })()
        .map_err(err)?;
        Ok(loss)
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
    /// sqrt(ᾱ) and sqrt(1 − ᾱ) per image, `[B, 1, 1, 1]`.
    pub a: Tensor,
    pub s: Tensor,
    /// ᾱ per image.
    pub acp: Vec<f64>,
}

impl Forward {
    /// The clean latents that `x` (a prediction or target) implies for the noisy input.
    pub fn x0(&self, x: &Tensor, prediction: Prediction) -> ferrite_plugin_api::Result<Tensor> {
        match prediction {
            Prediction::Epsilon => self.noisy.sub(&x.mul(&self.s)?)?.div(&self.a),
            Prediction::VPrediction => self.noisy.mul(&self.a)?.sub(&x.mul(&self.s)?),
        }
    }
}
