//! `compat-sgd`: `p ← p − lr·g`, no state. Built against plugin-api 1.0.

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    serde_json::{self, json},
};

struct Sgd;

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        for p in params {
            if let Some(g) = p.grad {
                p.tensor.assign(&p.tensor.sub(&g.mul_scalar(lr)?)?)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    fn load_state(&mut self, _state: Vec<(String, Tensor)>) -> Result<()> {
        Ok(())
    }
}

struct CompatOptim;

impl Plugin for CompatOptim {
    const NAME: &'static str = "compat-optim";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Optimizer,
            id: "compat-sgd".into(),
            version: Self::VERSION.into(),
            description: "plain SGD (plugin-api 1.0 compat test)".into(),
            options_schema: json!({"type": "object", "additionalProperties": false}),
        }]
    }

    fn instantiate(
        kind: ComponentKind,
        id: &str,
        _options: serde_json::Value,
    ) -> Result<Component> {
        if (kind, id) != (ComponentKind::Optimizer, "compat-sgd") {
            bail!("this library has no {kind} `{id}`");
        }
        Ok(Component::Optimizer(Box::new(Sgd)))
    }
}

export_plugin!(CompatOptim);
