//! Training data: concepts scanned into items (image + captions), OneTrainer's aspect-ratio
//! buckets, per-epoch order and augmentation drawn from the seed and the epoch (so a resumed run
//! sees the same batches), and images prepared as `[3, H, W]` tensors in [-1, 1].

pub mod augment;
pub mod buckets;
pub mod caption;
pub mod loader;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{BalancingStrategy, ConceptConfig, ConceptType, PromptSource, TrainConfig};

const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];
/// Smaller images are reported and left out.
const MIN_SIDE: u32 = 8;

/// One training image.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: PathBuf,
    /// Caption candidates (one is drawn per epoch).
    pub captions: Vec<String>,
    pub concept: usize,
    pub width: u32,
    pub height: u32,
    /// `<stem>-masklabel.png` beside the image: white is trained, black is not.
    pub mask: Option<PathBuf>,
}

/// The concepts' images, and the problems found while reading them.
#[derive(Debug, Default)]
pub struct Dataset {
    pub items: Vec<Item>,
    /// One line per unreadable/tiny image or missing caption.
    pub problems: Vec<String>,
}

pub(crate) fn images_in(
    dir: &Path,
    recursive: bool,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        // A linked folder is not followed: a link back up would never end.
        if e.file_type()?.is_dir() {
            if recursive {
                images_in(&p, true, out)?;
            }
        } else if p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            && !p.to_string_lossy().ends_with("-masklabel.png")
        {
            out.push(p);
        }
    }
    Ok(())
}

pub(crate) fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The captions of `image` for `concept`'s prompt source.
fn captions(
    concept: &ConceptConfig,
    base: &Path,
    image: &Path,
) -> std::result::Result<Vec<String>, String> {
    match concept.prompt_source {
        PromptSource::Filename => Ok(vec![
            image
                .file_stem()
                .map(|s| s.to_string_lossy().replace('_', " "))
                .unwrap_or_default(),
        ]),
        PromptSource::Concept => {
            let f = TrainConfig::path(base, &concept.text_file);
            std::fs::read_to_string(&f)
                .map(|t| lines(&t))
                .map_err(|e| format!("{}: {e}", f.display()))
        }
        _ => {
            let f = image.with_extension("txt");
            std::fs::read_to_string(&f).map(|t| lines(&t)).map_err(|_| {
                format!(
                    "{}: no caption file {}: trained with an empty caption",
                    image.display(),
                    f.display()
                )
            })
        }
    }
}

/// What reading one image found: its size and mask, or the problem.
struct Checked {
    size: std::result::Result<(u32, u32), String>,
    /// A problem with the mask, reported beside the image (which is still used).
    mask_problem: Option<String>,
    mask: Option<PathBuf>,
}

/// `<stem>-masklabel.png` beside the image.
fn mask_path(image: &Path) -> PathBuf {
    image.with_file_name(format!(
        "{}-masklabel.png",
        image.file_stem().unwrap_or_default().to_string_lossy()
    ))
}

/// The image files of a concept's folder, sorted (nothing is read).
pub fn concept_images(c: &ConceptConfig, base: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    images_in(
        &TrainConfig::path(base, &c.path),
        c.include_subdirectories,
        &mut paths,
    )?;
    Ok(paths)
}

