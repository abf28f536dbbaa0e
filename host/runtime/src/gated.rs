//! `x · sigmoid(a·x)` (SiLU with a = 1, quick GELU with a = 1.702) as one autodiff op that keeps
//! only its input for backward, where the decomposition keeps the sigmoid's output besides; and
//! `x · Φ(x)` (GELU), whose both directions run on the backend's kernels ([`Fused`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind, unary},
};
use burn_backend::{Backend, Scalar, tensor::FloatTensor};

use crate::fused::Fused;

fn sigmoid_of<B: Backend>(x: &FloatTensor<B>, a: f64) -> FloatTensor<B> {
    B::sigmoid(B::float_mul_scalar(x.clone(), Scalar::Float(a)))
}

/// `dy · (s + a·x·s·(1 − s))` with `s = sigmoid(a·x)` recomputed.
fn backward<B: Backend>(x: &FloatTensor<B>, a: f64, dy: FloatTensor<B>) -> FloatTensor<B> {
    let s = sigmoid_of::<B>(x, a);
    let one_minus = B::float_add_scalar(B::float_neg(s.clone()), Scalar::Float(1.0));
    let ax = B::float_mul_scalar(x.clone(), Scalar::Float(a));
    let d = B::float_add(s.clone(), B::float_mul(B::float_mul(ax, s), one_minus));
    B::float_mul(dy, d)
}

#[derive(Debug)]
struct XSigmoid {
    a: f64,
}

impl<B: Backend> Backward<B, 1> for XSigmoid {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            backward::<B>(&x, self.a, dy)
        });
    }
}

/// `x · sigmoid(a·x)`.
pub fn x_sigmoid<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    a: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let forward = |x: &FloatTensor<B>| B::float_mul(x.clone(), sigmoid_of::<B>(x, a));
    let op = XSigmoid { a };
    match op.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = forward(&x.primitive);
            prep.finish(x.primitive, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(&x.primitive)),
    }
}

#[derive(Debug)]
struct Gelu;

impl<B: Fused> Backward<B, 1> for Gelu {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| B::erf_gelu_grad(x, dy));
    }
}

/// `x · Φ(x)` (GELU, erf form), keeping `x` for backward.
pub fn gelu<B: Fused, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    match Gelu
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = B::erf_gelu(x.primitive.clone());
            prep.finish(x.primitive, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::erf_gelu(x.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive, activation::sigmoid};

    use super::*;

    type A = crate::CpuBackend;

    /// Output and gradient equal the decomposition `x · sigmoid(a·x)` for SiLU and quick GELU.
    #[test]
    fn gradients_equal_the_decomposition() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 4.0).collect();
        let w: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let dev = Default::default();
        for a in [1.0, 1.702] {
            let x =
                Tensor::<A, 1>::from_data(TensorData::new(v.clone(), [64]), &dev).require_grad();
            let w = Tensor::<A, 1>::from_data(TensorData::new(w.clone(), [64]), &dev);
            let reference = x.clone() * sigmoid(x.clone() * a);
            let ours = Tensor::<A, 1>::from_primitive(TensorPrimitive::Float(x_sigmoid::<
                burn::backend::Flex,
                NoCheckpointing,
            >(
                x.clone().into_primitive().tensor(),
                a,
            )));
            let vals = |t: Tensor<A, 1>| t.into_data().to_vec::<f32>().unwrap();
            let worst = |a: Vec<f32>, b: Vec<f32>| {
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            assert!(worst(vals(ours.clone()), vals(reference.clone())) < 1e-6);
            let g_ref = (reference * w.clone()).sum().backward();
            let g = (ours * w).sum().backward();
            let got = x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
            let want = x.grad(&g_ref).unwrap().into_data().to_vec::<f32>().unwrap();
            let e = got
                .iter()
                .zip(&want)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-5, "a = {a}: {e}");
        }
    }
}
