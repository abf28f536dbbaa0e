//! RMSprop (plain, centred, with momentum) and Adagrad (with learning-rate decay and a starting
//! accumulator), with torch.optim's update rules and OneTrainer's defaults.

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slot, Slots, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmspropOptions {
    /// How slowly the mean square follows the squared gradient.
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    /// Divide by the variance (the mean square less the squared mean) instead.
    pub centered: bool,
}

impl Default for RmspropOptions {
    fn default() -> Self {
        Self {
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdagradOptions {
    /// The rate at step t is lr / (1 + (t − 1)·lr_decay).
    pub lr_decay: f64,
    pub weight_decay: f64,
    /// What the sum of squared gradients starts at.
    pub initial_accumulator_value: f64,
    pub eps: f64,
}

impl Default for AdagradOptions {
    fn default() -> Self {
        Self {
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
        }
    }
}

enum Rule {
    Rmsprop(RmspropOptions),
    Adagrad(AdagradOptions),
}

pub struct Classic {
    rule: Rule,
    slots: Slots,
}

/// The slot's `field`, or `init` when the parameter has none yet.
fn field(slot: &mut Slot, name: &str, init: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    match slot.tensors.remove(name) {
        Some(t) => Ok(t),
        None => init(),
    }
}

impl Classic {
    fn rmsprop(
        o: &RmspropOptions,
        slot: &mut Slot,
        w: &Tensor,
        g: Tensor,
        lr: f64,
    ) -> Result<Tensor> {
        let g = if o.weight_decay != 0.0 {
            g.add(&w.mul_scalar(o.weight_decay)?)?
        } else {
            g
        };
        let sq = field(slot, "square_avg", || zeros_like(&g))?;
        let sq = sq
            .mul_scalar(o.alpha)?
            .add(&g.mul(&g)?.mul_scalar(1.0 - o.alpha)?)?;
        let avg = if o.centered {
            let ga = field(slot, "grad_avg", || zeros_like(&g))?;
            // torch's lerp form: m + (g − m)(1 − alpha).
            let ga = ga.add(&g.sub(&ga)?.mul_scalar(1.0 - o.alpha)?)?;
            let v = sq.sub(&ga.mul(&ga)?)?.sqrt()?;
            slot.set("grad_avg", ga);
            v
        } else {
            sq.sqrt()?
        }
        .add_scalar(o.eps)?;
        slot.set("square_avg", sq);
        let step = if o.momentum > 0.0 {
            let buf = field(slot, "momentum_buffer", || zeros_like(&g))?;
            let buf = buf.mul_scalar(o.momentum)?.add(&g.div(&avg)?)?;
            slot.set("momentum_buffer", buf.clone());
            buf
        } else {
            g.div(&avg)?
        };
        w.sub(&step.mul_scalar(lr)?)
    }

    fn adagrad(
        o: &AdagradOptions,
        slot: &mut Slot,
        w: &Tensor,
        g: Tensor,
        lr: f64,
    ) -> Result<Tensor> {
        let g = if o.weight_decay != 0.0 {
            g.add(&w.mul_scalar(o.weight_decay)?)?
        } else {
            g
        };
        let clr = lr / (1.0 + (slot.step - 1) as f64 * o.lr_decay);
        let sum = field(slot, "sum", || {
            zeros_like(&g)?.add_scalar(o.initial_accumulator_value)
        })?;
        let sum = sum.add(&g.mul(&g)?)?;
        let std = sum.sqrt()?.add_scalar(o.eps)?;
        slot.set("sum", sum);
        w.sub(&g.div(&std)?.mul_scalar(clr)?)
    }
}

impl Optimizer for Classic {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        for p in params {
            let Some(g) = p.grad else { continue };
            // In f32 whatever the parameter's dtype (a small decay would round away in bf16).
            let g = g.detach()?.cast(DType::F32)?;
            let w = p.tensor.detach()?.cast(DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            slot.step += 1;
            let new = match &self.rule {
                Rule::Rmsprop(o) => Self::rmsprop(o, slot, &w, g, lr)?,
                Rule::Adagrad(o) => Self::adagrad(o, slot, &w, g, lr)?,
            };
            write(p.tensor, &new)?;
        }
        Ok(())
    }

    /// `<parameter>.step` and `.square_avg`, `.grad_avg`, `.momentum_buffer` (RMSprop) or
    /// `.sum` (Adagrad).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct ClassicPlugin;

impl Plugin for ClassicPlugin {
    const NAME: &'static str = "optim-classic";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let (r, a) = (RmspropOptions::default(), AdagradOptions::default());
        let d = |id: &str, description: &str, properties| {
            Descriptor::optimizer(id, Self::VERSION, description, properties)
        };
        vec![
            d(
                "rmsprop",
                "RMSprop (torch.optim.RMSprop)",
                json!({
                    "alpha": {"type": "number", "minimum": 0, "maximum": 1, "default": r.alpha},
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": r.eps},
                    "weight_decay": {"type": "number", "minimum": 0, "default": r.weight_decay},
                    "momentum": {"type": "number", "minimum": 0, "default": r.momentum},
                    "centered": {"type": "boolean", "default": r.centered}
                }),
            ),
            d(
                "adagrad",
                "Adagrad (torch.optim.Adagrad)",
                json!({
                    "lr_decay": {"type": "number", "minimum": 0, "default": a.lr_decay},
                    "weight_decay": {"type": "number", "minimum": 0, "default": a.weight_decay},
                    "initial_accumulator_value": {"type": "number", "minimum": 0, "default": a.initial_accumulator_value},
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": a.eps}
                }),
            ),
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let (rule, fields): (Rule, &'static [&'static str]) = match (kind, id) {
            (ComponentKind::Optimizer, "rmsprop") => {
                let o: RmspropOptions = parse_options(id, RmspropOptions::default(), options)?;
                if !(0.0..=1.0).contains(&o.alpha)
                    || o.eps <= 0.0
                    || o.weight_decay < 0.0
                    || o.momentum < 0.0
                {
                    bail!(
                        "invalid rmsprop options {o:?}: alpha in [0, 1], eps > 0, weight_decay \
                         and momentum >= 0"
                    );
                }
                (
                    Rule::Rmsprop(o),
                    &["square_avg", "grad_avg", "momentum_buffer"],
                )
            }
            (ComponentKind::Optimizer, "adagrad") => {
                let o: AdagradOptions = parse_options(id, AdagradOptions::default(), options)?;
                if o.eps <= 0.0
                    || o.weight_decay < 0.0
                    || o.lr_decay < 0.0
                    || o.initial_accumulator_value < 0.0
                {
                    bail!("invalid adagrad options {o:?}: eps > 0, the others >= 0");
                }
                (Rule::Adagrad(o), &["sum"])
            }
            _ => bail!("this library has no {kind} `{id}`"),
        };
        let who = if matches!(rule, Rule::Rmsprop(_)) {
            "rmsprop"
        } else {
            "adagrad"
        };
        Ok(Component::Optimizer(Box::new(Classic {
            rule,
            slots: Slots::new(who, fields),
        })))
    }
}

export_plugin!(ClassicPlugin);
