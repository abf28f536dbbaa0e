//! Training: the trainer and what it uses.

pub mod bench;
pub mod cache;
pub mod demo;
pub mod loss;
pub mod multi_gpu;
pub mod tensorboard;
pub mod timesteps;
pub mod trainer;
