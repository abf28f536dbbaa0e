//! LoRA on linear and conv layers (LoCon: the down projection is a conv with the layer's kernel,
//! stride and padding, the up projection a 1×1 conv), with kohya/peft's initialisation (down
//! kaiming-uniform, up zero) and scale alpha/rank; and DoRA, peft's weight decomposition: one
//! magnitude per output channel, the norm of each output row of `W + scale·BA` taken over the
//! input axes (detached, as peft does).

use ferrite_plugin_api::{
    AdaptableLayer, Adapter, Component, ComponentKind, DType, Descriptor, Error, Generator, Plugin,
    Result, Tensor,
    adapter::{
        FileLayout, FileShapes, PeftTensors, check_weight, layer_seed, load_into, scalar,
        with_file_layout,
    },
    bail, export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The layer this adapter sits on (name, weight shape, conv options).
    pub layer: Option<AdaptableLayer>,
    pub rank: usize,
    /// Scale alpha/rank (OneTrainer's default alpha is 1).
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// DoRA: decompose the weight into magnitude and direction.
    pub dora: bool,
    /// Strength at use (sampling with several LoRAs).
    pub multiplier: f64,
    /// Seeds the initialisation (mixed with the layer's name).
    pub seed: u64,
    /// A file's tensors for this layer (set by the host when it loads one): the rank and DoRA
    /// come from them.
    pub file_shapes: Option<FileShapes>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            layer: None,
            rank: 16,
            alpha: 1.0,
            dropout: 0.0,
            dora: false,
            multiplier: 1.0,
            seed: 0,
            file_shapes: None,
        }
    }
}

/// The tensors' suffixes in kohya's files (and which are PEFT's A, B and magnitude).
fn file_layout() -> FileLayout {
    let t = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    FileLayout {
        tensors: t(&["lora_down.weight", "lora_up.weight", "dora_scale"]),
        markers: t(&["lora_down.weight", "lora_up.weight"]),
        rank_from: t(&["lora_down.weight"]),
        rank_rows: t(&["lora_down.weight"]),
        out_rows: t(&["lora_up.weight"]),
        per_output: t(&["dora_scale"]),
        network_module: "networks.lora".into(),
        args_when: [(
            "dora_scale".to_string(),
            [("dora_wd".to_string(), "True".to_string())].into(),
        )]
        .into(),
        name: "LoRA".into(),
        name_when: [("dora_scale".to_string(), "DoRA".to_string())].into(),
        peft: Some(PeftTensors {
            down: "lora_down.weight".into(),
            up: "lora_up.weight".into(),
            magnitude: Some("dora_scale".into()),
        }),
        ..FileLayout::default()
    }
}

pub struct Lora {
    o: Options,
    layer: AdaptableLayer,
    down: Tensor,
    up: Tensor,
    /// DoRA's magnitude, one per output channel.
    magnitude: Option<Tensor>,
    base: Option<(Tensor, Option<Tensor>)>,
    training: bool,
    /// DoRA: the per-output factor applied at merge time, to undo it.
    merged_scale: Option<Tensor>,
}

impl Lora {
    pub fn new(mut o: Options) -> Result<Self> {
        if let Some(shapes) = &o.file_shapes {
            o.rank = shapes
                .get("lora_down.weight")
                .and_then(|s| s.first().copied())
                .ok_or_else(|| Error::msg("the file has no lora_down.weight for this layer"))?;
            o.dora = shapes.contains_key("dora_scale");
        }
        let layer = o
            .layer
            .clone()
            .ok_or_else(|| Error::msg("lora needs the `layer` option"))?;
        let (shape, r) = (&layer.shape, o.rank);
        let fan_in: usize = shape.iter().skip(1).product();
        let (down_shape, up_shape) = match (shape.len(), layer.conv) {
            (2, None) => (vec![r, shape[1]], vec![shape[0], r]),
            (4, Some(c)) if c.groups == 1 => (
                vec![r, shape[1], shape[2], shape[3]],
                vec![shape[0], r, 1, 1],
            ),
            _ => bail!(
                "layer `{}`: lora supports linear and ungrouped conv layers, not shape {shape:?}",
                layer.name
            ),
        };
        if r == 0 || !(0.0..1.0).contains(&o.dropout) {
            bail!(
                "layer `{}`: rank must be at least 1 and dropout in [0, 1)",
                layer.name
            );
        }
        // kaiming_uniform(a=√5), as torch's Linear/Conv and peft/kohya initialise lora_down.
        let bound = 1.0 / (fan_in as f64).sqrt();
        let rng = Generator::new(layer_seed(o.seed, &layer.name))?;
        let down = Tensor::rand(&down_shape, &rng)?
            .mul_scalar(2.0 * bound)?
            .sub_scalar(bound)?;
        let up = Tensor::zeros(&up_shape, DType::F32)?;
        for t in [&down, &up] {
            t.set_requires_grad(true)?;
        }
        Ok(Self {
            o,
            layer,
            down,
            up,
            magnitude: None,
            base: None,
            training: false,
            merged_scale: None,
        })
    }

