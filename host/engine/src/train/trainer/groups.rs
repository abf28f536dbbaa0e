//! The trained parts (UNet, text encoder, or the adapters): their tensors and optimizers, the
//! optimizer step with gradient clipping, stopping a part, and EMA.

use ferrite_plugin_api::{AdaptableLayer, DType, Param, Tensor, plugin::OptimizerHandle};

use super::ema::Ema;
use super::intervals::Moment;
use super::{Result, TrainError, Trainer, err};
use crate::adapters::select;
use crate::config::{EmaMode, LoraWeightDtype, TimeUnit, TrainConfig, TrainingMethod};

/// A model part's (or an embedding's) trainable tensors and their optimizer.
pub(super) struct Group {
    /// The model part's id (`embedding-<i>` for an embedding): names its backup files.
    pub(super) part: String,
    pub(super) names: Vec<String>,
    pub(super) params: Vec<Tensor>,
    pub(super) optimizer: OptimizerHandle,
    pub(super) lr: f64,
    /// The moving average of `params`, when EMA is on.
    pub(super) ema: Option<Ema>,
    /// Its stop_training_after and unit.
    pub(super) stop: (f64, TimeUnit),
    /// It stopped training (stop_training_after) and keeps its weights from then on.
    pub(super) stopped: bool,
}

/// While it lives, the trained tensors record no autodiff graph (sampling and validation need
/// none, and building it made sampling several times slower).
pub(super) struct Untracked(Vec<Tensor>);

impl Untracked {
    pub(super) fn new(groups: &[Group]) -> Result<Self> {
        let tracked: Vec<Tensor> = groups
            .iter()
            .filter(|g| !g.stopped)
            .flat_map(|g| g.params.iter().cloned())
            .collect();
        for p in &tracked {
            p.set_requires_grad(false).map_err(err)?;
        }
        Ok(Self(tracked))
    }
}

impl Drop for Untracked {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Err(e) = p.set_requires_grad(true) {
                tracing::error!("re-enabling gradients: {e}");
            }
        }
    }
}

/// While it lives, the parameters hold the weights to evaluate with where their optimizer has
/// others than the trained ones (schedule-free's x, its `<parameter>.eval` state): for samples,
/// validation and the output. The trained weights are back afterwards.
pub(super) struct EvalWeights(Vec<(Tensor, Tensor)>);

impl EvalWeights {
    pub(super) fn new(groups: &[Group]) -> Result<Self> {
        let suffix = format!(".{}", ferrite_plugin_api::optim::EVAL_FIELD);
        let mut kept = Vec::new();
        for g in groups {
            let state = g.optimizer.state().map_err(err)?;
            let eval: std::collections::HashMap<&str, &Tensor> = state
                .iter()
                .filter_map(|(k, t)| Some((k.strip_suffix(&suffix)?, t)))
                .collect();
            for (name, p) in g.names.iter().zip(&g.params) {
                if let Some(x) = eval.get(name.as_str()) {
                    kept.push((p.clone(), p.detach().map_err(err)?));
                    p.assign(&x.cast(p.dtype().map_err(err)?).map_err(err)?)
                        .map_err(err)?;
                }
            }
        }
        Ok(Self(kept))
    }
}

impl Drop for EvalWeights {
    fn drop(&mut self) {
        for (p, v) in &self.0 {
            if let Err(e) = p.assign(v) {
                tracing::error!("putting the trained weights back: {e}");
            }
        }
    }
}

impl Trainer {
    /// The layers a LoRA run adapts: the preset's (or `lora_layers`') of the denoiser, every
    /// layer of the other trained parts.
    pub(super) fn adapted_layers(&self) -> Result<Vec<&AdaptableLayer>> {
        let c = &self.config;
        let filter =
            select::LayerFilter::new(c.lora_layer_preset, &c.lora_layers, c.layer_filter_regex)
                .map_err(err)?;
        let info = &self.model.info;
        filter.check(info).map_err(err)?;
        Ok(select::select(info, &filter, |id| {
            info.part(id).is_some_and(|p| c.trains(p))
        }))
    }

