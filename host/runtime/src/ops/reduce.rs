//! Reductions over dimensions, and the normalisations built on them.

use burn_backend::{Scalar, Shape};
use ferrite_plugin_api::Op;

use super::{F, RtResult, TensorTable, Tracking, check_dim, last_dim, shape_of};

fn reduce_dims(op: &str, dims: &[usize], rank: usize) -> RtResult<Vec<usize>> {
    for &d in dims {
        check_dim(op, d, rank)?;
    }
    let mut d: Vec<usize> = if dims.is_empty() {
        (0..rank).collect()
    } else {
        dims.to_vec()
    };
    d.sort_unstable();
    d.dedup();
    Ok(d)
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Mean,
    Max,
}

impl<B: Tracking> TensorTable<B> {
    /// `Sum`, `Mean` or `Max` over `dims` (all when empty), keeping or dropping them.
    pub(super) fn reduce(&self, op: &Op, t: F<B>, dims: &[usize], keepdim: bool) -> RtResult<F<B>> {
        let kind = match op {
            Op::Sum(_) => Kind::Sum,
            Op::Mean(_) => Kind::Mean,
            _ => Kind::Max,
        };
        Self::reduce_by(op.code().name(), kind, t, dims, keepdim)
    }

    fn reduce_by(op: &str, kind: Kind, t: F<B>, dims: &[usize], keepdim: bool) -> RtResult<F<B>> {
        let shape = shape_of::<B>(&t);
        let dims = reduce_dims(op, dims, shape.len())?;
        let mut t = t;
        for &d in &dims {
            t = match kind {
                Kind::Sum => B::float_sum_dim(t, d),
                Kind::Mean => B::float_mean_dim(t, d),
                Kind::Max => B::float_max_dim(t, d),
            };
        }
        if keepdim {
            return Ok(t);
        }
        let mut out: Vec<usize> = shape
            .iter()
            .enumerate()
            .filter(|(i, _)| !dims.contains(i))
            .map(|(_, &s)| s)
            .collect();
        if out.is_empty() {
            out.push(1);
        }
        Ok(B::float_reshape(t, Shape::from(out)))
    }

    pub(super) fn mean_over(t: F<B>, dims: &[usize]) -> RtResult<F<B>> {
        Self::reduce_by("mean", Kind::Mean, t, dims, true)
    }

    pub(super) fn variance(
        &self,
        t: F<B>,
        dims: &[usize],
        keepdim: bool,
        correction: usize,
    ) -> RtResult<F<B>> {
        let shape = shape_of::<B>(&t);
        let dims = reduce_dims("var", dims, shape.len())?;
        let n: usize = dims.iter().map(|&d| shape[d]).product();
        if n <= correction {
            return Err(format!("op var: {n} elements with correction {correction}"));
        }
        let mean = Self::mean_over(t.clone(), &dims)?;
        let c = B::float_sub(t, mean);
        let sq = B::float_mul(c.clone(), c);
        let s = Self::reduce_by("var", Kind::Sum, sq, &dims, keepdim)?;
        Ok(B::float_div_scalar(
            s,
            Scalar::Float((n - correction) as f64),
        ))
    }

    /// Normalises over the last dimension of `x` (population variance).
    pub(super) fn normalize_last(&self, x: F<B>, eps: f64) -> RtResult<F<B>> {
        let last = last_dim::<B>("normalize", &x)?;
        // In training, one op that keeps only its output for backward.
        if B::is_tracked(&x) && shape_of::<B>(&x)[last] > 0 {
            return Ok(B::normalize_last(x, eps));
        }
        let mean = Self::mean_over(x.clone(), &[last])?;
        let var = self.variance(x.clone(), &[last], true, 0)?;
        let denom = B::float_sqrt(B::float_add_scalar(var, Scalar::Float(eps)));
        Ok(B::float_div(B::float_sub(x, mean), denom))
    }
}
