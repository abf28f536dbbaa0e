//! bitsandbytes' blockwise dynamic quantisation of optimizer states: blocks of 256 values, each
//! scaled by its largest magnitude and stored as the index (u8) of the nearest value of the
//! dynamic code (`create_dynamic_map`): as bitsandbytes' `default` backend `quantize_blockwise`
//! does, the index is the number of code midpoints below the scaled value (`torch.bucketize`),
//! found here by a binary search of eight gathers. (Its CUDA kernel also keeps a first moment's
//! sign through the rounding; its CPU path, the reference here, does not.)

use ferrite_plugin_api::{DType, Result, Tensor};

/// Values per block (bitsandbytes' optimizers').
pub const BLOCK: usize = 256;

/// bitsandbytes' `create_dynamic_map(signed)`: 256 sorted values in [-1, 1] (signed) or
/// [0, 1], dense near 0.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let bits = if signed {
        &crate::dynamic_map::SIGNED
    } else {
        &crate::dynamic_map::UNSIGNED
    };
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

/// A code on the device with the midpoints between its neighbours.
pub struct Code {
    pub values: Tensor,
    /// `(code[i] + code[i + 1]) / 2`, 255 of them.
    bounds: Tensor,
}

impl Code {
    pub fn new(signed: bool) -> Result<Self> {
        let code = dynamic_map(signed);
        let bounds: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        Ok(Self {
            values: Tensor::from_f32(&code, &[256])?,
            bounds: Tensor::from_f32(&bounds, &[255])?,
        })
    }

    /// How many bounds lie below each of `scaled`'s values (`torch.bucketize`, right=False),
    /// flat, as f32 (the runtime reshapes and joins float tensors only).
    fn bucketize(&self, scaled: &Tensor) -> Result<Tensor> {
        let flat = scaled.reshape(&[-1])?;
        let mut pos = Tensor::zeros(&flat.shape()?, DType::F32)?;
        for step in [128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0] {
            // pos + step ≤ 255 always: the steps add up to 255.
            let idx = pos.add_scalar(step - 1.0)?.cast(DType::I64)?;
            let below = self.bounds.index_select(0, &idx)?.lt(&flat)?;
            pos = pos.add(&below.cast(DType::F32)?.mul_scalar(step)?)?;
        }
        Ok(pos)
    }

    /// `x` (f32, any shape) as its codes (u8, `x`'s shape) and each block's scale (`[blocks]`).
    pub fn quantize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape: Vec<i64> = x.shape()?.iter().map(|&d| d as i64).collect();
        let flat = x.reshape(&[-1])?;
        let n = flat.dim(0)?;
        let full = n / BLOCK * BLOCK;
        let (mut codes, mut absmax) = (Vec::new(), Vec::new());
        if full > 0 {
            let blocks = flat
                .narrow(0, 0, full)?
                .reshape(&[(full / BLOCK) as i64, BLOCK as i64])?;
            let m = blocks.abs()?.max(&[1], true)?;
            // bitsandbytes multiplies the whole blocks by the scale's reciprocal...
            let inv = Tensor::ones(&[1, 1], DType::F32)?.div(&m.clamp(Some(1e-38), None)?)?;
            let scaled = blocks.mul(&inv)?.clamp(Some(-1.0), Some(1.0))?;
            codes.push(self.bucketize(&scaled)?);
            absmax.push(m.reshape(&[-1])?);
        }
        if n > full {
            // ...and divides the last, partial one by its own.
            let tail = flat.narrow(0, full, n - full)?;
            let m = tail.abs()?.max(&[0], true)?;
            let scaled = tail
                .div(&m.clamp(Some(1e-38), None)?)?
                .clamp(Some(-1.0), Some(1.0))?;
            codes.push(self.bucketize(&scaled)?);
            absmax.push(m);
        }
        let cat = |v: Vec<Tensor>| -> Result<Tensor> {
            match &v[..] {
                [one] => Ok(one.clone()),
                _ => Tensor::cat(&v.iter().collect::<Vec<_>>(), 0),
            }
        };
        let codes = cat(codes)?.reshape(&shape)?.cast(DType::U8)?;
        Ok((codes, cat(absmax)?))
    }

    /// The f32 values `codes` (u8) and `absmax` stand for, in `codes`' shape.
    pub fn dequantize(&self, codes: &Tensor, absmax: &Tensor) -> Result<Tensor> {
        let shape: Vec<i64> = codes.shape()?.iter().map(|&d| d as i64).collect();
        let idx = codes.cast(DType::F32)?.reshape(&[-1])?.cast(DType::I64)?;
        let values = self.values.index_select(0, &idx)?;
        let n = values.dim(0)?;
        let blocks = absmax.dim(0)?;
        if blocks != n.div_ceil(BLOCK) {
            return Err(ferrite_plugin_api::Error(format!(
                "8-bit optimizer state: {n} codes need {} block scales, the state has {blocks}",
                n.div_ceil(BLOCK)
            )));
        }
        let padded = values.pad(&[0, blocks * BLOCK - n], 0.0)?;
        padded
            .reshape(&[blocks as i64, BLOCK as i64])?
            .mul(&absmax.reshape(&[-1, 1])?)?
            .reshape(&[-1])?
            .narrow(0, 0, n)?
            .reshape(&shape)
    }
}
