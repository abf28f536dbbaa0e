//! Dynamic loss scaling for float16 training (torch's `GradScaler` rule, which OneTrainer uses):
//! the loss is multiplied by the scale before backward so that small gradients survive float16;
//! a step whose gradients overflowed is skipped and the scale halves; after 2000 good steps in a
//! row it doubles. The scale is a power of two (exact in any dtype), kept in the run's progress
//! so a resumed run goes on with it.

use ferrite_plugin_api::Tensor;

use super::{Event, Result, TrainError, Trainer, err};
use crate::config::{FallbackTrainDtype, TrainDtype};
use crate::runtime::TrainDtype as RtTrainDtype;

impl From<TrainDtype> for RtTrainDtype {
    fn from(d: TrainDtype) -> Self {
        match d {
            TrainDtype::Float32 => Self::Float32,
            TrainDtype::Float16 => Self::Float16,
            TrainDtype::Bfloat16 => Self::BFloat16,
        }
    }
}

impl From<FallbackTrainDtype> for RtTrainDtype {
    fn from(d: FallbackTrainDtype) -> Self {
        match d {
            FallbackTrainDtype::Float32 => Self::Float32,
            FallbackTrainDtype::Bfloat16 => Self::BFloat16,
        }
    }
}

/// Good steps in a row before the scale doubles.
const GROWTH_INTERVAL: u64 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    /// The scale is 2^exponent.
    pub exponent: i32,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScale {
    /// 2^16, as torch starts.
    fn default() -> Self {
        Self {
            exponent: 16,
            good_steps: 0,
        }
    }
}

impl LossScale {
    pub fn factor(&self) -> f32 {
        2f32.powi(self.exponent)
    }

    /// Notes a step whose gradients were finite or not; true when the step is taken.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.exponent += 1;
                self.good_steps = 0;
            }
        } else {
            self.exponent -= 1;
            self.good_steps = 0;
        }
        finite
    }
}

impl Trainer {
    /// Runs `f` (part of the training forward) computing in the run's `train_dtype`.
    pub(super) fn in_train_dtype<T>(&self, f: impl FnOnce() -> T) -> T {
        let _entered = self.mixed.enter();
        f()
    }

    /// The loss scale of this step: Some in a float16 run (started at 2^16 on the first step).
    pub(super) fn loss_scale(&mut self) -> Option<f32> {
        if self.config.train_dtype != TrainDtype::Float16 {
            return None;
        }
        Some(
            self.progress
                .loss_scale
                .get_or_insert_with(LossScale::default)
                .factor(),
        )
    }

    /// In a float16 run, checks the summed (scaled) gradients: finite ones are unscaled and the
    /// step goes on (true); otherwise the step is skipped (false), the scale lowered and the
    /// skip reported. One host read per step, of one number. Overflowing at a scale of 1 is an
    /// error: lowering it further cannot help.
    pub(super) fn unscale(
        &mut self,
        grads: &mut [Vec<Option<Tensor>>],
        on_event: &mut impl FnMut(Event),
    ) -> Result<bool> {
        let Some(factor) = self.loss_scale() else {
            return Ok(true);
        };
        let mut total: Option<Tensor> = None;
        for g in grads.iter().flatten().flatten() {
            let s = g.sum_all().map_err(err)?;
            total = Some(match total {
                Some(t) => t.add(&s).map_err(err)?,
                None => s,
            });
        }
        // An overflow anywhere makes the sum inf or NaN.
        let finite = match &total {
            Some(t) => t.item().map_err(err)?.is_finite(),
            None => true,
        }
            // Where tests make the gradients overflow.
            && fail::eval("grads-overflow", |_| ()).is_none();
        let step = self.progress.step + 1; // as Event::Step numbers it
        let scale = self
            .progress
            .loss_scale
            .get_or_insert_with(LossScale::default);
        if !finite && scale.exponent <= 0 {
            return Err(TrainError(format!(
                "float16 gradients overflow even with a loss scale of {} at step {step}: they \
                 do not fit in float16; set train_dtype to bfloat16 or float32",
                scale.factor()
            )));
        }
        if !scale.update(finite) {
            let loss_scale = scale.factor();
            tracing::warn!(
                "step {step} skipped: float16 gradients overflowed; loss scale now {loss_scale}"
            );
            on_event(Event::Skipped { step, loss_scale });
            return Ok(false);
        }
        for g in grads.iter_mut().flatten().flatten() {
            *g = g.mul_scalar(1.0 / f64::from(factor)).map_err(err)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_the_scale_and_good_steps_double_it() {
        let mut s = LossScale::default();
        assert_eq!(s.factor(), 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.factor(), 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.factor(), 32768.0);
        assert!(s.update(true));
        assert_eq!((s.factor(), s.good_steps), (65536.0, 0));
    }
}
