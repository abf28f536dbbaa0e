//! Validation: each validation concept's loss at fixed timesteps and noise.

use ferrite_plugin_api::Tensor;
use rand::Rng;

use super::encode::Batch;
use super::groups::{EvalWeights, Untracked};
use super::{Result, Trainer, err};
use crate::data;

const RNG_VALIDATION: u64 = 4;
/// Timesteps per validation image, evenly spread over the noising range.
const VALIDATION_TIMESTEPS: usize = 8;

impl Trainer {
    /// The noising range's fixed timesteps the losses here are taken at.
    fn fixed_timesteps(&self) -> Vec<usize> {
        let c = &self.config;
        let n = self.noising.timesteps() as f64;
        let (lo, hi) = (c.min_noising_strength * n, c.max_noising_strength * n);
        (0..VALIDATION_TIMESTEPS)
            .map(|k| (lo + (k as f64 + 0.5) * (hi - lo) / VALIDATION_TIMESTEPS as f64) as usize)
            .collect()
    }

    /// One image's loss at `timesteps` and noise drawn from (seed, `index`), with its concept's
    /// random augmentations off and its first caption.
    fn fixed_loss(&self, item: &data::Item, index: usize, timesteps: &[usize]) -> Result<f32> {
        let c = &self.config;
        let fixed = c.concepts[item.concept].without_random_augmentation();
        let mut r = data::rng(c.seed, RNG_VALIDATION, index as u64);
        let bucket = self.buckets[0].nearest(item.width as usize, item.height as usize);
        let p = data::prepare(item, &fixed, bucket, &mut r).map_err(err)?;
        let t = timesteps.len();
        let image = Tensor::from_f32(&p.pixels, &[1, 3, bucket.1, bucket.0]).map_err(err)?;
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
        let noise = super::batch::Noise::new(r.random::<u64>(), (0, t))?;
        let f = self.forward(&batch, timesteps, &noise)?;
        let loss = self.loss(&batch, &f)?;
        Ok(loss.item().map_err(err)? * c.gradient_accumulation_steps as f32)
    }

    /// The loss of each validation concept at fixed timesteps and noise, so that the figures of
    /// one run can be compared with each other: (concept name, mean loss).
    pub fn validate(&self) -> Result<Vec<(String, f32)>> {
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
        let _eval = EvalWeights::new(&self.groups)?;
        let timesteps = self.fixed_timesteps();
        let mut out = Vec::new();
        for (ci, concept) in self.config.concepts.iter().enumerate() {
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
            let mut total = 0.0;
            for (ii, item) in &items {
                total += self.fixed_loss(item, *ii, &timesteps)?;
            }
            out.push((concept.name.clone(), total / items.len() as f32));
        }
        Ok(out)
    }

    /// Each training image's loss under the model as it is (with its adapters), at the fixed
    /// timesteps and noise validation uses, highest first: OneTrainer's calculate_loss, to find
    /// mislabelled or broken images. (image, concept name, caption, loss).
    pub fn loss_report(&self) -> Result<Vec<(std::path::PathBuf, String, String, f32)>> {
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
        let _eval = EvalWeights::new(&self.groups)?;
        let timesteps = self.fixed_timesteps();
        let mut out = Vec::new();
        for (i, item) in self.data.items.iter().enumerate() {
            let loss = self.fixed_loss(item, i, &timesteps)?;
            let concept = &self.config.concepts[item.concept];
            out.push((
                item.path.clone(),
                // Unnamed concepts go by their folder.
                if concept.name.is_empty() {
                    concept.path.clone()
                } else {
                    concept.name.clone()
                },
                item.captions.first().cloned().unwrap_or_default(),
                loss,
            ));
        }
        out.sort_by(|a, b| b.3.total_cmp(&a.3));
        Ok(out)
    }
}
