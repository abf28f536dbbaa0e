//! A loaded batch on the device: images encoded by the VAE or read from the latent cache, text
//! states encoded or read from the text cache (misses are encoded and written).

use ferrite_plugin_api::{DType, Tensor, Weights};

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
}
