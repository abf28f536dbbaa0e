//! Training: the config, and the trainer.

pub mod config;
pub mod demo;
pub mod tensorboard;
pub mod trainer;
