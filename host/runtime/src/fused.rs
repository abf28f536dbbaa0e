//! The kernels behind the runtime's own autodiff ops, per backend: each defaults to the op
//! composed of burn's primitives (what CUDA runs, fused there by burn's fusion); flex, the CPU
//! backend, overrides those whose composed form runs as many single-threaded passes.

use burn_backend::{
    Backend, DType, FloatDType, Shape, TensorData, TensorMetadata,
    ops::{ActivationOps, ConvOptions, ModuleOps},
    tensor::FloatTensor,
};
use ferrite_cpu_kernels::conv as flex_conv;

use ferrite_cpu_kernels::attention as flex_attention;
use ferrite_cpu_kernels::gelu as flex_gelu;
use ferrite_cpu_kernels::group_norm as flex_group_norm;

use crate::{attention, group_norm_silu};

pub trait Fused: Backend {
    /// [`attention::forward`]: the output and each query row's log-sum-exp.
    fn attention_forward(
        q: &FloatTensor<Self>,
        k: &FloatTensor<Self>,
        v: &FloatTensor<Self>,
        scale: f64,
        rows: usize,
        dt: Option<FloatDType>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::forward::<Self>(q, k, v, scale, rows, dt)
    }

    /// [`attention::backward`]: the gradients of q, k and v.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: &FloatTensor<Self>,
        k: &FloatTensor<Self>,
        v: &FloatTensor<Self>,
        out: &FloatTensor<Self>,
        lse: &FloatTensor<Self>,
        grad: &FloatTensor<Self>,
        scale: f64,
        rows: usize,
        dt: Option<FloatDType>,
    ) -> [FloatTensor<Self>; 3] {
        attention::backward::<Self>(q, k, v, out, lse, grad, scale, rows, dt)
    }

    /// `conv2d(x, w) + b`.
    fn conv(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, w, b, options)
    }

    /// The gradient of [`Fused::conv`]'s kernel.
    fn conv_weight_grad(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, w, grad, options)
    }

    /// The gradient of [`Fused::conv`]'s input.
    fn conv_input_grad(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, w, grad, options)
    }

    /// [`group_norm_silu::forward`]: the normalised input, each group's reciprocal std and the
    /// output.
    fn group_norm_silu_forward(
        x: FloatTensor<Self>,
        groups: usize,
        w: Option<&FloatTensor<Self>>,
        b: Option<&FloatTensor<Self>>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        group_norm_silu::forward::<Self>(x, groups, w, b, eps)
    }

    /// [`group_norm_silu::backward`]: the gradients of the input, weight and bias `wanted`.
    fn group_norm_silu_backward(
        y: &FloatTensor<Self>,
        rstd: &FloatTensor<Self>,
        dout: FloatTensor<Self>,
        w: Option<&FloatTensor<Self>>,
        b: Option<&FloatTensor<Self>>,
        groups: usize,
        wanted: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        group_norm_silu::backward::<Self>(y, rstd, dout, w, b, groups, wanted)
    }

    /// `x · Φ(x)` (GELU, erf form).
    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// [`Fused::erf_gelu`]'s backward, `dy · (Φ(x) + x · Φ'(x))` where the backend computes it
    /// so: by default burn's GELU backward, which on backends that keep burn's own (CUDA's)
    /// is the tanh approximation's derivative, as before this op existed.
    fn erf_gelu_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, dy)
    }

    /// f32 attention with no gradient where this backend's kernel beats its
    /// `ModuleOps::attention`; `None` leaves it to that.
    fn attention_no_grad(
        _q: &FloatTensor<Self>,
        _k: &FloatTensor<Self>,
        _v: &FloatTensor<Self>,
        _scale: f64,
    ) -> Option<FloatTensor<Self>> {
        None
    }
}

#[cfg(feature = "cuda")]
impl Fused for burn::backend::Cuda {}

type Flex = burn::backend::Flex;
type FlexTensor = FloatTensor<Flex>;

