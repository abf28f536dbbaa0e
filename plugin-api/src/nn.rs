//! Layers built on [`Tensor`], loaded by diffusers-style key prefixes.

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

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn load(w: &Weights, prefix: &str, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: w.get(&key(prefix, "weight"), dtype)?,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
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
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, options: ConvOptions) -> Self {
        Self {
            weight,
            bias,
            options,
        }
    }

    pub fn load(w: &Weights, prefix: &str, options: ConvOptions, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: w.get(&key(prefix, "weight"), dtype)?,
            bias: optional(w, &key(prefix, "bias"), dtype)?,
            options,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.options)
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
