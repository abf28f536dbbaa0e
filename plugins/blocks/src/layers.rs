//! Shape-checked loaders for the basic layers, so a wrong checkpoint fails naming the key.

use ferrite_plugin_api::{
    DType, Result, Tensor, Weights,
    nn::{Conv2d, GroupNorm, LayerNorm, Linear},
    ops::ConvOptions,
};

use crate::{expect_shape, key};

pub fn linear(w: &Weights, prefix: &str, out: usize, inp: usize, dtype: DType) -> Result<Linear> {
    expect_shape(w, &key(prefix, "weight"), &[out, inp])?;
    Linear::load(w, prefix, dtype)
}

/// A square-kernel conv, weight `[out, in, k, k]`.
pub fn conv2d(
    w: &Weights,
    prefix: &str,
    out: usize,
    inp: usize,
    k: usize,
    o: ConvOptions,
    dtype: DType,
) -> Result<Conv2d> {
    expect_shape(w, &key(prefix, "weight"), &[out, inp, k, k])?;
    Conv2d::load(w, prefix, o, dtype)
}

pub fn group_norm(
    w: &Weights,
    prefix: &str,
    channels: usize,
    groups: usize,
    eps: f64,
    dtype: DType,
) -> Result<GroupNorm> {
    expect_shape(w, &key(prefix, "weight"), &[channels])?;
    GroupNorm::load(w, prefix, groups, eps, dtype)
}

/// A norm's weight alone (RMS norms: T5's, Flux's QK norms), `[dim]`.
pub fn norm_weight(w: &Weights, prefix: &str, dim: usize, dtype: DType) -> Result<Tensor> {
    let k = key(prefix, "weight");
    expect_shape(w, &k, &[dim])?;
    w.get(&k, dtype)
}

pub fn layer_norm(
    w: &Weights,
    prefix: &str,
    dim: usize,
    eps: f64,
    dtype: DType,
) -> Result<LayerNorm> {
    expect_shape(w, &key(prefix, "weight"), &[dim])?;
    LayerNorm::load(w, prefix, eps, dtype)
}
