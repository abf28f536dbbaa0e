//! A batch's loss: the mix of MSE, MAE, log-cosh and Huber, masked areas, per-timestep and
//! per-concept weights.

use ferrite_plugin_api::Tensor;

use super::batch::Forward;
use super::encode::Batch;
use super::{Result, Trainer, err};
use crate::train::loss::{huber, log_cosh};

impl Trainer {
    /// The loss of a forward pass, divided by the accumulation steps and times `loss_scaler`'s
    /// number.
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
                let f = self.info.vae_scale_factor as i64;
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
                .levels
                .iter()
                .zip(weights)
                .map(|(&level, &cw)| (self.noising.loss_weight(c, level) * cw) as f32)
                .collect();
            let scale = c.loss_scaler.scale(
                c.batch_size,
                c.gradient_accumulation_steps,
                self.processes(),
            );
            per.mul(&Tensor::from_f32(&w, &[b])?)?
                .mean_all()?
                .mul_scalar(scale / c.gradient_accumulation_steps as f64)
        })()
        .map_err(err)?;
        Ok(loss)
    }
}
