//! Normalisation over the last dimension (`(x − mean) / sqrt(var + eps)`, the core of GroupNorm
//! and LayerNorm) as one autodiff op that keeps only its output and the per-row reciprocal
//! standard deviation for backward, where burn-autodiff's decomposition keeps the input, the
//! centred input and its square besides.

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind, unary},
};
use burn_backend::{Backend, Scalar, Shape, TensorMetadata, tensor::FloatTensor};

fn last<B: Backend>(t: &FloatTensor<B>) -> (usize, usize) {
    let s = t.shape().to_vec();
    (s.len() - 1, s[s.len() - 1])
}

fn widen<B: Backend>(t: FloatTensor<B>, like: &FloatTensor<B>) -> FloatTensor<B> {
    B::float_expand(t, Shape::from(like.shape().to_vec()))
}

/// The mean over the last dimension, kept as a dimension of 1.
fn mean_last<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let (dim, n) = last::<B>(&t);
    B::float_div_scalar(B::float_sum_dim(t, dim), Scalar::Float(n as f64))
}

/// The normalised input and the reciprocal standard deviation of each row (`[.., 1]`).
pub fn forward<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let centred = B::float_sub(x.clone(), widen::<B>(mean_last::<B>(x.clone()), &x));
    let var = mean_last::<B>(B::float_mul(centred.clone(), centred.clone()));
    let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, Scalar::Float(eps))));
    let y = B::float_mul(centred.clone(), widen::<B>(rstd.clone(), &centred));
    (y, rstd)
}

/// `dx = rstd · (dy − mean(dy) − y · mean(dy · y))`.
pub fn backward<B: Backend>(
    y: &FloatTensor<B>,
    rstd: &FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let m1 = widen::<B>(mean_last::<B>(dy.clone()), &dy);
    let m2 = widen::<B>(mean_last::<B>(B::float_mul(dy.clone(), y.clone())), &dy);
    let inner = B::float_sub(B::float_sub(dy, m1), B::float_mul(y.clone(), m2));
    B::float_mul(inner.clone(), widen::<B>(rstd.clone(), &inner))
}

#[derive(Debug)]
struct Normalize;

impl<B: Backend> Backward<B, 1> for Normalize {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, rstd) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            backward::<B>(&y, &rstd, dy)
        });
    }
}

/// [`forward`] as an autodiff op.
pub fn normalize_last<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    eps: f64,
) -> FloatTensor<Autodiff<B, C>> {
    match Normalize
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, rstd) = forward::<B>(x.primitive, eps);
            prep.finish((y.clone(), rstd), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward::<B>(x.primitive, eps).0),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use super::*;

    type A = crate::CpuBackend;

    /// Output and input gradient equal burn's decomposed normalisation (biased variance), on
    /// rows whose scales differ by orders of magnitude.
    #[test]
    fn gradients_equal_the_decomposed_normalisation() {
        let (rows, n) = (6, 37);
        let v: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * 10f32.powi((i / n) as i32 - 2))
            .collect();
        let w: Vec<f32> = (0..rows * n).map(|i| (i % 13) as f32 - 6.0).collect();
        let dev = Default::default();
        let x = Tensor::<A, 2>::from_data(TensorData::new(v, [rows, n]), &dev).require_grad();
        let w = Tensor::<A, 2>::from_data(TensorData::new(w, [rows, n]), &dev);
        let eps = 1e-5;

        let mean = x.clone().mean_dim(1);
        let centred = x.clone() - mean;
        let var = (centred.clone() * centred.clone()).mean_dim(1);
        let reference = centred / (var + eps).sqrt();
        let ours = Tensor::<A, 2>::from_primitive(TensorPrimitive::Float(normalize_last::<
            burn::backend::Flex,
            NoCheckpointing,
        >(
            x.clone().into_primitive().tensor(),
            eps,
        )));
        let vals = |t: Tensor<A, 2>| t.into_data().to_vec::<f32>().unwrap();
        let worst = |a: Vec<f32>, b: Vec<f32>| {
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(worst(vals(ours.clone()), vals(reference.clone())) < 1e-5);
        let g_ref = (reference * w.clone()).sum().backward();
        let g = (ours * w).sum().backward();
        let got = x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
        let want = x.grad(&g_ref).unwrap().into_data().to_vec::<f32>().unwrap();
        // Relative to each row's scale (1/σ spans 10⁴).
        for (r, (a, b)) in got.chunks(n).zip(want.chunks(n)).enumerate() {
            let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
            let e = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(e / scale < 1e-4, "row {r}: {e} against {scale}");
        }
    }
}
