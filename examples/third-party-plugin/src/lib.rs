//! An example third-party plugin: an optimizer (`signum`: SGD on the sign of the momentum) and
//! an adapter with file keys of its own (`ia3`: one learned scale per output channel, saved as
//! `<layer>.ia3_scale`). Nothing in Ferrite names either; the host learns the adapter's file
//! layout from its options schema.

use ferrite_plugin_api::{
    AdaptableLayer, Adapter, Component, ComponentKind, DType, Descriptor, Error, Optimizer, Param,
    Plugin, Result, Tensor,
    adapter::{FileLayout, FileShapes, check_weight, load_into, scalar, with_file_layout},
    bail, export_plugin,
    optim::{Slots, sign, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

// ---- the optimizer ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignumOptions {
    momentum: f64,
    weight_decay: f64,
}

struct Signum {
    o: SignumOptions,
    slots: Slots,
}

impl Optimizer for Signum {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        for p in params {
            let Some(g) = p.grad else { continue };
            let g = g.detach()?.cast(DType::F32)?;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            let m = match slot.tensors.remove("momentum") {
                Some(m) => m,
                None => zeros_like(&g)?,
            };
            slot.step += 1;
            let m = m
                .mul_scalar(self.o.momentum)?
                .add(&g.mul_scalar(1.0 - self.o.momentum)?)?;
            let w = p.tensor.detach()?.cast(DType::F32)?;
            let w = w.mul_scalar(1.0 - lr * self.o.weight_decay)?;
            write(p.tensor, &w.sub(&sign(&m)?.mul_scalar(lr)?)?)?;
            slot.set("momentum", m);
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

// ---- the adapter ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ia3Options {
    layer: Option<AdaptableLayer>,
    multiplier: f64,
    /// Set by the host from a file; IA3 has no structure to take from it.
    file_shapes: Option<FileShapes>,
    // The host passes every adapter the LoRA tab's common options; IA3 has no use for them.
    rank: Option<usize>,
    alpha: Option<f64>,
    seed: Option<u64>,
}

/// y = W x (1 + l) + b: `l` scales each output channel (zero: the layer as it was).
struct Ia3 {
    o: Ia3Options,
    layer: AdaptableLayer,
    scale: Tensor,
    base: Option<(Tensor, Option<Tensor>)>,
}

impl Ia3 {
    fn base(&self) -> Result<&(Tensor, Option<Tensor>)> {
        self.base
            .as_ref()
            .ok_or_else(|| Error(format!("layer `{}`: not bound", self.layer.name)))
    }

    /// 1 + multiplier·l, shaped per output row of the weight.
    fn row_factor(&self) -> Result<Tensor> {
        let mut shape = vec![self.layer.out_features() as i64];
        shape.extend(std::iter::repeat_n(1, self.layer.shape.len() - 1));
        self.scale
            .mul_scalar(self.o.multiplier)?
            .add_scalar(1.0)?
            .reshape(&shape)
    }
}

impl Adapter for Ia3 {
    fn bind(&mut self, weight: Tensor, bias: Option<Tensor>) -> Result<()> {
        check_weight(&self.layer, &weight)?;
        self.base = Some((weight, bias));
        Ok(())
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("ia3_scale".into(), self.scale.clone())])
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut s = self.parameters()?;
        // Every adapter file carries an alpha; IA3's changes nothing.
        s.push(("alpha".into(), Tensor::from_f32(&[1.0], &[])?));
        Ok(s)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let name = self.layer.name.clone();
        for (k, t) in &state {
            match k.as_str() {
                "ia3_scale" => load_into(&name, k, &self.scale, t)?,
                "alpha" => {
                    scalar(&name, k, t)?;
                }
                other => bail!("layer `{name}`: unexpected IA3 tensor `{other}`"),
            }
        }
        Ok(())
    }

    fn set_training(&mut self, _training: bool) {}

    fn forward(&self, _x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let per_out = self.layer.per_output_shape();
        let without_bias = match &self.base()?.1 {
            Some(b) => base_out.sub(&b.reshape(&per_out)?)?,
            None => base_out.clone(),
        };
        let l = self
            .scale
            .mul_scalar(self.o.multiplier)?
            .reshape(&per_out)?;
        base_out.add(&without_bias.mul(&l)?)
    }

    fn merged_weight(&mut self) -> Result<Tensor> {
        self.base()?.0.mul(&self.row_factor()?)
    }

    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        merged.div(&self.row_factor()?)
    }
}

// ---- the library ----

struct ExamplePlugin;

impl Plugin for ExamplePlugin {
    const NAME: &'static str = "example-plugin";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let layout = FileLayout {
            tensors: vec!["ia3_scale".into()],
            markers: vec!["ia3_scale".into()],
            per_output: vec!["ia3_scale".into()],
            network_module: "ferrite_example.ia3".into(),
            name: "IA3 (example plugin)".into(),
            ..FileLayout::default()
        };
        vec![
            Descriptor {
                kind: ComponentKind::Optimizer,
                id: "signum".into(),
                version: Self::VERSION.into(),
                description: "Signum: SGD on the sign of the momentum (example plugin)".into(),
                options_schema: json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "momentum": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.9},
                        "weight_decay": {"type": "number", "minimum": 0, "default": 0.0}
                    }
                }),
            },
            Descriptor {
                kind: ComponentKind::Adapter,
                id: "ia3".into(),
                version: Self::VERSION.into(),
                description: "IA3: one learned scale per output channel (example plugin)".into(),
                options_schema: with_file_layout(
                    json!({
                        "type": "object",
                        "properties": {
                            "multiplier": {"type": "number", "default": 1.0},
                            "layer": {"type": "object", "description": "set by the host"},
                            "file_shapes": {"type": ["object", "null"]},
                            "rank": {"type": "integer", "description": "unused"},
                            "alpha": {"type": "number", "description": "unused"},
                            "seed": {"type": "integer", "description": "unused"}
                        }
                    }),
                    &layout,
                ),
            },
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        match (kind, id) {
            (ComponentKind::Optimizer, "signum") => {
                let defaults = SignumOptions {
                    momentum: 0.9,
                    weight_decay: 0.0,
                };
                let o = parse_options(id, defaults, options)?;
                Ok(Component::Optimizer(Box::new(Signum {
                    o,
                    slots: Slots::new("signum", &["momentum"]),
                })))
            }
            (ComponentKind::Adapter, "ia3") => {
                let defaults = Ia3Options {
                    layer: None,
                    multiplier: 1.0,
                    file_shapes: None,
                    rank: None,
                    alpha: None,
                    seed: None,
                };
                let o: Ia3Options = parse_options(id, defaults, options)?;
                let layer = o
                    .layer
                    .clone()
                    .ok_or_else(|| Error::msg("ia3 needs the `layer` option"))?;
                let scale = Tensor::zeros(&[layer.out_features()], DType::F32)?;
                scale.set_requires_grad(true)?;
                Ok(Component::Adapter(Box::new(Ia3 {
                    o,
                    layer,
                    scale,
                    base: None,
                })))
            }
            _ => bail!("this library has no {kind} `{id}`"),
        }
    }
}

export_plugin!(ExamplePlugin);
