//! The safe tensor handle plugins compute with. It holds no data: every method is a host op.

use std::mem::ManuallyDrop;

use crate::abi::{Attr, DType, HostTensor, OpCode, TensorId};
use crate::error::{Error, Result};
use crate::host::{Generator, call, call1, host, res};

/// A handle to a host-owned tensor; released when dropped.
#[derive(Debug)]
pub struct Tensor {
    id: TensorId,
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

fn int(v: usize) -> Attr {
    Attr::Int(v as i64)
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
        call1(OpCode::ZEROS, &[], &[ints(shape), Attr::DType(dtype)])
    }

    pub fn ones(shape: &[usize], dtype: DType) -> Result<Tensor> {
        call1(OpCode::ONES, &[], &[ints(shape), Attr::DType(dtype)])
    }

    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Result<Tensor> {
        call1(
            OpCode::FULL,
            &[],
            &[ints(shape), Attr::Float(value), Attr::DType(dtype)],
        )
    }

    /// `start, start+step, ...` below `end`, as `dtype` (a float dtype or `I64`).
    pub fn arange(start: i64, end: i64, step: i64, dtype: DType) -> Result<Tensor> {
        call1(
            OpCode::ARANGE,
            &[],
            &[
                Attr::Int(start),
                Attr::Int(end),
                Attr::Int(step),
                Attr::DType(dtype),
            ],
        )
    }

    /// Standard normal samples drawn from `rng`.
    pub fn randn(shape: &[usize], rng: &Generator) -> Result<Tensor> {
        call1(
            OpCode::RANDN,
            &[],
            &[ints(shape), Attr::Int(rng.id() as i64)],
        )
    }

    /// Uniform samples in [0, 1) drawn from `rng`.
    pub fn rand(shape: &[usize], rng: &Generator) -> Result<Tensor> {
        call1(
            OpCode::RAND,
            &[],
            &[ints(shape), Attr::Int(rng.id() as i64)],
        )
    }

    /// Uploads small host data (constants, test inputs).
    pub fn from_f32(data: &[f32], shape: &[usize]) -> Result<Tensor> {
        call1(
            OpCode::FROM_F32,
            &[],
            &[Attr::Floats(data.into()), ints(shape)],
        )
    }

    pub fn from_i64(data: &[i64], shape: &[usize]) -> Result<Tensor> {
        call1(
            OpCode::FROM_I64,
            &[],
            &[Attr::Ints(data.into()), ints(shape)],
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
        res((host()?.dtype())(self.id))
    }

    /// Copies the values to host memory: for logs and tests only.
    pub fn to_host(&self) -> Result<HostTensor> {
        res((host()?.to_host())(self.id))
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.data.into_vec())
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
        call1(OpCode::RESHAPE, &[self], &[Attr::Ints(shape.into())])
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        call1(OpCode::PERMUTE, &[self], &[ints(dims)])
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        call1(OpCode::TRANSPOSE, &[self], &[int(d0), int(d1)])
    }

