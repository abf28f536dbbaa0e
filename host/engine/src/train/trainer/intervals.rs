//! What is due when: validation, samples, backups, saves and debug output every N steps,
//! epochs or minutes.

use std::time::Instant;

use super::{Event, Result, Trainer};
use crate::config::TimeUnit;

/// Where `after` and `stop_parts` are called: after an optimizer step or an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Moment {
    Step,
    Epoch,
}

impl Trainer {
    /// Whether something set to happen every `every` `unit`s is due at `at` (`key` names it
    /// for the timed units, which count from when it last ran or from the start).
    pub(super) fn due(
        &mut self,
        key: &'static str,
        every: f64,
        unit: TimeUnit,
        at: Moment,
    ) -> bool {
        let count = match at {
            Moment::Step => self.progress.step,
            Moment::Epoch => self.progress.epoch,
        };
        let seconds = match unit {
            TimeUnit::Second => 1.0,
            TimeUnit::Minute => 60.0,
            TimeUnit::Hour => 3600.0,
            TimeUnit::Always => return at == Moment::Step,
            TimeUnit::Step => {
                return at == Moment::Step && every >= 1.0 && count.is_multiple_of(every as u64);
            }
            TimeUnit::Epoch => {
                return at == Moment::Epoch && every >= 1.0 && count.is_multiple_of(every as u64);
            }
            TimeUnit::Never => return false,
        };
        if at != Moment::Step || every <= 0.0 {
            return false;
        }
        let since = *self.last_done.get(key).unwrap_or(&self.started);
        let due = since.elapsed().as_secs_f64() >= every * seconds;
        if due {
            self.last_done.insert(key, Instant::now());
        }
        due
    }

    /// Validation, samples, backups and saves due at `at`.
    pub(super) fn after(&mut self, at: Moment, on_event: &mut impl FnMut(Event)) -> Result<()> {
        // In a data-parallel run, the first process writes for all.
        if !self.leader() {
            return Ok(());
        }
        let c = self.config.clone();
        if c.debug_mode
            && self.due("debug", c.debug_after, c.debug_after_unit, at)
            && let Some(s) = &self.debug_last
        {
            self.write_debug(s)?;
        }
        let (validate, sample, backup, save) = (
            c.validation && self.due("validate", c.validate_after, c.validate_after_unit, at),
            self.due("sample", c.sample_after, c.sample_after_unit, at),
            self.due("backup", c.backup_after, c.backup_after_unit, at),
            self.due("save", c.save_every, c.save_every_unit, at),
        );
        if validate {
            for (concept, loss) in self.validate()? {
                self.log_scalar(&format!("loss/validation/{concept}"), loss);
                on_event(Event::Validation {
                    step: self.progress.step,
                    concept,
                    loss,
                });
            }
        }
        if sample {
            for p in self.sample()? {
                on_event(Event::Sample(p));
            }
        }
        if backup {
            on_event(Event::Backup(self.backup()?));
        }
        if save {
            on_event(Event::Saved(self.save_output()?));
        }
        Ok(())
    }
}
