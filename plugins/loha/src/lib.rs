//! LoHa (LyCORIS): the weight change is the Hadamard product of two rank-r products,
//! `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/rank`, reshaped to the layer's weight (linear or conv,
//! without the Tucker core). Initialised as LyCORIS 4 does: w1_a = 0, w2_a ~ N(0, 0.1), w1_b and
//! w2_b ~ N(0, 1), so a fresh adapter changes nothing.

use ferrite_plugin_api::{
    AdaptableLayer, Adapter, Component, ComponentKind, DType, Descriptor, Error, Generator, Plugin,
    Result, Tensor,
    adapter::{
        FileLayout, FileShapes, check_weight, forward_with_delta, layer_seed, load_into,
        merge_delta, scalar, with_file_layout,
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
    pub alpha: f64,
    pub multiplier: f64,
    pub seed: u64,
    /// A file's tensors for this layer (set by the host when it loads one): the rank comes from
    /// them.
    pub file_shapes: Option<FileShapes>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            layer: None,
            rank: 16,
            alpha: 1.0,
            multiplier: 1.0,
            seed: 0,
            file_shapes: None,
        }
    }
}

/// LyCORIS' suffixes: the `b`s are `[rank, in]`, the `a`s `[out, rank]`.
fn file_layout() -> FileLayout {
    let t = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    FileLayout {
        tensors: KEYS.iter().map(|k| k.to_string()).collect(),
        markers: t(&["hada_w1_a", "hada_w1_b"]),
        rank_from: t(&["hada_w1_b"]),
        rank_rows: t(&["hada_w1_b", "hada_w2_b"]),
        out_rows: t(&["hada_w1_a", "hada_w2_a"]),
        network_module: "lycoris.kohya".into(),
        network_args: [("algo".to_string(), "loha".to_string())].into(),
        name: "LoHa".into(),
        ..FileLayout::default()
    }
}

const KEYS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

pub struct Loha {
    o: Options,
    layer: AdaptableLayer,
    /// w1_a, w1_b, w2_a, w2_b.
    w: [Tensor; 4],
    base: Option<Tensor>,
}

impl Loha {
    pub fn new(mut o: Options) -> Result<Self> {
        if let Some(shapes) = &o.file_shapes {
            o.rank = shapes
                .get("hada_w1_b")
                .and_then(|s| s.first().copied())
                .ok_or_else(|| Error::msg("the file has no hada_w1_b for this layer"))?;
        }
        let layer = o
            .layer
            .clone()
            .ok_or_else(|| Error::msg("loha needs the `layer` option"))?;
        let ok = match layer.conv {
            None => layer.shape.len() == 2,
            Some(c) => layer.shape.len() == 4 && c.groups == 1,
        };
        if !ok || o.rank == 0 {
            bail!(
                "layer `{}`: loha supports linear and ungrouped conv layers with rank >= 1 (shape {:?})",
                layer.name,
                layer.shape
            );
        }
        let (out, r) = (layer.out_features(), o.rank);
        let fan_in: usize = layer.shape.iter().skip(1).product();
        let rng = Generator::new(layer_seed(o.seed, &layer.name))?;
        let w = [
            Tensor::zeros(&[out, r], DType::F32)?,
            Tensor::randn(&[r, fan_in], &rng)?,
            Tensor::randn(&[out, r], &rng)?.mul_scalar(0.1)?,
            Tensor::randn(&[r, fan_in], &rng)?,
        ];
        for t in &w {
            t.set_requires_grad(true)?;
        }
        Ok(Self {
            o,
            layer,
            w,
            base: None,
        })
    }

    /// ΔW in the layer's weight shape.
    fn delta(&self) -> Result<Tensor> {
        let [w1a, w1b, w2a, w2b] = &self.w;
        let shape: Vec<i64> = self.layer.shape.iter().map(|&d| d as i64).collect();
        w1a.matmul(w1b)?
            .mul(&w2a.matmul(w2b)?)?
            .mul_scalar(self.o.alpha / self.o.rank as f64)?
            .reshape(&shape)
    }
}

impl Adapter for Loha {
    fn bind(&mut self, weight: Tensor, _bias: Option<Tensor>) -> Result<()> {
        check_weight(&self.layer, &weight)?;
        self.base = Some(weight);
        Ok(())
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(KEYS
            .iter()
            .zip(&self.w)
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut s = self.parameters()?;
        s.push((
            "alpha".into(),
            Tensor::from_f32(&[self.o.alpha as f32], &[])?,
        ));
        Ok(s)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let name = self.layer.name.clone();
        let mut seen = [false; 4];
        for (k, t) in &state {
            if k == "alpha" {
                self.o.alpha = scalar(&name, k, t)?;
            } else if let Some(i) = KEYS.iter().position(|key| key == k) {
                load_into(&name, k, &self.w[i], t)?;
                seen[i] = true;
            } else {
                bail!("layer `{name}`: unexpected LoHa tensor `{k}`");
            }
        }
        if seen.contains(&false) {
            bail!(
                "layer `{name}`: the LoHa state needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"
            );
        }
        Ok(())
    }

    fn set_training(&mut self, _training: bool) {}

    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        forward_with_delta(&self.layer, x, base_out, &self.delta()?, self.o.multiplier)
    }

    fn merged_weight(&mut self) -> Result<Tensor> {
        merge_delta(
            &self.layer,
            self.base.as_ref(),
            &self.delta()?,
            self.o.multiplier,
        )
    }

    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        merged.sub(&self.delta()?.mul_scalar(self.o.multiplier)?)
    }
}

pub struct LohaPlugin;

impl Plugin for LohaPlugin {
    const NAME: &'static str = "loha";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Adapter,
            id: "loha".into(),
            version: Self::VERSION.into(),
            description: "LoHa (LyCORIS Hadamard-product adapter)".into(),
            options_schema: with_file_layout(
                json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "rank": {"type": "integer", "minimum": 1, "default": d.rank},
                        "alpha": {"type": "number", "default": d.alpha},
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
        if (kind, id) != (ComponentKind::Adapter, "loha") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = parse_options(id, Options::default(), options)?;
        Ok(Component::Adapter(Box::new(Loha::new(o)?)))
    }
}

export_plugin!(LohaPlugin);
