//! Batches made ready on the host ahead of the trainer: images decoded and augmented (or their
//! cached latents read), masks, captions, loss weights and timesteps. `dataloader_threads`
//! workers take turns over the epoch's batches, each a couple of batches ahead, and the trainer
//! takes them in order; every draw comes from (seed, purpose, batch index), so the batches are
//! the same whatever the number of threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rand::Rng;

use crate::config::{ConceptType, TrainConfig};
use crate::data::{self, BatchPlan, Dataset, caption};
use crate::train::cache::{Caches, read_f32};
use crate::train::timesteps::Timesteps;

pub const RNG_BATCH: u64 = 2;
pub const RNG_NOISE: u64 = 3;
const RNG_CAPTION: u64 = 5;
// Each purpose has its own stream, so that an option that draws for one (a caption option, the
// unmasked probability) leaves the others' draws as they were.
const RNG_MASK: u64 = 7;
const RNG_BATCH_CAPTION: u64 = 8;
const RNG_TIMESTEPS: u64 = 9;
/// Batches each worker prepares ahead.
const AHEAD: usize = 2;

/// One image of a batch.
pub enum Image {
    /// `[3, H, W]` in [-1, 1].
    Pixels(Vec<f32>),
    /// The VAE's mean and log-variance from the latent cache, with their shape.
    Cached {
        shape: Vec<usize>,
        mean: Vec<f32>,
        logvar: Vec<f32>,
    },
    /// Not in the cache yet: the trainer encodes it and writes `entry`.
    Miss {
        pixels: Vec<f32>,
        mask: Vec<f32>,
        geometry: [f32; 6],
        entry: PathBuf,
    },
}

/// A batch ready for the device.
pub struct Loaded {
    pub bucket: (usize, usize),
    pub images: Vec<Image>,
    /// `[H, W]` per image, concatenated (all ones where an image has no mask, or the step sees
    /// the whole image).
    pub masks: Vec<f32>,
    pub prompts: Vec<String>,
    /// Per image: [`data::Prepared::geometry`], concatenated.
    pub geometry: Vec<f32>,
    pub weights: Vec<f64>,
    /// Per image: a prior concept's.
    pub prior: Vec<bool>,
    pub timesteps: Vec<usize>,
    pub noise_seed: u64,
    /// This batch's first row in the batch its noise is drawn for, and that batch's rows (a
    /// data-parallel process holds its share of a larger one).
    pub rows: (usize, usize),
    /// With debug_mode: each image as it enters the VAE (`[3, H, W]` in [-1, 1]), also when its
    /// latents come from the cache.
    pub inputs: Vec<Vec<f32>>,
}

impl Loaded {
    /// Process `rank`'s share of the batch among `peers` (its rows, in order; the batch divides
    /// evenly).
    pub fn share(self, rank: usize, peers: usize) -> Loaded {
        let n = self.prompts.len() / peers;
        let rows = rank * n..(rank + 1) * n;
        let per = |len: usize| len / self.prompts.len().max(1);
        let cut = |v: Vec<f32>, per: usize| v[rows.start * per..rows.end * per].to_vec();
        let (mask_per, geometry_per) = (per(self.masks.len()), per(self.geometry.len()));
        Loaded {
            bucket: self.bucket,
            images: self.images.into_iter().skip(rows.start).take(n).collect(),
            masks: cut(self.masks, mask_per),
            prompts: self.prompts[rows.clone()].to_vec(),
            geometry: cut(self.geometry, geometry_per),
            weights: self.weights[rows.clone()].to_vec(),
            prior: self.prior[rows.clone()].to_vec(),
            timesteps: self.timesteps[rows.clone()].to_vec(),
            noise_seed: self.noise_seed,
            rows: (self.rows.0 + rows.start, self.rows.1),
            inputs: self.inputs.into_iter().skip(rows.start).take(n).collect(),
        }
    }
}

/// What the workers read.
pub struct Context {
    pub data: Arc<Dataset>,
    pub config: Arc<TrainConfig>,
    pub caches: Arc<Caches>,
    pub timesteps: Arc<Timesteps>,
    /// Text states come from the cache (the text encoder is frozen): each image then has
    /// `text_variations` captions, one per epoch in turn.
    pub text_cached: bool,
}

impl Context {
    fn placeholders(&self) -> Vec<&str> {
        self.config
            .embeddings()
            .into_iter()
            .map(|(_, e)| e.placeholder.as_str())
            .collect()
    }

    /// Image `i`'s caption in `epoch` when text states come from the cache (one of its
    /// `text_variations`, in turn: the cache holds each), placeholders kept.
    pub fn cached_caption(&self, i: usize, epoch: u64) -> String {
        let item = &self.data.items[i];
        let concept = &self.config.concepts[item.concept];
        let variation = epoch % concept.text_variations as u64;
        let mut r = data::rng(self.config.seed, RNG_CAPTION, (i as u64) << 24 | variation);
        let caption = caption::draw(&item.captions, concept, &mut r);
        caption::keep_placeholders(caption, &self.placeholders())
    }

