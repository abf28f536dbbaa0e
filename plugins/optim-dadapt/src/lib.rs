//! Learning-rate-free Adam variants: Prodigy and D-Adaptation Adam. Both estimate the step size
//! `d` as they go (the learning rate, usually 1, scales it); their scalars stay on the device.

mod dadapt_adam;
mod prodigy;

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};

pub use dadapt_adam::{DadaptAdam, DadaptAdamOptions};
pub use prodigy::{Prodigy, ProdigyOptions};

/// `new` where `moving` (a one-element bool) holds, else `old`: the step is skipped on the
/// device, as the references skip it on the host.
fn new_d(moving: &Tensor, new: &Tensor, old: &Tensor) -> Result<Tensor> {
    Tensor::where_(moving, new, old)
}

/// `new` where `moving` holds, else `old`, for a whole tensor.
fn masked(moving: &Tensor, new: &Tensor, old: &Tensor) -> Result<Tensor> {
    let m = moving.cast(DType::F32)?;
    old.add(&new.sub(old)?.mul(&m)?)
}

enum Adaptive {
    Prodigy(Prodigy),
    DadaptAdam(DadaptAdam),
}

impl Optimizer for Adaptive {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        match self {
            Self::Prodigy(o) => o.step(params, lr),
            Self::DadaptAdam(o) => o.step(params, lr),
        }
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Prodigy(o) => o.state(),
            Self::DadaptAdam(o) => o.state(),
        }
    }
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        match self {
            Self::Prodigy(o) => o.load_state(state),
            Self::DadaptAdam(o) => o.load_state(state),
        }
    }
}

fn beta(v: f64) -> serde_json::Value {
    json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": v})
}

fn growth_rate() -> serde_json::Value {
    json!({"type": ["number", "null"], "minimum": 1, "default": null, "examples": [1.02],
           "description": "the most d may grow in one step; null: no limit"})
}

pub struct DadaptPlugin;

impl Plugin for DadaptPlugin {
    const NAME: &'static str = "optim-dadapt";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let (p, a) = (ProdigyOptions::default(), DadaptAdamOptions::default());
        let d = |id: &str, description: &str, properties| {
            Descriptor::optimizer(id, Self::VERSION, description, properties)
        };
        vec![
            d(
                "prodigy",
                "Prodigy: Adam with its step size estimated (prodigyopt); learning rate 1",
                json!({
                    "beta1": beta(p.beta1),
                    "beta2": beta(p.beta2),
                    "beta3": {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1,
                              "default": null, "examples": [0.99], "description": "null: √beta2"},
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": p.eps},
                    "weight_decay": {"type": "number", "minimum": 0, "default": p.weight_decay},
                    "decouple": {"type": "boolean", "default": p.decouple},
                    "use_bias_correction": {"type": "boolean", "default": p.use_bias_correction},
                    "safeguard_warmup": {"type": "boolean", "default": p.safeguard_warmup},
                    "d0": {"type": "number", "exclusiveMinimum": 0, "default": p.d0},
                    "d_coef": {"type": "number", "exclusiveMinimum": 0, "default": p.d_coef},
                    "growth_rate": growth_rate(),
                    "slice_p": {"type": "integer", "minimum": 1, "default": p.slice_p}
                }),
            ),
            d(
                "dadapt_adam",
                "D-Adaptation Adam: Adam with its step size estimated (dadaptation); learning rate 1",
                json!({
                    "beta1": beta(a.beta1),
                    "beta2": beta(a.beta2),
                    "eps": {"type": "number", "exclusiveMinimum": 0, "default": a.eps},
                    "weight_decay": {"type": "number", "minimum": 0, "default": a.weight_decay},
                    "decouple": {"type": "boolean", "default": a.decouple},
                    "use_bias_correction": {"type": "boolean", "default": a.use_bias_correction},
                    "d0": {"type": "number", "exclusiveMinimum": 0, "default": a.d0},
                    "growth_rate": growth_rate()
                }),
            ),
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let betas_ok = |b: &[f64]| b.iter().all(|b| (0.0..1.0).contains(b));
        let opt = match (kind, id) {
            (ComponentKind::Optimizer, "prodigy") => {
                let o: ProdigyOptions = parse_options(id, ProdigyOptions::default(), options)?;
                let b3 = o.beta3.unwrap_or(0.0);
                if !betas_ok(&[o.beta1, o.beta2, b3])
                    || o.eps <= 0.0
                    || o.weight_decay < 0.0
                    || o.d0 <= 0.0
                    || o.d_coef <= 0.0
                    || o.slice_p == 0
                    || o.growth_rate.is_some_and(|g| g < 1.0)
                {
                    bail!(
                        "invalid prodigy options {o:?}: betas in [0, 1), eps, d0 and d_coef > 0, \
                         weight_decay >= 0, slice_p >= 1, growth_rate >= 1 or null"
                    );
                }
                Adaptive::Prodigy(Prodigy::new(o)?)
            }
            (ComponentKind::Optimizer, "dadapt_adam") => {
                let o: DadaptAdamOptions =
                    parse_options(id, DadaptAdamOptions::default(), options)?;
                if !betas_ok(&[o.beta1, o.beta2])
                    || o.eps <= 0.0
                    || o.weight_decay < 0.0
                    || o.d0 <= 0.0
                    || o.growth_rate.is_some_and(|g| g < 1.0)
                {
                    bail!(
                        "invalid dadapt_adam options {o:?}: betas in [0, 1), eps and d0 > 0, \
                         weight_decay >= 0, growth_rate >= 1 or null"
                    );
                }
                Adaptive::DadaptAdam(DadaptAdam::new(o)?)
            }
            _ => bail!("this library has no {kind} `{id}`"),
        };
        Ok(Component::Optimizer(Box::new(opt)))
    }
}

export_plugin!(DadaptPlugin);
