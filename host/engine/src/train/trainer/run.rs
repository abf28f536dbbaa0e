//! The training loop: batches from the loader, steps, stop requests and events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferrite_plugin_api::Tensor;
use rand::Rng;

use super::debug;
use super::intervals::Moment;
use super::{Event, Result, TrainError, Trainer, err};
use crate::data;
use crate::data::loader::{self, Prefetch};

const RNG_DROPOUT: u64 = 6;

impl Trainer {
    /// The data loader's view of this run.
    pub(super) fn loader_context(&self) -> Arc<loader::Context> {
        Arc::new(loader::Context {
            data: self.data.clone(),
            config: Arc::new(self.config.clone()),
            caches: self.caches.clone(),
            timesteps: self.timesteps.clone(),
            text_cached: self.text_cached,
        })
    }

    /// Trains to the end (or until cancelled), reporting through `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        let _scope = self.scope.enter();
        let done = self.run_steps(&mut on_event);
        if self.parallel.is_none() {
            return done;
        }
        let done = done.map_err(|e| self.after_failure(e, &mut on_event));
        // So that this process can join another run (the GUI's next).
        self.leave(done.is_ok());
        done
    }

    fn run_steps(&mut self, on_event: &mut impl FnMut(Event)) -> Result<()> {
        on_event(Event::Started {
            items: self.data.items.len(),
            problems: self.data.problems.clone(),
            steps: self.total_steps(),
        });
        if self.config.latent_caching {
            let cached = self.precache(on_event)?;
            on_event(Event::Cached(cached));
        }
        let accum = self.config.gradient_accumulation_steps;
        let mut acc: Vec<Vec<Option<Tensor>>> = Vec::new();
        let mut acc_loss: Option<Tensor> = None;
        let mut in_accum = 0;
        let mut data_wait = Duration::ZERO;
        let mut step_began = Instant::now();
        let mut stop_agreed = false;
        let context = self.loader_context();
        'epochs: while (self.progress.epoch as usize) < self.config.epochs {
            let plan = self.plan(self.progress.epoch);
            let mut batches = Prefetch::start(
                context.clone(),
                plan,
                self.progress.batch_in_epoch,
                self.progress.batches,
                self.config.dataloader_threads,
            );
            loop {
                // Stopping keeps the work (between steps only): a backup at the step reached,
                // and the output model as it is, as OneTrainer saves at the end of a stopped run.
                // (A data-parallel run stops where its processes agreed to, after a step.)
                let stop = match self.parallel {
                    Some(_) => stop_agreed,
                    None => self.controls.cancel.is_cancelled(),
                };
                if in_accum == 0 && stop {
                    if self.leader()
                        && self.last_backup() != Some(self.backups_dir().join(self.backup_name()))
                    {
                        on_event(Event::Backup(self.backup()?));
                    }
                    // (Not when no step was taken: nothing would replace a previous output.)
                    if self.leader() && self.progress.step > 0 {
                        on_event(Event::Saved(self.save_output()?));
                    }
                    return Ok(());
                }
                if in_accum == 0 {
                    self.serve_controls(on_event)?;
                    self.step_start = self.progress;
                    step_began = Instant::now();
                }
                let waiting = Instant::now();
                let Some(loaded) = batches.next_batch() else {
                    break;
                };
                data_wait += waiting.elapsed();
                let loaded = self.share(loaded.map_err(TrainError)?);
                // Where tests make a step fail or panic.
                fail::fail_point!("train-step", |m| Err(TrainError(m.unwrap_or_default())));
                // Dropout masks come from the run's seed and the batch: a resumed run repeats them.
                self.scope.seed_dropout(self.dropout_seed(
                    data::rng(self.config.seed, RNG_DROPOUT, self.progress.batches).random(),
                ));
                let (batch, loss, forward) = self.batch_loss(&loaded)?;
                if self.config.debug_mode {
                    self.debug_last = Some(debug::Snapshot::new(self, &loaded, &batch, &forward)?);
                }
                drop((batch, forward));
                let grads = match self.loss_scale() {
                    Some(f) => loss.mul_scalar(f64::from(f)).and_then(|l| l.backward()),
                    None => loss.backward(),
                }
                .map_err(err)?;
                // Summed on the device: the host reads it once per optimizer step.
                let loss = loss.detach().map_err(err)?;
                acc_loss = Some(match acc_loss {
                    Some(a) => a.add(&loss).map_err(err)?,
                    None => loss,
                });
                let mut new = Vec::new();
                for (gi, g) in self.groups.iter().enumerate() {
                    let mut row = Vec::new();
                    for (pi, p) in g.params.iter().enumerate() {
                        let grad = if g.stopped {
                            None
                        } else {
                            grads.get(p).map_err(err)?
                        };
                        let prev = acc.get(gi).and_then(|r| r.get(pi)).cloned().flatten();
                        row.push(match (prev, grad) {
                            (Some(a), Some(b)) => Some(a.add(&b).map_err(err)?),
                            (a, b) => b.or(a),
                        });
                    }
                    new.push(row);
                }
                acc = new;
                self.progress.batch_in_epoch += 1;
                self.progress.batches += 1;
                in_accum += 1;
                if in_accum < accum {
                    continue;
                }
                let mut grads = std::mem::take(&mut acc);
                // The logged figure: the step's one host read (two with float16's check; a
                // data-parallel run's exchange adds one).
                let mut rank_times = Vec::new();
                let step_loss = match acc_loss.take() {
                    Some(l) => {
                        let (loss, stop, times) = self.average(&mut grads, l, step_began)?;
                        (stop_agreed, rank_times) = (stop, times);
                        loss
                    }
                    None => 0.0,
                };
                if !step_loss.is_finite() {
                    return Err(TrainError(format!(
                        "the loss became {step_loss} at step {} (epoch {}): stopping; {}",
                        self.progress.step + 1,
                        self.progress.epoch,
                        match self.last_backup() {
                            Some(b) => format!("the last good backup is {}", b.display()),
                            None => "there is no backup yet".into(),
                        }
                    )));
                }
                // False on a float16 overflow: no update, but the step counts (as in torch).
                let taken = self.unscale(&mut grads, on_event)?;
                let lr_factor = self.lr_factor(self.progress.step);
                if taken {
                    self.apply(grads, lr_factor)?;
                }
                self.progress.step += 1;
                if taken
                    && self
                        .progress
                        .step
                        .is_multiple_of(self.config.ema_update_step_interval)
                {
                    self.update_ema()?;
                }
                let lr = self.reported_lr(self.progress.step - 1, lr_factor);
                self.log_scalar("loss/train", step_loss);
                self.log_scalar("learning_rate", lr as f32);
                if let Some(scale) = self.progress.loss_scale {
                    self.log_scalar("loss_scale", scale.factor());
                }
                on_event(Event::Step {
                    step: self.progress.step,
                    epoch: self.progress.epoch,
                    loss: step_loss,
                    lr,
                    data_wait: std::mem::take(&mut data_wait),
                    rank_times,
                });
                in_accum = 0;
                self.after(Moment::Step, on_event)?;
                if self.stop_parts(Moment::Step)? {
                    break 'epochs;
                }
            }
            self.progress.epoch += 1;
            self.progress.batch_in_epoch = 0;
            self.after(Moment::Epoch, on_event)?;
            if self.stop_parts(Moment::Epoch)? {
                break;
            }
        }
        if self.leader() {
            on_event(Event::Saved(self.save_output()?));
        }
        Ok(())
    }

    /// Waits while paused; samples or backs up when asked.
    pub(super) fn serve_controls(&mut self, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let controls = self.controls.clone();
        if controls.pause.load(Ordering::Relaxed) {
            on_event(Event::Paused(true));
            while controls.pause.load(Ordering::Relaxed) && !controls.cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
            on_event(Event::Paused(false));
        }
        if controls.sample_now.swap(false, Ordering::Relaxed) && self.leader() {
            for p in self.sample()? {
                on_event(Event::Sample(p));
            }
        }
        if controls.backup_now.swap(false, Ordering::Relaxed) && self.leader() {
            on_event(Event::Backup(self.backup()?));
        }
        Ok(())
    }

    /// Writes a scalar to the TensorBoard file; a failure is logged, not fatal.
    pub(super) fn log_scalar(&mut self, tag: &str, v: f32) {
        let step = self.progress.step;
        if let Some(tb) = &mut self.tensorboard
            && let Err(e) = tb.scalar(tag, step, v)
        {
            tracing::warn!("tensorboard {}: {e}", tb.path().display());
        }
    }
}