/// One image as an item of concept 0, from its header and mask file (no captions): for showing
/// it prepared as for training.
pub fn preview_item(path: &Path) -> std::result::Result<Item, String> {
    let (width, height) =
        image::image_dimensions(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mask = mask_path(path);
    Ok(Item {
        path: path.to_path_buf(),
        captions: Vec::new(),
        concept: 0,
        width,
        height,
        mask: mask.exists().then_some(mask),
    })
}

/// Decodes the image fully (a truncated file fails here, not mid-run) and checks its mask.
fn check(p: &Path) -> Checked {
    let size = image::open(p)
        .map(|i| (i.width(), i.height()))
        .map_err(|e| format!("{}: unreadable image: {e}", p.display()));
    let mask = mask_path(p);
    if !mask.exists() {
        return Checked {
            size,
            mask_problem: None,
            mask: None,
        };
    }
    let (mask_problem, mask) = match (image::image_dimensions(&mask), &size) {
        (Err(e), _) => (
            Some(format!(
                "{}: unreadable mask, trained without it: {e}",
                mask.display()
            )),
            None,
        ),
        (Ok((mw, mh)), Ok((w, h))) if (mw, mh) != (*w, *h) => (
            Some(format!(
                "{}: the mask is {mw}x{mh} but the image is {w}x{h}: it is stretched to fit",
                mask.display()
            )),
            Some(mask),
        ),
        _ => (None, Some(mask)),
    };
    Checked {
        size,
        mask_problem,
        mask,
    }
}

impl Dataset {
    /// Reads every enabled concept of the `kinds` given (`standard`, `prior`, `validation`);
    /// paths are relative to `base`. Every image is decoded once here, on `dataloader_threads`
    /// threads, so that problems are collected up front, not met mid-run: the run goes on
    /// without the images that have them.
    pub fn scan(config: &TrainConfig, base: &Path, kinds: &[ConceptType]) -> Self {
        let mut d = Dataset::default();
        let mut found = Vec::new();
        for (ci, c) in config.concepts.iter().enumerate() {
            if !c.enabled || !kinds.contains(&c.kind) {
                continue;
            }
            match concept_images(c, base) {
                Ok(paths) => found.extend(paths.into_iter().map(|p| (ci, p))),
                Err(e) => d.problems.push(format!(
                    "concept `{}`: {}: {e}",
                    c.name,
                    TrainConfig::path(base, &c.path).display()
                )),
            }
        }
        let threads = config.dataloader_threads.max(1);
        let chunk = found.len().div_ceil(threads).max(1);
        let checked: Vec<Checked> = std::thread::scope(|s| {
            let jobs: Vec<_> = found
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(_, p)| {
                                // A decoder that panics on a file only loses that file.
                                std::panic::catch_unwind(|| check(p)).unwrap_or_else(|_| Checked {
                                    size: Err(format!("{}: the image decoder failed", p.display())),
                                    mask_problem: None,
                                    mask: None,
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            jobs.into_iter()
                .flat_map(|j| j.join().unwrap_or_default())
                .collect()
        });
        for ((ci, p), checked) in found.into_iter().zip(checked) {
            let c = &config.concepts[ci];
            let (width, height) = match checked.size {
                Ok(s) => s,
                Err(e) => {
                    d.problems.push(e);
                    continue;
                }
            };
            if width < MIN_SIDE || height < MIN_SIDE {
                d.problems
                    .push(format!("{}: {width}x{height} is too small", p.display()));
                continue;
            }
            d.problems.extend(checked.mask_problem);
            let captions = match captions(c, base, &p) {
                Ok(caps) if !caps.is_empty() => caps,
                Ok(_) => {
                    d.problems
                        .push(format!("{}: the caption is empty", p.display()));
                    vec![String::new()]
                }
                Err(e) => {
                    d.problems.push(e);
                    vec![String::new()]
                }
            };
            d.items.push(Item {
                path: p,
                captions,
                concept: ci,
                width,
                height,
                mask: checked.mask,
            });
        }
        d
    }
}

/// A seeded generator for one purpose at one point of the run: the same (seed, purpose, index)
/// always gives the same draws, which is what makes a resumed run repeat an uninterrupted one.
pub fn rng(seed: u64, purpose: u64, index: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&purpose.to_le_bytes());
    s[16..24].copy_from_slice(&index.to_le_bytes());
    ChaCha8Rng::from_seed(s)
}

/// What each batch of an epoch holds.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    pub items: Vec<usize>,
    pub bucket: (usize, usize),
    pub epoch: u64,
}

/// One epoch: items repeated per concept balancing, assigned to buckets, shuffled, batched.
pub fn plan_epoch(
    d: &Dataset,
    config: &TrainConfig,
    buckets: &[buckets::Buckets],
    epoch: u64,
) -> Vec<BatchPlan> {
    plan_global_epoch(d, config, buckets, epoch, 1)
}

/// One epoch of a data-parallel run over `peers` processes: batches of `batch_size` per process
/// (each process takes its share of every one), only whole ones when `peers` is over 1.
pub fn plan_global_epoch(
    d: &Dataset,
    config: &TrainConfig,
    buckets: &[buckets::Buckets],
    epoch: u64,
    peers: usize,
) -> Vec<BatchPlan> {
    let batch = config.batch_size * peers;
    const PURPOSE: u64 = 1;
    let mut r = rng(config.seed, PURPOSE, epoch);
    let mut chosen = Vec::new();
    for (ci, c) in config.concepts.iter().enumerate() {
        let of: Vec<usize> = (0..d.items.len())
            .filter(|&i| d.items[i].concept == ci)
            .collect();
        if of.is_empty() {
            continue;
        }
        if c.balancing_strategy == BalancingStrategy::Samples {
            for _ in 0..c.balancing.round() as usize {
                chosen.push(of[r.random_range(0..of.len())]);
            }
        } else {
            let n = ((of.len() as f64 * c.balancing).floor() as usize).max(1);
            chosen.extend(of.iter().cycle().take(n));
        }
    }
    chosen.shuffle(&mut r);
    let mut by_bucket: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
    for i in chosen {
        let it = &d.items[i];
        // Several resolutions: one at random per image and epoch.
        let res = if buckets.len() > 1 {
            &buckets[r.random_range(0..buckets.len())]
        } else {
            &buckets[0]
        };
        by_bucket
            .entry(res.nearest(it.width as usize, it.height as usize))
            .or_default()
            .push(i);
    }
    let mut batches: Vec<BatchPlan> = by_bucket
        .into_iter()
        .flat_map(|(bucket, items)| {
            items
                .chunks(batch)
                .filter(|c| peers == 1 || c.len() == batch)
                .map(|c| BatchPlan {
                    items: c.to_vec(),
                    bucket,
                    epoch,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    batches.shuffle(&mut r);
    batches
}

/// An image and its mask prepared for training.
pub struct Prepared {
    /// RGB in [-1, 1], `[3, H, W]` order.
    pub pixels: Vec<f32>,
    /// In [0, 1], `[H, W]`; all ones without a mask file.
    pub mask: Vec<f32>,
    /// Original height and width, crop top and left (in the scaled image), and the bucket's
    /// height and width: what SDXL-like models are conditioned on.
    pub geometry: [f32; 6],
}

/// `[3, H, W]` in [-1, 1] as RGB bytes (`H × W × 3`).
pub fn rgb_bytes(chw: &[f32], w: usize, h: usize) -> Vec<u8> {
    let plane = w * h;
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| ((chw[c * plane + i] + 1.0) * 127.5).round() as u8))
        .collect()
}

/// The image scaled to cover `bucket` (width, height) and cropped (at a random offset with
/// jitter, else centred), then flipped, rotated and colour-changed as the concept says
/// ([`augment::Drawn`]); its mask (all ones without a mask file) goes through the same crop,
/// flip and rotation. Training, validation, the debug output and the GUI's preview all use this.
pub fn prepare(
    item: &Item,
    concept: &ConceptConfig,
    bucket: (usize, usize),
    r: &mut ChaCha8Rng,
) -> std::result::Result<Prepared, String> {
    let img = image::open(&item.path)
        .map_err(|e| format!("{}: {e}", item.path.display()))?
        .to_rgb8();
    let mask = match &item.mask {
        Some(m) => Some(
            image::open(m)
                .map_err(|e| format!("{}: {e}", m.display()))?
                .to_luma8(),
        ),
        None => None,
    };
    let (bw, bh) = (bucket.0 as u32, bucket.1 as u32);
    let scale = (bw as f64 / img.width() as f64).max(bh as f64 / img.height() as f64);
    let (sw, sh) = (
        ((img.width() as f64 * scale).round() as u32).max(bw),
        ((img.height() as f64 * scale).round() as u32).max(bh),
    );
    let (x, y) = if concept.enable_crop_jitter {
        (r.random_range(0..=sw - bw), r.random_range(0..=sh - bh))
    } else {
        ((sw - bw) / 2, (sh - bh) / 2)
    };
    fn place<P: image::Pixel<Subpixel = u8> + 'static>(
        i: &image::ImageBuffer<P, Vec<u8>>,
        (sw, sh): (u32, u32),
        (x, y, bw, bh): (u32, u32, u32, u32),
    ) -> image::ImageBuffer<P, Vec<u8>> {
        let scaled = image::imageops::resize(i, sw, sh, image::imageops::FilterType::Lanczos3);
        image::imageops::crop_imm(&scaled, x, y, bw, bh).to_image()
    }
    let crop = (x, y, bw, bh);
    let mut pixels = augment::Planes::from_image(&place(&img, (sw, sh), crop));
    let mut mask = match mask {
        Some(m) => augment::Planes::from_image(&place(&m, (sw, sh), crop)),
        None => augment::Planes {
            width: bw as usize,
            height: bh as usize,
            channels: 1,
            data: vec![1.0; (bw * bh) as usize],
        },
    };
    augment::Drawn::draw(concept, r).apply(&mut pixels, &mut mask);
    // [H, W, 3] in [0, 1] to [3, H, W] in [-1, 1].
    let plane = (bw * bh) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, p) in pixels.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = p[c] * 2.0 - 1.0;
        }
    }
    Ok(Prepared {
        pixels: chw,
        mask: mask.data,
        geometry: [img.height(), img.width(), y, x, bh, bw].map(|v| v as f32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_resolutions_are_drawn_per_image_and_batches_keep_one_bucket() {
        let items = (0..12)
            .map(|i| Item {
                path: PathBuf::from(format!("{i}.png")),
                captions: vec![],
                concept: 0,
                width: 64,
                height: 64,
                mask: None,
            })
            .collect();
        let d = Dataset {
            items,
            problems: vec![],
        };
        let config = TrainConfig {
            batch_size: 2,
            concepts: vec![ConceptConfig::default()],
            ..TrainConfig::default()
        };
        let sets = [16, 24].map(|r| buckets::Buckets::new((r, r), 8, true));
        let mut seen = std::collections::BTreeSet::new();
        for epoch in 0..4 {
            let plan = plan_epoch(&d, &config, &sets, epoch);
            assert_eq!(plan.iter().map(|b| b.items.len()).sum::<usize>(), 12);
            seen.extend(plan.iter().map(|b| b.bucket));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [(16, 16), (24, 24)]);
        let one = plan_epoch(&d, &config, &sets[..1], 0);
        assert!(
            one.iter()
                .all(|b| b.bucket == (16, 16) && b.items.len() == 2)
        );
    }

    #[test]
    fn the_mask_goes_through_the_same_crop_and_flip_as_the_image() {
        let d = tempfile::tempdir().unwrap();
        // A horizontal ramp, and a mask with the same ramp.
        let ramp = |x: u32| (x * 255 / 39) as u8;
        image::RgbImage::from_fn(40, 24, |x, _| image::Rgb([ramp(x), 0, 0]))
            .save(d.path().join("a.png"))
            .unwrap();
        image::GrayImage::from_fn(40, 24, |x, _| image::Luma([ramp(x)]))
            .save(d.path().join("a-masklabel.png"))
            .unwrap();
        let item = Item {
            path: d.path().join("a.png"),
            captions: vec![],
            concept: 0,
            width: 40,
            height: 24,
            mask: Some(d.path().join("a-masklabel.png")),
        };
        let concept = ConceptConfig::default();
        let mut flipped = 0;
        for seed in 0..8 {
            let p = prepare(&item, &concept, (16, 16), &mut rng(seed, 0, 0)).unwrap();
            for (i, m) in p.mask.iter().enumerate() {
                let red = (p.pixels[i] + 1.0) / 2.0;
                assert!(
                    (red - m).abs() < 0.02,
                    "seed {seed} pixel {i}: {red} vs {m}"
                );
            }
            flipped += usize::from(p.mask[0] > p.mask[15]);
        }
        assert!(
            flipped > 0 && flipped < 8,
            "flips happen at random ({flipped}/8)"
        );
    }
}
