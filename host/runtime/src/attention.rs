//! Attention in training with O(L) extra memory instead of burn-autodiff's decomposition, which
//! keeps every `[B, H, Lq, Lk]` probability matrix for backward (SD 1.5 at 512²: ~0.5 GiB per
//! self-attention layer per image). The forward runs over chunks of query rows and keeps only the
//! output and each row's log-sum-exp; the backward recomputes each chunk's probabilities from
//! them (FlashAttention's recurrence, over chunks rather than tiles). Without a mask or bias,
//! for q, k and v of one batch and head count with no empty dimension (the op table checks):
//! other attention keeps burn's path. Under mixed precision the matmuls compute in the train
//! dtype and backward keeps q, k and v in it, while the softmax statistics (row maxima, sums,
//! the log-sum-exp) and the probabilities' gradients stay f32 ([`crate::autocast`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn_backend::{
    Backend, FloatDType, Scalar, Shape, Slice, TensorMetadata, tensor::FloatTensor,
};

use crate::{autocast, fused::Fused};

/// Score elements per chunk (`B · H · rows · Lk`): 16 Mi floats, 64 MiB in f32.
const CHUNK_ELEMENTS: usize = 1 << 24;

/// Query rows per chunk for these sizes.
pub fn chunk_rows(batch_heads: usize, lq: usize, lk: usize) -> usize {
    (CHUNK_ELEMENTS / (batch_heads * lk).max(1)).clamp(1, lq.max(1))
}

fn dims<B: Backend>(t: &FloatTensor<B>) -> Vec<usize> {
    t.shape().to_vec()
}

/// Rows `start..end` of dimension 2.
fn rows<B: Backend>(t: &FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    let n = dims::<B>(t).len();
    let mut s: Vec<Slice> = (0..n)
        .map(|_| Slice {
            start: 0,
            end: None,
            step: 1,
        })
        .collect();
    s[2] = Slice {
        start: start as isize,
        end: Some(end as isize),
        step: 1,
    };
    B::float_slice(t.clone(), &s)
}

/// `t` `[.., 1]` broadcast to `like`'s shape.
fn widen<B: Backend>(t: FloatTensor<B>, like: &FloatTensor<B>) -> FloatTensor<B> {
    B::float_expand(t, Shape::from(dims::<B>(like)))
}

fn transpose<B: Backend>(t: &FloatTensor<B>) -> FloatTensor<B> {
    B::float_swap_dims(t.clone(), 2, 3)
}

/// The scaled scores of a chunk, in f32. In a train dtype the queries are scaled before the
/// matmul, as torch does, so that float16 scores do not overflow.
fn scores<B: Backend>(
    qc: &FloatTensor<B>,
    kt: &FloatTensor<B>,
    scale: f64,
    dt: Option<FloatDType>,
) -> FloatTensor<B> {
    let s = Scalar::Float(scale);
    match dt {
        Some(_) => autocast::matmul::<B>(B::float_mul_scalar(qc.clone(), s), kt.clone(), dt),
        None => B::float_mul_scalar(B::float_matmul(qc.clone(), kt.clone()), s),
    }
}

fn add<B: Backend>(acc: Option<FloatTensor<B>>, t: FloatTensor<B>) -> FloatTensor<B> {
    match acc {
        Some(a) => B::float_add(a, t),
        None => t,
    }
}

/// `softmax(q kᵀ · scale) v` over chunks of `rows` query rows (`[B, H, L, D]` inputs), and each
/// query row's log-sum-exp of the scaled scores (`[B, H, Lq, 1]`), both f32; the matmuls in
/// `dt` where given.
pub fn forward<B: Backend>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    v: &FloatTensor<B>,
    scale: f64,
    rows_per_chunk: usize,
    dt: Option<FloatDType>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let lq = dims::<B>(q)[2];
    let step = rows_per_chunk.max(1);
    let kt = transpose::<B>(k);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..lq).step_by(step) {
        let end = (start + step).min(lq);
        let s = scores::<B>(&rows::<B>(q, start, end), &kt, scale, dt);
        let m = B::float_max_dim(s.clone(), 3);
        let e = B::float_exp(B::float_sub(s.clone(), widen::<B>(m.clone(), &s)));
        let sum = B::float_sum_dim(e.clone(), 3);
        let p = B::float_div(e.clone(), widen::<B>(sum.clone(), &e));
        outs.push(autocast::matmul::<B>(p, v.clone(), dt));
        lses.push(B::float_add(m, B::float_log(sum)));
    }
    (B::float_cat(outs, 2), B::float_cat(lses, 2))
}

