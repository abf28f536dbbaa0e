//! The safe tensor handle plugins compute with. It holds no data: every method is a host op.

use std::mem::ManuallyDrop;

use crate::abi::{DType, HostTensor, TensorId, known};
use crate::error::{Error, Result};
use crate::host::{Generator, call, call1, call1_opt, host, res};
use crate::op::{self, Op};

/// A handle to a host-owned tensor; released when dropped.
#[derive(Debug)]
pub struct Tensor {
    id: TensorId,
}

fn shaped(shape: &[usize], dtype: DType) -> op::Shaped {
    op::Shaped {
        shape: shape.to_vec(),
        dtype,
    }
}

fn random(shape: &[usize], rng: &Generator) -> op::Random {
    op::Random {
        shape: shape.to_vec(),
        rng: rng.id(),
    }
}

impl Tensor {
    /// Takes ownership of a handle.
    pub fn from_raw(id: TensorId) -> Self {
        Self { id }
    }

    /// Views a handle owned by someone else without taking ownership.
    pub fn borrow_raw(id: TensorId) -> ManuallyDrop<Tensor> {
        ManuallyDrop::new(Self { id })
    }

    /// Gives up ownership of the handle (the receiver must release it).
    pub fn into_raw(self) -> TensorId {
        ManuallyDrop::new(self).id
    }

    pub fn id(&self) -> TensorId {
        self.id
    }

    /// Another reference to the same tensor (same handle, no data copied): an in-place
    /// [`assign`](Self::assign) through one is seen through the other, as with torch Parameters.
    pub fn try_clone(&self) -> Result<Tensor> {
        Ok(Tensor::from_raw(res((host()?.retain())(self.id))?))
    }

    // ---- creation ----

    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Tensor> {
        call1(Op::Zeros(shaped(shape, dtype)), &[])
    }

    pub fn ones(shape: &[usize], dtype: DType) -> Result<Tensor> {
        call1(Op::Ones(shaped(shape, dtype)), &[])
    }

    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Result<Tensor> {
        call1(
            Op::Full(op::Fill {
                shape: shape.to_vec(),
                value,
                dtype,
            }),
            &[],
        )
    }

    /// `start, start+step, ...` below `end`, as `dtype` (a float dtype or `I64`).
    pub fn arange(start: i64, end: i64, step: i64, dtype: DType) -> Result<Tensor> {
        let step = usize::try_from(step)
            .map_err(|_| Error(format!("arange: step {step} must be positive")))?;
        call1(
            Op::Arange(op::Arange {
                start,
                end,
                step,
                dtype,
            }),
            &[],
        )
    }

    /// Standard normal samples drawn from `rng`.
    pub fn randn(shape: &[usize], rng: &Generator) -> Result<Tensor> {
        call1(Op::Randn(random(shape, rng)), &[])
    }

    /// Uniform samples in [0, 1) drawn from `rng`.
    pub fn rand(shape: &[usize], rng: &Generator) -> Result<Tensor> {
        call1(Op::Rand(random(shape, rng)), &[])
    }

    /// Uploads small host data (constants, test inputs).
    pub fn from_f32(data: &[f32], shape: &[usize]) -> Result<Tensor> {
        call1(
            Op::FromF32(op::FromF32 {
                data: data.to_vec(),
                shape: shape.to_vec(),
            }),
            &[],
        )
    }

    pub fn from_i64(data: &[i64], shape: &[usize]) -> Result<Tensor> {
        call1(
            Op::FromI64(op::FromI64 {
                data: data.to_vec(),
                shape: shape.to_vec(),
            }),
            &[],
        )
    }

    // ---- metadata and host copies ----

    pub fn shape(&self) -> Result<Vec<usize>> {
        let s = res((host()?.shape())(self.id))?;
        Ok(s.into_iter().map(|d| d as usize).collect())
    }

    pub fn rank(&self) -> Result<usize> {
        Ok(self.shape()?.len())
    }

    /// Size of one dimension.
    pub fn dim(&self, d: usize) -> Result<usize> {
        let s = self.shape()?;
        s.get(d)
            .copied()
            .ok_or_else(|| Error(format!("dimension {d} out of range for shape {s:?}")))
    }

    pub fn dtype(&self) -> Result<DType> {
        known("dtype", &res((host()?.dtype())(self.id))?).map_err(Error)
    }

