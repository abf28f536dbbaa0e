//! Validation: each validation concept's loss at fixed timesteps and noise.

use ferrite_plugin_api::{Generator, Tensor};
use rand::Rng;

use super::encode::Batch;
use super::groups::Untracked;
use super::{Result, Trainer, err};
use crate::data;

const RNG_VALIDATION: u64 = 4;
/// Timesteps per validation image, evenly spread over the noising range.
const VALIDATION_TIMESTEPS: usize = 8;

impl Trainer {
    /// The loss of each validation concept at fixed timesteps and noise, so that the figures of
    /// one run can be compared with each other: (concept name, mean loss).
    pub fn validate(&self) -> Result<Vec<(String, f32)>> {
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
        let c = &self.config;
        let n = self.noising.timesteps() as f64;
        let (lo, hi) = (c.min_noising_strength * n, c.max_noising_strength * n);
        let timesteps: Vec<usize> = (0..VALIDATION_TIMESTEPS)
            .map(|k| (lo + (k as f64 + 0.5) * (hi - lo) / VALIDATION_TIMESTEPS as f64) as usize)
            .collect();
        let mut out = Vec::new();
        for (ci, concept) in c.concepts.iter().enumerate() {
            let items: Vec<_> = self
                .validation
                .items
                .iter()
                .enumerate()
                .filter(|(_, it)| it.concept == ci)
                .collect();
            if items.is_empty() {
                continue;
            }
            let fixed = concept.without_random_augmentation();
            let mut total = 0.0;
            for (ii, item) in &items {
                let mut r = data::rng(c.seed, RNG_VALIDATION, *ii as u64);
                let bucket = self.buckets[0].nearest(item.width as usize, item.height as usize);
                let p = data::prepare(item, &fixed, bucket, &mut r).map_err(err)?;
                let t = timesteps.len();
                let image =
                    Tensor::from_f32(&p.pixels, &[1, 3, bucket.1, bucket.0]).map_err(err)?;
                let (mean, logvar) = self.arch.vae_encode(&image).map_err(err)?;
                let repeat = |x: &Tensor| Tensor::cat(&vec![x; t], 0).map_err(err);
                let batch = Batch {
                    bucket,
                    mean: repeat(&mean)?,
                    logvar: repeat(&logvar)?,
                    masks: (0..t).flat_map(|_| p.mask.iter().copied()).collect(),
                    cond: self
                        .conditioning(&item.captions[..1], &p.geometry)?
                        .iter()
                        .map(repeat)
                        .collect::<Result<_>>()?,
                    weights: vec![1.0; t],
                    prior: vec![false; t],
                };
                let noise = Generator::new(r.random::<u64>()).map_err(err)?;
                let f = self.forward(&batch, &timesteps, &noise)?;
                let loss = self.loss(&batch, &f)?;
                total += loss.item().map_err(err)? * c.gradient_accumulation_steps as f32;
            }
            out.push((concept.name.clone(), total / items.len() as f32));
        }
        Ok(out)
    }
}
