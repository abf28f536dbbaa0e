//! Schedule-free AdamW (Defazio et al. 2024), with the schedulefree package's
//! `AdamWScheduleFree`: no learning-rate schedule (a warmup of its own), the parameters hold
//! the training point y, and the weights to evaluate and save are x = y + (z − y)(1 − 1/β1),
//! returned as `<parameter>.eval` from `state()` (the host swaps them in for samples, validation
//! and the output).

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{EVAL_FIELD, Slots, f64_of, f64_tensor, own, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Weights the average by step^r.
    pub r: f64,
    /// Weights the average by the largest learning rate so far to this power.
    pub weight_lr_power: f64,
    /// Steps over which the learning rate rises to its value (the run's schedule stays
    /// constant).
    pub warmup_steps: u64,
}

impl Default for Options {
    fn default() -> Self {
        // OneTrainer's defaults.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            r: 0.0,
            weight_lr_power: 2.0,
            warmup_steps: 0,
        }
    }
}

pub struct ScheduleFree {
    o: Options,
    slots: Slots,
    /// Each parameter's tensor (a handle to the trained weights), to derive its eval weights.
    params: std::collections::BTreeMap<String, Tensor>,
    k: u64,
    lr_max: f64,
    weight_sum: f64,
}

const FIELDS: &[&str] = &["z", "exp_avg_sq", EVAL_FIELD];

impl Optimizer for ScheduleFree {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let o = &self.o;
        let k = self.k as f64;
        let sched = if self.k < o.warmup_steps {
            (k + 1.0) / o.warmup_steps as f64
        } else {
            1.0
        };
        let bias2 = 1.0 - o.beta2.powf(k + 1.0);
        let lr = lr * sched;
        self.lr_max = self.lr_max.max(lr);
        let weight = (k + 1.0).powf(o.r) * self.lr_max.powf(o.weight_lr_power);
        self.weight_sum += weight;
        let ckp1 = if self.weight_sum != 0.0 {
            weight / self.weight_sum
        } else {
            0.0
        };
        for p in params {
            // Every parameter's handle, with or without a gradient now: its eval weights are
            // derived from it (after a resume too).
            self.params.insert(p.name.to_string(), p.tensor.clone());
            let Some(g) = p.grad else { continue };
            let g = g.detach()?.cast(DType::F32)?;
            let y = p.tensor.detach()?.cast(DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            if slot.tensors.is_empty() {
                slot.set("z", y.clone());
                slot.set("exp_avg_sq", zeros_like(&g)?);
            }
            slot.step += 1;
            let v = slot
                .get("exp_avg_sq")?
                .mul_scalar(o.beta2)?
                .add(&g.mul(&g)?.mul_scalar(1.0 - o.beta2)?)?;
            let denom = v.div_scalar(bias2)?.sqrt()?.add_scalar(o.eps)?;
            let mut step = g.div(&denom)?;
            if o.weight_decay != 0.0 {
                step = step.add(&y.mul_scalar(o.weight_decay)?)?;
            }
            let z = slot.get("z")?.clone();
            // y ← lerp(y, z, ckp1) + lr(β1(1 − ckp1) − 1)·step; z ← z − lr·step.
            let y = y
                .add(&z.sub(&y)?.mul_scalar(ckp1)?)?
                .add(&step.mul_scalar(lr * (o.beta1 * (1.0 - ckp1) - 1.0))?)?;
            write(p.tensor, &y)?;
            slot.set("z", z.sub(&step.mul_scalar(lr)?)?);
            slot.set("exp_avg_sq", v);
        }
        self.k += 1;
        Ok(())
    }

    /// The parameters' `step`, `z`, `exp_avg_sq` and `eval` (x, derived), and `k`, `lr_max`,
    /// `weight_sum`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.slots.save(vec![
            ("k".into(), Tensor::from_f32(&[self.k as f32], &[1])?),
            ("lr_max".into(), f64_tensor(self.lr_max)?),
            ("weight_sum".into(), f64_tensor(self.weight_sum)?),
        ])?;
        for (name, y) in &self.params {
            // A parameter that never had a gradient has no z: it is its own eval weight.
            let Some(z) = self
                .slots
                .by_param
                .get(name)
                .and_then(|s| s.tensors.get("z"))
            else {
                continue;
            };
            let y = y.detach()?.cast(DType::F32)?;
            let x = y.add(&z.sub(&y)?.mul_scalar(1.0 - 1.0 / self.o.beta1)?)?;
            out.push((format!("{name}.{EVAL_FIELD}"), x));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut mine = self.slots.load(state)?;
        for slot in self.slots.by_param.values_mut() {
            slot.tensors.remove(EVAL_FIELD);
        }
        self.k = own(&mut mine, "schedule_free_adamw", "k")?.item()? as u64;
        self.lr_max = f64_of(&own(&mut mine, "schedule_free_adamw", "lr_max")?)?;
        self.weight_sum = f64_of(&own(&mut mine, "schedule_free_adamw", "weight_sum")?)?;
        self.slots.no_more(mine)
    }
}

pub struct ScheduleFreePlugin;

impl Plugin for ScheduleFreePlugin {
    const NAME: &'static str = "optim-schedulefree";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        let beta =
            |v: f64| json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": v});
        vec![Descriptor {
            kind: ComponentKind::Optimizer,
            id: "schedule_free_adamw".into(),
            version: Self::VERSION.into(),
            description: "Schedule-free AdamW (schedulefree): use a constant learning-rate \
                          schedule; it warms up on its own"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "beta1": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": d.beta1},
                    "beta2": beta(d.beta2),
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": d.eps},
                    "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay},
                    "r": {"type": "number", "minimum": 0, "default": d.r},
                    "weight_lr_power": {"type": "number", "minimum": 0, "default": d.weight_lr_power},
                    "warmup_steps": {"type": "integer", "minimum": 0, "default": d.warmup_steps}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "schedule_free_adamw") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        if o.beta1 <= 0.0
            || o.beta1 >= 1.0
            || !(0.0..1.0).contains(&o.beta2)
            || o.eps <= 0.0
            || o.weight_decay < 0.0
            || o.r < 0.0
            || o.weight_lr_power < 0.0
        {
            bail!(
                "invalid schedule_free_adamw options {o:?}: beta1 in (0, 1), beta2 in [0, 1), \
                 eps > 0, the others >= 0"
            );
        }
        Ok(Component::Optimizer(Box::new(ScheduleFree {
            o,
            slots: Slots::new("schedule_free_adamw", FIELDS),
            params: Default::default(),
            k: 0,
            lr_max: -1.0,
            weight_sum: 0.0,
        })))
    }
}

export_plugin!(ScheduleFreePlugin);
