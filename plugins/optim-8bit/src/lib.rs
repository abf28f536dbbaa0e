//! 8-bit AdamW, Adam and Lion as bitsandbytes runs them (`AdamW8bit`, `Adam8bit`, `Lion8bit`,
//! its CPU update): each moment is kept between steps as u8 codes of the dynamic map in blocks of
//! 256 with an f32 scale per block ([`quant`]), dequantised for the update and quantised again
//! after it. A parameter with fewer than `min_8bit_size` elements keeps f32 moments (bitsandbytes'
//! 32-bit update). Weight decay is decoupled in all three (bitsandbytes' Adam8bit too). A
//! parameter without a gradient is skipped with its state kept.

mod dynamic_map;
pub mod quant;

use ferrite_plugin_api::{
    Component, ComponentKind, DType, Descriptor, Optimizer, Param, Plugin, Result, Tensor, bail,
    export_plugin,
    optim::{Slot, Slots, sign, write, zeros_like},
    parse_options,
    serde_json::{self, json},
};
use quant::Code;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Adam,
    Lion,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    pub beta1: f64,
    pub beta2: f64,
    /// Adam's; Lion has none.
    #[serde(default)]
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameters with fewer elements keep 32-bit moments.
    pub min_8bit_size: usize,
}

impl Options {
    /// bitsandbytes' defaults (OneTrainer's too).
    fn defaults(id: &str) -> Self {
        let (beta2, weight_decay) = match id {
            "adamw_8bit" => (0.999, 1e-2),
            "lion_8bit" => (0.99, 0.0),
            _ => (0.999, 0.0),
        };
        Self {
            beta1: 0.9,
            beta2,
            eps: 1e-8,
            weight_decay,
            min_8bit_size: 4096,
        }
    }
}

pub struct EightBit {
    kind: Kind,
    o: Options,
    slots: Slots,
    signed: Code,
    unsigned: Code,
}

/// The state fields: 8-bit codes with their block scales, or f32 moments.
const FIELDS: &[&str] = &[
    "state1",
    "absmax1",
    "state2",
    "absmax2",
    "exp_avg",
    "exp_avg_sq",
];

impl EightBit {
    /// A moment kept in 8 bits (`state{i}`, `absmax{i}`) as f32, zeros at the first step.
    fn load8(slot: &Slot, i: u8, code: &Code, like: &Tensor) -> Result<Tensor> {
        let (state, absmax) = (format!("state{i}"), format!("absmax{i}"));
        match (slot.tensors.get(&state), slot.tensors.get(&absmax)) {
            (Some(q), Some(a)) => code.dequantize(q, a),
            (None, None) => zeros_like(like),
            _ => bail!("optimizer state has one of `{state}`, `{absmax}` without the other"),
        }
    }

    fn store8(slot: &mut Slot, i: u8, code: &Code, value: &Tensor) -> Result<()> {
        let (q, a) = code.quantize(value)?;
        slot.set(&format!("state{i}"), q);
        slot.set(&format!("absmax{i}"), a);
        Ok(())
    }
}

impl Optimizer for EightBit {
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let o = self.o.clone();
        for p in params {
            let Some(g) = p.grad else { continue };
            let g = g.detach()?.cast(DType::F32)?;
            let numel: usize = g.shape()?.iter().product();
            let eight = numel >= o.min_8bit_size;
            let slot = self.slots.by_param.entry(p.name.to_string()).or_default();
            slot.step += 1;
            let t = slot.step as i32;
            let mut w = p.tensor.detach()?.cast(DType::F32)?;
            let m = if eight {
                Self::load8(slot, 1, &self.signed, &g)?
            } else {
                let [m] = slot.take_or_zeros(["exp_avg"], &g)?;
                m
            };
            if o.weight_decay > 0.0 {
                w = w.mul_scalar(1.0 - lr * o.weight_decay)?;
            }
            let m = match self.kind {
                Kind::Lion => {
                    let dir = sign(&m.mul_scalar(o.beta1)?.add(&g.mul_scalar(1.0 - o.beta1)?)?)?;
                    w = w.sub(&dir.mul_scalar(lr)?)?;
                    m.mul_scalar(o.beta2)?.add(&g.mul_scalar(1.0 - o.beta2)?)?
                }
                Kind::Adam => {
                    let v = if eight {
                        Self::load8(slot, 2, &self.unsigned, &g)?
                    } else {
                        let [v] = slot.take_or_zeros(["exp_avg_sq"], &g)?;
                        v
                    };
                    let m = m.mul_scalar(o.beta1)?.add(&g.mul_scalar(1.0 - o.beta1)?)?;
                    let v = v
                        .mul_scalar(o.beta2)?
                        .add(&g.mul(&g)?.mul_scalar(1.0 - o.beta2)?)?;
                    let c1 = 1.0 - o.beta1.powi(t);
                    let c2 = (1.0 - o.beta2.powi(t)).sqrt();
                    // bitsandbytes' two updates, each as it writes it.
                    let update = if eight {
                        m.div(&v.sqrt()?.div_scalar(c2)?.add_scalar(o.eps)?)?
                            .mul_scalar(-lr / c1)?
                    } else {
                        m.div(&v.sqrt()?.add_scalar(o.eps * c2)?)?
                            .mul_scalar(-lr * c2 / c1)?
                    };
                    w = w.add(&update)?;
                    if eight {
                        Self::store8(slot, 2, &self.unsigned, &v)?;
                    } else {
                        slot.set("exp_avg_sq", v);
                    }
                    m
                }
            };
            if eight {
                Self::store8(slot, 1, &self.signed, &m)?;
            } else {
                slot.set("exp_avg", m);
            }
            write(p.tensor, &w)?;
        }
        Ok(())
    }

    /// `<parameter>.step`, and `.state1`/`.absmax1` (u8 codes, f32 block scales; Adam's second
    /// moment `.state2`/`.absmax2`) or, for small parameters, `.exp_avg`/`.exp_avg_sq`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots.save(Vec::new())
    }

    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        self.slots.load_all(state)
    }
}