    pub(super) fn make_groups(&self) -> Result<Vec<Group>> {
        let c = &self.config;
        let named: Vec<(String, Tensor)> = if c.training_method == TrainingMethod::Lora {
            self.model.clear();
            let layers = self.adapted_layers()?;
            self.model
                .create(&self.registry, &layers, &c.adapter_options())
                .map_err(err)?;
            // Kept in lora_weight_dtype from here on: what loads into them (a LoRA to go on
            // from, a backup) is cast to it, and the optimizer's state follows them.
            if c.lora_weight_dtype == LoraWeightDtype::Bfloat16 {
                for (_, p) in self.model.parameters().map_err(err)? {
                    p.assign(&p.cast(DType::BF16).map_err(err)?).map_err(err)?;
                }
            }
            if !c.lora_base_model.is_empty() {
                self.model
                    .resume(&TrainConfig::path(&self.base, &c.lora_base_model))
                    .map_err(err)?;
            }
            self.model.set_training(true).map_err(err)?;
            self.model.parameters().map_err(err)?
        } else {
            let all = self.arch.parameters().map_err(err)?;
            for (_, t) in &all {
                t.set_requires_grad(false).map_err(err)?;
            }
            all
        };
        let mut groups = Vec::new();
        for part in &self.info.parts {
            let Some(pc) = c.part(&part.config_table).filter(|_| c.trains(part)) else {
                continue;
            };
            let (names, params): (Vec<String>, Vec<Tensor>) = named
                .iter()
                .filter(|(n, _)| n.starts_with(&format!("{}.", part.id)))
                .map(|(n, t)| (n.clone(), t.clone()))
                .unzip();
            if params.is_empty() {
                continue;
            }
            let lr = pc
                .learning_rate
                .or(part.default_learning_rate)
                .unwrap_or(c.learning_rate);
            tracing::info!(
                "training {}: {} tensors at learning rate {lr}",
                part.name,
                params.len()
            );
            let stop = (pc.stop_training_after, pc.stop_training_after_unit);
            groups.push(self.group(part.id.clone(), names, params, lr, stop)?);
        }
        groups.extend(self.embedding_groups()?);
        let c = &self.config;
        if c.learning_rate_scheduler == crate::config::LrScheduler::Adafactor
            && (c.learning_rate_warmup_steps > 0.0 || c.learning_rate_min_factor > 0.0)
        {
            tracing::warn!(
                "learning_rate_scheduler adafactor: the optimizer sets the rate; the warmup and \
                 learning_rate_min_factor do not apply (as in OneTrainer)"
            );
        }
        if groups.is_empty() {
            return Err(TrainError(
                "nothing to train: no parameters in the parts marked train, and no embedding \
                 marked train"
                    .into(),
            ));
        }
        Ok(groups)
    }

    /// A group training `params` with its own optimizer (and EMA when it is on).
    pub(super) fn group(
        &self,
        part: String,
        names: Vec<String>,
        params: Vec<Tensor>,
        lr: f64,
        stop: (f64, TimeUnit),
    ) -> Result<Group> {
        let c = &self.config;
        for p in &params {
            p.set_requires_grad(true).map_err(err)?;
        }
        let (opt_id, mut opt_options) = c.optimizer_options();
        // An optimizer that schedules more than one rate (Muon's Adam) gets the part's own.
        if self
            .registry
            .declared_options(ferrite_plugin_api::ComponentKind::Optimizer, &opt_id)
            .is_some_and(|d| d.contains("learning_rate"))
        {
            opt_options["learning_rate"] = lr.into();
        }
        let optimizer = self
            .registry
            .optimizer(&opt_id, &opt_options.to_string())
            .map_err(err)?;
        let ema = match c.ema {
            EmaMode::Off => None,
            on => Some(Ema::new(&params, on == EmaMode::Cpu).map_err(err)?),
        };
        Ok(Group {
            part,
            names,
            params,
            optimizer,
            lr,
            ema,
            stop,
            stopped: false,
        })
    }

