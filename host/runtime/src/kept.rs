//! Frozen weights kept in less memory than f32 (a part's `weight_dtype`): halves (f16, bf16),
//! float8 (e4m3fn codes with one scale per tensor, absmax / 448) and nfloat4 (4-bit NormalFloat
//! codes, two per byte with the first in the high nibble, and the absmax of each block of 64
//! values, as bitsandbytes stores them). Ops read a kept weight as f32, dequantised on the
//! device for each op. Linear layers and convolutions on a kept weight are ops of their own
//! ([`crate::kept_ops`]) that keep the kept weight for backward and dequantise it again there;
//! other readers (embeddings, DoRA's merged weight) get an f32 copy.
//!
//! Quantising happens once, on the host, when the weight is kept.

use burn_backend::{
    AutodiffBackend, DType as BDType, FloatDType, IntDType, Scalar, Shape, TensorData,
    TensorMetadata,
    tensor::{FloatTensor, IntTensor},
};

use crate::RtResult;

/// How a frozen weight is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    F16,
    BF16,
    /// float8 e4m3fn with a per-tensor scale.
    Float8,
    /// nfloat4, absmax per block of [`NF4_BLOCK`].
    Nf4,
}

impl WeightFormat {
    /// The format a weight of `rank` dimensions is kept in: None for vectors (biases, norm
    /// scales: small, kept f32); the quantised formats take matrices, and kernels are kept in
    /// bfloat16 instead.
    pub fn for_rank(self, rank: usize) -> Option<Self> {
        match self {
            _ if rank < 2 => None,
            WeightFormat::Float8 | WeightFormat::Nf4 if rank > 2 => Some(WeightFormat::BF16),
            f => Some(f),
        }
    }
}

/// The 16 values of the 4-bit NormalFloat code (QLoRA; bitsandbytes' table).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per nfloat4 scale.
pub const NF4_BLOCK: usize = 64;

/// The largest finite e4m3fn value.
const F8_MAX: f32 = 448.0;

