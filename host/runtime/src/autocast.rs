//! The precision policy of mixed-precision training (`train_dtype`): matmul, linear,
//! convolutions and attention compute in the train dtype; everything else (norms, softmax
//! statistics, the loss, the optimizer) in f32. Operands are cast at the op and its result is
//! cast back, so tensors between ops, trained parameters (the f32 masters) and their gradients
//! stay f32, while what backward keeps for those ops is their operands in the train dtype. The
//! runtime applies it to every plugin's ops: no plugin changes for it.

use burn_backend::{Backend, DType, FloatDType, TensorMetadata, tensor::FloatTensor};

/// The dtype matmul, linear, convolutions and attention compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainDtype {
    #[default]
    Float32,
    Float16,
    BFloat16,
}

impl TrainDtype {
    /// The cast the policy applies; None: ops compute in f32 as they are.
    pub(crate) fn compute(self) -> Option<FloatDType> {
        match self {
            TrainDtype::Float32 => None,
            TrainDtype::Float16 => Some(FloatDType::F16),
            TrainDtype::BFloat16 => Some(FloatDType::BF16),
        }
    }
}

/// The dtype an op on `operands` computes in: the train dtype `dt`; without one, f32 when the
/// operands' float dtypes differ (torch's type promotion: a bfloat16 adapter parameter, as
/// `lora_weight_dtype` keeps it, meeting f32 activations), else None (as they are).
pub fn promoted<'a, B: Backend>(
    dt: Option<FloatDType>,
    operands: impl IntoIterator<Item = &'a FloatTensor<B>>,
) -> Option<FloatDType> {
    let mut dtypes = operands.into_iter().map(|t| t.dtype());
    let first = dtypes.next();
    let mixed = dtypes.any(|d| Some(d) != first);
    dt.or(mixed.then_some(FloatDType::F32))
}

/// `a` and `b` in one dtype (see [`promoted`], with no train dtype).
pub fn promote<B: Backend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dt = promoted::<B>(None, [&a, &b]);
    (to::<B>(a, dt), to::<B>(b, dt))
}

/// `t` in `dt` (as it is when `dt` is None or already its dtype).
pub fn to<B: Backend>(t: FloatTensor<B>, dt: Option<FloatDType>) -> FloatTensor<B> {
    match dt {
        Some(d) if t.dtype() != DType::from(d) => B::float_cast(t, d),
        _ => t,
    }
}

/// A result computed in the train dtype `dt`, back in f32 (as it is when `dt` is None: a
/// plugin's own half-precision tensors stay as they are).
pub fn back<B: Backend>(t: FloatTensor<B>, dt: Option<FloatDType>) -> FloatTensor<B> {
    match dt {
        Some(_) if t.dtype() != DType::F32 => B::float_cast(t, FloatDType::F32),
        _ => t,
    }
}

/// `l · r` computed in `dt`, in f32.
pub fn matmul<B: Backend>(
    l: FloatTensor<B>,
    r: FloatTensor<B>,
    dt: Option<FloatDType>,
) -> FloatTensor<B> {
    back::<B>(B::float_matmul(to::<B>(l, dt), to::<B>(r, dt)), dt)
}
