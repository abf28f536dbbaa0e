//! Multi-tensor ops (torch's `_foreach_*`): one call updates a whole list, so that an optimizer
//! step is a few calls per parameter group instead of several per parameter. The lists come one
//! after another in the inputs; each pair or triple must have one shape.

use burn_backend::{Scalar, TensorMetadata};
use ferrite_plugin_api::{Op, TensorId};

use super::{F, RtResult, TensorTable, Tracking, Value, align, shape_of};

impl<B: Tracking> TensorTable<B> {
    /// The inputs as `k` lists of one length, each position's tensors of one shape.
    fn lists(&self, op: &str, ids: &[TensorId], k: usize) -> RtResult<Vec<Vec<F<B>>>> {
        if ids.is_empty() || !ids.len().is_multiple_of(k) {
            return Err(format!(
                "op {op}: {} inputs are not {k} lists of one length",
                ids.len()
            ));
        }
        let n = ids.len() / k;
        // Detached: optimizer arithmetic records no graph.
        let lists: Vec<Vec<F<B>>> = (0..k)
            .map(|j| {
                ids[j * n..(j + 1) * n]
                    .iter()
                    .map(|&i| self.float(i).map(B::float_detach))
                    .collect()
            })
            .collect::<RtResult<_>>()?;
        for i in 0..n {
            let first = shape_of::<B>(&lists[0][i]);
            if let Some(l) = lists[1..].iter().find(|l| shape_of::<B>(&l[i]) != first) {
                return Err(format!(
                    "op {op}: tensor {i} of the lists has shapes {first:?} and {:?}",
                    shape_of::<B>(&l[i])
                ));
            }
        }
        Ok(lists)
    }

    pub(super) fn foreach(&self, op: &Op, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let name = op.code().name();
        let scale = |t: F<B>, s: f64| B::float_mul_scalar(t, Scalar::Float(s));
        let sum = |x: F<B>, y: F<B>| -> RtResult<F<B>> {
            let (x, y) = align::<B>(x, y)?;
            Ok(B::float_add(x, y))
        };
        let product = |x: F<B>, y: F<B>| -> RtResult<F<B>> {
            let (x, y) = align::<B>(x, y)?;
            Ok(B::float_mul(x, y))
        };
        let out: Vec<F<B>> = match op {
            Op::ForeachAxpby(a) => {
                let [x, y]: [Vec<F<B>>; 2] = self.lists(name, ids, 2)?.try_into().unwrap();
                x.into_iter()
                    .zip(y)
                    .map(|(x, y)| sum(scale(x, a.a), scale(y, a.b)))
                    .collect::<RtResult<_>>()?
            }
            Op::ForeachAddcmul(a) => {
                let [x, y, z]: [Vec<F<B>>; 3] = self.lists(name, ids, 3)?.try_into().unwrap();
                x.into_iter()
                    .zip(y.into_iter().zip(z))
                    .map(|(x, (y, z))| sum(scale(x, a.a), scale(product(y, z)?, a.b)))
                    .collect::<RtResult<_>>()?
            }
            Op::ForeachAddcdivSqrt(a) => {
                let [x, y, z]: [Vec<F<B>>; 3] = self.lists(name, ids, 3)?.try_into().unwrap();
                let mut out = Vec::with_capacity(x.len());
                for (x, (y, z)) in x.into_iter().zip(y.into_iter().zip(z)) {
                    let denom =
                        B::float_add_scalar(scale(B::float_sqrt(z), a.c), Scalar::Float(a.eps));
                    let (y, denom) = align::<B>(y, denom)?;
                    out.push(sum(scale(x, a.a), scale(B::float_div(y, denom), a.b))?);
                }
                out
            }
            Op::ForeachAssign(_) => {
                // Each value in its target's dtype (trained weights may be kept in bf16).
                let [targets, values]: [Vec<F<B>>; 2] =
                    self.lists(name, ids, 2)?.try_into().unwrap();
                for (i, (t, v)) in targets.iter().zip(values).enumerate() {
                    let v = if v.dtype() == t.dtype() {
                        v
                    } else {
                        B::float_cast(v, t.dtype().into())
                    };
                    self.assign_value(ids[i], v)?;
                }
                return Ok(vec![]);
            }
            _ => return Err(format!("op {name} is not a multi-tensor op")),
        };
        Ok(out.into_iter().map(Value::Float).collect())
    }
}
