//! A loaded batch on the device: images encoded by the VAE or read from the latent cache, the
//! model's text tensors encoded or read from the text cache (misses are encoded and written),
//! and each image's geometry when the model is conditioned on it.

use ferrite_plugin_api::{DType, PartKind, Tensor, Weights};

use super::{Result, TrainError, Trainer, err};
use crate::data::loader::{Image, Loaded};

/// A batch on the device, ready for the loss.
pub(super) struct Batch {
    pub bucket: (usize, usize),
    /// The VAE's mean and log-variance, `[B, C, h, w]`.
    pub mean: Tensor,
    pub logvar: Tensor,
    /// `[H, W]` per image, concatenated.
    pub masks: Vec<f32>,
    /// What the denoiser is conditioned on: the model's text tensors (batch first), then the
    /// images' geometry `[B, 6]` when it takes that.
    pub cond: Vec<Tensor>,
    pub weights: Vec<f64>,
    /// Per image: a prior concept's, whose target is the model's prediction without adapters.
    pub prior: Vec<bool>,
}

impl Batch {
    pub fn cond(&self) -> Vec<&Tensor> {
        self.cond.iter().collect()
    }
}

impl Trainer {
    /// The VAE's mean and log-variance of `[B, 3, H, W]` images in [-1, 1] (the caching
    /// benchmark's bare encode).
    pub fn vae_encode(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let _scope = self.scope.enter();
        self.arch.vae_encode(images).map_err(err)
    }

    /// Writes one image's latent cache entry (`mask` is `[h, w]` for bucket `(w, h)`).
    pub(super) fn write_latents(
        &self,
        entry: &std::path::Path,
        mean: &Tensor,
        logvar: &Tensor,
        mask: &[f32],
        geometry: &[f32],
        (w, h): (usize, usize),
    ) -> Result<()> {
        let mask = Tensor::from_f32(mask, &[h, w]).map_err(err)?;
        let geometry = Tensor::from_f32(geometry, &[6]).map_err(err)?;
        std::fs::create_dir_all(entry.parent().expect("cache folder")).map_err(err)?;
        ferrite_plugin_api::save_safetensors(
            &entry.to_string_lossy(),
            &[
                ("mean", mean),
                ("logvar", logvar),
                ("mask", &mask),
                ("geometry", &geometry),
            ],
            &[],
        )
        .map_err(|e| TrainError(format!("latent cache {}: {e}", entry.display())))?;
        self.caches
            .latents_encoded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The model's text tensors for `prompts` (batch first, in the order of its
    /// `conditioning.text`); from the text cache when it is on (prompts not in it are encoded
    /// together and written).
    pub(super) fn text_states(&self, prompts: &[String]) -> Result<Vec<Tensor>> {
        let names = &self.info.conditioning.text;
        let encode = |ps: &[&str]| -> Result<Vec<Tensor>> {
            let out = self.arch.encode_text(ps).map_err(err)?;
            if out.len() != names.len() {
                return Err(TrainError(format!(
                    "the model's encode_text returned {} tensors, its conditioning names {}",
                    out.len(),
                    names.len()
                )));
            }
            Ok(out)
        };
        if !self.text_cached {
            // Encoded each step (a trained text encoder, or no cache): part of the training
            // forward. Cached states are encoded in f32, whatever the run's train dtype.
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            return self.in_train_dtype(|| encode(&refs));
        }
        let mut rows: Vec<Option<Vec<Tensor>>> = Vec::new();
        let mut missing = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let entry = self.caches.text_entry(p);
            let hit = Weights::open(&entry.to_string_lossy())
                .and_then(|w| names.iter().map(|n| w.get(n, DType::F32)).collect())
                .ok();
            if hit.is_none() {
                missing.push((i, entry));
            }
            rows.push(hit);
        }
        if !missing.is_empty() {
            let refs: Vec<&str> = missing.iter().map(|(i, _)| prompts[*i].as_str()).collect();
            let encoded = encode(&refs)?;
            for (k, (i, entry)) in missing.iter().enumerate() {
                let one = encoded
                    .iter()
                    .map(|t| t.narrow(0, k, 1)?.detach())
                    .collect::<ferrite_plugin_api::Result<Vec<_>>>()
                    .map_err(err)?;
                std::fs::create_dir_all(entry.parent().expect("cache folder")).map_err(err)?;
                let named: Vec<(&str, &Tensor)> =
                    names.iter().map(String::as_str).zip(&one).collect();
                ferrite_plugin_api::save_safetensors(&entry.to_string_lossy(), &named, &[])
                    .map_err(|e| TrainError(format!("text cache {}: {e}", entry.display())))?;
                self.caches
                    .texts_encoded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rows[*i] = Some(one);
            }
        }
        let rows: Vec<Vec<Tensor>> = rows.into_iter().flatten().collect();
        (0..names.len())
            .map(|n| {
                let column: Vec<&Tensor> = rows.iter().map(|r| &r[n]).collect();
                Tensor::cat(&column, 0).map_err(err)
            })
            .collect()
    }

    /// The denoiser's conditioning for a batch: its text tensors, then the images' geometry
    /// (`[B, 6]`, concatenated rows) or the guidance value (`[B]`, the denoiser table's
    /// `guidance_scale`) when the model takes them.
    pub(super) fn conditioning(&self, prompts: &[String], geometry: &[f32]) -> Result<Vec<Tensor>> {
        let mut cond = self.text_states(prompts)?;
        if self.info.conditioning.image_geometry {
            cond.push(Tensor::from_f32(geometry, &[prompts.len(), 6]).map_err(err)?);
        }
        if self.info.conditioning.guidance {
            let scale = self
                .info
                .parts
                .iter()
                .find(|p| p.kind == PartKind::Denoiser)
                .and_then(|p| self.config.part(&p.config_table))
                .map_or(1.0, |t| t.guidance_scale);
            cond.push(Tensor::full(&[prompts.len()], scale, DType::F32).map_err(err)?);
        }
        Ok(cond)
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
                    geometry,
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
                    self.write_latents(entry, &mean, &logvar, mask, geometry, (w, h))?;
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
            cond: self.conditioning(&loaded.prompts, &loaded.geometry)?,
            weights: loaded.weights.clone(),
            prior: loaded.prior.clone(),
        })
    }
}