    /// `len` elements of `dim` from `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        call1(OpCode::NARROW, &[self], &[int(dim), int(start), int(len)])
    }

    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        call1(OpCode::CAT, tensors, &[int(dim)])
    }

    pub fn stack(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        call1(OpCode::STACK, tensors, &[int(dim)])
    }

    /// Splits `dim` into `chunks` pieces (the last may be smaller, as in torch).
    pub fn chunk(&self, chunks: usize, dim: usize) -> Result<Vec<Tensor>> {
        call(OpCode::CHUNK, &[self], &[int(chunks), int(dim)])
    }

    /// Broadcasts size-1 dimensions (and new leading ones) to `shape`.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        call1(OpCode::EXPAND, &[self], &[ints(shape)])
    }

    pub fn index_select(&self, dim: usize, indices: &Tensor) -> Result<Tensor> {
        call1(OpCode::INDEX_SELECT, &[self, indices], &[int(dim)])
    }

    pub fn gather(&self, dim: usize, indices: &Tensor) -> Result<Tensor> {
        call1(OpCode::GATHER, &[self, indices], &[int(dim)])
    }

    /// Constant padding; `pads` as in torch: (last-dim left, last-dim right, next-to-last left, ...).
    pub fn pad(&self, pads: &[usize], value: f64) -> Result<Tensor> {
        call1(OpCode::PAD, &[self], &[ints(pads), Attr::Float(value)])
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
        call1(OpCode::ADD, &[self, o], &[])
    }
    pub fn sub(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::SUB, &[self, o], &[])
    }
    pub fn mul(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::MUL, &[self, o], &[])
    }
    pub fn div(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::DIV, &[self, o], &[])
    }
    pub fn pow(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::POW, &[self, o], &[])
    }
    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::ADD, &[self], &[Attr::Float(v)])
    }
    pub fn sub_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::SUB, &[self], &[Attr::Float(v)])
    }
    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::MUL, &[self], &[Attr::Float(v)])
    }
    pub fn div_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::DIV, &[self], &[Attr::Float(v)])
    }
    pub fn powf(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::POW, &[self], &[Attr::Float(v)])
    }

    fn unary(&self, op: OpCode) -> Result<Tensor> {
        call1(op, &[self], &[])
    }
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(OpCode::NEG)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(OpCode::EXP)
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary(OpCode::LOG)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(OpCode::SQRT)
    }
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(OpCode::RSQRT)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(OpCode::ABS)
    }
    pub fn sin(&self) -> Result<Tensor> {
        self.unary(OpCode::SIN)
    }
    pub fn cos(&self) -> Result<Tensor> {
        self.unary(OpCode::COS)
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(OpCode::TANH)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(OpCode::SIGMOID)
    }
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(OpCode::SILU)
    }
    /// Exact (erf) GELU.
    pub fn gelu(&self) -> Result<Tensor> {
        call1(OpCode::GELU, &[self], &[Attr::Str("none".into())])
    }
    /// GELU with the tanh approximation.
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        call1(OpCode::GELU, &[self], &[Attr::Str("tanh".into())])
    }
    /// `x * sigmoid(1.702 x)`, as in CLIP.
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(OpCode::QUICK_GELU)
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(OpCode::RELU)
    }
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Result<Tensor> {
        let a = |v: Option<f64>| v.map_or(Attr::None, Attr::Float);
        call1(OpCode::CLAMP, &[self], &[a(min), a(max)])
    }

    // ---- comparisons (bool results) and selection ----

    pub fn gt(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::GT, &[self, o], &[])
    }
    pub fn ge(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::GE, &[self, o], &[])
    }
    pub fn lt(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::LT, &[self, o], &[])
    }
    pub fn le(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::LE, &[self, o], &[])
    }
    pub fn eq(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::EQ, &[self, o], &[])
    }
    pub fn gt_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::GT, &[self], &[Attr::Float(v)])
    }
    pub fn lt_scalar(&self, v: f64) -> Result<Tensor> {
        call1(OpCode::LT, &[self], &[Attr::Float(v)])
    }
    /// `cond ? a : b`, elementwise with broadcasting.
    pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        call1(OpCode::WHERE, &[cond, a, b], &[])
    }

    // ---- reductions ----

    fn reduce(&self, op: OpCode, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        call1(op, &[self], &[ints(dims), Attr::Bool(keepdim)])
    }
    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(OpCode::SUM, dims, keepdim)
    }
    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(OpCode::MEAN, dims, keepdim)
    }
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(OpCode::MAX, dims, keepdim)
    }
    /// Variance with Bessel's `correction` (0 = population, 1 = sample).
    pub fn var(&self, dims: &[usize], keepdim: bool, correction: usize) -> Result<Tensor> {
        call1(
            OpCode::VAR,
            &[self],
            &[ints(dims), Attr::Bool(keepdim), int(correction)],
        )
    }
    /// Sum of all elements, as a tensor of shape `[1]`.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reduce(OpCode::SUM, &[], false)
    }
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reduce(OpCode::MEAN, &[], false)
    }

    // ---- linear algebra and nn primitives ----

    /// Batched matrix product with broadcasting of batch dimensions.
    pub fn matmul(&self, o: &Tensor) -> Result<Tensor> {
        call1(OpCode::MATMUL, &[self, o], &[])
    }

    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        call1(OpCode::SOFTMAX, &[self], &[int(dim)])
    }

    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        call1(OpCode::CAST, &[self], &[Attr::DType(dtype)])
    }

    pub fn to_device(&self, device: &str) -> Result<Tensor> {
        call1(OpCode::TO_DEVICE, &[self], &[Attr::Str(device.into())])
    }

    // ---- autodiff ----

    /// The same values, cut from the graph.
    pub fn detach(&self) -> Result<Tensor> {
        self.unary(OpCode::DETACH)
    }

    /// Marks this tensor (in place) as a leaf whose gradient is wanted.
    pub fn set_requires_grad(&self, requires: bool) -> Result<()> {
        call(OpCode::SET_REQUIRES_GRAD, &[self], &[Attr::Bool(requires)]).map(drop)
    }

    /// Back-propagates from this (scalar) tensor.
    pub fn backward(&self) -> Result<Gradients> {
        Ok(Gradients(call1(OpCode::BACKWARD, &[self], &[])?))
    }

    /// Replaces this handle's value with `src`'s (detached); a trainable tensor stays trainable.
    /// This is how optimizers update parameters in place.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        call(OpCode::ASSIGN, &[self, src], &[]).map(drop)
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
        let mut out = call(OpCode::GRAD, &[&self.0, param], &[])?;
        Ok(out.pop())
    }
}

