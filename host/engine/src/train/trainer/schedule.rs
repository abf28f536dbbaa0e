//! How long the run is and the learning rate along it (warmup, then the schedule).

use super::Trainer;
use crate::config::LrScheduler;

impl Trainer {
    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        (self.config.epochs * self.batches_per_epoch / self.config.gradient_accumulation_steps)
            as u64
    }

    /// The learning-rate factor at `step`: warmup, then the schedule.
    pub fn lr_factor(&self, step: u64) -> f64 {
        let c = &self.config;
        let total = self.total_steps().max(1) as f64;
        let warmup = if c.learning_rate_warmup_steps <= 1.0 {
            c.learning_rate_warmup_steps * total
        } else {
            c.learning_rate_warmup_steps
        };
        let s = step as f64;
        if s < warmup {
            return (s + 1.0) / warmup;
        }
        let p = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
        let pi = std::f64::consts::PI;
        match c.learning_rate_scheduler {
            LrScheduler::Linear => 1.0 - p,
            LrScheduler::Cosine => 0.5 * (1.0 + (pi * p).cos()),
            LrScheduler::CosineWithRestarts => {
                0.5 * (1.0 + (pi * ((c.learning_rate_cycles * p) % 1.0)).cos())
            }
            LrScheduler::Constant => 1.0,
        }
    }
}
