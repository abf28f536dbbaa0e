//! SGD with momentum, dampening and Nesterov, with torch.optim.SGD's update rule.

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Error, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdOptions {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdOptions {
    fn default() -> Self {
        Self {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

pub struct Sgd {
    opts: SgdOptions,
    /// The momentum buffer of each parameter, by name.
    momentum: BTreeMap<String, Tensor>,
}

impl Sgd {
    pub fn new(opts: SgdOptions) -> Result<Self> {
        if opts.momentum < 0.0 || opts.weight_decay < 0.0 {
            bail!("invalid SGD options {opts:?}: momentum and weight_decay must be >= 0");
        }
        if opts.nesterov && (opts.momentum <= 0.0 || opts.dampening != 0.0) {
            bail!("SGD: nesterov needs momentum > 0 and dampening 0");
        }
        Ok(Self {
            opts,
            momentum: BTreeMap::new(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let SgdOptions {
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.opts;
        for p in params {
            let Some(g) = p.grad else { continue };
            let p_old = p.tensor.detach()?;
            let mut d = g.detach()?;
            if weight_decay != 0.0 {
                d = d.add(&p_old.mul_scalar(weight_decay)?)?;
            }
            if momentum != 0.0 {
                let buf = match self.momentum.remove(p.name) {
                    Some(b) => b
                        .mul_scalar(momentum)?
                        .add(&d.mul_scalar(1.0 - dampening)?)?,
                    None => d.clone(),
                };
                d = if nesterov {
                    d.add(&buf.mul_scalar(momentum)?)?
                } else {
                    buf.clone()
                };
                self.momentum.insert(p.name.to_string(), buf);
            }
            // In the parameter's own dtype, whatever the momentum's.
            p.tensor
                .assign(&p_old.sub(&d.mul_scalar(lr)?)?.cast(p.tensor.dtype()?)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .momentum
            .iter()
            .map(|(name, b)| (format!("{name}.momentum_buffer"), b.clone()))
            .collect())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut bufs = BTreeMap::new();
        for (name, t) in state {
            let param = name
                .strip_suffix(".momentum_buffer")
                .ok_or_else(|| Error(format!("unknown SGD state tensor `{name}`")))?;
            bufs.insert(param.to_string(), t);
        }
        self.momentum = bufs;
        Ok(())
    }
}

pub struct SgdPlugin;

impl Plugin for SgdPlugin {
    const NAME: &'static str = "optim-sgd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Optimizer,
            id: "sgd".into(),
            version: Self::VERSION.into(),
            description: "SGD with optional momentum, dampening and Nesterov (torch.optim.SGD)"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "momentum": {"type": "number", "minimum": 0, "default": 0.0},
                    "dampening": {"type": "number", "minimum": 0, "default": 0.0},
                    "nesterov": {"type": "boolean", "default": false},
                    "weight_decay": {"type": "number", "minimum": 0, "default": 0.0}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "sgd") {
            bail!("this library has no {kind} `{id}`");
        }
        let opts = parse_options(id, SgdOptions::default(), options)?;
        Ok(Component::Optimizer(Box::new(Sgd::new(opts)?)))
    }
}

export_plugin!(SgdPlugin);