    /// Copies the values to host memory: for logs and tests only.
    pub fn to_host(&self) -> Result<HostTensor> {
        res((host()?.to_host())(self.id))
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.data.into_vec())
    }

    /// A captioner's or masker's image (`[3, H, W]`, RGB in 0..1) as 8-bit interleaved RGB
    /// pixels with its width and height: what PIL hands OneTrainer's processors. `what` names
    /// the plugin in the error.
    pub fn to_rgb8(&self, what: &str) -> Result<(u32, u32, Vec<u8>)> {
        let shape = self.shape()?;
        let [3, h, w] = shape[..] else {
            return Err(Error(format!(
                "{what}: the image is {shape:?}, not [3, height, width]"
            )));
        };
        let v = self.to_vec()?;
        let plane = h * w;
        let bytes = (0..plane)
            .flat_map(|i| (0..3).map(move |c| (i, c)))
            .map(|(i, c)| (v[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        Ok((w as u32, h as u32, bytes))
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        let v = self.to_vec()?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(Error(format!("item() on a tensor of {} elements", v.len()))),
        }
    }

    // ---- shape ----

    /// `-1` in one place infers that dimension.
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        call1(
            Op::Reshape(op::Reshape {
                shape: shape.to_vec(),
            }),
            &[self],
        )
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        call1(
            Op::Permute(op::Dims {
                dims: dims.to_vec(),
            }),
            &[self],
        )
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        call1(Op::Transpose(op::Transpose { dim0: d0, dim1: d1 }), &[self])
    }

    /// `len` elements of `dim` from `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        call1(Op::Narrow(op::Narrow { dim, start, len }), &[self])
    }

    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        call1(Op::Cat(op::Dim { dim }), tensors)
    }

    pub fn stack(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        call1(Op::Stack(op::Dim { dim }), tensors)
    }

    /// Splits `dim` into `chunks` pieces (the last may be smaller, as in torch).
    pub fn chunk(&self, chunks: usize, dim: usize) -> Result<Vec<Tensor>> {
        call(Op::Chunk(op::Chunk { chunks, dim }), &[self])
    }

    /// Broadcasts size-1 dimensions (and new leading ones) to `shape`.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        call1(
            Op::Expand(op::Shape {
                shape: shape.to_vec(),
            }),
            &[self],
        )
    }

    pub fn index_select(&self, dim: usize, indices: &Tensor) -> Result<Tensor> {
        call1(Op::IndexSelect(op::Dim { dim }), &[self, indices])
    }

    pub fn gather(&self, dim: usize, indices: &Tensor) -> Result<Tensor> {
        call1(Op::Gather(op::Dim { dim }), &[self, indices])
    }

    /// Constant padding; `pads` as in torch: (last-dim left, last-dim right, next-to-last left, ...).
    pub fn pad(&self, pads: &[usize], value: f64) -> Result<Tensor> {
        call1(
            Op::Pad(op::Pad {
                pads: pads.to_vec(),
                value,
            }),
            &[self],
        )
    }

    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        let mut s: Vec<i64> = self.shape()?.iter().map(|&d| d as i64).collect();
        if dim > s.len() {
            return Err(Error(format!(
                "unsqueeze({dim}) on a tensor of rank {}",
                s.len()
            )));
        }
        s.insert(dim, 1);
        self.reshape(&s)
    }

    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        let mut s: Vec<i64> = self.shape()?.iter().map(|&d| d as i64).collect();
        if s.get(dim) != Some(&1) {
            return Err(Error(format!(
                "squeeze({dim}) on shape {s:?}: that dimension is not 1"
            )));
        }
        s.remove(dim);
        self.reshape(&s)
    }

    /// Merges dimensions `start..=end` into one.
    pub fn flatten(&self, start: usize, end: usize) -> Result<Tensor> {
        let s = self.shape()?;
        if start > end || end >= s.len() {
            return Err(Error(format!("flatten({start}, {end}) on shape {s:?}")));
        }
        let mut out: Vec<i64> = s[..start].iter().map(|&d| d as i64).collect();
        out.push(s[start..=end].iter().product::<usize>() as i64);
        out.extend(s[end + 1..].iter().map(|&d| d as i64));
        self.reshape(&out)
    }

    // ---- elementwise ----

    pub fn add(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Add, Some(o), None)
    }
    pub fn sub(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Sub, Some(o), None)
    }
    pub fn mul(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Mul, Some(o), None)
    }
    pub fn div(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Div, Some(o), None)
    }
    pub fn pow(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Pow, Some(o), None)
    }
    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Add, None, Some(v))
    }
    pub fn sub_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Sub, None, Some(v))
    }
    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Mul, None, Some(v))
    }
    pub fn div_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Div, None, Some(v))
    }
    pub fn powf(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Pow, None, Some(v))
    }

    /// `self ∘ other` for a tensor operand, `self ∘ scalar` for a number.
    fn binary(
        &self,
        op: fn(op::Binary) -> Op,
        other: Option<&Tensor>,
        scalar: Option<f64>,
    ) -> Result<Tensor> {
        call1_opt(op(op::Binary { scalar }), &[self], &[other])
    }

    fn unary(&self, op: fn(op::NoArgs) -> Op) -> Result<Tensor> {
        call1(op(op::NoArgs {}), &[self])
    }
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(Op::Neg)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(Op::Exp)
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary(Op::Log)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(Op::Sqrt)
    }
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(Op::Rsqrt)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(Op::Abs)
    }
    pub fn sin(&self) -> Result<Tensor> {
        self.unary(Op::Sin)
    }
    pub fn cos(&self) -> Result<Tensor> {
        self.unary(Op::Cos)
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(Op::Tanh)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(Op::Sigmoid)
    }
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(Op::Silu)
    }
    /// Exact (erf) GELU.
    pub fn gelu(&self) -> Result<Tensor> {
        call1(
            Op::Gelu(op::Gelu {
                approximation: op::GeluApproximation::None,
            }),
            &[self],
        )
    }
    /// GELU with the tanh approximation.
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        call1(
            Op::Gelu(op::Gelu {
                approximation: op::GeluApproximation::Tanh,
            }),
            &[self],
        )
    }
    /// `x * sigmoid(1.702 x)`, as in CLIP.
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(Op::QuickGelu)
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(Op::Relu)
    }
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Result<Tensor> {
        call1(Op::Clamp(op::Clamp { min, max }), &[self])
    }

    // ---- comparisons (bool results) and selection ----

    pub fn gt(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Gt, Some(o), None)
    }
    pub fn ge(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Ge, Some(o), None)
    }
    pub fn lt(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Lt, Some(o), None)
    }
    pub fn le(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Le, Some(o), None)
    }
    pub fn eq(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Op::Eq, Some(o), None)
    }
    pub fn gt_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Gt, None, Some(v))
    }
    pub fn lt_scalar(&self, v: f64) -> Result<Tensor> {
        self.binary(Op::Lt, None, Some(v))
    }
    /// `cond ? a : b`, elementwise with broadcasting.
    pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        call1(Op::Where(op::NoArgs {}), &[cond, a, b])
    }

    // ---- reductions ----

    fn reduce(&self, op: fn(op::Reduce) -> Op, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        let dims = dims.to_vec();
        call1(op(op::Reduce { dims, keepdim }), &[self])
    }
    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Sum, dims, keepdim)
    }
    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Mean, dims, keepdim)
    }
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Max, dims, keepdim)
    }
    /// Variance with Bessel's `correction` (0 = population, 1 = sample).
    pub fn var(&self, dims: &[usize], keepdim: bool, correction: usize) -> Result<Tensor> {
        call1(
            Op::Var(op::Var {
                dims: dims.to_vec(),
                keepdim,
                correction,
            }),
            &[self],
        )
    }
    /// Sum of all elements, as a tensor of shape `[1]`.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reduce(Op::Sum, &[], false)
    }
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reduce(Op::Mean, &[], false)
    }

    // ---- linear algebra and nn primitives ----

    /// Batched matrix product with broadcasting of batch dimensions.
    pub fn matmul(&self, o: &Tensor) -> Result<Tensor> {
        call1(Op::Matmul(op::NoArgs {}), &[self, o])
    }

    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        call1(Op::Softmax(op::Dim { dim }), &[self])
    }

    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        call1(Op::Cast(op::Cast { dtype }), &[self])
    }

    pub fn to_device(&self, device: &str) -> Result<Tensor> {
        call1(
            Op::ToDevice(op::ToDevice {
                device: device.into(),
            }),
            &[self],
        )
    }

    // ---- autodiff ----

    /// The same values, cut from the graph.
    pub fn detach(&self) -> Result<Tensor> {
        self.unary(Op::Detach)
    }

    /// Marks this tensor (in place) as a leaf whose gradient is wanted.
    pub fn set_requires_grad(&self, requires: bool) -> Result<()> {
        call(Op::SetRequiresGrad(op::RequiresGrad { requires }), &[self]).map(drop)
    }

    /// Back-propagates from this (scalar) tensor.
    pub fn backward(&self) -> Result<Gradients> {
        Ok(Gradients(call1(Op::Backward(op::NoArgs {}), &[self])?))
    }

    /// Replaces this handle's value with `src`'s (detached); a trainable tensor stays trainable.
    /// This is how optimizers update parameters in place.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        call(Op::Assign(op::NoArgs {}), &[self, src]).map(drop)
    }
}

