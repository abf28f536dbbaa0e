//! `silu(group_norm(x))` (every resnet's norm and activation) as one autodiff op that keeps the
//! normalised input and each group's reciprocal standard deviation for backward, recomputing
//! the affine output there. burn-autodiff's chain of ops keeps SiLU's input besides: two
//! activation-sized tensors per norm where this keeps one. Both directions run on the backend's
//! kernel where it has one ([`Fused`]: flex's one pass per group).

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn_backend::{AutodiffBackend, Backend, Scalar, Shape, TensorMetadata, tensor::FloatTensor};

use crate::fused::Fused;
use crate::normalize;

/// `[1, C, 1, ..]` for a per-channel vector of `x`'s channel dimension (1).
fn per_channel<B: Backend>(p: FloatTensor<B>, x_shape: &[usize]) -> FloatTensor<B> {
    let mut view = vec![1; x_shape.len()];
    view[1] = x_shape[1];
    B::float_reshape(p, Shape::from(view))
}

/// `x` as `[N, groups, rest]`.
fn grouped<B: Backend>(x: FloatTensor<B>, groups: usize) -> FloatTensor<B> {
    let s = x.shape().to_vec();
    let rest = s[1..].iter().product::<usize>() / groups;
    B::float_reshape(x, Shape::from(vec![s[0], groups, rest]))
}

/// `y · w + b` per channel.
fn affine<B: Backend>(
    y: &FloatTensor<B>,
    w: Option<&FloatTensor<B>>,
    b: Option<&FloatTensor<B>>,
) -> FloatTensor<B> {
    let s = y.shape().to_vec();
    let mut z = y.clone();
    if let Some(w) = w {
        z = B::float_mul(z, per_channel::<B>(w.clone(), &s));
    }
    if let Some(b) = b {
        z = B::float_add(z, per_channel::<B>(b.clone(), &s));
    }
    z
}

/// The sum over every dimension but the channels', as `[C]`.
fn channel_sum<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let s = t.shape().to_vec();
    let mut t = B::float_sum_dim(t, 0);
    for d in 2..s.len() {
        t = B::float_sum_dim(t, d);
    }
    B::float_reshape(t, Shape::from(vec![s[1]]))
}

/// The normalised input (`x`'s shape), each group's reciprocal std (`[N, G, 1]`) and the output.
pub fn forward<B: Backend>(
    x: FloatTensor<B>,
    groups: usize,
    w: Option<&FloatTensor<B>>,
    b: Option<&FloatTensor<B>>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = Shape::from(x.shape().to_vec());
    let (y, rstd) = normalize::forward::<B>(grouped::<B>(x, groups), eps);
    let y = B::float_reshape(y, shape);
    let z = affine::<B>(&y, w, b);
    let out = B::float_mul(z.clone(), B::sigmoid(z));
    (y, rstd, out)
}

#[derive(Debug)]
struct GroupNormSilu {
    groups: usize,
}

impl<B: Fused> Backward<B, 3> for GroupNormSilu {
    /// The normalised input, the reciprocal stds, the weight and the bias.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        Option<FloatTensor<B>>,
        Option<FloatTensor<B>>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let (y, rstd, w, b) = ops.state;
        let [x_node, w_node, b_node] = ops.parents;
        let wanted = [x_node.is_some(), w_node.is_some(), b_node.is_some()];
        let (w, b) = (w.as_ref(), b.as_ref());
        let grads_of = B::group_norm_silu_backward(&y, &rstd, dout, w, b, self.groups, wanted);
        for (node, grad) in [x_node, w_node, b_node].into_iter().zip(grads_of) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The gradients of [`forward`]'s input, weight and bias (those `wanted`), from the output's
/// gradient `dout` and what it kept.
pub fn backward<B: Backend>(
    y: &FloatTensor<B>,
    rstd: &FloatTensor<B>,
    dout: FloatTensor<B>,
    w: Option<&FloatTensor<B>>,
    b: Option<&FloatTensor<B>>,
    groups: usize,
    [want_x, want_w, want_b]: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    // silu'(z) = s · (1 + z · (1 − s)), s = sigmoid(z).
    let z = affine::<B>(y, w, b);
    let s = B::sigmoid(z.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), Scalar::Float(1.0));
    let slope = B::float_mul(
        s,
        B::float_add_scalar(B::float_mul(z, one_minus_s), Scalar::Float(1.0)),
    );
    let dz = B::float_mul(dout, slope);
    let db = (want_b && b.is_some()).then(|| channel_sum::<B>(dz.clone()));
    let dw = (want_w && w.is_some()).then(|| channel_sum::<B>(B::float_mul(dz.clone(), y.clone())));
    if !want_x {
        return [None, dw, db];
    }
    let shape = Shape::from(y.shape().to_vec());
    let dy = match w {
        Some(w) => B::float_mul(dz, per_channel::<B>(w.clone(), &shape)),
        None => dz,
    };
    let dx = normalize::backward::<B>(
        &grouped::<B>(y.clone(), groups),
        rstd,
        grouped::<B>(dy, groups),
    );
    [Some(B::float_reshape(dx, shape)), dw, db]
}

/// What stands for an absent weight or bias among an op's parents: an untracked tensor on
/// `like`'s device (its node takes no part in backward).
pub(crate) fn placeholder<B: Backend, C: CheckpointStrategy>(
    like: &FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    Autodiff::<B, C>::from_inner(B::float_zeros(
        Shape::from(vec![1]),
        &B::float_device(like),
        burn_backend::FloatDType::F32,
    ))
}

/// [`forward`] as an autodiff op: `x` is `[N, C, ..]` with `groups` dividing `C`; `w` and `b`
/// are `[C]` (the op table checks).
pub fn group_norm_silu<B: Fused, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    groups: usize,
    w: Option<FloatTensor<Autodiff<B, C>>>,
    b: Option<FloatTensor<Autodiff<B, C>>>,
    eps: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let absent = || placeholder::<B, C>(&x.primitive).node;
    let nodes = [
        x.node.clone(),
        w.as_ref().map_or_else(absent, |t| t.node.clone()),
        b.as_ref().map_or_else(absent, |t| t.node.clone()),
    ];
    let (wp, bp) = (w.map(|t| t.primitive), b.map(|t| t.primitive));
    match (GroupNormSilu { groups })
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, rstd, out) =
                B::group_norm_silu_forward(x.primitive, groups, wp.as_ref(), bp.as_ref(), eps);
            prep.finish((y, rstd, wp, bp), out)
        }
        OpsKind::UnTracked(prep) => {
            let out =
                B::group_norm_silu_forward(x.primitive, groups, wp.as_ref(), bp.as_ref(), eps);
            prep.finish(out.2)
        }
    }
}