    fn scale(&self) -> f64 {
        self.o.alpha / self.o.rank as f64
    }

    fn base(&self) -> Result<&(Tensor, Option<Tensor>)> {
        self.base
            .as_ref()
            .ok_or_else(|| Error(format!("layer `{}`: adapter not bound", self.layer.name)))
    }

    /// scale · up(down(x)).
    fn lora_out(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.training && self.o.dropout > 0.0 {
            ferrite_plugin_api::ops::dropout(x, self.o.dropout)?
        } else {
            x.clone()
        };
        let h = self.layer.apply(&x, &self.down)?;
        let y = match self.layer.conv {
            Some(_) => ferrite_plugin_api::ops::conv2d(&h, &self.up, None, Default::default())?,
            None => ferrite_plugin_api::ops::linear(&h, &self.up, None)?,
        };
        y.mul_scalar(self.scale())
    }

    /// scale · BA in the base weight's shape.
    fn delta(&self) -> Result<Tensor> {
        let (out, r) = (self.layer.out_features() as i64, self.o.rank as i64);
        let shape: Vec<i64> = self.layer.shape.iter().map(|&d| d as i64).collect();
        self.up
            .reshape(&[out, r])?
            .matmul(&self.down.reshape(&[r, -1])?)?
            .reshape(&shape)?
            .mul_scalar(self.scale())
    }

    /// The norm of each output row, detached: `[out]`.
    fn row_norm(&self, w: &Tensor) -> Result<Tensor> {
        let out = self.layer.out_features() as i64;
        w.reshape(&[out, -1])?
            .powf(2.0)?
            .sum(&[1], false)?
            .sqrt()?
            .detach()
    }

    /// DoRA's per-output factor magnitude / ‖W + scale·BA‖, shaped for `like`'s rank.
    fn dora_factor(&self, magnitude: &Tensor, shape: &[i64]) -> Result<Tensor> {
        let (w, _) = self.base()?;
        magnitude
            .div(&self.row_norm(&w.add(&self.delta()?)?)?)?
            .reshape(shape)
    }

    fn weight_shape_per_output(&self) -> Vec<i64> {
        let mut s = vec![self.layer.out_features() as i64];
        s.extend(std::iter::repeat_n(1, self.layer.shape.len() - 1));
        s
    }
}