/// The gradients of q, k and v given the output's, recomputing each chunk's probabilities from
/// the saved log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    v: &FloatTensor<B>,
    out: &FloatTensor<B>,
    lse: &FloatTensor<B>,
    grad: &FloatTensor<B>,
    scale: f64,
    rows_per_chunk: usize,
    dt: Option<FloatDType>,
) -> [FloatTensor<B>; 3] {
    let lq = dims::<B>(q)[2];
    let step = rows_per_chunk.max(1);
    let (kt, vt) = (transpose::<B>(k), transpose::<B>(v));
    // Dᵢ = Σⱼ dOᵢⱼ Oᵢⱼ: the softmax backward's row term.
    let d = B::float_sum_dim(B::float_mul(grad.clone(), out.clone()), 3);
    let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
    for start in (0..lq).step_by(step) {
        let end = (start + step).min(lq);
        let qc = rows::<B>(q, start, end);
        let s = scores::<B>(&qc, &kt, scale, dt);
        let p = B::float_exp(B::float_sub(
            s.clone(),
            widen::<B>(rows::<B>(lse, start, end), &s),
        ));
        let go = rows::<B>(grad, start, end);
        dv = Some(add::<B>(
            dv,
            autocast::matmul::<B>(transpose::<B>(&p), go.clone(), dt),
        ));
        let dp = autocast::matmul::<B>(go, vt.clone(), dt);
        let ds = B::float_mul(
            p,
            B::float_sub(dp.clone(), widen::<B>(rows::<B>(&d, start, end), &dp)),
        );
        let ds = B::float_mul_scalar(ds, Scalar::Float(scale));
        dq.push(autocast::matmul::<B>(ds.clone(), k.clone(), dt));
        dk = Some(add::<B>(
            dk,
            autocast::matmul::<B>(transpose::<B>(&ds), qc, dt),
        ));
    }
    let zero = |t: &FloatTensor<B>| {
        autocast::back::<B>(B::float_mul_scalar(t.clone(), Scalar::Float(0.0)), dt)
    };
    [
        B::float_cat(dq, 2),
        dk.unwrap_or_else(|| zero(k)),
        dv.unwrap_or_else(|| zero(v)),
    ]
}

#[derive(Debug)]
struct MemoryEfficientAttention {
    scale: f64,
    rows: usize,
    dt: Option<FloatDType>,
}

impl<B: Fused> Backward<B, 3> for MemoryEfficientAttention {
    /// q, k, v (the inputs' own buffers, or their copies in the train dtype), the output and
    /// the log-sum-exp.
    type State = [FloatTensor<B>; 5];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [q, k, v, out, lse] = ops.state;
        let g = B::attention_backward(
            &q, &k, &v, &out, &lse, &grad, self.scale, self.rows, self.dt,
        );
        for (parent, g) in ops.parents.into_iter().zip(g) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Attention of `[B, H, L, D]` tensors with `scale` and no mask, as an autodiff op of its own;
/// its matmuls in `dt` where given.
pub fn attention<B: Fused, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    scale: f64,
    dt: Option<FloatDType>,
) -> FloatTensor<Autodiff<B, C>> {
    let (qs, ks) = (dims::<B>(&q.primitive), dims::<B>(&k.primitive));
    let rows = chunk_rows(qs[0] * qs[1], qs[2], ks[2]);
    attention_in_chunks::<B, C>(q, k, v, scale, rows, dt)
}

/// [`attention`] over chunks of `rows` query rows.
pub fn attention_in_chunks<B: Fused, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    scale: f64,
    rows: usize,
    dt: Option<FloatDType>,
) -> FloatTensor<Autodiff<B, C>> {
    let op = MemoryEfficientAttention { scale, rows, dt };
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let [q, k, v] = [q, k, v].map(|t| autocast::to::<B>(t.primitive, dt));
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, lse) = B::attention_forward(&q, &k, &v, scale, rows, dt);
            prep.finish([q, k, v, out.clone(), lse], out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(B::attention_forward(&q, &k, &v, scale, rows, dt).0)
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData, TensorPrimitive, activation::softmax};

    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;

    type A = crate::CpuBackend;

    fn data(shape: [usize; 4], seed: u64) -> Tensor<A, 4> {
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn values(t: Tensor<impl burn::tensor::backend::Backend, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Output and the gradients of q, k and v equal burn's materialised attention (softmax of
    /// the full score matrix), in one chunk and in several uneven ones.
    #[test]
    fn gradients_equal_the_materialised_attention() {
        for (lq, lk, rows) in [(37, 19, 5), (8, 8, 8), (9, 30, 1)] {
            let (b, h, d, dv) = (2, 3, 4, 5);
            let q = data([b, h, lq, d], 1).require_grad();
            let k = data([b, h, lk, d], 2).require_grad();
            let v = data([b, h, lk, dv], 3).require_grad();
            let w = data([b, h, lq, dv], 4);
            let scale = 0.4;

            let reference =
                softmax(q.clone().matmul(k.clone().swap_dims(2, 3)) * scale, 3).matmul(v.clone());
            let ours =
                Tensor::<A, 4>::from_primitive(TensorPrimitive::Float(attention_in_chunks::<
                    burn::backend::Flex,
                    NoCheckpointing,
                >(
                    q.clone().into_primitive().tensor(),
                    k.clone().into_primitive().tensor(),
                    v.clone().into_primitive().tensor(),
                    scale,
                    rows,
                    None,
                )));
            let out = worst(&values(ours.clone()), &values(reference.clone()));
            assert!(out < 1e-5, "output {out}");
            let g_ref = (reference * w.clone()).sum().backward();
            let g = (ours * w).sum().backward();
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let got = values(t.grad(&g).unwrap());
                let want = values(t.grad(&g_ref).unwrap());
                let e = worst(&got, &want);
                assert!(e < 1e-4, "({lq}, {lk}, {rows}) d{name}: {e}");
            }
        }
    }

    #[test]
    fn chunks_keep_the_scores_near_their_budget() {
        assert_eq!(chunk_rows(16, 4096, 4096), 256);
        assert_eq!(chunk_rows(1, 10, 10), 10);
        assert_eq!(chunk_rows(1 << 20, 4096, 4096), 1);
    }
}
