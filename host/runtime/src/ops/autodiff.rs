//! Casts, the device, and autodiff: detach, trainability, backward, gradients, in-place assign.

use std::sync::{Arc, Mutex};

use burn_backend::{Scalar, TensorMetadata};
use ferrite_plugin_api::{DType, TensorId};

use super::{F, RtResult, TensorTable, Tracking, Value, one, shape_of};
use crate::table::{float_dtype, int_dtype};

impl<B: Tracking> TensorTable<B> {
    pub(super) fn cast(&self, id: TensorId, dt: DType) -> RtResult<Vec<Value<B>>> {
        let bool_dt = self.settings().bool_dtype;
        let v = self.get(id)?;
        Ok(vec![match (v, dt.is_float()) {
            (Value::Float(t), true) => Value::Float(B::float_cast(t, float_dtype(dt)?)),
            (Value::Float(t), false) if dt == DType::Bool => {
                Value::Bool(B::float_not_equal_elem(t, Scalar::Float(0.0), bool_dt))
            }
            (Value::Float(t), false) => Value::Int(B::float_into_int(t, int_dtype(dt)?)),
            (Value::Int(t), true) => Value::Float(B::int_into_float(t, float_dtype(dt)?)),
            (Value::Bool(t), true) => Value::Float(B::bool_into_float(t, float_dtype(dt)?)),
            // The integer dtype asked for (u8 optimizer states are stored as u8).
            (Value::Int(t), false) if dt != DType::Bool => {
                Value::Int(B::int_cast(t, int_dtype(dt)?))
            }
            (v, _) => return Err(format!("op cast: cannot cast a {} to {dt}", v.kind())),
        }])
    }

    pub(super) fn to_device(&self, id: TensorId, name: &str) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        if name != self.device_name {
            return Err(format!(
                "op to_device: this run computes on `{}`; moving to `{name}` is not supported",
                self.device_name
            ));
        }
        one(t)
    }

    pub(super) fn set_requires_grad(
        &self,
        id: TensorId,
        requires: bool,
    ) -> RtResult<Vec<Value<B>>> {
        if !requires && matches!(self.get_kept(id)?, Value::Kept(_)) {
            // A kept weight is frozen already, and stays kept.
            return Ok(vec![]);
        }
        self.not_kept("set_requires_grad", id)?;
        let t = B::float_set_require_grad(self.float(id)?, requires);
        self.replace(id, Value::Float(t))?;
        Ok(vec![])
    }

    pub(super) fn backward(&self, id: TensorId) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        if t.shape().num_elements() != 1 {
            return Err(format!(
                "op backward: the loss must have one element, got shape {:?}",
                shape_of::<B>(&t)
            ));
        }
        Ok(vec![Value::Grads(Arc::new(Mutex::new(B::backward(t))))])
    }

    pub(super) fn grad(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let grads = match self.get(ids[0])? {
            Value::Grads(g) => g,
            other => {
                return Err(format!(
                    "op grad: first input is a {}, not gradients",
                    other.kind()
                ));
            }
        };
        let p = self.f(ids, 1)?;
        let grads = grads.lock().unwrap_or_else(|e| e.into_inner());
        Ok(B::grad(&p, &grads)
            .map(|g| Value::Float(B::from_inner(g)))
            .into_iter()
            .collect())
    }

    /// Replaces the destination's value (every handle to it sees the change).
    pub(super) fn assign(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let src = self.f(ids, 1)?;
        self.assign_value(ids[0], src)?;
        Ok(vec![])
    }

    /// Puts `src` in tensor `id`'s place, keeping whether it is trained.
    pub(super) fn assign_value(&self, id: TensorId, src: F<B>) -> RtResult<()> {
        self.not_kept("assign", id)?;
        let dst = self.float(id)?;
        if shape_of::<B>(&dst) != shape_of::<B>(&src) {
            return Err(format!(
                "op assign: shape {:?} into {:?}",
                shape_of::<B>(&src),
                shape_of::<B>(&dst)
            ));
        }
        let trainable = B::float_is_require_grad(&dst);
        let new = B::float_set_require_grad(B::float_detach(src), trainable);
        self.replace(id, Value::Float(new))
    }
}
