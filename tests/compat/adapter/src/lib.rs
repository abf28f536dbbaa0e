//! `compat-lora`: `y = base(x) + (α/r)·up(down(x))` on linear layers, down drawn from a seeded
//! normal, up zero. Built against plugin-api 1.0.

use ferrite_plugin_api::{
    AdaptableLayer, Adapter, Component, ComponentKind, DType, Descriptor, Error, Generator, Plugin,
    Result, Tensor,
    adapter::{layer_seed, load_into},
    bail, export_plugin, ops, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Options {
    layer: Option<AdaptableLayer>,
    rank: usize,
    alpha: f64,
    dropout: f64,
    dora: bool,
    seed: u64,
}

struct Lora {
    layer: AdaptableLayer,
    scale: f64,
    alpha: f64,
    down: Tensor,
    up: Tensor,
    weight: Option<Tensor>,
}

impl Lora {
    fn new(o: Options) -> Result<Self> {
        let layer = o
            .layer
            .ok_or_else(|| Error::msg("compat-lora needs `layer`"))?;
        if layer.shape.len() != 2 || o.rank == 0 || o.dropout != 0.0 || o.dora {
            bail!("compat-lora: linear layers, rank > 0, no dropout, no DoRA");
        }
        let (out_f, in_f) = (layer.shape[0], layer.shape[1]);
        let rng = Generator::new(layer_seed(o.seed, &layer.name))?;
        let down = Tensor::randn(&[o.rank, in_f], &rng)?.mul_scalar(0.1)?;
        let up = Tensor::zeros(&[out_f, o.rank], DType::F32)?;
        down.set_requires_grad(true)?;
        up.set_requires_grad(true)?;
        Ok(Self {
            layer,
            scale: o.alpha / o.rank as f64,
            alpha: o.alpha,
            down,
            up,
            weight: None,
        })
    }

    fn delta(&self) -> Result<Tensor> {
        self.up.matmul(&self.down)?.mul_scalar(self.scale)
    }
}

impl Adapter for Lora {
    fn bind(&mut self, weight: Tensor, _bias: Option<Tensor>) -> Result<()> {
        self.weight = Some(weight);
        Ok(())
    }
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("lora_down.weight".into(), self.down.clone()),
            ("lora_up.weight".into(), self.up.clone()),
        ])
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut s = self.parameters()?;
        s.push(("alpha".into(), Tensor::from_f32(&[self.alpha as f32], &[])?));
        Ok(s)
    }
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        for (k, t) in state {
            match k.as_str() {
                "lora_down.weight" => load_into(&self.layer.name, &k, &self.down, &t)?,
                "lora_up.weight" => load_into(&self.layer.name, &k, &self.up, &t)?,
                _ => {}
            }
        }
        Ok(())
    }
    fn set_training(&mut self, _training: bool) {}
    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let h = ops::linear(&ops::linear(x, &self.down, None)?, &self.up, None)?;
        base_out.add(&h.mul_scalar(self.scale)?)
    }
    fn merged_weight(&mut self) -> Result<Tensor> {
        let w = self
            .weight
            .as_ref()
            .ok_or_else(|| Error::msg("not bound"))?;
        w.add(&self.delta()?)
    }
    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        merged.sub(&self.delta()?)
    }
}

struct CompatAdapter;

impl Plugin for CompatAdapter {
    const NAME: &'static str = "compat-adapter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Adapter,
            id: "compat-lora".into(),
            version: Self::VERSION.into(),
            description: "minimal LoRA on linear layers (plugin-api 1.0 compat test)".into(),
            options_schema: json!({"type": "object"}),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Adapter, "compat-lora") {
            bail!("this library has no {kind} `{id}`");
        }
        let defaults = Options {
            layer: None,
            rank: 4,
            alpha: 1.0,
            dropout: 0.0,
            dora: false,
            seed: 0,
        };
        let o = parse_options(id, defaults, options)?;
        Ok(Component::Adapter(Box::new(Lora::new(o)?)))
    }
}

export_plugin!(CompatAdapter);