pub struct EightBitPlugin;

const IDS: [(&str, &str); 3] = [
    (
        "adamw_8bit",
        "AdamW with 8-bit moments (bitsandbytes' AdamW8bit): a quarter of AdamW's state memory",
    ),
    (
        "adam_8bit",
        "Adam with 8-bit moments (bitsandbytes' Adam8bit, whose weight decay is decoupled)",
    ),
    (
        "lion_8bit",
        "Lion with an 8-bit momentum (bitsandbytes' Lion8bit)",
    ),
];

impl Plugin for EightBitPlugin {
    const NAME: &'static str = "optim-8bit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        IDS.iter()
            .map(|(id, description)| {
                let d = Options::defaults(id);
                let mut props = json!({
                    "beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.beta1},
                    "beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": d.beta2},
                    "weight_decay": {"type": "number", "minimum": 0, "default": d.weight_decay},
                    "min_8bit_size": {"type": "integer", "minimum": 1, "default": d.min_8bit_size,
                                      "description": "smaller parameters keep 32-bit moments"}
                });
                if *id != "lion_8bit" {
                    props["eps"] = json!({"type": "number", "minimum": 0, "default": d.eps});
                }
                Descriptor::optimizer(id, Self::VERSION, description, props)
            })
            .collect()
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let Some((id, _)) = IDS.iter().find(|(i, _)| *i == id) else {
            bail!("this library has no {kind} `{id}`");
        };
        if kind != ComponentKind::Optimizer {
            bail!("this library has no {kind} `{id}`");
        }
        let kind = if *id == "lion_8bit" {
            Kind::Lion
        } else {
            Kind::Adam
        };
        if kind == Kind::Lion && options.get("eps").is_some() {
            bail!("options of `lion_8bit`: eps: Lion has no eps");
        }
        let o: Options = parse_options(id, Options::defaults(id), options)?;
        if [o.beta1, o.beta2].iter().any(|b| !(0.0..1.0).contains(b))
            || o.eps < 0.0
            || o.weight_decay < 0.0
            || o.min_8bit_size == 0
        {
            bail!(
                "invalid {id} options {o:?}: betas must be in [0, 1), eps and weight_decay >= 0, \
                 min_8bit_size >= 1"
            );
        }
        Ok(Component::Optimizer(Box::new(EightBit {
            kind,
            o,
            slots: Slots::new("8-bit optimizer", FIELDS),
            signed: Code::new(true)?,
            unsigned: Code::new(false)?,
        })))
    }
}

export_plugin!(EightBitPlugin);

#[cfg(test)]
mod tests {
    use super::quant::dynamic_map;

    /// The maps are bitsandbytes' `create_dynamic_map`, value for value (written into the 8-bit
    /// fixture's metadata by tests/fixtures/gen/optimizers.py).
    #[test]
    fn the_dynamic_maps_are_bitsandbytes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/optim/adamw_8bit.safetensors"
        );
        let bytes = std::fs::read(path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        for (key, signed) in [("dynamic", true), ("udynamic", false)] {
            let text = header["__metadata__"][key].as_str().unwrap();
            let want: Vec<f32> = serde_json::from_str(text).unwrap();
            assert_eq!(dynamic_map(signed), want, "{key}");
        }
    }

    /// The map's shape: sorted, 0 and 1 in it; the signed one symmetric but for its 1, the
    /// unsigned one non-negative. (Its exact values are checked against bitsandbytes' in the
    /// parity test.)
    #[test]
    fn the_dynamic_maps_have_bitsandbytes_shape() {
        for signed in [true, false] {
            let m = dynamic_map(signed);
            assert_eq!(m.len(), 256);
            assert!(m.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
            if signed {
                assert!(m[0] < -0.99 && m[0] > -1.0, "{}", m[0]);
            } else {
                assert!(m[0] == 0.0);
            }
        }
    }
}
