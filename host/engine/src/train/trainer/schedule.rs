//! How long the run is and the learning rate along it (warmup, then the schedule), with
//! OneTrainer's formulas (`lr_scheduler_util.py`).

use std::f64::consts::PI;

use super::Trainer;
use crate::config::{LrScheduler, TrainConfig};

impl Trainer {
    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        (self.config.epochs * self.batches_per_epoch / self.config.gradient_accumulation_steps)
            as u64
    }

    /// The learning-rate factor at `step`: warmup, then the schedule.
    pub fn lr_factor(&self, step: u64) -> f64 {
        let c = &self.config;
        let scale = c.learning_rate_scaler.scale(
            c.batch_size,
            c.gradient_accumulation_steps,
            self.processes(),
        );
        // OneTrainer scales by the square root.
        lr_factor(c, step, self.total_steps()) * scale.sqrt()
    }

    /// The learning rate reported for optimizer step `step` (from 0) taken at `factor`: the
    /// configured rate times the factor, or Adafactor's relative step where it sets its own.
    pub fn reported_lr(&self, step: u64, factor: f64) -> f64 {
        let c = &self.config;
        let option = |k: &str| c.optimizer.get(k).and_then(|v| v.as_bool()) == Some(true);
        if c.learning_rate_scheduler == LrScheduler::Adafactor && option("relative_step") {
            adafactor_relative_step(step + 1, option("warmup_init"))
        } else {
            c.learning_rate * factor
        }
    }
}

/// transformers' Adafactor `_get_lr` without the parameter scale, at its step `t` (from 1).
pub fn adafactor_relative_step(t: u64, warmup_init: bool) -> f64 {
    let t = t as f64;
    let floor = if warmup_init { 1e-6 * t } else { 1e-2 };
    floor.min(1.0 / t.sqrt())
}

