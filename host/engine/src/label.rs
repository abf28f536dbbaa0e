//! What captioning and masking a folder share (OneTrainer's dataset tools): the images of a
//! folder, an image as the `[3, H, W]` tensor the plugins take, and a run over the folder that
//! reports each image that fails and goes on.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::Tensor;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LabelError(pub String);

/// What a folder run did.
#[derive(Debug, Default)]
pub struct LabelReport {
    pub written: usize,
    /// Images left as they were (fill mode found a caption or mask).
    pub kept: usize,
    /// Images that could not be done, with why.
    pub failed: Vec<(PathBuf, String)>,
}

/// The images of `dir` (and its subfolders when asked), masks aside.
pub fn images(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>, LabelError> {
    let mut out = Vec::new();
    crate::data::images_in(dir, recursive, &mut out)
        .map_err(|e| LabelError(format!("{}: {e}", dir.display())))?;
    Ok(out)
}

/// An image file as PIL opens it for OneTrainer: its format from its content (not its name),
/// turned upright by its EXIF orientation.
pub fn open_image(path: &Path) -> Result<image::DynamicImage, LabelError> {
    use image::ImageDecoder;
    let fail = |e: &dyn std::fmt::Display| LabelError(format!("cannot read the image: {e}"));
    let decoder = image::ImageReader::open(path)
        .map_err(|e| fail(&e))?
        .with_guessed_format()
        .map_err(|e| fail(&e))?
        .into_decoder()
        .map_err(|e| fail(&e))?;
    let mut decoder = decoder;
    let orientation = decoder.orientation().map_err(|e| fail(&e))?;
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| fail(&e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// An image file as RGB `[3, H, W]` in 0..1, with its width and height.
pub fn image_chw(path: &Path) -> Result<(Tensor, usize, usize), LabelError> {
    let rgb = open_image(path)?.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let pixels: Vec<f32> = rgb.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_f32(&pixels, &[h, w, 3])
        .and_then(|t| t.permute(&[2, 0, 1]))
        .map_err(|e| LabelError(e.to_string()))?;
    Ok((t, w, h))
}

/// Runs `one` on every image of `dir` (true: written, false: left as it was); an image it fails
/// on is logged and listed, and the run goes on. `progress(done, total)` before the first and
/// after each; when it says false the run stops there (the images done stay done).
pub fn each_image(
    dir: &Path,
    recursive: bool,
    mut progress: impl FnMut(usize, usize) -> bool,
    mut one: impl FnMut(&Path) -> Result<bool, LabelError>,
) -> Result<LabelReport, LabelError> {
    let files = images(dir, recursive)?;
    let mut report = LabelReport::default();
    if !progress(0, files.len()) {
        return Ok(report);
    }
    for (i, file) in files.iter().enumerate() {
        match one(file) {
            Ok(true) => report.written += 1,
            Ok(false) => report.kept += 1,
            Err(e) => {
                tracing::warn!("{}: {e}; skipped", file.display());
                report.failed.push((file.clone(), e.to_string()));
            }
        }
        if !progress(i + 1, files.len()) {
            break;
        }
    }
    Ok(report)
}
