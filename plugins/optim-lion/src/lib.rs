//! Lion (Chen et al. 2023), with lion-pytorch's update: the step is the sign of a mix of the
//! momentum and the gradient, weight decay is decoupled, and the momentum follows the gradient
//! with its own rate.

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slots, sign, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LionOptions {
    /// How much of the momentum the step's sign takes.
    pub beta1: f64,
    /// How slowly the momentum follows the gradient.
    pub beta2: f64,
    pub weight_decay: f64,
}

impl Default for LionOptions {
    fn default() -> Self {
        // OneTrainer's (and lion-pytorch's) defaults.
        Self {
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
        }
    }
}

pub struct Lion {
    opts: LionOptions,
    slots: Slots,
}

impl Optimizer for Lion {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let LionOptions {
            beta1,
            beta2,
            weight_decay,
        } = self.opts;
        for p in params {
            let Some(g) = p.grad else { continue };
            // In f32 whatever the parameter's dtype (a small decay would round away in bf16).
            let g = g.detach()?.cast(DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            let m = match slot.tensors.remove("exp_avg") {
                Some(m) => m,
                None => zeros_like(&g)?,
            };
            slot.step += 1;
            let mut w = p.tensor.detach()?.cast(DType::F32)?;
            if weight_decay != 0.0 {
                w = w.mul_scalar(1.0 - lr * weight_decay)?;
            }
            let update = sign(&m.mul_scalar(beta1)?.add(&g.mul_scalar(1.0 - beta1)?)?)?;
            write(p.tensor, &w.sub(&update.mul_scalar(lr)?)?)?;
            slot.set(
                "exp_avg",
                m.mul_scalar(beta2)?.add(&g.mul_scalar(1.0 - beta2)?)?,
            );
        }
        Ok(())
    }

    /// `<parameter>.step`, `<parameter>.exp_avg`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct LionPlugin;

impl Plugin for LionPlugin {
    const NAME: &'static str = "optim-lion";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = LionOptions::default();
        vec![Descriptor {
            kind: ComponentKind::Optimizer,
            id: "lion".into(),
            version: Self::VERSION.into(),
            description: "Lion: sign of the momentum (lion-pytorch); use a learning rate 3-10× \
                          below AdamW's"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "beta1": {"type": "number", "minimum": 0, "maximum": 1, "default": d.beta1},
                    "beta2": {"type": "number", "minimum": 0, "maximum": 1, "default": d.beta2},
                    "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "lion") {
            bail!("this library has no {kind} `{id}`");
        }
        let opts: LionOptions = parse_options(id, LionOptions::default(), options)?;
        let betas = [opts.beta1, opts.beta2];
        if betas.iter().any(|b| !(0.0..=1.0).contains(b)) || opts.weight_decay < 0.0 {
            bail!("invalid lion options {opts:?}: betas must be in [0, 1], weight_decay >= 0");
        }
        Ok(Component::Optimizer(Box::new(Lion {
            opts,
            slots: Slots::new("lion", &["exp_avg"]),
        })))
    }
}

export_plugin!(LionPlugin);
