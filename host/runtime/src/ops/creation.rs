//! Ops that make tensors from attributes: constants, ranges, random draws, uploads.

use burn_backend::{Scalar, Shape, TensorData};
use ferrite_plugin_api::{DType, op};
use rand::Rng;
use rand_distr::StandardNormal;

use super::{RtResult, TensorTable, Tracking, Value, one};
use crate::table::float_dtype;

/// Uploaded values must fill the shape exactly.
fn check_fill(op: &str, values: usize, shape: &[usize]) -> RtResult<()> {
    if values != shape.iter().product::<usize>() {
        return Err(format!(
            "op {op}: {values} values do not fill shape {shape:?}"
        ));
    }
    Ok(())
}

impl<B: Tracking> TensorTable<B> {
    pub(super) fn fill(
        &self,
        shape: &[usize],
        value: f64,
        dtype: DType,
    ) -> RtResult<Vec<Value<B>>> {
        let shape = Shape::from(shape.to_vec());
        if dtype == DType::I64 || dtype == DType::I32 {
            let data = TensorData::full(shape, value as i64);
            return Ok(vec![Value::Int(B::int_from_data(
                data.convert_dtype(self.settings().int_dtype.into()),
                &self.device,
            ))]);
        }
        one(B::float_full(
            shape,
            Scalar::Float(value),
            &self.device,
            float_dtype(dtype)?,
        ))
    }

    pub(super) fn arange(&self, a: &op::Arange) -> RtResult<Vec<Value<B>>> {
        if a.step == 0 || a.end < a.start {
            return Err(format!(
                "op arange: empty or invalid range {}..{} step {}",
                a.start, a.end, a.step
            ));
        }
        let t = B::int_arange_step(
            a.start..a.end,
            a.step,
            &self.device,
            self.settings().int_dtype,
        );
        if a.dtype.is_float() {
            one(B::int_into_float(t, float_dtype(a.dtype)?))
        } else {
            Ok(vec![Value::Int(t)])
        }
    }

    /// Standard normal (`normal`) or uniform [0, 1) draws from a host generator.
    pub(super) fn random(&self, op: &str, a: &op::Random, normal: bool) -> RtResult<Vec<Value<B>>> {
        let n: usize = a.shape.iter().product();
        let v: Vec<f32> = self
            .with_rng(a.rng, |g| {
                if normal {
                    (0..n).map(|_| g.sample(StandardNormal)).collect()
                } else {
                    (0..n).map(|_| g.random::<f32>()).collect()
                }
            })
            .ok_or_else(|| format!("op {op}: generator {} does not exist", a.rng))?;
        one(B::float_from_data(
            TensorData::new(v, a.shape.clone()),
            &self.device,
        ))
    }

    pub(super) fn upload_f32(&self, a: &op::FromF32) -> RtResult<Vec<Value<B>>> {
        check_fill("from_f32", a.data.len(), &a.shape)?;
        one(B::float_from_data(
            TensorData::new(a.data.clone(), a.shape.clone()),
            &self.device,
        ))
    }

    pub(super) fn upload_i64(&self, a: &op::FromI64) -> RtResult<Vec<Value<B>>> {
        check_fill("from_i64", a.data.len(), &a.shape)?;
        let td = TensorData::new(a.data.clone(), a.shape.clone())
            .convert_dtype(self.settings().int_dtype.into());
        Ok(vec![Value::Int(B::int_from_data(td, &self.device))])
    }
}