    /// The host side of batch `index` of the run (`plan` of its epoch).
    pub fn load(&self, plan: &BatchPlan, index: u64) -> Result<Loaded, String> {
        let c = &*self.config;
        let mut r = data::rng(c.seed, RNG_BATCH, index);
        let mut mask_r = data::rng(c.seed, RNG_MASK, index);
        let mut caption_r = data::rng(c.seed, RNG_BATCH_CAPTION, index);
        let mut b = Loaded {
            bucket: plan.bucket,
            images: Vec::new(),
            masks: Vec::new(),
            prompts: Vec::new(),
            geometry: Vec::new(),
            weights: Vec::new(),
            prior: Vec::new(),
            timesteps: Vec::new(),
            noise_seed: 0,
            rows: (0, plan.items.len()),
            inputs: Vec::new(),
        };
        let debug = c.debug_mode;
        for &i in &plan.items {
            let item = &self.data.items[i];
            let concept = &c.concepts[item.concept];
            let (image, mask, geometry, input) = if c.latent_caching {
                let variation = plan.epoch % concept.image_variations as u64;
                let (entry, seed) =
                    self.caches
                        .latent_entry(item, concept, plan.bucket, variation)?;
                // The entry's augmentation comes from its own seed, so it can be redone.
                let prepare =
                    || data::prepare(item, concept, plan.bucket, &mut data::rng(seed, 0, 0));
                match read_f32(&entry, &["mean", "logvar", "mask", "geometry"]).as_deref() {
                    Some([(shape, mean), (_, logvar), (_, mask), (_, geometry)])
                        if geometry.len() == 6 =>
                    {
                        (
                            Image::Cached {
                                shape: shape.clone(),
                                mean: mean.clone(),
                                logvar: logvar.clone(),
                            },
                            mask.clone(),
                            geometry.clone(),
                            if debug { Some(prepare()?.pixels) } else { None },
                        )
                    }
                    _ => {
                        let p = prepare()?;
                        let input = debug.then(|| p.pixels.clone());
                        (
                            Image::Miss {
                                pixels: p.pixels,
                                mask: p.mask.clone(),
                                geometry: p.geometry,
                                entry,
                            },
                            p.mask,
                            p.geometry.to_vec(),
                            input,
                        )
                    }
                }
            } else {
                let p = data::prepare(item, concept, plan.bucket, &mut r)?;
                let input = debug.then(|| p.pixels.clone());
                (Image::Pixels(p.pixels), p.mask, p.geometry.to_vec(), input)
            };
            b.geometry.extend(geometry);
            b.inputs.extend(input);
            b.images.push(image);
            // Now and then a step sees the whole image, as OneTrainer's unmasked_probability.
            if c.masked_training && mask_r.random_bool(c.unmasked_probability) {
                b.masks.extend(std::iter::repeat_n(1.0, mask.len()));
            } else {
                b.masks.extend(mask);
            }
            let caption = if self.text_cached {
                self.cached_caption(i, plan.epoch)
            } else {
                let caption = caption::draw(&item.captions, concept, &mut caption_r);
                caption::keep_placeholders(caption, &self.placeholders())
            };
            let dropped = caption_r.random_bool(c.text_encoder.dropout_probability);
            b.prompts
                .push(if dropped { String::new() } else { caption });
            b.weights.push(concept.loss_weight);
            b.prior.push(concept.kind == ConceptType::Prior);
        }
        let mut time_r = data::rng(c.seed, RNG_TIMESTEPS, index);
        b.timesteps = (0..plan.items.len())
            .map(|_| self.timesteps.draw_for(&mut time_r, plan.bucket))
            .collect();
        b.noise_seed = data::rng(c.seed, RNG_NOISE, index).random::<u64>();
        Ok(b)
    }
}

/// An epoch's batches from `first` on, prepared by worker threads (or on the caller's thread
/// with none).
pub struct Prefetch {
    context: Arc<Context>,
    plans: Arc<Vec<BatchPlan>>,
    /// The next batch to hand out: its place in the epoch and its index in the run.
    next: usize,
    next_index: u64,
    first: usize,
    workers: Vec<Receiver<Result<Loaded, String>>>,
}

impl Prefetch {
    pub fn start(
        context: Arc<Context>,
        plans: Vec<BatchPlan>,
        first: usize,
        first_index: u64,
        threads: usize,
    ) -> Self {
        let plans = Arc::new(plans);
        let workers = (0..threads)
            .map(|w| {
                let (tx, rx): (SyncSender<_>, _) = sync_channel(AHEAD);
                let (context, plans) = (context.clone(), plans.clone());
                std::thread::Builder::new()
                    .name(format!("dataloader-{w}"))
                    .spawn(move || {
                        for k in (first + w..plans.len()).step_by(threads) {
                            let index = first_index + (k - first) as u64;
                            // The trainer went away (stopped or failed): nothing more to do.
                            if tx.send(context.load(&plans[k], index)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn a data loader thread");
                rx
            })
            .collect();
        Self {
            context,
            plans,
            next: first,
            next_index: first_index,
            first,
            workers,
        }
    }

    /// The next batch, or None at the end of the epoch.
    pub fn next_batch(&mut self) -> Option<Result<Loaded, String>> {
        if self.next >= self.plans.len() {
            return None;
        }
        let k = self.next;
        let loaded = if self.workers.is_empty() {
            self.context.load(&self.plans[k], self.next_index)
        } else {
            let w = (k - self.first) % self.workers.len();
            self.workers[w]
                .recv()
                .unwrap_or_else(|_| Err("a data loader thread stopped unexpectedly".into()))
        };
        self.next += 1;
        self.next_index += 1;
        Some(loaded)
    }
}