impl Adapter for Lora {
    fn bind(&mut self, weight: Tensor, bias: Option<Tensor>) -> Result<()> {
        check_weight(&self.layer, &weight)?;
        if self.o.dora {
            let m = self.row_norm(&weight)?;
            m.set_requires_grad(true)?;
            self.magnitude = Some(m);
        }
        self.base = Some((weight, bias));
        Ok(())
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut p = vec![
            ("lora_down.weight".to_string(), self.down.clone()),
            ("lora_up.weight".to_string(), self.up.clone()),
        ];
        if let Some(m) = &self.magnitude {
            p.push(("dora_scale".into(), m.clone()));
        }
        Ok(p)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut s = self.parameters()?;
        if let Some((_, m)) = s.iter_mut().find(|(k, _)| k == "dora_scale") {
            // Files keep kohya's layout: [out, 1] ([out, 1, 1, 1] for a conv).
            *m = m.reshape(&self.weight_shape_per_output())?;
        }
        s.push((
            "alpha".into(),
            Tensor::from_f32(&[self.o.alpha as f32], &[])?,
        ));
        Ok(s)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let name = self.layer.name.clone();
        let mut seen = (false, false, false);
        for (k, t) in &state {
            match k.as_str() {
                "lora_down.weight" => {
                    load_into(&name, k, &self.down, t)?;
                    seen.0 = true;
                }
                "lora_up.weight" => {
                    load_into(&name, k, &self.up, t)?;
                    seen.1 = true;
                }
                "alpha" => self.o.alpha = scalar(&name, k, t)?,
                "dora_scale" => {
                    let m = self.magnitude.as_ref().ok_or_else(|| {
                        Error(format!("layer `{name}`: the file has DoRA's dora_scale but this adapter is plain LoRA"))
                    })?;
                    let flat = t.reshape(&[-1])?;
                    load_into(&name, k, m, &flat)?;
                    seen.2 = true;
                }
                other => bail!("layer `{name}`: unexpected LoRA tensor `{other}`"),
            }
        }
        if !seen.0 || !seen.1 || (self.magnitude.is_some() && !seen.2) {
            bail!("layer `{name}`: the LoRA state lacks lora_down, lora_up or (DoRA) dora_scale");
        }
        Ok(())
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let lora = self.lora_out(x)?;
        let Some(m) = &self.magnitude else {
            return base_out.add(&lora.mul_scalar(self.o.multiplier)?);
        };
        // peft: (m/‖W'‖ − 1)·(W x) + m/‖W'‖ · scale·BA x, on top of the base output.
        let per_out = self.layer.per_output_shape();
        let factor = self.dora_factor(m, &per_out)?;
        let without_bias = match &self.base()?.1 {
            Some(b) => base_out.sub(&b.reshape(&per_out)?)?,
            None => base_out.clone(),
        };
        let change = factor
            .sub_scalar(1.0)?
            .mul(&without_bias)?
            .add(&factor.mul(&lora)?)?;
        base_out.add(&change.mul_scalar(self.o.multiplier)?)
    }

    fn merged_weight(&mut self) -> Result<Tensor> {
        let (w, _) = self.base()?;
        let mult = self.o.multiplier;
        let Some(m) = &self.magnitude else {
            return w.add(&self.delta()?.mul_scalar(mult)?);
        };
        // W + mult·(c⊙(W + Δ) − W), c = m/‖W + Δ‖ per output row.
        let c = self.dora_factor(m, &self.weight_shape_per_output())?;
        let merged = w.add(&c.mul(&w.add(&self.delta()?)?)?.sub(w)?.mul_scalar(mult)?)?;
        self.merged_scale = Some(c);
        Ok(merged)
    }

    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        let mult = self.o.multiplier;
        let Some(c) = &self.merged_scale else {
            return merged.sub(&self.delta()?.mul_scalar(mult)?);
        };
        // Solves merged = W(1 − mult + mult·c) + mult·c⊙Δ for W.
        merged
            .sub(&c.mul(&self.delta()?)?.mul_scalar(mult)?)?
            .div(&c.mul_scalar(mult)?.add_scalar(1.0 - mult)?)
    }
}

pub struct LoraPlugin;

impl Plugin for LoraPlugin {
    const NAME: &'static str = "lora";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Adapter,
            id: "lora".into(),
            version: Self::VERSION.into(),
            description: "LoRA / LoCon, and DoRA (decompose weights)".into(),
            options_schema: with_file_layout(
                json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "rank": {"type": "integer", "minimum": 1, "default": d.rank},
                        "alpha": {"type": "number", "default": d.alpha},
                        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.dropout},
                        "dora": {"type": "boolean", "default": d.dora, "description": "decompose weights (DoRA)"},
                        "multiplier": {"type": "number", "default": d.multiplier},
                        "seed": {"type": "integer", "minimum": 0, "default": d.seed},
                        "layer": {"type": "object", "description": "set by the host"},
                        "file_shapes": {"type": ["object", "null"], "description": "set by the host"}
                    }
                }),
                &file_layout(),
            ),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Adapter, "lora") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = parse_options(id, Options::default(), options)?;
        Ok(Component::Adapter(Box::new(Lora::new(o)?)))
    }
}

export_plugin!(LoraPlugin);
