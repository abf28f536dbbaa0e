//! CPU kernels on plain f32 slices, parallel on rayon's pool (the one burn's flex backend
//! uses). No burn dependency: the runtime hands them its tensors' buffers. Built optimised even
//! in dev builds (the workspace's Cargo.toml), since tests and benchmarks run them at size.

pub mod attention;
pub mod conv;
mod rows;
mod winograd;
