//! AdamW (decoupled weight decay) and Adam (L2 weight decay), with torch.optim's update rules.

use std::collections::BTreeMap;

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Error, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::foreach,
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamOptions {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// One multi-tensor call per update for the whole group instead of several per parameter
    /// (the same arithmetic, in the sum form β·m + (1 − β)·g).
    pub foreach: bool,
}

impl AdamOptions {
    fn defaults(decoupled: bool) -> Self {
        // OneTrainer's defaults: AdamW decays by 1e-2, Adam not at all.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: if decoupled { 1e-2 } else { 0.0 },
            // Opt-in for now: see the README.
            foreach: false,
        }
    }
}

fn schema(decoupled: bool) -> serde_json::Value {
    let d = AdamOptions::defaults(decoupled);
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.beta1},
            "beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.beta2},
            "eps": {"type": "number", "exclusiveMinimum": 0, "default": d.eps},
            "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay},
            "foreach": {"type": "boolean", "default": d.foreach,
                        "description": "update every parameter of a group in one call per step"}
        }
    })
}

/// One parameter's state: its own step count (a parameter skipped for lack of a gradient does
/// not count the step, as in torch) and moments.
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct Adam {
    opts: AdamOptions,
    /// AdamW when true: decay is applied to the weights, not added to the gradient.
    decoupled: bool,
    /// By parameter name.
    state: BTreeMap<String, Moments>,
}

impl Adam {
    pub fn new(opts: AdamOptions, decoupled: bool) -> Result<Self> {
        let ok = (0.0..1.0).contains(&opts.beta1) && (0.0..1.0).contains(&opts.beta2);
        if !ok || opts.eps <= 0.0 || opts.weight_decay < 0.0 {
            bail!(
                "invalid Adam options {opts:?}: betas must be in [0, 1), eps > 0, weight_decay >= 0"
            );
        }
        Ok(Self {
            opts,
            decoupled,
            state: BTreeMap::new(),
        })
    }
}

const FIELDS: [&str; 3] = ["step", "exp_avg", "exp_avg_sq"];

