//! Helpers shared by the runtime's integration tests.

use ferrite_plugin_api::Tensor;

/// A tensor of deterministic values in [-1, 1) from `seed`.
pub fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
        })
        .collect();
    Tensor::from_f32(&v, shape).unwrap()
}
