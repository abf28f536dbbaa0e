//! LoKr (LyCORIS): the weight change is a Kronecker product `ΔW = w1 ⊗ w2 · alpha/rank`, with
//! the output and input sizes each split in two by LyCORIS' `factorization` (out = a·c,
//! in = b·d): `w1` is `[a, b]` (or `w1_a [a, r] · w1_b [r, b]` with `decompose_both`), `w2` is
//! `[c, d·k]` for a kernel of k elements (or `w2_a [c, r] · w2_b [r, d·k]` when the rank is
//! small enough, as LyCORIS decides), reshaped to the layer's weight (linear or conv, without the
//! Tucker core). Both factors whole: scale 1. Initialised as LyCORIS does: w1 (and w1_a, w1_b)
//! and w2_a kaiming-uniform, w2 or w2_b zero, so a fresh adapter changes nothing.

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
    /// How the sizes are split: the part nearest this number (-1: as square as possible).
    pub factor: i64,
    /// Decompose w1 into two low-rank factors too.
    pub decompose_both: bool,
    /// Keep both factors whole (no low rank).
    pub full_matrix: bool,
    pub multiplier: f64,
    pub seed: u64,
    /// A file's tensors for this layer (set by the host when it loads one): the structure
    /// comes from them.
    pub file_shapes: Option<FileShapes>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            layer: None,
            rank: 16,
            alpha: 1.0,
            factor: -1,
            decompose_both: false,
            full_matrix: false,
            multiplier: 1.0,
            seed: 0,
            file_shapes: None,
        }
    }
}

/// LyCORIS' `factorization`: `dim = m·n` with `m <= n`, m the divisor nearest `factor` (or the
/// most square split when factor is -1).
pub fn factorization(dim: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dim.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dim / factor as usize);
        return (m.min(n), m.max(n));
    }
    let factor = if factor < 0 { dim } else { factor as usize };
    let (mut m, mut n) = (1, dim);
    let mut length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dim.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dim / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n, length) = (new_m, new_n, new_m + new_n);
    }
    (m.min(n), m.max(n))
}

/// The factors' sizes: out = a·c, in = b·d, k kernel elements; which are low rank.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    k: usize,
    rank: usize,
    w1_low: bool,
    w2_low: bool,
}

impl Plan {
    fn new(layer: &AdaptableLayer, o: &Options) -> Result<Self> {
        let (out, input) = (layer.shape[0], layer.shape[1]);
        let k: usize = layer.shape[2..].iter().product();
        if let Some(shapes) = &o.file_shapes {
            return Self::from_file(layer, shapes, k);
        }
        let (a, c) = factorization(out, o.factor);
        let (b, d) = factorization(input, o.factor);
        let r = o.rank as f64;
        Ok(Self {
            a,
            b,
            c,
            d,
            k,
            rank: o.rank,
            w1_low: o.decompose_both && r < a.max(b) as f64 / 2.0 && !o.full_matrix,
            w2_low: r < c.max(d) as f64 / 2.0 && !o.full_matrix,
        })
    }

    /// The plan a file's tensors were made with.
    fn from_file(layer: &AdaptableLayer, shapes: &FileShapes, k: usize) -> Result<Self> {
        for (unsupported, what) in [
            ("lokr_t2", "a Tucker core (LyCORIS' use_tucker)"),
            (
                "dora_scale",
                "weight decomposition (LyCORIS' weight_decompose)",
            ),
        ] {
            if shapes.contains_key(unsupported) {
                bail!(
                    "layer `{}`: the file's LoKr has {what}, which Ferrite's LoKr does not have",
                    layer.name
                );
            }
        }
        let get = |key: &str| shapes.get(key).filter(|s| s.len() >= 2);
        let bad = || {
            Error(format!(
                "layer `{}`: the file's LoKr tensors {:?} do not fit its weight {:?}",
                layer.name,
                shapes.keys().collect::<Vec<_>>(),
                layer.shape
            ))
        };
        let (a, b, w1_rank, w1_low) = match (get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b")) {
            (Some(w1), _, _) => (w1[0], w1[1], None, false),
            (None, Some(wa), Some(wb)) => (wa[0], wb[1], Some(wb[0]), true),
            _ => return Err(bad()),
        };
        let (out, input) = (layer.shape[0], layer.shape[1]);
        if a == 0 || b == 0 || !out.is_multiple_of(a) || !input.is_multiple_of(b) {
            return Err(bad());
        }
        let (c, d) = (out / a, input / b);
        let (w2_rank, w2_low) = match (get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b")) {
            (Some(w2), _, _) if w2[0] == c && w2[1..].iter().product::<usize>() == d * k => {
                (None, false)
            }
            (None, Some(wa), Some(wb)) if wa[0] == c && wb[1] == d * k && wa[1] == wb[0] => {
                (Some(wb[0]), true)
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            a,
            b,
            c,
            d,
            k,
            rank: w2_rank.or(w1_rank).unwrap_or(1),
            w1_low,
            w2_low,
        })
    }

