//! The caches filled ahead of training, as OneTrainer's caching pass does: every image
//! variation and caption the run will read that the cache lacks is encoded before the first
//! step, images in batches of `batch_size` (decoded and augmented on a loader thread while the
//! VAE encodes the previous batch), captions in batches of 16. Training then reads them all from
//! the cache. The entries come from planning every epoch left as training will (its buckets,
//! resolutions and balancing draws). The processes of a data-parallel run take turns over the
//! entries and wait for each other after the pass (`peer_timeout` at most: a process whose share
//! takes longer than that after the others finished fails the run); on machines that share no
//! cache folder each then encodes, when a batch needs it, what another process cached.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;

use ferrite_plugin_api::Tensor;

use super::{Event, Result, TrainError, Trainer, err};
use crate::data;

/// Captions encoded together.
const TEXT_BATCH: usize = 16;

/// One image variation to encode.
struct Todo {
    item: usize,
    bucket: (usize, usize),
    entry: PathBuf,
    seed: u64,
}

/// What the pass did: entries encoded now and entries the cache already had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cached {
    pub latents_encoded: usize,
    pub latents_reused: usize,
    pub texts_encoded: usize,
    pub texts_reused: usize,
}

impl std::fmt::Display for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "caching pass: {} latents encoded, {} reused; {} text states encoded, {} reused",
            self.latents_encoded, self.latents_reused, self.texts_encoded, self.texts_reused
        )
    }
}

impl Trainer {
    /// Whether the `k`-th thing to cache is this process's (a data-parallel process takes every
    /// `nodes`-th, counted over every entry, cached or not, so that all count alike).
    fn mine(&self, k: usize) -> bool {
        self.parallel
            .as_ref()
            .is_none_or(|p| k % p.nodes as usize == p.rank as usize)
    }

    /// Fills the latent and text caches for the run (see the module's comment), reporting
    /// progress as [`Event::Caching`].
    pub(super) fn precache(&mut self, on_event: &mut impl FnMut(Event)) -> Result<Cached> {
        let mut done = Cached::default();
        if !self.config.latent_caching {
            return Ok(done);
        }
        let context = self.loader_context();
        let mut seen = HashSet::new();
        let mut todo: BTreeMap<(usize, usize), Vec<Todo>> = BTreeMap::new();
        let mut prompts = Vec::new();
        let mut prompt_seen = HashSet::new();
        // Every epoch left: balancing by samples draws other images each epoch (entries are
        // worked out once per run, so planning again costs little).
        for epoch in self.progress.epoch..self.config.epochs as u64 {
            for plan in self.plan(epoch) {
                for &i in &plan.items {
                    let item = &self.data.items[i];
                    let concept = &self.config.concepts[item.concept];
                    let variation = epoch % concept.image_variations as u64;
                    let (entry, seed) = self
                        .caches
                        .latent_entry(item, concept, plan.bucket, variation)
                        .map_err(TrainError)?;
                    if seen.insert(entry.clone()) {
                        if entry.is_file() {
                            done.latents_reused += 1;
                        } else if self.mine(seen.len()) {
                            todo.entry(plan.bucket).or_default().push(Todo {
                                item: i,
                                bucket: plan.bucket,
                                entry,
                                seed,
                            });
                        }
                    }
                    if self.text_cached {
                        let text = context.cached_caption(i, epoch);
                        if prompt_seen.insert(text.clone()) {
                            prompts.push(text);
                        }
                    }
                }
            }
        }
        if self.text_cached && self.config.text_encoder.dropout_probability > 0.0 {
            // A dropped caption is the empty prompt.
            if prompt_seen.insert(String::new()) {
                prompts.push(String::new());
            }
        }
        let total = todo.values().map(Vec::len).sum::<usize>();
        let batch = self.config.batch_size.max(1);
        if total > 0 {
            on_event(Event::Caching {
                what: "latents",
                done: 0,
                total,
            });
        }
        let jobs: Vec<Vec<Todo>> = todo
            .into_values()
            .flat_map(|mut v| {
                let mut out = Vec::new();
                while !v.is_empty() {
                    let rest = v.split_off(batch.min(v.len()));
                    out.push(std::mem::replace(&mut v, rest));
                }
                out
            })
            .collect();
        // Images load on their own thread, a batch ahead of the VAE.
        let (tx, rx) = sync_channel(1);
        let (data, concepts) = (self.data.clone(), self.config.concepts.clone());
        let loader = std::thread::Builder::new()
            .name("precache-loader".into())
            .spawn(move || {
                for job in jobs {
                    let prepared: std::result::Result<Vec<_>, String> = job
                        .iter()
                        .map(|t| {
                            let item = &data.items[t.item];
                            data::prepare(
                                item,
                                &concepts[item.concept],
                                t.bucket,
                                &mut data::rng(t.seed, 0, 0),
                            )
                        })
                        .collect();
                    if tx.send((job, prepared)).is_err() {
                        return;
                    }
                }
            })
            .map_err(err)?;
        for (job, prepared) in rx {
            if self.controls.cancel.is_cancelled() {
                break;
            }
            let prepared = prepared.map_err(TrainError)?;
            let (w, h) = job[0].bucket;
            let pixels: Vec<f32> = prepared
                .iter()
                .flat_map(|p| p.pixels.iter().copied())
                .collect();
            let images = Tensor::from_f32(&pixels, &[job.len(), 3, h, w]).map_err(err)?;
            let (mean, logvar) = self.arch.vae_encode(&images).map_err(err)?;
            for (k, (t, p)) in job.iter().zip(&prepared).enumerate() {
                let row = |x: &Tensor| x.narrow(0, k, 1).and_then(|r| r.detach());
                let (mean, logvar) = (row(&mean).map_err(err)?, row(&logvar).map_err(err)?);
                self.write_latents(&t.entry, &mean, &logvar, &p.mask, &p.geometry, (w, h))?;
            }
            done.latents_encoded += job.len();
            on_event(Event::Caching {
                what: "latents",
                done: done.latents_encoded,
                total,
            });
        }
        loader
            .join()
            .map_err(|_| TrainError("the caching pass's image loader panicked".into()))?;
        if !prompts.is_empty() {
            self.precache_texts(&prompts, &mut done, on_event)?;
        }
        // Each process of a data-parallel run cached its share: training starts once all are
        // written (a process on another machine without a shared folder encodes the others'
        // share when a batch needs it).
        self.barrier()?;
        Ok(done)
    }

    fn precache_texts(
        &self,
        prompts: &[String],
        done: &mut Cached,
        on_event: &mut impl FnMut(Event),
    ) -> Result<()> {
        let cached: Vec<bool> = prompts
            .iter()
            .map(|p| self.caches.text_entry(p).is_file())
            .collect();
        done.texts_reused = cached.iter().filter(|&&c| c).count();
        let missing: Vec<String> = prompts
            .iter()
            .zip(&cached)
            .enumerate()
            .filter(|&(k, (_, &c))| !c && self.mine(k))
            .map(|(_, (p, _))| p.clone())
            .collect();
        let total = missing.len();
        if total > 0 {
            on_event(Event::Caching {
                what: "text states",
                done: 0,
                total,
            });
        }
        for chunk in missing.chunks(TEXT_BATCH) {
            if self.controls.cancel.is_cancelled() {
                break;
            }
            // Misses are encoded together and written.
            self.text_states(chunk)?;
            done.texts_encoded += chunk.len();
            on_event(Event::Caching {
                what: "text states",
                done: done.texts_encoded,
                total,
            });
        }
        Ok(())
    }
}
