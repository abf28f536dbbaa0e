//! Ops that move elements without computing: reshapes, views, joins, splits, gathers, padding.

use burn_backend::{Scalar, Shape, Slice, TensorMetadata};
use ferrite_plugin_api::{TensorId, op};

use super::{
    F, RtResult, TensorTable, Tracking, Value, broadcast_shape, check_dim, full_slices, one,
    shape_of,
};

fn resolve_reshape(from: &[usize], to: &[i64]) -> RtResult<Vec<usize>> {
    let numel: usize = from.iter().product();
    let known: i64 = to.iter().filter(|&&d| d != -1).product();
    let infer = to.iter().filter(|&&d| d == -1).count();
    if infer > 1 || to.iter().any(|&d| d < -1) {
        return Err(format!("op reshape: invalid target shape {to:?}"));
    }
    let out: Vec<usize> = to
        .iter()
        .map(|&d| {
            if d == -1 {
                if known == 0 {
                    0
                } else {
                    numel / known as usize
                }
            } else {
                d as usize
            }
        })
        .collect();
    if out.iter().product::<usize>() != numel {
        return Err(format!(
            "op reshape: cannot reshape {from:?} ({numel} elements) to {to:?}"
        ));
    }
    Ok(out)
}

impl<B: Tracking> TensorTable<B> {
    pub(super) fn reshape_value(v: Value<B>, shape: Vec<usize>) -> RtResult<Value<B>> {
        let s = Shape::from(shape);
        Ok(match v {
            Value::Float(t) => Value::Float(B::float_reshape(t, s)),
            Value::Int(t) => Value::Int(B::int_reshape(t, s)),
            Value::Bool(t) => Value::Bool(B::bool_reshape(t, s)),
            Value::Grads(_) | Value::Kept(_) => return Err("op reshape: not a tensor".into()),
        })
    }

    pub(super) fn narrow_value(
        &self,
        v: Value<B>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> RtResult<Value<B>> {
        let shape = v.shape();
        check_dim("narrow", dim, shape.len())?;
        if start + len > shape[dim] {
            return Err(format!(
                "op narrow: {start}+{len} exceeds size {} of dimension {dim} (shape {shape:?})",
                shape[dim]
            ));
        }
        let mut s = full_slices(shape.len());
        s[dim] = Slice {
            start: start as isize,
            end: Some((start + len) as isize),
            step: 1,
        };
        Ok(match v {
            Value::Float(t) => Value::Float(B::float_slice(t, &s)),
            Value::Int(t) => Value::Int(B::int_slice(t, &s)),
            Value::Bool(t) => Value::Bool(B::bool_slice(t, &s)),
            Value::Grads(_) | Value::Kept(_) => return Err("op narrow: not a tensor".into()),
        })
    }

    pub(super) fn reshape(&self, id: TensorId, a: &op::Reshape) -> RtResult<Vec<Value<B>>> {
        let v = self.get(id)?;
        let shape = resolve_reshape(&v.shape(), &a.shape)?;
        Ok(vec![Self::reshape_value(v, shape)?])
    }

    pub(super) fn permute(&self, id: TensorId, a: &op::Dims) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        let rank = shape_of::<B>(&t).len();
        let mut sorted = a.dims.clone();
        sorted.sort_unstable();
        if sorted != (0..rank).collect::<Vec<_>>() {
            return Err(format!(
                "op permute: {:?} is not a permutation of the {rank} dims",
                a.dims
            ));
        }
        one(B::float_permute(t, &a.dims))
    }

    pub(super) fn transpose(&self, id: TensorId, a: &op::Transpose) -> RtResult<Vec<Value<B>>> {
        let t = self.float(id)?;
        let r = shape_of::<B>(&t).len();
        check_dim("transpose", a.dim0, r)?;
        check_dim("transpose", a.dim1, r)?;
        one(B::float_swap_dims(t, a.dim0, a.dim1))
    }

