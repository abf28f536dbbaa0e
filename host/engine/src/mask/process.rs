//! OneTrainer's mask post-processing (its maskers' `__process_mask`) and its ways of combining a
//! new mask with the one a sample has (`MaskSample.apply_mask`), on the device.

use ferrite_plugin_api::{DType, Result, Tensor, ops};

use super::MaskMode;

/// The mean over a `(2r+1)²` square with the edge pixels repeated outward (OneTrainer's
/// averaging conv with `padding_mode='replicate'`), on `[1, 1, H, W]`.
fn box_mean(x: &Tensor, r: usize) -> Result<Tensor> {
    if r == 0 {
        return Ok(x.clone());
    }
    let k = 2 * r + 1;
    let mut x = x.clone();
    for dim in [2, 3] {
        let n = x.dim(dim)?;
        let mut shape = x.shape()?;
        shape[dim] = r;
        let first = x.narrow(dim, 0, 1)?.expand(&shape)?;
        let last = x.narrow(dim, n - 1, 1)?.expand(&shape)?;
        x = Tensor::cat(&[&first, &x, &last], dim)?;
    }
    let kernel = Tensor::full(&[1, 1, k, k], 1.0 / (k * k) as f64, DType::F32)?;
    ops::conv2d(&x, &kernel, None, Default::default())
}

/// A masker's map (`[c, h, w]`) as a 0/1 mask of the image's size (`[height, width]`): the
/// mean over its channels, smoothed over `smooth` pixels, resized (bilinear), above
/// `threshold`, grown by `expand` pixels.
pub fn process(
    map: &Tensor,
    (height, width): (usize, usize),
    threshold: f64,
    smooth: usize,
    expand: usize,
) -> Result<Tensor> {
    let shape = map.shape()?;
    let (h, w) = match shape[..] {
        [_, h, w] | [h, w] if h > 0 && w > 0 => (h, w),
        _ => {
            return Err(ferrite_plugin_api::Error(format!(
                "the masker returned a map of shape {shape:?}, not [channels, height, width]"
            )));
        }
    };
    let x = map
        .cast(DType::F32)?
        .reshape(&[1, -1, h as i64, w as i64])?
        .mean(&[1], true)?;
    let mut x = box_mean(&x, smooth)?;
    if (h, w) != (height, width) {
        x = ops::interpolate(&x, [height, width], ops::InterpolateMode::Bilinear)?;
    }
    let x = x.gt_scalar(threshold)?.cast(DType::F32)?;
    box_mean(&x, expand)?
        .gt_scalar(0.0)?
        .cast(DType::F32)?
        .reshape(&[height as i64, width as i64])
}

/// The sample's mask after `mode` with strength `alpha` (`new` and `old` `[H, W]` in 0..1).
pub fn combine(mode: MaskMode, new: &Tensor, old: Option<&Tensor>, alpha: f64) -> Result<Tensor> {
    let scaled = new.mul_scalar(alpha)?;
    let Some(old) = old else {
        // Every mode starts from the new mask where there is none (OneTrainer's).
        return Ok(scaled);
    };
    match mode {
        MaskMode::Replace | MaskMode::Fill => Ok(scaled),
        MaskMode::Add => old.add(&scaled)?.clamp(Some(0.0), Some(1.0)),
        MaskMode::Subtract => old.sub(&scaled)?.clamp(Some(0.0), Some(1.0)),
        MaskMode::Blend => {
            let sum = old.add(&scaled)?;
            let sum = if alpha < 0.0 {
                sum.sub_scalar(alpha)?
            } else {
                sum
            };
            sum.div_scalar(1.0 + alpha)
        }
    }
}