/// The sizes of an f32 attention computed in f32, which flex's kernel takes.
fn f32_dims(
    q: &FlexTensor,
    v: &FlexTensor,
    lk: usize,
    dt: Option<FloatDType>,
) -> Option<flex_attention::Dims> {
    let (qs, vs) = (q.shape().to_vec(), v.shape().to_vec());
    let f32_compute = dt.is_none_or(|d| d == FloatDType::F32);
    (f32_compute && q.dtype() == DType::F32 && v.dtype() == DType::F32).then(|| {
        flex_attention::Dims {
            bh: qs[0] * qs[1],
            lq: qs[2],
            lk,
            d: qs[3],
            dv: vs[3],
        }
    })
}

/// `t`'s elements in order (a copy only where `t` is a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) if t.is_contiguous() => std::borrow::Cow::Borrowed(s),
        _ => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap_or(&[]).to_vec()),
    }
}

fn tensor(v: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, Shape::from(shape)))
}

/// The geometry of `x` by `w` when flex's kernel computes it: f32, one group, no empty
/// dimension but the batch (burn's convolution handles the rest).
fn conv_geometry(
    x: &FlexTensor,
    w: &FlexTensor,
    options: &ConvOptions<2>,
) -> Option<flex_conv::Conv> {
    let (xs, ws) = (x.shape().to_vec(), w.shape().to_vec());
    let plain = options.groups == 1
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && xs.len() == 4
        && ws.len() == 4
        && xs[1] == ws[1]
        && !ws.contains(&0)
        && xs[1..].iter().all(|&d| d > 0);
    plain.then(|| flex_conv::Conv {
        n: xs[0],
        cin: xs[1],
        h: xs[2],
        w: xs[3],
        cout: ws[0],
        kh: ws[2],
        kw: ws[3],
        stride: options.stride,
        padding: options.padding,
        dilation: options.dilation,
    })
}

/// The grouping of `x` (`[N, C, ..]`) when flex's GroupNorm kernel takes it: f32 throughout,
/// with `[C]` parameters.
fn norm_groups(
    x: &FlexTensor,
    groups: usize,
    params: [Option<&FlexTensor>; 2],
) -> Option<flex_group_norm::Groups> {
    let s = x.shape().to_vec();
    let c = *s.get(1)?;
    let params_fit = params
        .iter()
        .flatten()
        .all(|p| p.dtype() == DType::F32 && p.shape().to_vec() == [c]);
    // Empty tensors are left to the composed op (the kernel's chunks would be empty).
    let fits = x.dtype() == DType::F32
        && groups > 0
        && c.is_multiple_of(groups)
        && s[1..].iter().all(|&d| d > 0)
        && params_fit;
    fits.then(|| flex_group_norm::Groups {
        n: s[0],
        c,
        len: s[2..].iter().product(),
        groups,
    })
}

impl Fused for Flex {
    fn conv(
        x: FlexTensor,
        w: FlexTensor,
        b: Option<FlexTensor>,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        let f32_bias = b
            .as_ref()
            .is_none_or(|b| b.dtype() == DType::F32 && b.shape().to_vec() == [w.shape()[0]]);
        let has_output = |c: &flex_conv::Conv| !c.out_size().contains(&0);
        match conv_geometry(&x, &w, &options).filter(|c| f32_bias && has_output(c)) {
            Some(c) => {
                let bias = b.as_ref().map(values);
                let y = flex_conv::conv2d(&values(&x), &values(&w), bias.as_deref(), c);
                let [ho, wo] = c.out_size();
                tensor(y, vec![c.n, c.cout, ho, wo])
            }
            None => Self::conv2d(x, w, b, options),
        }
    }