/// Functional forms of the fused ops.
pub mod ops {
    use super::*;

    /// `x @ weight.T + bias`, weight as in torch: `[out, in]`.
    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        call1(OpCode::LINEAR, &inputs, &[])
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
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        call1(
            OpCode::CONV2D,
            &inputs,
            &[
                ints(&o.stride),
                ints(&o.padding),
                ints(&o.dilation),
                int(o.groups),
            ],
        )
    }

    /// Transposed 2-D convolution, weight `[in, out/groups, kh, kw]` as in torch.
    pub fn conv_transpose2d(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        o: ConvOptions,
        output_padding: [usize; 2],
    ) -> Result<Tensor> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        call1(
            OpCode::CONV_TRANSPOSE2D,
            &inputs,
            &[
                ints(&o.stride),
                ints(&o.padding),
                ints(&output_padding),
                ints(&o.dilation),
                int(o.groups),
            ],
        )
    }

    /// Group norm over `[N, C, ...]`, with optional per-channel affine.
    pub fn group_norm(
        x: &Tensor,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        affine_norm(
            OpCode::GROUP_NORM,
            x,
            weight,
            bias,
            &[int(groups), Attr::Float(eps)],
        )
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        affine_norm(OpCode::LAYER_NORM, x, weight, bias, &[Attr::Float(eps)])
    }

    /// RMS norm over the last dimension.
    pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        affine_norm(OpCode::RMS_NORM, x, weight, None, &[Attr::Float(eps)])
    }

    // Optional inputs are passed positionally; flags say which are present.
    fn affine_norm(
        op: OpCode,
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        attrs: &[Attr],
    ) -> Result<Tensor> {
        let mut inputs = vec![x];
        inputs.extend(weight);
        inputs.extend(bias);
        let mut a = attrs.to_vec();
        a.push(Attr::Bool(weight.is_some()));
        a.push(Attr::Bool(bias.is_some()));
        call1(op, &inputs, &a)
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
        let mut inputs = vec![q, k, v];
        inputs.extend(mask);
        call1(
            OpCode::ATTENTION,
            &inputs,
            &[scale.map_or(Attr::None, Attr::Float)],
        )
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum InterpolateMode {
        /// torch's `nearest` (floor of the scaled index).
        Nearest,
        /// torch's `bilinear` with `align_corners=False`.
        Bilinear,
    }

    /// Resizes `[N, C, H, W]` to `size`.
    pub fn interpolate(x: &Tensor, size: [usize; 2], mode: InterpolateMode) -> Result<Tensor> {
        let m = match mode {
            InterpolateMode::Nearest => "nearest",
            InterpolateMode::Bilinear => "bilinear",
        };
        call1(
            OpCode::INTERPOLATE,
            &[x],
            &[ints(&size), Attr::Str(m.into())],
        )
    }

    /// Zeroes elements with probability `p` and scales the rest by `1/(1-p)`.
    pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
        call1(OpCode::DROPOUT, &[x], &[Attr::Float(p)])
    }

    /// Rows of `weight` `[V, D]` picked by integer `ids` of any shape; output `ids.shape + [D]`.
    pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
        call1(OpCode::EMBEDDING, &[weight, ids], &[])
    }
}
