//! AdEMAMix (Pagliardini et al. 2024): Adam plus a slow momentum (beta3) added with weight
//! `alpha`, with the paper's optional warmup of alpha and beta3 over `t_alpha_beta3` steps;
//! decoupled weight decay. Each parameter counts its own steps (as bitsandbytes, which
//! OneTrainer uses).

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slots, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdemamixOptions {
    pub beta1: f64,
    pub beta2: f64,
    /// The slow momentum's decay.
    pub beta3: f64,
    /// The slow momentum's weight.
    pub alpha: f64,
    /// Steps over which alpha and beta3 rise to their values; null: none.
    pub t_alpha_beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdemamixOptions {
    fn default() -> Self {
        // OneTrainer's defaults.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            alpha: 5.0,
            t_alpha_beta3: None,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdemamixOptions {
    /// alpha and beta3 at `step` (the paper's linear alpha and half-life-linear beta3 warmup).
    fn scheduled(&self, step: f64) -> (f64, f64) {
        let Some(t) = self.t_alpha_beta3 else {
            return (self.alpha, self.beta3);
        };
        let alpha = (step * self.alpha / t).min(self.alpha);
        let (l1, l3) = (self.beta1.ln(), self.beta3.ln());
        let f = step / t;
        let beta3 = (l1 * l3 / ((1.0 - f) * l3 + f * l1)).exp().min(self.beta3);
        (alpha, beta3)
    }
}

pub struct Ademamix {
    o: AdemamixOptions,
    slots: Slots,
}

const FIELDS: &[&str] = &["exp_avg", "exp_avg_sq", "exp_avg_slow"];

impl Optimizer for Ademamix {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let o = &self.o;
        for p in params {
            let Some(g) = p.grad else { continue };
            // In f32 whatever the parameter's dtype (a small decay would round away in bf16).
            let g = g.detach()?.cast(DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            if slot.tensors.is_empty() {
                for f in FIELDS {
                    slot.set(f, zeros_like(&g)?);
                }
            }
            slot.step += 1;
            let step = slot.step as f64;
            let (alpha, beta3) = o.scheduled(step);
            let mut w = p.tensor.detach()?.cast(DType::F32)?;
            if o.weight_decay != 0.0 {
                w = w.mul_scalar(1.0 - lr * o.weight_decay)?;
            }
            // torch's lerp form: m + (g − m)(1 − beta).
            let lerp = |m: &Tensor, beta: f64| m.add(&g.sub(m)?.mul_scalar(1.0 - beta)?);
            let m = lerp(slot.get("exp_avg")?, o.beta1)?;
            let slow = lerp(slot.get("exp_avg_slow")?, beta3)?;
            let v = slot
                .get("exp_avg_sq")?
                .mul_scalar(o.beta2)?
                .add(&g.mul(&g)?.mul_scalar(1.0 - o.beta2)?)?;
            let bias1 = 1.0 - o.beta1.powf(step);
            let bias2_sqrt = (1.0 - o.beta2.powf(step)).sqrt();
            let denom = v.sqrt()?.div_scalar(bias2_sqrt)?.add_scalar(o.eps)?;
            let update = m.div_scalar(bias1)?.add(&slow.mul_scalar(alpha)?)?;
            write(p.tensor, &w.sub(&update.div(&denom)?.mul_scalar(lr)?)?)?;
            slot.set("exp_avg", m);
            slot.set("exp_avg_slow", slow);
            slot.set("exp_avg_sq", v);
        }
        Ok(())
    }

    /// `<parameter>.step`, `.exp_avg`, `.exp_avg_sq`, `.exp_avg_slow`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct AdemamixPlugin;

impl Plugin for AdemamixPlugin {
    const NAME: &'static str = "optim-ademamix";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = AdemamixOptions::default();
        let beta =
            |v: f64| json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": v});
        vec![Descriptor {
            kind: ComponentKind::Optimizer,
            id: "ademamix".into(),
            version: Self::VERSION.into(),
            description: "AdEMAMix: Adam with a second, slow momentum".into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "beta1": beta(d.beta1),
                    "beta2": beta(d.beta2),
                    "beta3": beta(d.beta3),
                    "alpha": {"type": "number", "minimum": 0, "default": d.alpha},
                    "t_alpha_beta3": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                      "default": null, "examples": [10000], "description": "warmup steps of alpha and beta3"},
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": d.eps},
                    "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "ademamix") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: AdemamixOptions = parse_options(id, AdemamixOptions::default(), options)?;
        let betas = [o.beta1, o.beta2, o.beta3];
        if betas.iter().any(|b| !(0.0..1.0).contains(b))
            || o.alpha < 0.0
            || o.eps <= 0.0
            || o.weight_decay < 0.0
            || o.t_alpha_beta3.is_some_and(|t| t <= 0.0)
        {
            bail!(
                "invalid ademamix options {o:?}: betas in [0, 1), alpha and weight_decay >= 0, \
                 eps > 0, t_alpha_beta3 > 0 or null"
            );
        }
        Ok(Component::Optimizer(Box::new(Ademamix {
            o,
            slots: Slots::new("ademamix", FIELDS),
        })))
    }
}

export_plugin!(AdemamixPlugin);
