//! Masks for a folder of images (`ferrite mask`, OneTrainer's batch masking): a masker plugin
//! maps each image, the host post-processes the map as OneTrainer does ([`process`]) and
//! combines it with the image's `<stem>-masklabel.png` by the mode, then writes that file
//! atomically. An image that cannot be read or masked is reported and skipped.

pub mod process;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferrite_plugin_api::{Tensor, plugin::MaskerHandle};

pub use crate::label::{LabelError as MaskError, LabelReport as MaskReport};
use crate::label::{each_image, image_chw};

/// How a new mask meets the one an image has (OneTrainer's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskMode {
    /// Write the new mask over any old one.
    Replace,
    /// Only images without a mask.
    #[default]
    Fill,
    /// The old mask plus `alpha` times the new one, clamped to 0..1.
    Add,
    /// The old mask minus `alpha` times the new one, clamped to 0..1.
    Subtract,
    /// `(old + alpha·new) / (1 + alpha)`.
    Blend,
}

impl FromStr for MaskMode {
    type Err = MaskError;
    fn from_str(s: &str) -> Result<Self, MaskError> {
        Ok(match s {
            "replace" => Self::Replace,
            "fill" => Self::Fill,
            "add" => Self::Add,
            "subtract" => Self::Subtract,
            "blend" => Self::Blend,
            _ => {
                return Err(MaskError(format!(
                    "mode `{s}`: one of replace, fill, add, subtract, blend"
                )));
            }
        })
    }
}

/// OneTrainer's masking options, with its defaults.
#[derive(Debug, Clone)]
pub struct MaskOptions {
    /// What to mask (the colour masker: a hex colour); several prompts separated by commas.
    pub prompt: String,
    pub mode: MaskMode,
    /// A pixel is masked where the map is above it.
    pub threshold: f64,
    pub smooth_pixels: usize,
    pub expand_pixels: usize,
    /// The new mask's strength in add, subtract and blend (and its value in replace and fill).
    pub alpha: f64,
    pub include_subdirectories: bool,
}

impl Default for MaskOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            mode: MaskMode::Fill,
            threshold: 0.3,
            smooth_pixels: 5,
            expand_pixels: 10,
            alpha: 1.0,
            include_subdirectories: false,
        }
    }
}

/// `<stem>-masklabel.png` next to the image.
pub fn mask_path(image: &Path) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    image.with_file_name(format!("{stem}-masklabel.png"))
}

/// Masks every image of `dir`; `progress(done, total)` after each (false stops the run).
pub fn mask_folder(
    masker: &mut MaskerHandle,
    dir: &Path,
    o: &MaskOptions,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<MaskReport, MaskError> {
    if o.mode == MaskMode::Blend && o.alpha == -1.0 {
        return Err(MaskError(
            "alpha: blend divides by 1 + alpha, so -1 is not a strength".into(),
        ));
    }
    each_image(dir, o.include_subdirectories, progress, |file| {
        mask_image(masker, file, o)
    })
}

/// Masks one image; false when fill found a mask there already.
pub fn mask_image(
    masker: &mut MaskerHandle,
    image: &Path,
    o: &MaskOptions,
) -> Result<bool, MaskError> {
    let out = mask_path(image);
    // Replace never reads the old mask (it may be what is being fixed), fill only sees it.
    let old = match (out.exists(), o.mode) {
        (true, MaskMode::Fill) => return Ok(false),
        (true, MaskMode::Add | MaskMode::Subtract | MaskMode::Blend) => Some(read_mask(&out)?),
        _ => None,
    };
    let (chw, w, h) = image_chw(image)?;
    let err = |e: ferrite_plugin_api::Error| MaskError(e.to_string());
    let map = masker.mask(&chw, &o.prompt).map_err(err)?;
    let new = process::process(&map, (h, w), o.threshold, o.smooth_pixels, o.expand_pixels)
        .map_err(err)?;
    let old = match old {
        Some((mw, mh, _)) if (mw, mh) != (w, h) => {
            return Err(MaskError(format!(
                "its mask {} is {mw}x{mh}, the image {w}x{h}",
                out.display()
            )));
        }
        Some((_, _, values)) => Some(Tensor::from_f32(&values, &[h, w]).map_err(err)?),
        None => None,
    };
    let mask = process::combine(o.mode, &new, old.as_ref(), o.alpha).map_err(err)?;
    write_mask(&out, &mask.to_vec().map_err(err)?, w, h)?;
    Ok(true)
}

/// A mask file as 0..1 values (its luma), with its width and height.
fn read_mask(path: &Path) -> Result<(usize, usize, Vec<f32>), MaskError> {
    let l = image::open(path)
        .map_err(|e| MaskError(format!("cannot read its mask {}: {e}", path.display())))?
        .to_luma8();
    let values = l.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok((l.width() as usize, l.height() as usize, values))
}

/// Writes a mask as an RGB PNG (OneTrainer's: each value times 255, truncated).
fn write_mask(path: &Path, values: &[f32], w: usize, h: usize) -> Result<(), MaskError> {
    let luma: Vec<u8> = values
        .iter()
        .map(|&v| (v * 255.0).clamp(0.0, 255.0) as u8)
        .collect();
    write_mask_luma(path, &luma, w, h)
}

/// Writes a mask given as one byte per pixel (255: trained) as OneTrainer's RGB PNG, atomically.
pub fn write_mask_luma(path: &Path, luma: &[u8], w: usize, h: usize) -> Result<(), MaskError> {
    let bytes: Vec<u8> = luma.iter().flat_map(|&b| [b, b, b]).collect();
    let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
        MaskError(format!(
            "{}: {w}x{h} mask of {} pixels",
            path.display(),
            luma.len()
        ))
    })?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| MaskError(format!("{}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &png).map_err(|e| MaskError(e.to_string()))
}
