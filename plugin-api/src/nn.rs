//! Layers built on [`Tensor`], loaded by diffusers-style key prefixes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DType;
use crate::error::Result;
use crate::host::Weights;
use crate::tensor::{
    Tensor,
    ops::{self, ConvOptions},
};

fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn optional(w: &Weights, k: &str, dtype: DType) -> Result<Option<Tensor>> {
    w.info(k).map(|_| w.get(k, dtype)).transpose()
}

/// Pushes `(prefix.name, tensor)` pairs of a layer's parameters.
pub trait Parameters {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>);
}

/// Pushes the present ones of a layer's `weight` and `bias`.
fn push(
    out: &mut Vec<(String, Tensor)>,
    prefix: &str,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) {
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            out.push((key(prefix, name), t.clone()));
        }
    }
}

/// A linear or conv layer adapters can attach to: its name (component and diffusers module
/// name), weight shape and, for a conv, its options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptableLayer {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<ConvOptions>,
    /// The module's name in the original single-file layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// Its key (without the tensor suffixes) in each adapter file layout the model supports
    /// besides diffusers/PEFT, whose key is `name` ([`crate::family::layouts`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, String>,
    /// More names adapter files may use for it (read, never written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Where the layouts of `keys` fuse this layer with others into one module (Flux's BFL
    /// names: `img_attn.qkv` holds `to_q`, `to_k` and `to_v`), the rows of that module it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused: Option<FusedRows>,
}

/// This layer's outputs are rows `start..start + out_features` of a fused module of `rows`
/// output features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusedRows {
    pub start: usize,
    pub rows: usize,
}

impl AdaptableLayer {
    fn of(name: String, weight: &Tensor, conv: Option<ConvOptions>) -> Self {
        Self {
            name,
            // A weight whose shape cannot be read fails at its first use anyway.
            shape: weight.shape().unwrap_or_default(),
            conv,
            original: None,
            keys: BTreeMap::new(),
            aliases: Vec::new(),
            fused: None,
        }
    }
}

impl AdaptableLayer {
    /// The layer's op with another weight (no bias): `x Wᵀ`, or the conv with its options.
    pub fn apply(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        match self.conv {
            Some(o) => ops::conv2d(x, weight, None, o),
            None => ops::linear(x, weight, None),
        }
    }

    /// Output features (or channels).
    pub fn out_features(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// The shape that broadcasts a per-output vector against the layer's output: `[out]` for a
    /// linear layer (features last), `[1, out, 1, 1]` for a conv.
    pub fn per_output_shape(&self) -> Vec<i64> {
        let out = self.out_features() as i64;
        match self.conv {
            Some(_) => vec![1, out, 1, 1],
            None => vec![out],
        }
    }
}

/// The output of an adaptable layer: the host's adapters see it when it has a name.
fn adapted(name: &Option<String>, x: &Tensor, base_out: Tensor) -> Result<Tensor> {
    match name {
        Some(n) => crate::host::adapt(n, x, base_out),
        None => Ok(base_out),
    }
}

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Set when loaded through a scoped [`Weights`]: adapters attach by this name.
    pub name: Option<String>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            name: None,
        }
    }

    pub fn load(w: &Weights, prefix: &str, dtype: DType) -> Result<Self> {
        let weight = w.get(&key(prefix, "weight"), dtype)?;
        Ok(Self {
            name: w.register(prefix, |n| AdaptableLayer::of(n, &weight, None)),
            weight,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        adapted(
            &self.name,
            x,
            ops::linear(x, &self.weight, self.bias.as_ref())?,
        )
    }
}

impl Parameters for Linear {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push(out, prefix, Some(&self.weight), self.bias.as_ref());
    }
}

#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub options: ConvOptions,
    /// Set when loaded through a scoped [`Weights`]: adapters attach by this name.
    pub name: Option<String>,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, options: ConvOptions) -> Self {
        Self {
            weight,
            bias,
            options,
            name: None,
        }
    }

    pub fn load(w: &Weights, prefix: &str, options: ConvOptions, dtype: DType) -> Result<Self> {
        let weight = w.get(&key(prefix, "weight"), dtype)?;
        Ok(Self {
            name: w.register(prefix, |n| AdaptableLayer::of(n, &weight, Some(options))),
            weight,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
            options,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = ops::conv2d(x, &self.weight, self.bias.as_ref(), self.options)?;
        adapted(&self.name, x, out)
    }
}

impl Parameters for Conv2d {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push(out, prefix, Some(&self.weight), self.bias.as_ref());
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(w: &Weights, prefix: &str, groups: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: optional(w, &key(prefix, "weight"), dtype)?,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(
            x,
            self.groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    /// `silu(self.forward(x))`, as one op.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm_silu(
            x,
            self.groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }
}

impl Parameters for GroupNorm {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push(out, prefix, self.weight.as_ref(), self.bias.as_ref());
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: optional(w, &key(prefix, "weight"), dtype)?,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

impl Parameters for LayerNorm {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push(out, prefix, self.weight.as_ref(), self.bias.as_ref());
    }
}

#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn load(w: &Weights, prefix: &str, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: w.get(&key(prefix, "weight"), dtype)?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        ops::embedding(&self.weight, ids)
    }
}

impl Parameters for Embedding {
    fn parameters(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push(out, prefix, Some(&self.weight), None);
    }
}