impl Clone for Tensor {
    /// Panics only if the host is gone or the handle is invalid, both programming errors.
    fn clone(&self) -> Self {
        self.try_clone().expect("retaining a tensor handle")
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if let Ok(h) = host() {
            (h.release())(self.id);
        }
    }
}

/// The gradients computed by one `backward`.
#[derive(Debug)]
pub struct Gradients(Tensor);

impl Gradients {
    /// The gradient of `param`, or `None` if it did not take part in the graph.
    pub fn get(&self, param: &Tensor) -> Result<Option<Tensor>> {
        let mut out = call(Op::Grad(op::NoArgs {}), &[&self.0, param])?;
        Ok(out.pop())
    }
}

/// Functional forms of the fused ops.
pub mod ops {
    use super::*;
    pub use crate::op::InterpolateMode;

    /// `x @ weight.T + bias`, weight as in torch: `[out, in]`.
    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        call1_opt(Op::Linear(op::NoArgs {}), &[x, weight], &[bias])
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct ConvOptions {
        pub stride: [usize; 2],
        pub padding: [usize; 2],
        pub dilation: [usize; 2],
        pub groups: usize,
    }

    impl Default for ConvOptions {
        fn default() -> Self {
            Self {
                stride: [1, 1],
                padding: [0, 0],
                dilation: [1, 1],
                groups: 1,
            }
        }
    }

