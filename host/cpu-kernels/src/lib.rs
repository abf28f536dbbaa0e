//! CPU kernels on plain f32 slices (attention, convolution, GroupNorm with SiLU, GELU), parallel on
//! rayon's pool (the one burn's flex backend uses). No burn dependency: the runtime hands them
//! its tensors' buffers. Built optimised even in dev builds (the workspace's Cargo.toml), since
//! tests and benchmarks run them at size.

pub mod attention;
pub mod conv;
pub mod gelu;
pub mod group_norm;
mod rows;
mod winograd;

/// The tests' inputs: `len` values in `[low, low + 1)` from a linear congruential generator.
#[cfg(test)]
fn uniform(len: usize, seed: u32, low: f32) -> Vec<f32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1 << 24) as f32 + low
        })
        .collect()
}

/// The tests' largest absolute difference between two results.
#[cfg(test)]
fn worst_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