    /// Stops the parts whose stop_training_after has come; true when no part trains any more.
    pub(super) fn stop_parts(&mut self, at: Moment) -> Result<bool> {
        let (step, epoch) = (self.progress.step as f64, self.progress.epoch as f64);
        let elapsed = self.started.elapsed().as_secs_f64();
        for g in &mut self.groups {
            let (after, unit) = g.stop;
            let reached = after > 0.0
                && match (unit, at) {
                    (TimeUnit::Step, Moment::Step) => step >= after,
                    (TimeUnit::Epoch, Moment::Epoch) => epoch >= after,
                    (TimeUnit::Second, _) => elapsed >= after,
                    (TimeUnit::Minute, _) => elapsed >= after * 60.0,
                    (TimeUnit::Hour, _) => elapsed >= after * 3600.0,
                    _ => false,
                };
            if reached && !g.stopped {
                tracing::info!("{} stops training at step {step}", g.part);
                g.stopped = true;
                for p in &g.params {
                    p.set_requires_grad(false).map_err(err)?;
                }
            }
        }
        Ok(self.groups.iter().all(|g| g.stopped))
    }

    /// Clips the accumulated gradients and steps each part's optimizer.
    pub(super) fn apply(&mut self, grads: Vec<Vec<Option<Tensor>>>, lr_factor: f64) -> Result<()> {
        let clip = self.config.clip_grad_norm;
        let scale = if clip > 0.0 {
            let mut sq: Option<Tensor> = None;
            for g in grads.iter().flatten().flatten() {
                // Summed in f32: a bfloat16 sum (lora_weight_dtype) drops small terms.
                let s = g
                    .cast(DType::F32)
                    .and_then(|g| g.powf(2.0)?.sum_all())
                    .map_err(err)?;
                sq = Some(match sq {
                    Some(acc) => acc.add(&s).map_err(err)?,
                    None => s,
                });
            }
            // min(1, clip / (‖g‖ + 1e-6)), on the device.
            sq.map(|s| {
                s.sqrt()?
                    .add_scalar(1e-6)?
                    .powf(-1.0)?
                    .mul_scalar(clip)?
                    .clamp(None, Some(1.0))
            })
            .transpose()
            .map_err(err)?
        } else {
            None
        };
        for (g, row) in self.groups.iter_mut().zip(grads) {
            if g.stopped {
                continue;
            }
            // Every parameter goes by name; one without a gradient is skipped by the
            // optimizer with its state kept.
            let scaled: Vec<Option<Tensor>> = row
                .into_iter()
                .map(|grad| match (grad, &scale) {
                    // In the gradient's dtype: a bfloat16 adapter's moments stay bfloat16.
                    (Some(grad), Some(s)) => grad.mul(&s.cast(grad.dtype()?)?).map(Some),
                    (grad, _) => Ok(grad),
                })
                .collect::<ferrite_plugin_api::Result<_>>()
                .map_err(err)?;
            let params: Vec<Param<'_>> = g
                .names
                .iter()
                .zip(&g.params)
                .zip(&scaled)
                .map(|((name, tensor), grad)| Param {
                    name,
                    tensor,
                    grad: grad.as_ref(),
                })
                .collect();
            g.optimizer.step(&params, g.lr * lr_factor).map_err(err)?;
        }
        Ok(())
    }

    /// ema ← d·ema + (1 − d)·param, with d warming up as (1 + step)/(10 + step) towards
    /// `ema_decay` (OneTrainer's and diffusers' rule).
    pub(super) fn update_ema(&mut self) -> Result<()> {
        let s = self.progress.step as f64;
        let d = self.config.ema_decay.min((1.0 + s) / (10.0 + s));
        for g in &mut self.groups {
            if let Some(ema) = &mut g.ema {
                ema.update(&g.params, d).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the EMA weights in place of the trained ones (when EMA is on).
    pub(super) fn with_ema_weights<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut kept = Vec::new();
        for g in &self.groups {
            let Some(ema) = &g.ema else { continue };
            for (e, p) in ema.tensors().map_err(err)?.iter().zip(&g.params) {
                kept.push((p.clone(), p.detach().map_err(err)?));
                // The f32 average, in the weights' own dtype.
                p.assign(&e.cast(p.dtype().map_err(err)?).map_err(err)?)
                    .map_err(err)?;
            }
        }
        let out = f();
        for (p, v) in kept {
            p.assign(&v).map_err(err)?;
        }
        out
    }
}
