//! GELU (erf form) and its backward over a whole activation: chunks in parallel, each a
//! vectorised pass ([`crate::rows`]). flex's own runs libm's erf element by element on one
//! thread.

use rayon::prelude::*;

use crate::rows;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `x · Φ(x)`.
pub fn forward(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| rows::gelu(x, o));
    out
}

/// `dy · (Φ(x) + x · Φ'(x))`.
pub fn backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(d, (x, dy))| rows::gelu_grad(x, dy, d));
    dx
}