/// The factor of the learning rate at optimizer step `step` (from 0) of `total`.
pub fn lr_factor(c: &TrainConfig, step: u64, total: u64) -> f64 {
    if c.learning_rate_scheduler == LrScheduler::Adafactor {
        // The optimizer's own; OneTrainer applies no warmup to it either.
        return 1.0;
    }
    let total = total.max(1) as f64;
    let warmup = if c.learning_rate_warmup_steps <= 1.0 {
        c.learning_rate_warmup_steps * total
    } else {
        c.learning_rate_warmup_steps
    };
    let s = step as f64;
    if s < warmup {
        // (s + 1): the first step already learns (OneTrainer's s/warmup spends it at 0).
        return (s + 1.0) / warmup;
    }
    // Progress through the steps after warmup; past the end the schedule stays at its floor.
    let p = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
    let cycles = c.learning_rate_cycles;
    let value = match c.learning_rate_scheduler {
        LrScheduler::Constant | LrScheduler::Adafactor => return 1.0,
        LrScheduler::Linear => 1.0 - p,
        LrScheduler::Cosine => 0.5 * (1.0 + (PI * p).cos()),
        LrScheduler::CosineWithRestarts => 0.5 * (1.0 + (2.0 * PI * cycles * p).cos()),
        LrScheduler::CosineWithHardRestarts => 0.5 * (1.0 + (PI * ((cycles * p) % 1.0)).cos()),
        LrScheduler::Rex => {
            const D: f64 = 0.9;
            if p < 1.0 {
                (1.0 - p) / ((1.0 - D) + D * (1.0 - p))
            } else {
                0.0
            }
        }
    };
    let min = c.learning_rate_min_factor;
    min + (1.0 - min) * value.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(s: LrScheduler, warmup: f64, cycles: f64, min: f64) -> TrainConfig {
        TrainConfig {
            learning_rate_scheduler: s,
            learning_rate_warmup_steps: warmup,
            learning_rate_cycles: cycles,
            learning_rate_min_factor: min,
            ..TrainConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Each schedule against its formula written out by hand at chosen points (100 steps, no
    /// warmup: progress is step/100).
    #[test]
    fn each_schedule_follows_onetrainers_formula() {
        use LrScheduler::*;
        let cases: &[(LrScheduler, f64, u64, f64)] = &[
            (Constant, 1.0, 37, 1.0),
            (Linear, 1.0, 25, 0.75),
            (Cosine, 1.0, 50, 0.5),
            (Cosine, 1.0, 25, 0.5 * (1.0 + (PI / 4.0).cos())),
            // Two whole periods: back at the top halfway, at the bottom at a quarter.
            (CosineWithRestarts, 2.0, 25, 0.0),
            (CosineWithRestarts, 2.0, 50, 1.0),
            (CosineWithRestarts, 2.0, 60, 0.5 * (1.0 + (0.4 * PI).cos())),
            // Two half-cosines: near the bottom just before halfway, then the full rate again.
            (CosineWithHardRestarts, 2.0, 25, 0.5),
            (CosineWithHardRestarts, 2.0, 50, 1.0),
            (
                CosineWithHardRestarts,
                2.0,
                49,
                0.5 * (1.0 + (0.98 * PI).cos()),
            ),
            // REX at half way: 0.5 / (0.1 + 0.45).
            (Rex, 1.0, 50, 0.5 / 0.55),
            (Rex, 1.0, 90, 0.1 / (0.1 + 0.09)),
            (Rex, 1.0, 100, 0.0),
        ];
        for &(s, cycles, step, want) in cases {
            let got = lr_factor(&config(s, 0.0, cycles, 0.0), step, 100);
            assert!(close(got, want), "{s} at {step}: {got} != {want}");
        }
    }

    /// Adafactor's schedule: a factor of 1 from the first step (no warmup, no floor); the
    /// relative step against transformers' formula.
    #[test]
    fn adafactors_schedule_is_its_relative_step() {
        let c = config(LrScheduler::Adafactor, 10.0, 1.0, 0.5);
        for step in [0, 5, 99] {
            assert_eq!(lr_factor(&c, step, 100), 1.0);
        }
        for (t, warmup_init, want) in [
            (1, false, 1e-2),
            (10_000, false, 1e-2),
            (40_000, false, 0.005),
            (1, true, 1e-6),
            (1000, true, 1e-3),
            (1_000_000, true, 1e-3),
        ] {
            let got = adafactor_relative_step(t, warmup_init);
            assert!(close(got, want), "{t} {warmup_init}: {got} != {want}");
        }
    }

    #[test]
    fn the_floor_lifts_every_decaying_schedule_but_not_constant_or_warmup() {
        for s in [
            LrScheduler::Linear,
            LrScheduler::Cosine,
            LrScheduler::CosineWithRestarts,
            LrScheduler::CosineWithHardRestarts,
            LrScheduler::Rex,
        ] {
            let bare = config(s, 0.0, 1.0, 0.0);
            let floored = config(s, 0.0, 1.0, 0.2);
            for step in [0, 13, 50, 99, 100, 150] {
                let (v, f) = (lr_factor(&bare, step, 100), lr_factor(&floored, step, 100));
                assert!(close(f, 0.2 + 0.8 * v), "{s} at {step}: {f} from {v}");
            }
            // The last step of a linear or REX run reaches the floor, not 0.
            if matches!(s, LrScheduler::Linear | LrScheduler::Rex) {
                assert!(close(lr_factor(&floored, 100, 100), 0.2));
            }
        }
        let constant = config(LrScheduler::Constant, 0.0, 1.0, 0.2);
        assert_eq!(lr_factor(&constant, 50, 100), 1.0);
        // Warmup rises to the full rate whatever the floor.
        let warm = config(LrScheduler::Linear, 10.0, 1.0, 0.5);
        assert!(close(lr_factor(&warm, 0, 100), 0.1));
        assert!(close(lr_factor(&warm, 4, 100), 0.5));
    }

    #[test]
    fn warmup_in_steps_or_as_a_fraction_then_the_schedule_starts_at_its_top() {
        let steps = config(LrScheduler::Linear, 20.0, 1.0, 0.0);
        let fraction = config(LrScheduler::Linear, 0.2, 1.0, 0.0);
        for step in 0..100 {
            assert!(close(
                lr_factor(&steps, step, 100),
                lr_factor(&fraction, step, 100)
            ));
        }
        assert!(close(lr_factor(&steps, 9, 100), 0.5));
        assert!(close(lr_factor(&steps, 20, 100), 1.0));
        // 80 steps of schedule after the warmup: half way at step 60.
        assert!(close(lr_factor(&steps, 60, 100), 0.5));
    }
}
