//! Optimizers with a factored second moment: a matrix's mean squared gradient is kept as its
//! row and column means (O(n + m) memory instead of O(nm)). Adafactor with transformers' update
//! (relative step, parameter scale, warmup init, update clipping, optional first moment) and
//! CAME with came_pytorch's (Adafactor's preconditioner plus a confidence-weighted momentum).

mod factored;

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slot, Slots, rms, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

use factored::SecondMoment;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdafactorOptions {
    /// Added to the squared gradient.
    pub eps: f64,
    /// The floor of the parameter scale.
    pub eps2: f64,
    /// The most an update's RMS may be (larger ones are scaled down to it).
    pub clip_threshold: f64,
    /// The second moment's decay: 1 − step^decay_rate.
    pub decay_rate: f64,
    /// A first moment with this decay; null: none (less memory).
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    /// Scale the step by the parameter's RMS.
    pub scale_parameter: bool,
    /// Ignore the learning rate: step min(1e-2, 1/√step) (warmup_init: min(1e-6·step, 1/√step)).
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorOptions {
    fn default() -> Self {
        // OneTrainer's defaults (a set learning rate, no parameter scale).
        Self {
            eps: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: false,
            relative_step: false,
            warmup_init: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameOptions {
    pub beta1: f64,
    pub beta2: f64,
    /// How slowly the instability (the update's distance from the momentum) is averaged.
    pub beta3: f64,
    /// Added to the squared gradient.
    pub eps: f64,
    /// Added to the squared instability.
    pub eps2: f64,
    pub clip_threshold: f64,
    pub weight_decay: f64,
}

impl Default for CameOptions {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            eps: 1e-30,
            eps2: 1e-16,
            clip_threshold: 1.0,
            weight_decay: 1e-2,
        }
    }
}

enum Rule {
    Adafactor(AdafactorOptions),
    Came(CameOptions),
}

pub struct Factored {
    rule: Rule,
    slots: Slots,
}

const FIELDS: &[&str] = &[
    "exp_avg",
    "exp_avg_sq",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
    "exp_avg_res_row",
    "exp_avg_res_col",
];

/// The update divided by max(1, RMS(update) / threshold).
fn clipped(update: &Tensor, threshold: f64) -> Result<Tensor> {
    let scale = rms(update)?.div_scalar(threshold)?.clamp(Some(1.0), None)?;
    update.div(&scale)
}

fn adafactor(
    o: &AdafactorOptions,
    slot: &mut Slot,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
) -> Result<Tensor> {
    let step = slot.step as f64;
    let rate = if o.relative_step {
        let floor = if o.warmup_init { 1e-6 * step } else { 1e-2 };
        floor.min(1.0 / step.sqrt())
    } else {
        lr
    };
    // The step size: a number, or with scale_parameter a one-element tensor (the weight's RMS).
    let lr_t = if o.scale_parameter {
        Some(rms(w)?.clamp(Some(o.eps2), None)?.mul_scalar(rate)?)
    } else {
        None
    };
    let times_lr = |t: &Tensor| match &lr_t {
        Some(l) => t.mul(l),
        None => t.mul_scalar(rate),
    };
    let beta2t = 1.0 - step.powf(o.decay_rate);
    let sq = g.mul(g)?.add_scalar(o.eps)?;
    let moment = SecondMoment::new(slot, "exp_avg_sq", g)?;
    let precond = moment.update(slot, &sq, beta2t)?;
    let mut update = times_lr(&clipped(&precond.mul(g)?, o.clip_threshold)?)?;
    if let Some(beta1) = o.beta1 {
        let m = match slot.tensors.remove("exp_avg") {
            Some(m) => m,
            None => zeros_like(g)?,
        };
        update = m.mul_scalar(beta1)?.add(&update.mul_scalar(1.0 - beta1)?)?;
        slot.set("exp_avg", update.clone());
    }
    let mut w = w.clone();
    if o.weight_decay != 0.0 {
        w = w.sub(&times_lr(&w.mul_scalar(o.weight_decay)?)?)?;
    }
    w.sub(&update)
}

fn came(o: &CameOptions, slot: &mut Slot, w: &Tensor, g: &Tensor, lr: f64) -> Result<Tensor> {
    let sq = g.mul(g)?.add_scalar(o.eps)?;
    let moment = SecondMoment::new(slot, "exp_avg_sq", g)?;
    let update = clipped(
        &moment.update(slot, &sq, o.beta2)?.mul(g)?,
        o.clip_threshold,
    )?;
    let m = match slot.tensors.remove("exp_avg") {
        Some(m) => m,
        None => zeros_like(g)?,
    };
    let m = m
        .mul_scalar(o.beta1)?
        .add(&update.mul_scalar(1.0 - o.beta1)?)?;
    // Confidence: how far the update is from the momentum, averaged like the second moment.
    let step = if moment.factored() {
        let diff = update.sub(&m)?;
        let res = diff.mul(&diff)?.add_scalar(o.eps2)?;
        let instability = SecondMoment::new(slot, "exp_avg_res", g)?;
        instability.update(slot, &res, o.beta3)?.mul(&m)?
    } else {
        m.clone()
    };
    slot.set("exp_avg", m);
    let mut w = w.clone();
    if o.weight_decay != 0.0 {
        w = w.sub(&w.mul_scalar(o.weight_decay * lr)?)?;
    }
    w.sub(&step.mul_scalar(lr)?)
}

impl Optimizer for Factored {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        for p in params {
            let Some(g) = p.grad else { continue };
            let g = g.detach()?.cast(ferrite_plugin_api::DType::F32)?;
            let w = p.tensor.detach()?.cast(ferrite_plugin_api::DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            slot.step += 1;
            let new = match &self.rule {
                Rule::Adafactor(o) => adafactor(o, slot, &w, &g, lr)?,
                Rule::Came(o) => came(o, slot, &w, &g, lr)?,
            };
            write(p.tensor, &new)?;
        }
        Ok(())
    }

    /// `<parameter>.step`, `.exp_avg` (when kept), and `.exp_avg_sq` or its `_row`/`_col`
    /// factors (CAME: also `.exp_avg_res_row`/`_col`).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct FactoredPlugin;

impl Plugin for FactoredPlugin {
    const NAME: &'static str = "optim-adafactor";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let (a, c) = (AdafactorOptions::default(), CameOptions::default());
        let d = |id: &str, description: &str, properties| {
            Descriptor::optimizer(id, Self::VERSION, description, properties)
        };
        let num = |v: f64| json!({"type": "number", "minimum": 0, "default": v});
        let positive = |v: f64| json!({"type": "number", "exclusiveMinimum": 0, "default": v});
        let beta =
            |v: f64| json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": v});
        vec![
            d(
                "adafactor",
                "Adafactor: factored second moment, little memory (transformers' Adafactor)",
                json!({
                    "eps": positive(a.eps),
                    "eps2": positive(a.eps2),
                    "clip_threshold": positive(a.clip_threshold),
                    "decay_rate": {"type": "number", "exclusiveMaximum": 0, "default": a.decay_rate},
                    "beta1": {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1,
                              "default": null, "examples": [0.9], "description": "null: no first moment"},
                    "weight_decay": num(a.weight_decay),
                    "scale_parameter": {"type": "boolean", "default": a.scale_parameter},
                    "relative_step": {"type": "boolean", "default": a.relative_step,
                                      "description": "ignore the learning rate"},
                    "warmup_init": {"type": "boolean", "default": a.warmup_init}
                }),
            ),
            d(
                "came",
                "CAME: Adafactor with confidence-weighted momentum (came_pytorch)",
                json!({
                    "beta1": beta(c.beta1),
                    "beta2": beta(c.beta2),
                    "beta3": beta(c.beta3),
                    "eps": positive(c.eps),
                    "eps2": positive(c.eps2),
                    "clip_threshold": positive(c.clip_threshold),
                    "weight_decay": num(c.weight_decay)
                }),
            ),
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let rule = match (kind, id) {
            (ComponentKind::Optimizer, "adafactor") => {
                let o: AdafactorOptions = parse_options(id, AdafactorOptions::default(), options)?;
                if o.eps <= 0.0
                    || o.eps2 <= 0.0
                    || o.clip_threshold <= 0.0
                    || o.decay_rate >= 0.0
                    || o.weight_decay < 0.0
                    || o.beta1.is_some_and(|b| !(0.0..1.0).contains(&b))
                {
                    bail!(
                        "invalid adafactor options {o:?}: eps, eps2, clip_threshold > 0, \
                         decay_rate < 0, weight_decay >= 0, beta1 in [0, 1) or null"
                    );
                }
                if o.warmup_init && !o.relative_step {
                    bail!("adafactor: warmup_init needs relative_step");
                }
                Rule::Adafactor(o)
            }
            (ComponentKind::Optimizer, "came") => {
                let o: CameOptions = parse_options(id, CameOptions::default(), options)?;
                let betas = [o.beta1, o.beta2, o.beta3];
                if betas.iter().any(|b| !(0.0..1.0).contains(b))
                    || o.eps <= 0.0
                    || o.eps2 <= 0.0
                    || o.clip_threshold <= 0.0
                    || o.weight_decay < 0.0
                {
                    bail!(
                        "invalid came options {o:?}: betas in [0, 1), eps, eps2, clip_threshold \
                         > 0, weight_decay >= 0"
                    );
                }
                Rule::Came(o)
            }
            _ => bail!("this library has no {kind} `{id}`"),
        };
        let who = if matches!(rule, Rule::Adafactor(_)) {
            "adafactor"
        } else {
            "came"
        };
        Ok(Component::Optimizer(Box::new(Factored {
            rule,
            slots: Slots::new(who, FIELDS),
        })))
    }
}

export_plugin!(FactoredPlugin);