    fn conv_weight_grad(
        x: FlexTensor,
        w: FlexTensor,
        grad: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        match conv_geometry(&x, &w, &options).filter(|_| grad.dtype() == DType::F32) {
            Some(c) => {
                let dw = flex_conv::conv2d_weight_grad(&values(&x), &values(&grad), c);
                tensor(dw, w.shape().to_vec())
            }
            None => Self::conv2d_weight_backward(x, w, grad, options),
        }
    }

    /// A stride-1 convolution's input gradient is the output gradient's convolution by the
    /// kernel rotated 180° with its channel axes swapped, padded by `dilation·(k − 1) − padding`.
    fn conv_input_grad(
        x: FlexTensor,
        w: FlexTensor,
        grad: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        let pad =
            |i: usize, k: usize| (options.dilation[i] * (k - 1)).checked_sub(options.padding[i]);
        let geometry = conv_geometry(&x, &w, &options)
            .filter(|_| options.stride == [1, 1] && grad.dtype() == DType::F32);
        let Some((c, [py, px])) = geometry.and_then(|c| Some((c, [pad(0, c.kh)?, pad(1, c.kw)?])))
        else {
            return Self::conv2d_x_backward(x, w, grad, options);
        };
        let [ho, wo] = c.out_size();
        let back = flex_conv::Conv {
            n: c.n,
            cin: c.cout,
            h: ho,
            w: wo,
            cout: c.cin,
            padding: [py, px],
            ..c
        };
        let rotated = flex_conv::flip_transpose(&values(&w), c.cout, c.cin, c.kh, c.kw);
        let dx = flex_conv::conv2d(&values(&grad), &rotated, None, back);
        tensor(dx, vec![c.n, c.cin, c.h, c.w])
    }

