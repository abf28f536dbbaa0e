//! Helpers shared by adapter plugins.

use crate::error::{Error, Result};
use crate::nn::AdaptableLayer;
use crate::tensor::Tensor;

/// Checks that the weight an adapter is bound to is the one it was made for.
pub fn check_weight(layer: &AdaptableLayer, weight: &Tensor) -> Result<()> {
    let got = weight.shape()?;
    if got != layer.shape {
        return Err(Error(format!(
            "layer `{}`: weight has shape {got:?}, the adapter was made for {:?}",
            layer.name, layer.shape
        )));
    }
    Ok(())
}

/// FNV-1a of the layer name mixed into the seed: every layer gets its own initialisation.
pub fn layer_seed(seed: u64, layer: &str) -> u64 {
    layer.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Copies a tensor read from a file into the adapter's own in place (handles held elsewhere, an
/// optimizer's, stay valid), after checking its shape.
pub fn load_into(layer: &str, key: &str, target: &Tensor, src: &Tensor) -> Result<()> {
    let (want, got) = (target.shape()?, src.shape()?);
    if want != got {
        return Err(Error(format!(
            "layer `{layer}`: `{key}` has shape {got:?}, this adapter expects {want:?} \
             (a different rank or layer)"
        )));
    }
    target.assign(&src.cast(target.dtype()?)?.detach()?)
}

/// A scalar such as kohya's `alpha` (0-d, or one element).
pub fn scalar(layer: &str, key: &str, t: &Tensor) -> Result<f64> {
    match t.to_vec()?[..] {
        [v] => Ok(v as f64),
        _ => Err(Error(format!(
            "layer `{layer}`: `{key}` should hold one value"
        ))),
    }
}
