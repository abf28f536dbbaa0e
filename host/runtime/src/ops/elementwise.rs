//! Elementwise ops: arithmetic with a tensor or a scalar, unary maps, comparisons, selection.

use burn_backend::{Scalar, Shape, TensorMetadata};
use ferrite_plugin_api::{Op, TensorId, op};

use super::{
    F, RtResult, TensorTable, Tracking, Value, align, broadcast_shape, one, shape_of, to_rank,
};

impl<B: Tracking> TensorTable<B> {
    pub(super) fn arithmetic(
        &self,
        op: &Op,
        ids: &[TensorId],
        a: &op::Binary,
    ) -> RtResult<Vec<Value<B>>> {
        let t = self.f(ids, 0)?;
        match (self.opt_f(ids, 1)?, a.scalar) {
            (None, Some(s)) => {
                let s = Scalar::Float(s);
                one(match op {
                    Op::Add(_) => B::float_add_scalar(t, s),
                    Op::Sub(_) => B::float_sub_scalar(t, s),
                    Op::Mul(_) => B::float_mul_scalar(t, s),
                    Op::Div(_) => B::float_div_scalar(t, s),
                    _ => B::float_powf_scalar(t, s),
                })
            }
            (Some(r), None) => {
                let (l, r) = align::<B>(t, r)?;
                one(match op {
                    Op::Add(_) => B::float_add(l, r),
                    Op::Sub(_) => B::float_sub(l, r),
                    Op::Mul(_) => B::float_mul(l, r),
                    Op::Div(_) => B::float_div(l, r),
                    _ => B::float_powf(l, r),
                })
            }
            _ => Err(operand_error(op)),
        }
    }

    pub(super) fn compare(
        &self,
        op: &Op,
        ids: &[TensorId],
        a: &op::Binary,
    ) -> RtResult<Vec<Value<B>>> {
        let bool_dt = self.settings().bool_dtype;
        let t = self.f(ids, 0)?;
        let out = match (self.opt_f(ids, 1)?, a.scalar) {
            (None, Some(s)) => {
                let s = Scalar::Float(s);
                match op {
                    Op::Gt(_) => B::float_greater_elem(t, s, bool_dt),
                    Op::Ge(_) => B::float_greater_equal_elem(t, s, bool_dt),
                    Op::Lt(_) => B::float_lower_elem(t, s, bool_dt),
                    Op::Le(_) => B::float_lower_equal_elem(t, s, bool_dt),
                    _ => B::float_equal_elem(t, s, bool_dt),
                }
            }
            (Some(r), None) => {
                let (l, r) = align::<B>(t, r)?;
                let target = Shape::from(broadcast_shape(&shape_of::<B>(&l), &shape_of::<B>(&r))?);
                let (l, r) = (
                    B::float_expand(l, target.clone()),
                    B::float_expand(r, target),
                );
                match op {
                    Op::Gt(_) => B::float_greater(l, r, bool_dt),
                    Op::Ge(_) => B::float_greater_equal(l, r, bool_dt),
                    Op::Lt(_) => B::float_lower(l, r, bool_dt),
                    Op::Le(_) => B::float_lower_equal(l, r, bool_dt),
                    _ => B::float_equal(l, r, bool_dt),
                }
            }
            _ => return Err(operand_error(op)),
        };
        Ok(vec![Value::Bool(out)])
    }

    /// The attribute-free float maps.
    pub(super) fn unary(&self, op: &Op, t: F<B>) -> RtResult<F<B>> {
        Ok(match op {
            Op::Neg(_) => B::float_neg(t),
            Op::Exp(_) => B::float_exp(t),
            Op::Log(_) => B::float_log(t),
            Op::Sqrt(_) => B::float_sqrt(t),
            Op::Rsqrt(_) => B::float_recip(B::float_sqrt(t)),
            Op::Abs(_) => B::float_abs(t),
            Op::Sin(_) => B::float_sin(t),
            Op::Cos(_) => B::float_cos(t),
            Op::Tanh(_) => B::float_tanh(t),
            Op::Sigmoid(_) => B::sigmoid(t),
            Op::Silu(_) => B::x_sigmoid(t, 1.0),
            Op::QuickGelu(_) => B::x_sigmoid(t, 1.702),
            Op::Relu(_) => B::relu(t),
            other => return Err(format!("op {} is not a unary map", other.code().name())),
        })
    }

    pub(super) fn gelu(&self, id: TensorId, a: &op::Gelu) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        match a.approximation {
            op::GeluApproximation::None => one(B::erf_gelu(t)),
            op::GeluApproximation::Tanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let cube = B::float_powf_scalar(t.clone(), Scalar::Float(3.0));
                let inner = B::float_add(
                    t.clone(),
                    B::float_mul_scalar(cube, Scalar::Float(0.044715)),
                );
                let th = B::float_tanh(B::float_mul_scalar(
                    inner,
                    Scalar::Float((2.0 / std::f64::consts::PI).sqrt()),
                ));
                let g = B::float_mul_scalar(
                    B::float_add_scalar(th, Scalar::Float(1.0)),
                    Scalar::Float(0.5),
                );
                one(B::float_mul(t, g))
            }
        }
    }

    pub(super) fn clamp(&self, id: TensorId, a: &op::Clamp) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        one(match (a.min, a.max) {
            (Some(lo), Some(hi)) => B::float_clamp(t, Scalar::Float(lo), Scalar::Float(hi)),
            (Some(lo), None) => B::float_clamp_min(t, Scalar::Float(lo)),
            (None, Some(hi)) => B::float_clamp_max(t, Scalar::Float(hi)),
            (None, None) => t,
        })
    }

    /// `cond ? a : b` with broadcasting.
    pub(super) fn where_(&self, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let (c, t, f) = (self.bool(ids[0])?, self.f(ids, 1)?, self.f(ids, 2)?);
        let cs = c.shape().to_vec();
        let target = broadcast_shape(
            &broadcast_shape(&cs, &shape_of::<B>(&t))?,
            &shape_of::<B>(&f),
        )?;
        let r = target.len();
        let s = Shape::from(target);
        let c = B::bool_reshape(
            c,
            Shape::from(
                std::iter::repeat_n(1, r - cs.len())
                    .chain(cs)
                    .collect::<Vec<_>>(),
            ),
        );
        let c = B::bool_expand(c, s.clone());
        let t = B::float_expand(to_rank::<B>(t, r), s.clone());
        let f = B::float_expand(to_rank::<B>(f, r), s);
        // mask_where(tensor, mask, value) takes `value` where the mask is set.
        one(B::float_mask_where(f, c, t))
    }
}

fn operand_error(op: &Op) -> String {
    format!(
        "op {}: give either a second tensor or a scalar, not both or neither",
        op.code().name()
    )
}