    /// The tensors' names and shapes, in state order (a whole w2 keeps the layer's kernel
    /// dimensions, as LyCORIS writes it).
    fn tensors(&self, layer: &AdaptableLayer) -> Vec<(&'static str, Vec<usize>)> {
        let (r, dk) = (self.rank, self.d * self.k);
        let mut t = if self.w1_low {
            vec![
                ("lokr_w1_a", vec![self.a, r]),
                ("lokr_w1_b", vec![r, self.b]),
            ]
        } else {
            vec![("lokr_w1", vec![self.a, self.b])]
        };
        if self.w2_low {
            t.extend([("lokr_w2_a", vec![self.c, r]), ("lokr_w2_b", vec![r, dk])]);
        } else {
            let mut shape = vec![self.c, self.d];
            shape.extend(&layer.shape[2..]);
            t.push(("lokr_w2", shape));
        }
        t
    }
}

const TENSORS: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// LyCORIS' suffixes; no layout fuses LoKr factors.
fn file_layout() -> FileLayout {
    let t = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    FileLayout {
        // The Tucker core and DoRA scale are LyCORIS' too: read, to be refused by name.
        tensors: t(&[&TENSORS[..], &["lokr_t2", "dora_scale"]].concat()),
        markers: t(&["lokr_w1", "lokr_w1_a"]),
        rank_from: t(&["lokr_w2_b", "lokr_w1_b"]),
        network_module: "lycoris.kohya".into(),
        network_args: [("algo".to_string(), "lokr".to_string())].into(),
        name: "LoKr".into(),
        ..FileLayout::default()
    }
}

pub struct Lokr {
    o: Options,
    layer: AdaptableLayer,
    plan: Plan,
    /// By name, in [`Plan::tensors`]' order.
    w: Vec<(&'static str, Tensor)>,
    base: Option<Tensor>,
}

impl Lokr {
    pub fn new(o: Options) -> Result<Self> {
        let layer = o
            .layer
            .clone()
            .ok_or_else(|| Error::msg("lokr needs the `layer` option"))?;
        let ok = match layer.conv {
            None => layer.shape.len() == 2,
            Some(c) => layer.shape.len() == 4 && c.groups == 1,
        };
        if !ok || o.rank == 0 {
            bail!(
                "layer `{}`: lokr supports linear and ungrouped conv layers with rank >= 1 (shape {:?})",
                layer.name,
                layer.shape
            );
        }
        let plan = Plan::new(&layer, &o)?;
        let rng = Generator::new(layer_seed(o.seed, &layer.name))?;
        let mut w = Vec::new();
        for (name, shape) in plan.tensors(&layer) {
            // kaiming_uniform(a=√5): bound 1/√fan_in, fan_in the second dimension.
            let t = if matches!(name, "lokr_w2" | "lokr_w2_b") {
                Tensor::zeros(&shape, DType::F32)?
            } else {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                Tensor::rand(&shape, &rng)?
                    .mul_scalar(2.0 * bound)?
                    .sub_scalar(bound)?
            };
            t.set_requires_grad(true)?;
            w.push((name, t));
        }
        Ok(Self {
            o,
            layer,
            plan,
            w,
            base: None,
        })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error(format!("layer `{}`: no {name}", self.layer.name)))
    }

    /// alpha/rank; 1 when both factors are whole (LyCORIS).
    fn scale(&self) -> f64 {
        if self.plan.w1_low || self.plan.w2_low {
            self.o.alpha / self.plan.rank as f64
        } else {
            1.0
        }
    }

