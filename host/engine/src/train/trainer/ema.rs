//! The exponential moving average of the trained weights, kept on the training device (`gpu`)
//! or in host memory (`cpu`: costs a copy of the weights every update interval, saves their size
//! in device memory).

use ferrite_plugin_api::{DType, Result, Tensor};

pub enum Ema {
    Device(Vec<Tensor>),
    /// Shape and values of each tensor.
    Host(Vec<(Vec<usize>, Vec<f32>)>),
}

impl Ema {
    /// Starts at the weights as they are.
    pub fn new(params: &[Tensor], on_host: bool) -> Result<Self> {
        Ok(if on_host {
            Ema::Host(
                params
                    .iter()
                    .map(|p| Ok((p.shape()?, p.to_vec()?)))
                    .collect::<Result<_>>()?,
            )
        } else {
            // In f32 whatever the weights' dtype (lora_weight_dtype): a bfloat16 average would
            // stop moving once d·ema rounds back to ema.
            Ema::Device(
                params
                    .iter()
                    .map(|p| p.detach()?.cast(DType::F32))
                    .collect::<Result<_>>()?,
            )
        })
    }

    /// ema ← d·ema + (1 − d)·param.
    pub fn update(&mut self, params: &[Tensor], d: f64) -> Result<()> {
        match self {
            Ema::Device(ema) => {
                for (e, p) in ema.iter().zip(params) {
                    let next = e.mul_scalar(d)?.add(&p.detach()?.mul_scalar(1.0 - d)?)?;
                    e.assign(&next)?;
                }
            }
            Ema::Host(ema) => {
                let (d32, rest) = (d as f32, (1.0 - d) as f32);
                for ((_, e), p) in ema.iter_mut().zip(params) {
                    for (e, v) in e.iter_mut().zip(p.to_vec()?) {
                        *e = d32 * *e + rest * v;
                    }
                }
            }
        }
        Ok(())
    }

    /// The averaged weights as tensors on the device.
    pub fn tensors(&self) -> Result<Vec<Tensor>> {
        match self {
            Ema::Device(ema) => Ok(ema.clone()),
            Ema::Host(ema) => ema
                .iter()
                .map(|(shape, v)| Tensor::from_f32(v, shape))
                .collect(),
        }
    }

    /// Replaces the averages (from a backup).
    pub fn load(&mut self, values: &[Tensor]) -> Result<()> {
        match self {
            Ema::Device(ema) => {
                for (e, v) in ema.iter().zip(values) {
                    e.assign(v)?;
                }
            }
            Ema::Host(ema) => {
                for ((_, e), v) in ema.iter_mut().zip(values) {
                    *e = v.to_vec()?;
                }
            }
        }
        Ok(())
    }
}
