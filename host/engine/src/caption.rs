//! Captions for a folder of images (`ferrite caption`, OneTrainer's batch captioning): a
//! captioner plugin captions each image from the initial caption, the host puts the prefix and
//! postfix around it and writes `<stem>.txt` atomically by the mode. An image that cannot be read
//! or captioned is reported and skipped.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferrite_plugin_api::plugin::CaptionerHandle;

pub use crate::label::{LabelError as CaptionError, LabelReport as CaptionReport};
use crate::label::{each_image, image_chw};

/// What happens to a caption an image has (OneTrainer's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptionMode {
    /// Write the new caption over any old one.
    Replace,
    /// Only images without a caption file.
    #[default]
    Fill,
    /// The new caption as one more line of the file (each line is one of the image's captions).
    Add,
}

impl FromStr for CaptionMode {
    type Err = CaptionError;
    fn from_str(s: &str) -> Result<Self, CaptionError> {
        Ok(match s {
            "replace" => Self::Replace,
            "fill" => Self::Fill,
            "add" => Self::Add,
            _ => {
                return Err(CaptionError(format!(
                    "mode `{s}`: one of replace, fill, add"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    /// Where the caption starts (a tagger puts it first).
    pub initial_caption: String,
    pub prefix: String,
    pub postfix: String,
    pub mode: CaptionMode,
    pub include_subdirectories: bool,
}

/// `<stem>.txt` next to the image.
pub fn caption_path(image: &Path) -> PathBuf {
    image.with_extension("txt")
}

/// Captions every image of `dir`; `progress(done, total)` after each (false stops the run).
pub fn caption_folder(
    captioner: &mut CaptionerHandle,
    dir: &Path,
    o: &CaptionOptions,
    progress: impl FnMut(usize, usize) -> bool,
) -> Result<CaptionReport, CaptionError> {
    each_image(dir, o.include_subdirectories, progress, |file| {
        caption_image(captioner, file, o)
    })
}

/// Captions one image; false when fill found a caption file there already.
pub fn caption_image(
    captioner: &mut CaptionerHandle,
    image: &Path,
    o: &CaptionOptions,
) -> Result<bool, CaptionError> {
    let out = caption_path(image);
    // Fill only sees a caption file, replace never reads it; add keeps its lines.
    let old = match (out.exists(), o.mode) {
        (true, CaptionMode::Fill) => return Ok(false),
        (true, CaptionMode::Add) => Some(std::fs::read_to_string(&out).map_err(|e| {
            CaptionError(format!("cannot read its caption {}: {e}", out.display()))
        })?),
        _ => None,
    };
    let (chw, _, _) = image_chw(image)?;
    let generated = captioner
        .caption(&chw, &o.initial_caption)
        .map_err(|e| CaptionError(e.to_string()))?;
    let caption = format!("{}{generated}{}", o.prefix, o.postfix)
        .trim()
        .to_string();
    // OneTrainer's file: one caption per line, blank lines dropped.
    let mut lines = old.as_deref().map(crate::data::lines).unwrap_or_default();
    lines.push(caption);
    crate::fsutil::write_atomic(&out, lines.join("\n").as_bytes())
        .map_err(|e| CaptionError(e.to_string()))?;
    Ok(true)
}
