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
