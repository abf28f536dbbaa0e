//! Every ABI op, implemented on burn's backend primitives (ranks are dynamic at the ABI). The op
//! and its attributes arrive decoded by `plugin-api`'s op table; one module per family.

mod autodiff;
mod creation;
mod elementwise;
mod foreach;
mod nn;
mod reduce;
mod shape;

use burn_backend::{Shape, Slice, TensorMetadata, tensor::FloatTensor};
use ferrite_plugin_api::{Op, TensorId};

use super::RtResult;
use super::table::{TensorTable, Tracking, Value};

type F<B> = FloatTensor<B>;

fn shape_of<B: burn_backend::AutodiffBackend>(t: &F<B>) -> Vec<usize> {
    t.shape().to_vec()
}

fn full_slices(rank: usize) -> Vec<Slice> {
    vec![
        Slice {
            start: 0,
            end: None,
            step: 1
        };
        rank
    ]
}

/// Numpy broadcasting of two shapes, or an error naming both.
fn broadcast_shape(a: &[usize], b: &[usize]) -> RtResult<Vec<usize>> {
    let r = a.len().max(b.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(a), pad(b));
    pa.iter()
        .zip(&pb)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Ok(x),
            (1, _) => Ok(y),
            (_, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

fn to_rank<B: burn_backend::AutodiffBackend>(t: F<B>, rank: usize) -> F<B> {
    let s = shape_of::<B>(&t);
    if s.len() >= rank {
        return t;
    }
    let new: Vec<usize> = std::iter::repeat_n(1, rank - s.len()).chain(s).collect();
    B::float_reshape(t, Shape::from(new))
}

/// Brings two operands to a common rank after checking they broadcast (the backend broadcasts
/// size-1 dimensions itself, and autodiff reduces the gradients back).
fn align<B: burn_backend::AutodiffBackend>(a: F<B>, b: F<B>) -> RtResult<(F<B>, F<B>)> {
    let out = broadcast_shape(&shape_of::<B>(&a), &shape_of::<B>(&b))?;
    let (a, b) = crate::autocast::promote::<B>(a, b);
    Ok((to_rank::<B>(a, out.len()), to_rank::<B>(b, out.len())))
}

/// The last dimension of `t`, or an error for a scalar (which has none).
fn last_dim<B: burn_backend::AutodiffBackend>(op: &str, t: &F<B>) -> RtResult<usize> {
    shape_of::<B>(t)
        .len()
        .checked_sub(1)
        .ok_or_else(|| format!("op {op}: the input needs at least one dimension, got a scalar"))
}

fn check_dim(op: &str, dim: usize, rank: usize) -> RtResult<()> {
    if dim >= rank {
        return Err(format!(
            "op {op}: dimension {dim} out of range for rank {rank}"
        ));
    }
    Ok(())
}

fn one<B: burn_backend::AutodiffBackend>(t: F<B>) -> RtResult<Vec<Value<B>>> {
    Ok(vec![Value::Float(t)])
}

impl<B: Tracking> TensorTable<B> {
    /// Float input `i` (its count was checked against the op table).
    fn f(&self, ids: &[TensorId], i: usize) -> RtResult<F<B>> {
        let id = ids
            .get(i)
            .ok_or_else(|| format!("missing tensor input {i}"))?;
        self.float(*id)
    }

    /// Optional float input `i`.
    fn opt_f(&self, ids: &[TensorId], i: usize) -> RtResult<Option<F<B>>> {
        match ids.get(i) {
            Some(&id) if id != TensorId::NONE => self.float(id).map(Some),
            _ => Ok(None),
        }
    }

    /// Runs one op. Outputs are new values; the caller stores them.
    pub fn exec(&self, op: &Op, ids: &[TensorId]) -> RtResult<Vec<Value<B>>> {
        let name = op.code().name();
        match op {
            Op::Zeros(a) => self.fill(&a.shape, 0.0, a.dtype),
            Op::Ones(a) => self.fill(&a.shape, 1.0, a.dtype),
            Op::Full(a) => self.fill(&a.shape, a.value, a.dtype),
            Op::Arange(a) => self.arange(a),
            Op::Randn(a) => self.random(name, a, true),
            Op::Rand(a) => self.random(name, a, false),
            Op::FromF32(a) => self.upload_f32(a),
            Op::FromI64(a) => self.upload_i64(a),
            Op::Reshape(a) => self.reshape(ids[0], a),
            Op::Permute(a) => self.permute(ids[0], a),
            Op::Transpose(a) => self.transpose(ids[0], a),
            Op::Narrow(a) => {
                let v = self.get(ids[0])?;
                Ok(vec![self.narrow_value(v, a.dim, a.start, a.len)?])
            }
            Op::Cat(a) => self.cat(name, ids, a.dim, false),
            Op::Stack(a) => self.cat(name, ids, a.dim, true),
            Op::Chunk(a) => self.chunk(ids[0], a),
            Op::Expand(a) => self.expand(ids[0], a),
            Op::IndexSelect(a) => self.index_select(ids, a.dim),
            Op::Gather(a) => self.gather(ids, a.dim),
            Op::Pad(a) => self.pad(ids[0], a),
            Op::Add(a) | Op::Sub(a) | Op::Mul(a) | Op::Div(a) | Op::Pow(a) => {
                self.arithmetic(op, ids, a)
            }
            Op::Gt(a) | Op::Ge(a) | Op::Lt(a) | Op::Le(a) | Op::Eq(a) => self.compare(op, ids, a),
            Op::Gelu(a) => self.gelu(ids[0], a),
            Op::Clamp(a) => self.clamp(ids[0], a),
            Op::Where(_) => self.where_(ids),
            Op::Sum(a) | Op::Mean(a) | Op::Max(a) => {
                let t = self.f(ids, 0)?;
                one(self.reduce(op, t, &a.dims, a.keepdim)?)
            }
            Op::Var(a) => {
                let t = self.f(ids, 0)?;
                one(self.variance(t, &a.dims, a.keepdim, a.correction)?)
            }
            Op::Matmul(_) => self.matmul(ids),
            Op::Linear(_) => self.linear(ids),
            Op::Conv2d(a) => self.conv2d(ids, a),
            Op::ConvTranspose2d(a) => self.conv_transpose2d(ids, a),
            Op::GroupNorm(a) => self.group_norm(ids, a),
            Op::GroupNormSilu(a) => self.group_norm_silu(ids, a),
            Op::LayerNorm(a) => self.layer_norm(ids, a.eps),
            Op::RmsNorm(a) => self.rms_norm(ids, a.eps),
            Op::Softmax(a) => self.softmax(ids[0], a.dim),
            Op::Attention(a) => self.attention(ids, a),
            Op::Interpolate(a) => self.interpolate(ids[0], a),
            Op::Dropout(a) => self.dropout(ids[0], a.p),
            Op::Embedding(_) => self.embedding(ids),
            Op::Cast(a) => self.cast(ids[0], a.dtype),
            Op::ToDevice(a) => self.to_device(ids[0], &a.device),
            Op::Detach(_) => one(B::float_detach(self.f(ids, 0)?)),
            Op::SetRequiresGrad(a) => self.set_requires_grad(ids[0], a.requires),
            Op::Backward(_) => self.backward(ids[0]),
            Op::Grad(_) => self.grad(ids),
            Op::Assign(_) => self.assign(ids),
            Op::ForeachAxpby(_)
            | Op::ForeachAddcmul(_)
            | Op::ForeachAddcdivSqrt(_)
            | Op::ForeachAssign(_) => self.foreach(op, ids),
            Op::CheckpointBegin(_)
            | Op::CheckpointEnd(_)
            | Op::WeightLoaded(_)
            | Op::FallbackBegin(_)
            | Op::FallbackEnd(_) => Err(format!(
                "op {name} tells the runtime's caller about a block or a weight, it computes \
                 nothing"
            )),
            Op::Neg(_)
            | Op::Exp(_)
            | Op::Log(_)
            | Op::Sqrt(_)
            | Op::Rsqrt(_)
            | Op::Abs(_)
            | Op::Sin(_)
            | Op::Cos(_)
            | Op::Tanh(_)
            | Op::Sigmoid(_)
            | Op::Silu(_)
            | Op::QuickGelu(_)
            | Op::Relu(_) => {
                let t = self.f(ids, 0)?;
                one(self.unary(op, t)?)
            }
        }
    }
}
