//! A test architecture plugin: a two-layer MLP written only against `plugin-api`.

use ferrite_plugin_api::{
    Architecture, Component, ComponentKind, Descriptor, Generator, Plugin, Result, Tensor, bail,
    export_plugin,
    nn::{Linear, Parameters},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    inputs: usize,
    hidden: usize,
    outputs: usize,
    seed: u64,
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

fn init_linear(rng: &Generator, inputs: usize, outputs: usize) -> Result<Linear> {
    let scale = 1.0 / (inputs as f64).sqrt();
    let w = Tensor::randn(&[outputs, inputs], rng)?.mul_scalar(scale)?;
    let b = Tensor::zeros(&[outputs], ferrite_plugin_api::DType::F32)?;
    w.set_requires_grad(true)?;
    b.set_requires_grad(true)?;
    Ok(Linear::new(w, Some(b)))
}

impl Architecture for Mlp {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        self.fc1.parameters("fc1", &mut out);
        self.fc2.parameters("fc2", &mut out);
        Ok(out)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let x = match inputs {
            [x] => x,
            // Lets the tests check that a panic inside a plugin method comes back as an error.
            [_, _, _] => panic!("test-mlp was asked to panic"),
            _ => bail!("test-mlp takes one input, got {}", inputs.len()),
        };
        Ok(vec![self.fc2.forward(&self.fc1.forward(x)?.silu()?)?])
    }
}

struct TestPlugin;

impl Plugin for TestPlugin {
    const NAME: &'static str = "test-regression";
    const VERSION: &'static str = "0.1.0";

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Architecture,
            id: "test-mlp".into(),
            version: Self::VERSION.into(),
            description: "two-layer MLP for host tests".into(),
            options_schema: json!({"type": "object"}),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Architecture, "test-mlp") {
            bail!("no {kind} `{id}` here");
        }
        let o = parse_options(
            id,
            Options {
                inputs: 4,
                hidden: 32,
                outputs: 1,
                seed: 0,
            },
            options,
        )?;
        let rng = Generator::new(o.seed)?;
        Ok(Component::Architecture(Box::new(Mlp {
            fc1: init_linear(&rng, o.inputs, o.hidden)?,
            fc2: init_linear(&rng, o.hidden, o.outputs)?,
        })))
    }
}

export_plugin!(TestPlugin);
