//! The on-disk caches under `cache_dir`: encoded images (`latents/`) and text-encoder states
//! (`text/`), one safetensors file per entry, named by a SHA-256 of everything that changes the
//! entry, so a changed image, caption or setting re-encodes that entry only and a second run with
//! nothing changed encodes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::config::ConceptConfig;
use crate::data::Item;

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image file of a concept, a bucket and a variation: one latent cache entry.
type Slot = (PathBuf, usize, (usize, usize), u64);

/// What the caches share: the folder, what identifies the model (its path, when it changed, its
/// facts), and the run's seed (part of a latent entry's key only when the image is augmented at
/// random).
pub struct Caches {
    pub dir: PathBuf,
    identity: String,
    seed: u64,
    /// The text encoder's layer skip changes every text entry.
    layer_skip: usize,
    /// Latent cache file and augmentation seed per (image, concept, bucket, variation), once
    /// worked out.
    memo: Mutex<HashMap<Slot, (PathBuf, u64)>>,
    /// Entries encoded (not found in the cache) during this run.
    pub latents_encoded: AtomicUsize,
    pub texts_encoded: AtomicUsize,
}

impl Caches {
    /// `model`: every file or folder the model is read from (a changed one re-encodes).
    pub fn new(
        dir: PathBuf,
        model: &[PathBuf],
        info: &serde_json::Value,
        seed: u64,
        layer_skip: usize,
    ) -> Self {
        let files: Vec<String> = model
            .iter()
            .map(|p| {
                let modified = std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_default();
                format!("{} {modified}", p.display())
            })
            .collect();
        let mut facts = info.clone();
        if let Some(o) = facts.as_object_mut() {
            o.remove("adaptable_layers");
        }
        Self {
            dir,
            identity: format!("{} {facts}", files.join(" ")),
            seed,
            layer_skip,
            memo: Default::default(),
            latents_encoded: AtomicUsize::new(0),
            texts_encoded: AtomicUsize::new(0),
        }
    }

    /// Removes every entry (clear_cache_before_training).
    pub fn clear(&self) {
        for sub in ["latents", "text"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
    }

    /// The cache file of one image variation and the seed of its augmentation, both from a hash
    /// of the image and mask files, the bucket, the concept's image settings, the variation, the
    /// model, and the seed when an option draws at random. Worked out once per run: the files are
    /// read for it the first time only.
    pub fn latent_entry(
        &self,
        item: &Item,
        concept: &ConceptConfig,
        bucket: (usize, usize),
        variation: u64,
    ) -> Result<(PathBuf, u64), String> {
        let memo_key = (item.path.clone(), item.concept, bucket, variation);
        if let Some(entry) = self.lock().get(&memo_key) {
            return Ok(entry.clone());
        }
        // Only the image options change the encoded image.
        let image_settings: serde_json::Map<String, serde_json::Value> =
            serde_json::to_value(concept)
                .map_err(|e| e.to_string())?
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    ["enable_random_", "enable_fixed_", "random_"]
                        .iter()
                        .any(|p| k.starts_with(p))
                        || matches!(k.as_str(), "enable_crop_jitter" | "image_variations")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut h = Sha256::new();
        h.update(b"ferrite latent cache v2\0");
        h.update(read(&item.path)?);
        if let Some(m) = &item.mask {
            h.update(read(m)?);
        }
        h.update(
            format!(
                "{bucket:?} {} {variation} {}",
                serde_json::Value::Object(image_settings),
                self.identity
            )
            .as_bytes(),
        );
        if concept.random_image_augmentation() {
            h.update(format!(" seed {}", self.seed).as_bytes());
        }
        let digest = h.finalize();
        let entry = (
            self.dir
                .join("latents")
                .join(format!("{}.safetensors", hex(&digest))),
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")),
        );
        self.lock().insert(memo_key, entry.clone());
        Ok(entry)
    }

    /// The cache file of the text-encoder states of one prompt.
    pub fn text_entry(&self, prompt: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(b"ferrite text cache v1\0");
        h.update(prompt.as_bytes());
        h.update(b"\0");
        h.update(self.identity.as_bytes());
        if self.layer_skip > 0 {
            h.update(format!(" layer skip {}", self.layer_skip).as_bytes());
        }
        self.dir
            .join("text")
            .join(format!("{}.safetensors", hex(&h.finalize())))
    }

    /// (latents, texts) encoded during this run because the cache did not have them.
    pub fn encoded(&self) -> (usize, usize) {
        (
            self.latents_encoded.load(Ordering::Relaxed),
            self.texts_encoded.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, (PathBuf, u64)>> {
        self.memo.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Named f32 tensors of a cache file, read on the host (loader threads read entries without
/// touching the device): name → (shape, values). None when the file is missing or unreadable,
/// which makes the entry encode again.
pub fn read_f32(path: &Path, names: &[&str]) -> Option<Vec<(Vec<usize>, Vec<f32>)>> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    names
        .iter()
        .map(|n| {
            let t = st.tensor(n).ok()?;
            if t.dtype() != safetensors::Dtype::F32 {
                return None;
            }
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Some((t.shape().to_vec(), v))
        })
        .collect()
}