    impl ConvOptions {
        pub fn padding(p: usize) -> Self {
            Self {
                padding: [p, p],
                ..Self::default()
            }
        }
        pub fn with_stride(mut self, s: usize) -> Self {
            self.stride = [s, s];
            self
        }
    }

    /// 2-D convolution, weight `[out, in/groups, kh, kw]`.
    pub fn conv2d(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        o: ConvOptions,
    ) -> Result<Tensor> {
        let args = op::Conv {
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: o.groups,
        };
        call1_opt(Op::Conv2d(args), &[x, weight], &[bias])
    }

    /// Transposed 2-D convolution, weight `[in, out/groups, kh, kw]` as in torch.
    pub fn conv_transpose2d(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        o: ConvOptions,
        output_padding: [usize; 2],
    ) -> Result<Tensor> {
        let args = op::ConvTranspose {
            stride: o.stride,
            padding: o.padding,
            output_padding,
            dilation: o.dilation,
            groups: o.groups,
        };
        call1_opt(Op::ConvTranspose2d(args), &[x, weight], &[bias])
    }

    /// Group norm over `[N, C, ...]`, with optional per-channel affine.
    pub fn group_norm(
        x: &Tensor,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let args = op::GroupNorm { groups, eps };
        call1_opt(Op::GroupNorm(args), &[x], &[weight, bias])
    }

    /// `silu(group_norm(..))` as one op (ABI 1.3), whose backward keeps one activation-sized
    /// tensor instead of two; on an older host, the two ops.
    pub fn group_norm_silu(
        x: &Tensor,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let args = op::GroupNorm { groups, eps };
        match call1_opt(Op::GroupNormSilu(args), &[x], &[weight, bias]) {
            Err(e) if e.is_unknown_op() => group_norm(x, groups, weight, bias, eps)?.silu(),
            out => out,
        }
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        call1_opt(Op::LayerNorm(op::Norm { eps }), &[x], &[weight, bias])
    }

    /// RMS norm over the last dimension.
    pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        call1_opt(Op::RmsNorm(op::Norm { eps }), &[x], &[weight])
    }

    /// `softmax(q kᵀ · scale + mask) v` over `[B, H, L, D]`; `scale` defaults to `1/sqrt(D)`.
    /// A float mask is added to the scores; a bool mask hides positions where it is `true`.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: Option<f64>,
    ) -> Result<Tensor> {
        call1_opt(Op::Attention(op::Attention { scale }), &[q, k, v], &[mask])
    }

    /// Resizes `[N, C, H, W]` to `size`.
    pub fn interpolate(x: &Tensor, size: [usize; 2], mode: InterpolateMode) -> Result<Tensor> {
        call1(Op::Interpolate(op::Interpolate { size, mode }), &[x])
    }

    /// Zeroes elements with probability `p` and scales the rest by `1/(1-p)`.
    pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
        call1(Op::Dropout(op::Dropout { p }), &[x])
    }

    /// Rows of `weight` `[V, D]` picked by integer `ids` of any shape; output `ids.shape + [D]`.
    pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
        call1(Op::Embedding(op::NoArgs {}), &[weight, ids])
    }
}