    /// `cat`, or `stack` (a new dimension `dim`) with `new_dim`.
    pub(super) fn cat(
        &self,
        op: &str,
        ids: &[TensorId],
        dim: usize,
        new_dim: bool,
    ) -> RtResult<Vec<Value<B>>> {
        let mut ts = ids
            .iter()
            .map(|&i| self.float(i))
            .collect::<RtResult<Vec<_>>>()?;
        if new_dim {
            ts = ts
                .into_iter()
                .map(|t| {
                    let mut s = shape_of::<B>(&t);
                    check_dim(op, dim, s.len() + 1)?;
                    s.insert(dim, 1);
                    Ok(B::float_reshape(t, Shape::from(s)))
                })
                .collect::<RtResult<_>>()?;
        }
        let first = shape_of::<B>(&ts[0]);
        check_dim(op, dim, first.len())?;
        for t in &ts[1..] {
            let s = shape_of::<B>(t);
            let same = s.len() == first.len()
                && s.iter()
                    .zip(&first)
                    .enumerate()
                    .all(|(i, (p, q))| i == dim || p == q);
            if !same {
                return Err(format!(
                    "op {op}: shapes {first:?} and {s:?} differ outside dimension {dim}"
                ));
            }
        }
        one(B::float_cat(ts, dim))
    }

    pub(super) fn chunk(&self, id: TensorId, a: &op::Chunk) -> RtResult<Vec<Value<B>>> {
        let v = self.get(id)?;
        let shape = v.shape();
        let dim = a.dim;
        check_dim("chunk", dim, shape.len())?;
        if a.chunks == 0 {
            return Err("op chunk: zero chunks".into());
        }
        let size = shape[dim].div_ceil(a.chunks).max(1);
        (0..shape[dim])
            .step_by(size)
            .map(|s| self.narrow_value(v.clone(), dim, s, size.min(shape[dim] - s)))
            .collect()
    }

    pub(super) fn expand(&self, id: TensorId, a: &op::Shape) -> RtResult<Vec<Value<B>>> {
        let v = self.get(id)?;
        let target = a.shape.clone();
        let from = v.shape();
        if target.len() < from.len()
            || broadcast_shape(&from, &target).ok().as_ref() != Some(&target)
        {
            return Err(format!("op expand: cannot expand {from:?} to {target:?}"));
        }
        let padded: Vec<usize> = std::iter::repeat_n(1, target.len() - from.len())
            .chain(from)
            .collect();
        let v = Self::reshape_value(v, padded)?;
        let s = Shape::from(target);
        Ok(vec![match v {
            Value::Float(t) => Value::Float(B::float_expand(t, s)),
            Value::Int(t) => Value::Int(B::int_expand(t, s)),
            Value::Bool(t) => Value::Bool(B::bool_expand(t, s)),
            Value::Grads(_) | Value::Kept(_) => return Err("op expand: not a tensor".into()),
        }])
    }

    pub(super) fn index_select(&self, ids: &[TensorId], dim: usize) -> RtResult<Vec<Value<B>>> {
        let (t, idx) = (self.f(ids, 0)?, self.int(ids[1])?);
        check_dim("index_select", dim, shape_of::<B>(&t).len())?;
        let n: usize = idx.shape().num_elements();
        let idx = B::int_reshape(idx, Shape::from(vec![n]));
        one(B::float_select(t, dim, idx))
    }

    pub(super) fn gather(&self, ids: &[TensorId], dim: usize) -> RtResult<Vec<Value<B>>> {
        let (t, idx) = (self.f(ids, 0)?, self.int(ids[1])?);
        let (ts, is) = (shape_of::<B>(&t), idx.shape().to_vec());
        check_dim("gather", dim, ts.len())?;
        if ts.len() != is.len() {
            return Err(format!(
                "op gather: index rank {} differs from input rank {}",
                is.len(),
                ts.len()
            ));
        }
        one(B::float_gather(dim, t, idx))
    }

    pub(super) fn pad(&self, id: TensorId, a: &op::Pad) -> RtResult<Vec<Value<B>>> {
        let t: F<B> = self.float(id)?;
        let pads = &a.pads;
        let shape = shape_of::<B>(&t);
        if !pads.len().is_multiple_of(2) || pads.len() / 2 > shape.len() {
            return Err(format!(
                "op pad: {} pad values for rank {}",
                pads.len(),
                shape.len()
            ));
        }
        let mut out = shape.clone();
        let mut slices = full_slices(shape.len());
        for (k, p) in pads.chunks(2).enumerate() {
            let d = shape.len() - 1 - k;
            out[d] += p[0] + p[1];
            slices[d] = Slice {
                start: p[0] as isize,
                end: Some((p[0] + shape[d]) as isize),
                step: 1,
            };
        }
        let base = B::float_full(
            Shape::from(out),
            Scalar::Float(a.value),
            &self.device,
            t.dtype().into(),
        );
        one(B::float_slice_assign(base, &slices, t))
    }
}