/// The nearest nfloat4 code of `x` in [-1, 1] (ties to the lower code).
fn nf4_code(x: f32) -> u8 {
    let mut best = 0;
    for (i, v) in NF4.iter().enumerate().skip(1) {
        if (x - v).abs() < (x - NF4[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// nfloat4 codes of `w` (flattened), two per byte, and each block's absmax.
pub fn nf4_quantize(w: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let absmax: Vec<f32> = w
        .chunks(NF4_BLOCK)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let codes: Vec<u8> = w
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let m = absmax[i / NF4_BLOCK];
            nf4_code(if m > 0.0 { v / m } else { 0.0 })
        })
        .collect();
    let packed = codes
        .chunks(2)
        // An odd count pads with the code of 0, as bitsandbytes does.
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(nf4_code(0.0)))
        .collect();
    (packed, absmax)
}

/// float8 e4m3fn codes of `w / scale` and the scale (absmax / 448, so nothing saturates).
pub fn fp8_quantize(w: &[f32]) -> (Vec<u8>, f32) {
    let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if absmax > 0.0 { absmax / F8_MAX } else { 1.0 };
    let codes = w
        .iter()
        .map(|v| float8::F8E4M3::from_f32(v / scale).to_bits())
        .collect();
    (codes, scale)
}

/// A weight as it is kept.
pub enum Kept<B: AutodiffBackend> {
    Half(FloatTensor<B>),
    Float8 {
        /// One e4m3fn code per value (u8).
        codes: IntTensor<B>,
        /// What each code means, times the scale (256 values).
        values: FloatTensor<B>,
        shape: Vec<usize>,
    },
    Nf4 {
        /// Two codes per byte (u8).
        packed: IntTensor<B>,
        /// One per block of 64 values.
        absmax: FloatTensor<B>,
        /// [`NF4`], on the device.
        table: FloatTensor<B>,
        shape: Vec<usize>,
    },
}

impl<B: AutodiffBackend> Clone for Kept<B> {
    fn clone(&self) -> Self {
        match self {
            Kept::Half(t) => Kept::Half(t.clone()),
            Kept::Float8 {
                codes,
                values,
                shape,
            } => Kept::Float8 {
                codes: codes.clone(),
                values: values.clone(),
                shape: shape.clone(),
            },
            Kept::Nf4 {
                packed,
                absmax,
                table,
                shape,
            } => Kept::Nf4 {
                packed: packed.clone(),
                absmax: absmax.clone(),
                table: table.clone(),
                shape: shape.clone(),
            },
        }
    }
}

fn floats<B: AutodiffBackend>(v: Vec<f32>, device: &B::Device) -> FloatTensor<B> {
    let n = v.len();
    B::float_from_data(TensorData::new(v, [n]), device)
}

fn bytes<B: AutodiffBackend>(v: Vec<u8>, device: &B::Device) -> IntTensor<B> {
    let n = v.len();
    B::int_from_data(TensorData::new(v, [n]), device)
}

impl<B: AutodiffBackend> Kept<B> {
    /// Keeps the f32 weight `t` (read back once to quantise it) in `format`; None for F32.
    pub fn new(t: FloatTensor<B>, format: WeightFormat) -> RtResult<Option<Self>> {
        let device = B::float_device(&t);
        let shape = t.shape().to_vec();
        let host = || -> RtResult<Vec<f32>> {
            burn_backend::read_sync(B::float_into_data(B::float_cast(
                t.clone(),
                FloatDType::F32,
            )))
            .map_err(|e| format!("reading a weight to quantise it: {e}"))?
            .to_vec::<f32>()
            .map_err(|e| format!("reading a weight to quantise it: {e:?}"))
        };
        Ok(Some(match format {
            WeightFormat::F32 => return Ok(None),
            WeightFormat::F16 => Kept::Half(B::float_cast(t, FloatDType::F16)),
            WeightFormat::BF16 => Kept::Half(B::float_cast(t, FloatDType::BF16)),
            WeightFormat::Float8 => {
                let (codes, scale) = fp8_quantize(&host()?);
                let values = (0..=255u8)
                    .map(|c| float8::F8E4M3::from_bits(c).to_f32() * scale)
                    .collect();
                Kept::Float8 {
                    codes: bytes::<B>(codes, &device),
                    values: floats::<B>(values, &device),
                    shape,
                }
            }
            WeightFormat::Nf4 => {
                let (packed, absmax) = nf4_quantize(&host()?);
                Kept::Nf4 {
                    packed: bytes::<B>(packed, &device),
                    absmax: floats::<B>(absmax, &device),
                    table: floats::<B>(NF4.to_vec(), &device),
                    shape,
                }
            }
        }))
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Kept::Half(t) => t.shape().to_vec(),
            Kept::Float8 { shape, .. } | Kept::Nf4 { shape, .. } => shape.clone(),
        }
    }

    /// How it is kept.
    pub fn format(&self) -> WeightFormat {
        match self {
            Kept::Half(t) if t.dtype() == BDType::F16 => WeightFormat::F16,
            Kept::Half(_) => WeightFormat::BF16,
            Kept::Float8 { .. } => WeightFormat::Float8,
            Kept::Nf4 { .. } => WeightFormat::Nf4,
        }
    }

    /// The dtype a reader sees: a half's own, f32 for the quantised formats (read as f32).
    pub fn dtype(&self) -> BDType {
        match self {
            Kept::Half(t) => t.dtype(),
            _ => BDType::F32,
        }
    }

    /// The weight as f32, on its device.
    pub fn dequantize(&self, int_dtype: IntDType) -> FloatTensor<B> {
        match self {
            Kept::Half(t) => B::float_cast(t.clone(), FloatDType::F32),
            Kept::Float8 {
                codes,
                values,
                shape,
            } => {
                let idx = B::int_cast(codes.clone(), int_dtype);
                B::float_reshape(
                    B::float_select(values.clone(), 0, idx),
                    Shape::from(shape.clone()),
                )
            }
            Kept::Nf4 {
                packed,
                absmax,
                table,
                shape,
            } => {
                let n: usize = shape.iter().product();
                let bytes = B::int_cast(packed.clone(), int_dtype);
                let len = bytes.shape().num_elements();
                let pair = Shape::from(vec![len, 1]);
                let hi = B::int_reshape(
                    B::bitwise_right_shift_scalar(bytes.clone(), Scalar::Int(4)),
                    pair.clone(),
                );
                let lo = B::int_reshape(B::bitwise_and_scalar(bytes, Scalar::Int(15)), pair);
                let codes = B::int_reshape(B::int_cat(vec![hi, lo], 1), Shape::from(vec![2 * len]));
                let normal = B::float_select(table.clone(), 0, codes);
                // Whole blocks: the codes of a last partial block are padded with zero.
                let blocks = absmax.shape().num_elements();
                let padded = blocks * NF4_BLOCK;
                let normal = if padded > 2 * len {
                    let zeros = B::float_zeros(
                        Shape::from(vec![padded - 2 * len]),
                        &B::float_device(&normal),
                        FloatDType::F32,
                    );
                    B::float_cat(vec![normal, zeros], 0)
                } else {
                    normal
                };
                let scaled = B::float_mul(
                    B::float_reshape(normal, Shape::from(vec![blocks, NF4_BLOCK])),
                    B::float_reshape(absmax.clone(), Shape::from(vec![blocks, 1])),
                );
                let flat = B::float_reshape(scaled, Shape::from(vec![padded]));
                let flat = B::float_slice(
                    flat,
                    &[burn_backend::Slice {
                        start: 0,
                        end: Some(n as isize),
                        step: 1,
                    }],
                );
                B::float_reshape(flat, Shape::from(shape.clone()))
            }
        }
    }

    /// The weight in the compute dtype `dt` (f32 when None): a half kept in it as it is, any
    /// other dequantised to f32 first.
    pub fn for_compute(&self, int_dtype: IntDType, dt: Option<FloatDType>) -> FloatTensor<B> {
        match (self, dt) {
            (Kept::Half(t), Some(d)) if t.dtype() == BDType::from(d) => t.clone(),
            (_, Some(d)) => B::float_cast(self.dequantize(int_dtype), d),
            (_, None) => self.dequantize(int_dtype),
        }
    }

    /// Bytes this weight takes as kept.
    pub fn bytes(&self) -> usize {
        match self {
            Kept::Half(t) => t.shape().num_elements() * 2,
            Kept::Float8 { codes, .. } => codes.shape().num_elements() + 256 * 4,
            Kept::Nf4 { packed, absmax, .. } => {
                packed.shape().num_elements() + absmax.shape().num_elements() * 4
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_codes_round_to_the_nearest_value() {
        assert_eq!(nf4_code(-1.0), 0);
        assert_eq!(nf4_code(0.0), 7);
        assert_eq!(nf4_code(1.0), 15);
        assert_eq!(nf4_code(0.03), 7);
        assert_eq!(nf4_code(0.05), 8);
        let (packed, absmax) = nf4_quantize(&[-2.0, 2.0, 0.0]);
        assert_eq!(absmax, vec![2.0]);
        assert_eq!(packed, vec![0x0F, 0x77]);
    }
}