    fn attention_forward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        scale: f64,
        rows: usize,
        dt: Option<FloatDType>,
    ) -> (FlexTensor, FlexTensor) {
        let lk = k.shape()[2];
        let Some(n) = f32_dims(q, v, lk, dt).filter(|_| k.dtype() == DType::F32) else {
            return attention::forward::<Flex>(q, k, v, scale, rows, dt);
        };
        let (out, lse) =
            flex_attention::forward(&values(q), &values(k), &values(v), n, scale as f32);
        let mut shape = q.shape().to_vec();
        shape[3] = n.dv;
        let mut lse_shape = shape.clone();
        lse_shape[3] = 1;
        (tensor(out, shape), tensor(lse, lse_shape))
    }

    fn attention_backward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        out: &FlexTensor,
        lse: &FlexTensor,
        grad: &FlexTensor,
        scale: f64,
        rows: usize,
        dt: Option<FloatDType>,
    ) -> [FlexTensor; 3] {
        let lk = k.shape()[2];
        let all_f32 = [k, out, lse, grad].iter().all(|t| t.dtype() == DType::F32);
        let Some(n) = f32_dims(q, v, lk, dt).filter(|_| all_f32) else {
            return attention::backward::<Flex>(q, k, v, out, lse, grad, scale, rows, dt);
        };
        let [dq, dk, dv] = flex_attention::backward(
            &values(q),
            &values(k),
            &values(v),
            &values(out),
            &values(lse),
            &values(grad),
            n,
            scale as f32,
        );
        [
            tensor(dq, q.shape().to_vec()),
            tensor(dk, k.shape().to_vec()),
            tensor(dv, v.shape().to_vec()),
        ]
    }

    fn group_norm_silu_forward(
        x: FlexTensor,
        groups: usize,
        w: Option<&FlexTensor>,
        b: Option<&FlexTensor>,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some(g) = norm_groups(&x, groups, [w, b]) else {
            return group_norm_silu::forward::<Flex>(x, groups, w, b, eps);
        };
        let (w, b) = (w.map(values), b.map(values));
        let (y, rstd, out) =
            flex_group_norm::forward(&values(&x), w.as_deref(), b.as_deref(), g, eps as f32);
        let shape = x.shape().to_vec();
        (
            tensor(y, shape.clone()),
            tensor(rstd, vec![g.n, groups, 1]),
            tensor(out, shape),
        )
    }

    fn group_norm_silu_backward(
        y: &FlexTensor,
        rstd: &FlexTensor,
        dout: FlexTensor,
        w: Option<&FlexTensor>,
        b: Option<&FlexTensor>,
        groups: usize,
        wanted: [bool; 3],
    ) -> [Option<FlexTensor>; 3] {
        let f32_grad = dout.dtype() == DType::F32 && rstd.dtype() == DType::F32;
        let Some(g) = norm_groups(y, groups, [w, b]).filter(|_| f32_grad) else {
            return group_norm_silu::backward::<Flex>(y, rstd, dout, w, b, groups, wanted);
        };
        let (wv, bv) = (w.map(values), b.map(values));
        let [want_x, want_w, want_b] = wanted;
        let (dx, dw, db) = flex_group_norm::backward(
            &values(y),
            &values(rstd),
            &values(&dout),
            wv.as_deref(),
            bv.as_deref(),
            g,
            want_x,
        );
        [
            dx.map(|dx| tensor(dx, y.shape().to_vec())),
            (want_w && w.is_some()).then(|| tensor(dw, vec![g.c])),
            (want_b && b.is_some()).then(|| tensor(db, vec![g.c])),
        ]
    }

    fn erf_gelu(x: FlexTensor) -> FlexTensor {
        if x.dtype() != DType::F32 {
            return Self::gelu(x);
        }
        tensor(flex_gelu::forward(&values(&x)), x.shape().to_vec())
    }

    fn erf_gelu_grad(x: FlexTensor, dy: FlexTensor) -> FlexTensor {
        if x.dtype() != DType::F32 || dy.dtype() != DType::F32 || x.shape() != dy.shape() {
            return Self::gelu_backward(x, dy);
        }
        tensor(
            flex_gelu::backward(&values(&x), &values(&dy)),
            x.shape().to_vec(),
        )
    }

    fn attention_no_grad(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        scale: f64,
    ) -> Option<FlexTensor> {
        let n = f32_dims(q, v, k.shape()[2], None).filter(|_| k.dtype() == DType::F32)?;
        let (out, _) = flex_attention::forward(&values(q), &values(k), &values(v), n, scale as f32);
        let mut shape = q.shape().to_vec();
        shape[3] = n.dv;
        Some(tensor(out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], seed: u64) -> FlexTensor {
        let n = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        tensor(v, shape.to_vec())
    }

    fn worst(a: &FlexTensor, b: &FlexTensor) -> f32 {
        assert_eq!(a.shape(), b.shape());
        values(a)
            .iter()
            .zip(values(b).iter())
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    /// Flex's kernel gives the composed op's output, log-sum-exp and gradients: several row
    /// blocks with a short last one, heads split into groups, and a single row.
    #[test]
    fn flex_attention_equals_the_composed_op() {
        for (b, h, lq, lk, d, dv) in [
            (1, 3, 300, 37, 8, 5),
            (2, 1, 129, 200, 4, 6),
            (1, 2, 1, 3, 2, 2),
        ] {
            let q = random(&[b, h, lq, d], 1);
            let k = random(&[b, h, lk, d], 2);
            let v = random(&[b, h, lk, dv], 3);
            let g = random(&[b, h, lq, dv], 4);
            let scale = 0.35;
            let (out, lse) = Flex::attention_forward(&q, &k, &v, scale, 7, None);
            let (out_c, lse_c) = attention::forward::<Flex>(&q, &k, &v, scale, 7, None);
            assert!(worst(&out, &out_c) < 1e-5, "output {}", worst(&out, &out_c));
            assert!(worst(&lse, &lse_c) < 1e-5, "lse {}", worst(&lse, &lse_c));
            let grads = Flex::attention_backward(&q, &k, &v, &out, &lse, &g, scale, 7, None);
            let grads_c =
                attention::backward::<Flex>(&q, &k, &v, &out_c, &lse_c, &g, scale, 7, None);
            for (name, (a, c)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&grads_c)) {
                let e = worst(a, c);
                assert!(e < 1e-4, "({b}, {h}, {lq}, {lk}) {name}: {e}");
            }
        }
    }

    /// Flex's GroupNorm+SiLU kernel gives the composed op's output, kept values and gradients,
    /// with and without a weight and bias, and leaves out the gradients not wanted; empty
    /// inputs go to the composed op.
    #[test]
    fn flex_group_norm_silu_equals_the_composed_op() {
        let x = random(&[2, 6, 5, 7], 1);
        let dout = random(&[2, 6, 5, 7], 2);
        let (w, b) = (random(&[6], 3), random(&[6], 4));
        for (w, b) in [(Some(&w), Some(&b)), (None, None), (Some(&w), None)] {
            let kernel = Flex::group_norm_silu_forward(x.clone(), 3, w, b, 1e-5);
            let composed = group_norm_silu::forward::<Flex>(x.clone(), 3, w, b, 1e-5);
            for (name, (a, c)) in ["y", "rstd", "out"].iter().zip([
                (&kernel.0, &composed.0),
                (&kernel.1, &composed.1),
                (&kernel.2, &composed.2),
            ]) {
                assert!(worst(a, c) < 1e-5, "{name}: {}", worst(a, c));
            }
            let all = [true; 3];
            let grads =
                Flex::group_norm_silu_backward(&kernel.0, &kernel.1, dout.clone(), w, b, 3, all);
            let grads_c = group_norm_silu::backward::<Flex>(
                &composed.0,
                &composed.1,
                dout.clone(),
                w,
                b,
                3,
                all,
            );
            for (name, (a, c)) in ["dx", "dw", "db"].iter().zip(grads.iter().zip(&grads_c)) {
                match (a, c) {
                    (Some(a), Some(c)) => assert!(worst(a, c) < 1e-4, "{name}: {}", worst(a, c)),
                    (None, None) => {}
                    _ => panic!("{name}: present in one and not the other"),
                }
            }
            assert_eq!(grads[1].is_some(), w.is_some());
            let some = Flex::group_norm_silu_backward(
                &kernel.0,
                &kernel.1,
                dout.clone(),
                w,
                b,
                3,
                [false, true, false],
            );
            assert!(some[0].is_none() && some[2].is_none());
            assert_eq!(some[1].is_some(), w.is_some());
        }
    }

    /// Flex's GELU kernel gives burn's GELU and its gradient (flex's, through libm's erf).
    #[test]
    fn flex_gelu_equals_burns() {
        let x = random(&[3, 1000], 1);
        let dy = random(&[3, 1000], 2);
        let (y, y_burn) = (Flex::erf_gelu(x.clone()), Flex::gelu(x.clone()));
        assert!(worst(&y, &y_burn) < 1e-6, "gelu {}", worst(&y, &y_burn));
        let dx = Flex::erf_gelu_grad(x.clone(), dy.clone());
        let dx_burn = Flex::gelu_backward(x, dy);
        assert!(
            worst(&dx, &dx_burn) < 1e-6,
            "gradient {}",
            worst(&dx, &dx_burn)
        );
    }

    #[test]
    fn flex_group_norm_silu_leaves_empty_inputs_to_the_composed_op() {
        for shape in [[1, 4, 0, 3], [0, 4, 2, 2]] {
            let x = random(&shape, 1);
            let (y, rstd, out) = Flex::group_norm_silu_forward(x.clone(), 2, None, None, 1e-5);
            assert_eq!(out.shape().to_vec(), shape.to_vec());
            let grads = Flex::group_norm_silu_backward(&y, &rstd, x, None, None, 2, [true; 3]);
            assert_eq!(
                grads[0].as_ref().map(|g| g.shape().to_vec()),
                Some(shape.to_vec())
            );
        }
    }
}
