//! 2-D convolution as an autodiff op of the runtime's own, so that its forward and its input
//! gradient run on the backend's own kernels where it has them ([`crate::fused::Fused`]: flex's
//! im2col convolution, and the input gradient of a stride-1 convolution as a convolution by the
//! rotated kernel, where burn's default runs a transposed convolution; the kernel's gradient as
//! one gemm per band of im2col columns). The bias's gradient is burn's.

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn_backend::{ops::ConvOptions, tensor::FloatTensor};

use crate::fused::Fused;

#[derive(Debug)]
struct Conv2d;

impl<B: Fused> Backward<B, 3> for Conv2d {
    /// The input, the kernel, the bias, the options.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        Option<FloatTensor<B>>,
        ConvOptions<2>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w, b, options) = ops.state;
        let [x_node, w_node, b_node] = ops.parents;
        if let (Some(node), Some(b)) = (b_node, b) {
            grads.register::<B>(node.id, B::conv2d_bias_backward(x.clone(), b, grad.clone()));
        }
        if let Some(node) = w_node {
            let dw = B::conv_weight_grad(x.clone(), w.clone(), grad.clone(), options.clone());
            grads.register::<B>(node.id, dw);
        }
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::conv_input_grad(x, w, grad, options));
        }
    }
}

/// `conv2d(x, w) + b` as an autodiff op (see the module's comment).
pub fn conv2d<B: Fused, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    b: Option<FloatTensor<Autodiff<B, C>>>,
    options: ConvOptions<2>,
) -> FloatTensor<Autodiff<B, C>> {
    let absent = || crate::group_norm_silu::placeholder::<B, C>(&x.primitive).node;
    let nodes = [
        x.node.clone(),
        w.node.clone(),
        b.as_ref().map_or_else(absent, |t| t.node.clone()),
    ];
    let bp = b.map(|t| t.primitive);
    match Conv2d.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = B::conv(
                x.primitive.clone(),
                w.primitive.clone(),
                bp.clone(),
                options.clone(),
            );
            prep.finish((x.primitive, w.primitive, bp, options), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::conv(x.primitive, w.primitive, bp, options)),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive, module};

    use super::*;

    type A = crate::CpuBackend;

    fn data(shape: [usize; 4], seed: u32) -> Tensor<A, 4> {
        let mut x = seed;
        let v: Vec<f32> = (0..shape.iter().product())
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn worst<B: burn::tensor::backend::Backend, const D: usize>(
        a: Tensor<B, D>,
        b: Tensor<B, D>,
    ) -> f32 {
        let (a, b) = (
            a.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap(),
        );
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The op's output and the gradients of its input, kernel and bias equal burn's conv2d:
    /// padded, unpadded, dilated, strided (burn's input gradient), padding beyond the kernel
    /// (burn's too), and a 1×1 kernel.
    #[test]
    fn equals_burns_convolution() {
        let cases = [
            ([2, 3, 9, 8], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1]),
            ([1, 2, 7, 7], [3, 2, 3, 3], [1, 1], [0, 0], [1, 1]),
            ([1, 2, 9, 9], [2, 2, 3, 2], [1, 1], [2, 1], [2, 1]),
            ([1, 3, 8, 8], [2, 3, 3, 3], [2, 2], [1, 1], [1, 1]),
            ([1, 1, 5, 5], [2, 1, 3, 3], [1, 1], [3, 3], [1, 1]),
            ([1, 4, 6, 6], [5, 4, 1, 1], [1, 1], [0, 0], [1, 1]),
        ];
        for (xs, ws, stride, padding, dilation) in cases {
            let x = data(xs, 1).require_grad();
            let w = data(ws, 2).require_grad();
            let b = Tensor::<A, 1>::from_data(
                TensorData::new(
                    (0..ws[0]).map(|i| i as f32 * 0.1).collect::<Vec<_>>(),
                    [ws[0]],
                ),
                &Default::default(),
            )
            .require_grad();
            let options = ConvOptions::new(stride, padding, dilation, 1);
            let reference = module::conv2d(x.clone(), w.clone(), Some(b.clone()), options.clone());
            let ours = Tensor::<A, 4>::from_primitive(TensorPrimitive::Float(conv2d::<
                burn::backend::Flex,
                NoCheckpointing,
            >(
                x.clone().into_primitive().tensor(),
                w.clone().into_primitive().tensor(),
                Some(b.clone().into_primitive().tensor()),
                options,
            )));
            let case = format!("{xs:?} {ws:?} {stride:?} {padding:?} {dilation:?}");
            assert!(
                worst(ours.clone(), reference.clone()) < 1e-5,
                "{case}: output"
            );
            let weights = data(ours.dims(), 3);
            let g_ref = (reference * weights.clone()).sum().backward();
            let g = (ours * weights).sum().backward();
            let (dx, dx_ref) = (x.grad(&g).unwrap(), x.grad(&g_ref).unwrap());
            assert!(worst(dx, dx_ref) < 1e-4, "{case}: dx");
            let (dw, dw_ref) = (w.grad(&g).unwrap(), w.grad(&g_ref).unwrap());
            assert!(worst(dw, dw_ref) < 1e-4, "{case}: dw");
            let (db, db_ref) = (b.grad(&g).unwrap(), b.grad(&g_ref).unwrap());
            assert!(worst(db, db_ref) < 1e-4, "{case}: db");
        }
    }
}