impl Adam {
    /// The step with multi-tensor calls: parameters that have taken the same number of steps
    /// share their bias corrections and go through a handful of calls together.
    fn step_foreach(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let AdamOptions {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.opts;
        let mut by_step: BTreeMap<u64, Vec<&Param<'_>>> = BTreeMap::new();
        for p in params.iter().filter(|p| p.grad.is_some()) {
            let step = self.state.get(p.name).map_or(0, |m| m.step) + 1;
            by_step.entry(step).or_default().push(p);
        }
        for (step, group) in by_step {
            let w: Vec<Tensor> = group.iter().map(|p| p.tensor.clone()).collect();
            let mut g: Vec<Tensor> = group.iter().filter_map(|p| p.grad.cloned()).collect();
            if weight_decay != 0.0 && !self.decoupled {
                g = foreach::axpby(1.0, &g, weight_decay, &w)?;
            }
            let (mut m, mut v) = (Vec::new(), Vec::new());
            for (p, g) in group.iter().zip(&g) {
                match self.state.remove(p.name) {
                    Some(s) => {
                        m.push(s.exp_avg);
                        v.push(s.exp_avg_sq);
                    }
                    // In the gradient's dtype, as the per-tensor path's moments (bf16 with
                    // lora_weight_dtype).
                    None => {
                        let zeros = Tensor::zeros(&g.shape()?, g.dtype()?)?;
                        m.push(zeros.clone());
                        v.push(zeros);
                    }
                }
            }
            let m = foreach::axpby(beta1, &m, 1.0 - beta1, &g)?;
            let v = foreach::addcmul(beta2, &v, 1.0 - beta2, &g, &g)?;
            let bias1 = 1.0 - beta1.powi(step as i32);
            let bias2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
            let keep = if self.decoupled {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let new = foreach::addcdiv_sqrt(keep, &w, -lr / bias1, &m, 1.0 / bias2_sqrt, &v, eps)?;
            foreach::assign(&w, &new)?;
            for ((p, exp_avg), exp_avg_sq) in group.iter().zip(m).zip(v) {
                self.state.insert(
                    p.name.to_string(),
                    Moments {
                        step,
                        exp_avg,
                        exp_avg_sq,
                    },
                );
            }
        }
        Ok(())
    }
}

impl Optimizer for Adam {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        if self.opts.foreach {
            return self.step_foreach(params, lr);
        }
        let AdamOptions {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.opts;
        for p in params {
            let Some(g) = p.grad else { continue };
            let mut p_new = p.tensor.detach()?;
            let mut g = g.detach()?;
            if weight_decay != 0.0 {
                if self.decoupled {
                    p_new = p_new.mul_scalar(1.0 - lr * weight_decay)?;
                } else {
                    g = g.add(&p_new.mul_scalar(weight_decay)?)?;
                }
            }
            let m = match self.state.remove(p.name) {
                Some(m) => Moments {
                    step: m.step + 1,
                    // torch's lerp form: m + (g - m)(1 - beta1).
                    exp_avg: m
                        .exp_avg
                        .add(&g.sub(&m.exp_avg)?.mul_scalar(1.0 - beta1)?)?,
                    exp_avg_sq: m
                        .exp_avg_sq
                        .mul_scalar(beta2)?
                        .add(&g.mul(&g)?.mul_scalar(1.0 - beta2)?)?,
                },
                None => Moments {
                    step: 1,
                    exp_avg: g.mul_scalar(1.0 - beta1)?,
                    exp_avg_sq: g.mul(&g)?.mul_scalar(1.0 - beta2)?,
                },
            };
            let bias1 = 1.0 - beta1.powi(m.step as i32);
            let bias2_sqrt = (1.0 - beta2.powi(m.step as i32)).sqrt();
            let denom = m
                .exp_avg_sq
                .sqrt()?
                .div_scalar(bias2_sqrt)?
                .add_scalar(eps)?;
            let update = m.exp_avg.div(&denom)?.mul_scalar(lr / bias1)?;
            // In the parameter's own dtype, whatever the state's (a backup of another
            // lora_weight_dtype).
            p.tensor
                .assign(&p_new.sub(&update)?.cast(p.tensor.dtype()?)?)?;
            self.state.insert(p.name.to_string(), m);
        }
        Ok(())
    }

    /// `<parameter>.step`, `<parameter>.exp_avg`, `<parameter>.exp_avg_sq`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, m) in &self.state {
            out.push((
                format!("{name}.step"),
                Tensor::from_f32(&[m.step as f32], &[1])?,
            ));
            out.push((format!("{name}.exp_avg"), m.exp_avg.clone()));
            out.push((format!("{name}.exp_avg_sq"), m.exp_avg_sq.clone()));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for (name, t) in state {
            let (param, field) = name
                .rsplit_once('.')
                .and_then(|(p, f)| Some((p, FIELDS.iter().position(|x| *x == f)?)))
                .ok_or_else(|| Error(format!("unknown Adam state tensor `{name}`")))?;
            parts.entry(param.to_string()).or_default()[field] = Some(t);
        }
        self.state = parts
            .into_iter()
            .map(|(name, p)| match p {
                [Some(step), Some(exp_avg), Some(exp_avg_sq)] => Ok((
                    name,
                    Moments {
                        step: step.item()? as u64,
                        exp_avg,
                        exp_avg_sq,
                    },
                )),
                _ => Err(Error(format!("Adam state for `{name}` is incomplete"))),
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

pub struct AdamPlugin;

impl Plugin for AdamPlugin {
    const NAME: &'static str = "optim-adamw";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = |id: &str, desc: &str, decoupled| Descriptor {
            kind: ComponentKind::Optimizer,
            id: id.into(),
            version: Self::VERSION.into(),
            description: desc.into(),
            options_schema: schema(decoupled),
        };
        vec![
            d(
                "adamw",
                "AdamW: Adam with decoupled weight decay (torch.optim.AdamW)",
                true,
            ),
            d(
                "adam",
                "Adam with L2 weight decay (torch.optim.Adam)",
                false,
            ),
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let decoupled = match (kind, id) {
            (ComponentKind::Optimizer, "adamw") => true,
            (ComponentKind::Optimizer, "adam") => false,
            _ => bail!("this library has no {kind} `{id}`"),
        };
        let opts = parse_options(id, AdamOptions::defaults(decoupled), options)?;
        Ok(Component::Optimizer(Box::new(Adam::new(opts, decoupled)?)))
    }
}

export_plugin!(AdamPlugin);
