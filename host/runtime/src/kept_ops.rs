//! The ops that read a kept weight ([`crate::kept`]) as autodiff ops of their own: their
//! backward keeps the kept weight, not an f32 copy of it, and dequantises it again. Only the
//! input and the bias get gradients (a kept weight is frozen). Under mixed precision their
//! matmuls and convolutions compute in the train dtype ([`crate::autocast`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn_backend::{
    AutodiffBackend, Backend, FloatDType, IntDType, Shape, TensorMetadata,
    ops::{ConvOptions, ConvTransposeOptions, conv::calculate_padding_out},
    tensor::FloatTensor,
};

use crate::autocast;
use crate::kept::Kept;

/// The kept weight a [`linear`] node keeps for backward.
#[derive(Clone)]
struct KeptState<I: Backend> {
    weight: Kept<Autodiff<I>>,
    int_dtype: IntDType,
    compute: Option<FloatDType>,
    x_shape: Vec<usize>,
}

impl<I: Backend> std::fmt::Debug for KeptState<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptState")
            .field("x_shape", &self.x_shape)
            .finish()
    }
}

#[derive(Debug)]
struct KeptLinear;

impl<I: Backend> Backward<I, 2> for KeptLinear {
    type State = KeptState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<I>(&ops.node);
        let KeptState {
            weight,
            int_dtype,
            compute,
            x_shape,
        } = ops.state;
        let outs = *g.shape().last().unwrap_or(&1);
        let rows = g.shape().num_elements() / outs.max(1);
        let g = I::float_reshape(g, Shape::from(vec![rows, outs]));
        let [x, b] = ops.parents;
        if let Some(node) = b {
            let db = I::float_reshape(I::float_sum_dim(g.clone(), 0), Shape::from(vec![outs]));
            grads.register::<I>(node.id, db);
        }
        if let Some(node) = x {
            // The weight is dequantised again rather than kept as f32 since forward.
            let w = Autodiff::<I>::inner(weight.for_compute(int_dtype, compute));
            let dx = autocast::matmul::<I>(g, w, compute);
            let dx = I::float_reshape(dx, Shape::from(x_shape));
            grads.register::<I>(node.id, dx);
        }
    }
}

/// `x · wᵀ + b` over the last dimension of `x`, for a weight kept below f32: an autodiff op
/// whose backward keeps the kept weight (only `x` and `b` get gradients: a kept weight is
/// frozen).
pub fn linear<I: Backend>(
    x: FloatTensor<Autodiff<I>>,
    w: Kept<Autodiff<I>>,
    b: Option<FloatTensor<Autodiff<I>>>,
    int_dtype: IntDType,
    compute: Option<FloatDType>,
) -> FloatTensor<Autodiff<I>> {
    let x_shape = x.primitive.shape().to_vec();
    let ins = *x_shape.last().unwrap_or(&1);
    let rows = x_shape.iter().product::<usize>() / ins.max(1);
    let wf = Autodiff::<I>::inner(w.for_compute(int_dtype, compute));
    let outs = wf.shape()[0];
    let x2 = I::float_reshape(x.primitive.clone(), Shape::from(vec![rows, ins]));
    let mut y = autocast::matmul::<I>(x2, I::float_swap_dims(wf, 0, 1), compute);
    if let Some(b) = &b {
        y = I::float_add(
            y,
            I::float_reshape(b.primitive.clone(), Shape::from(vec![1, outs])),
        );
    }
    let mut out_shape = x_shape.clone();
    if let Some(last) = out_shape.last_mut() {
        *last = outs;
    }
    let y = I::float_reshape(y, Shape::from(out_shape));
    // No bias: an untracked node takes its place, and no part in backward.
    let b_node = match &b {
        Some(b) => b.node.clone(),
        None => Autodiff::<I>::from_inner(y.clone()).node,
    };
    let state = KeptState {
        weight: w,
        int_dtype,
        compute,
        x_shape,
    };
    match KeptLinear
        .prepare::<NoCheckpointing>([x.node.clone(), b_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// What a [`conv2d`] node keeps for backward.
#[derive(Clone)]
struct KeptConvState<I: Backend> {
    weight: Kept<Autodiff<I>>,
    int_dtype: IntDType,
    compute: Option<FloatDType>,
    x_shape: Vec<usize>,
    options: ConvOptions<2>,
}

impl<I: Backend> std::fmt::Debug for KeptConvState<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConvState")
            .field("x_shape", &self.x_shape)
            .finish()
    }
}

#[derive(Debug)]
struct KeptConv2d;

impl<I: Backend> Backward<I, 2> for KeptConv2d {
    type State = KeptConvState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<I>(&ops.node);
        let KeptConvState {
            weight,
            int_dtype,
            compute,
            x_shape,
            options,
        } = ops.state;
        let [x, b] = ops.parents;
        if let Some(node) = b {
            let channels = g.shape()[1];
            let db = I::float_sum_dim(I::float_sum_dim(I::float_sum_dim(g.clone(), 0), 2), 3);
            grads.register::<I>(node.id, I::float_reshape(db, Shape::from(vec![channels])));
        }
        if let Some(node) = x {
            // The input's gradient is the transposed convolution of the output's (burn's
            // conv2d_x_backward, which needs only the input's shape).
            let w = Autodiff::<I>::inner(weight.for_compute(int_dtype, compute));
            let k = w.shape().to_vec();
            let out = g.shape().to_vec();
            let padding_out = [0, 1].map(|d| {
                calculate_padding_out(
                    k[2 + d],
                    options.stride[d],
                    options.padding[d],
                    options.dilation[d],
                    x_shape[2 + d],
                    out[2 + d],
                )
            });
            let opts = ConvTransposeOptions::new(
                options.stride,
                options.padding,
                padding_out,
                options.dilation,
                options.groups,
            );
            let dx = I::conv_transpose2d(
                autocast::to::<I>(g, compute),
                autocast::to::<I>(w, compute),
                None,
                opts,
            );
            grads.register::<I>(node.id, autocast::back::<I>(dx, compute));
        }
    }
}

/// A 2-D convolution of `x` by a kernel kept below f32, as an autodiff op that keeps the kept
/// kernel for backward.
pub fn conv2d<I: Backend>(
    x: FloatTensor<Autodiff<I>>,
    w: Kept<Autodiff<I>>,
    b: Option<FloatTensor<Autodiff<I>>>,
    options: ConvOptions<2>,
    int_dtype: IntDType,
    compute: Option<FloatDType>,
) -> FloatTensor<Autodiff<I>> {
    let x_shape = x.primitive.shape().to_vec();
    let wf = Autodiff::<I>::inner(w.for_compute(int_dtype, compute));
    let y = I::conv2d(
        autocast::to::<I>(x.primitive.clone(), compute),
        autocast::to::<I>(wf, compute),
        b.as_ref()
            .map(|b| autocast::to::<I>(b.primitive.clone(), compute)),
        options.clone(),
    );
    let y = autocast::back::<I>(y, compute);
    let b_node = match &b {
        Some(b) => b.node.clone(),
        None => Autodiff::<I>::from_inner(y.clone()).node,
    };
    let state = KeptConvState {
        weight: w,
        int_dtype,
        compute,
        x_shape,
        options,
    };
    match KeptConv2d
        .prepare::<NoCheckpointing>([x.node.clone(), b_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
