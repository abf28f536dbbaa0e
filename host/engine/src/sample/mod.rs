//! Sampling: noise schedules and samplers, on host scalars and device tensors (no host syncs).

pub mod flow;
pub mod generate;
pub mod schedule;

pub use schedule::{NoiseSchedule, Prediction, Sampler, SamplerRun, SchedulerConfig, sample_cfg};