    /// ΔW in the layer's weight shape.
    fn delta(&self) -> Result<Tensor> {
        let Plan { a, b, c, d, k, .. } = self.plan;
        let w1 = if self.plan.w1_low {
            self.get("lokr_w1_a")?.matmul(self.get("lokr_w1_b")?)?
        } else {
            self.get("lokr_w1")?.clone()
        };
        let w2 = if self.plan.w2_low {
            self.get("lokr_w2_a")?.matmul(self.get("lokr_w2_b")?)?
        } else {
            self.get("lokr_w2")?.reshape(&[c as i64, (d * k) as i64])?
        };
        // kron(w1, w2)[i·c + p, j·dk + q] = w1[i, j]·w2[p, q]: [a, 1, b, 1] × [1, c, 1, dk].
        let (a, b, c, dk) = (a as i64, b as i64, c as i64, (d * k) as i64);
        let kron = w1
            .reshape(&[a, 1, b, 1])?
            .mul(&w2.reshape(&[1, c, 1, dk])?)?;
        let shape: Vec<i64> = self.layer.shape.iter().map(|&s| s as i64).collect();
        kron.reshape(&shape)?.mul_scalar(self.scale())
    }
}

impl Adapter for Lokr {
    fn bind(&mut self, weight: Tensor, _bias: Option<Tensor>) -> Result<()> {
        check_weight(&self.layer, &weight)?;
        self.base = Some(weight);
        Ok(())
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .w
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut s = self.parameters()?;
        // LyCORIS writes the rank as alpha when both factors are whole (scale 1).
        let alpha = if self.plan.w1_low || self.plan.w2_low {
            self.o.alpha
        } else {
            self.plan.rank as f64
        };
        s.push(("alpha".into(), Tensor::from_f32(&[alpha as f32], &[])?));
        Ok(s)
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let name = self.layer.name.clone();
        let mut seen = 0;
        for (k, t) in &state {
            if k == "alpha" {
                self.o.alpha = scalar(&name, k, t)?;
                continue;
            }
            let Some((_, target)) = self.w.iter().find(|(n, _)| n == k) else {
                bail!(
                    "layer `{name}`: LoKr tensor `{k}` does not belong to this adapter's \
                     structure ({:?})",
                    self.w.iter().map(|(n, _)| *n).collect::<Vec<_>>()
                );
            };
            load_into(&name, k, target, t)?;
            seen += 1;
        }
        if seen != self.w.len() {
            bail!(
                "layer `{name}`: the LoKr state needs {:?}",
                self.w.iter().map(|(n, _)| *n).collect::<Vec<_>>()
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

pub struct LokrPlugin;

impl Plugin for LokrPlugin {
    const NAME: &'static str = "lokr";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Adapter,
            id: "lokr".into(),
            version: Self::VERSION.into(),
            description: "LoKr (LyCORIS Kronecker-product adapter)".into(),
            options_schema: with_file_layout(
                json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "rank": {"type": "integer", "minimum": 1, "default": d.rank},
                        "alpha": {"type": "number", "default": d.alpha},
                        "factor": {"type": "integer", "default": d.factor, "not": {"const": 0},
                                   "description": "split sizes near this number; -1: most square"},
                        "decompose_both": {"type": "boolean", "default": d.decompose_both},
                        "full_matrix": {"type": "boolean", "default": d.full_matrix},
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
        if (kind, id) != (ComponentKind::Adapter, "lokr") {
            bail!("this library has no {kind} `{id}`");
        }
        let mut o: Options = parse_options(id, Options::default(), options)?;
        // LyCORIS: an alpha of 0 means the rank (scale 1).
        if o.alpha == 0.0 {
            o.alpha = o.rank as f64;
        }
        if o.factor == 0 {
            bail!("options of `lokr`: factor must be -1 or at least 1");
        }
        Ok(Component::Adapter(Box::new(Lokr::new(o)?)))
    }
}

export_plugin!(LokrPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    /// What lycoris.functional.general.factorization returns (lycoris-lora 3.x; its docstring's
    /// table is older: 360 by -1 and by 16 differ there).
    #[test]
    fn factorization_matches_lycoris() {
        let cases = [
            (127, -1, (1, 127)),
            (128, -1, (8, 16)),
            (250, -1, (10, 25)),
            (360, -1, (18, 20)),
            (512, -1, (16, 32)),
            (1024, -1, (32, 32)),
            (128, 2, (2, 64)),
            (250, 4, (2, 125)),
            (360, 4, (4, 90)),
            (250, 8, (5, 50)),
            (360, 8, (8, 45)),
            (1024, 16, (16, 64)),
            (360, 16, (15, 24)),
        ];
        for (dim, factor, want) in cases {
            assert_eq!(factorization(dim, factor), want, "{dim} by {factor}");
        }
    }
}
