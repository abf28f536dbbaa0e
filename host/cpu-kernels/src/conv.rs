//! 2-D convolution (NCHW, one group): 3×3 at stride 1 by Winograd's transform
//! ([`crate::winograd`]), any other as im2col and one gemm per band of output rows: the
//! band's columns (`Cin·kh·kw × rows·Wo`) are laid out in parallel, then one multithreaded gemm
//! multiplies the kernel by them. Bands keep the columns near [`COLUMNS_BUDGET`] floats so a
//! VAE-sized image does not need gigabytes of them.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::winograd;

/// Column floats per band (64 MiB).
const COLUMNS_BUDGET: usize = 1 << 24;

/// A convolution's geometry: input `[n, cin, h, w]`, kernel `[cout, cin, kh, kw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl Conv {
    /// The output's height and width (zero where the kernel does not fit).
    pub fn out_size(&self) -> [usize; 2] {
        let dim = |size: usize, k: usize, i: usize| {
            let span = self.dilation[i] * (k - 1) + 1;
            (size + 2 * self.padding[i])
                .checked_sub(span)
                .map_or(0, |r| r / self.stride[i] + 1)
        };
        [dim(self.h, self.kh, 0), dim(self.w, self.kw, 1)]
    }
}

/// `conv2d(x, weight) + bias`, `[n, cout, ho, wo]` row-major: Winograd's for a 3×3 kernel at
/// stride 1 ([`crate::winograd`]), im2col's otherwise.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, c: Conv) -> Vec<f32> {
    if winograd::applies(&c) {
        return winograd::conv2d(x, weight, bias, c);
    }
    im2col_conv2d(x, weight, bias, c)
}

/// [`conv2d`] as im2col and one gemm per band.
fn im2col_conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, c: Conv) -> Vec<f32> {
    im2col_in_bands(x, weight, bias, c, COLUMNS_BUDGET)
}

/// Calls `f(image, first output row, columns)` for each band of about `budget` column floats
/// of each image, the band's columns laid out by [`im2col`] (nothing when the output or the
/// kernel is empty).
fn for_each_band(x: &[f32], c: &Conv, budget: usize, mut f: impl FnMut(usize, usize, &[f32])) {
    let [ho, wo] = c.out_size();
    let k = c.cin * c.kh * c.kw;
    if ho * wo == 0 || k == 0 {
        return;
    }
    let band_rows = (budget / (k * wo)).clamp(1, ho);
    let mut cols = vec![0f32; k * band_rows * wo];
    for (img, x) in x.chunks(c.cin * c.h * c.w).take(c.n).enumerate() {
        for oy0 in (0..ho).step_by(band_rows) {
            let rows = band_rows.min(ho - oy0);
            let cols = &mut cols[..k * rows * wo];
            im2col(x, cols, c, oy0, rows, wo);
            f(img, oy0, cols);
        }
    }
}

/// [`im2col_conv2d`] in bands of about `budget` column floats.
fn im2col_in_bands(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c: Conv,
    budget: usize,
) -> Vec<f32> {
    let [ho, wo] = c.out_size();
    let plane = ho * wo;
    let k = c.cin * c.kh * c.kw;
    let mut out = vec![0f32; c.n * c.cout * plane];
    for_each_band(x, &c, budget, |img, oy0, cols| {
        let len = cols.len() / k;
        let out = &mut out[img * c.cout * plane..][..c.cout * plane];
        // SAFETY: out holds cout rows of `plane` from offset oy0·wo (len each), weight is
        // cout × k and cols k × len, all row-major.
        unsafe {
            gemm(
                c.cout,
                len,
                k,
                out.as_mut_ptr().add(oy0 * wo),
                1,
                plane as isize,
                false,
                weight.as_ptr(),
                1,
                k as isize,
                cols.as_ptr(),
                1,
                len as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(0),
            )
        }
    });
    if let (Some(b), true) = (bias, plane > 0) {
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(p, o)| o.iter_mut().for_each(|v| *v += b[p % c.cout]));
    }
    out
}

/// The kernel's gradient `[cout, cin, kh, kw]` of [`conv2d`] given the output's (`grad`,
/// `[n, cout, ho, wo]`): per band of output rows, the gradient times the band's columns
/// transposed, accumulated in one `cout × cin·kh·kw` gemm each (burn's default convolves the
/// input by the gradient as a kernel: one thin product per input channel).
pub fn conv2d_weight_grad(x: &[f32], grad: &[f32], c: Conv) -> Vec<f32> {
    weight_grad_in_bands(x, grad, c, COLUMNS_BUDGET)
}

fn weight_grad_in_bands(x: &[f32], grad: &[f32], c: Conv, budget: usize) -> Vec<f32> {
    let [ho, wo] = c.out_size();
    let plane = ho * wo;
    let k = c.cin * c.kh * c.kw;
    let mut dw = vec![0f32; c.cout * k];
    let mut first = true;
    for_each_band(x, &c, budget, |img, oy0, cols| {
        let len = cols.len() / k;
        let g = &grad[img * c.cout * plane..][..c.cout * plane];
        // SAFETY: g holds cout rows of `plane` from offset oy0·wo (len each), cols is k × len
        // (read transposed: len × k), dw cout × k, all row-major.
        unsafe {
            gemm(
                c.cout,
                k,
                len,
                dw.as_mut_ptr(),
                1,
                k as isize,
                !first,
                g.as_ptr().add(oy0 * wo),
                1,
                plane as isize,
                cols.as_ptr(),
                len as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(0),
            )
        }
        first = false;
    });
    dw
}

/// Output rows `oy0..oy0 + rows` of image `x` as columns: row `(ci·kh + a)·kw + b` holds the
/// input under kernel tap (a, b) for each output position (0 in the padding).
fn im2col(x: &[f32], cols: &mut [f32], c: &Conv, oy0: usize, rows: usize, wo: usize) {
    let len = rows * wo;
    let [sy, sx] = c.stride;
    let [py, px] = c.padding;
    let [dy, dx] = c.dilation;
    cols.par_chunks_mut(len).enumerate().for_each(|(r, col)| {
        let (ci, tap) = (r / (c.kh * c.kw), r % (c.kh * c.kw));
        let (a, b) = (tap / c.kw, tap % c.kw);
        let src = &x[ci * c.h * c.w..][..c.h * c.w];
        for (oy, dst) in (oy0..oy0 + rows).zip(col.chunks_mut(wo)) {
            let iy = (oy * sy + a * dy).wrapping_sub(py);
            if iy >= c.h {
                dst.fill(0.0);
                continue;
            }
            let line = &src[iy * c.w..][..c.w];
            // Output columns whose input column lies inside the row: ox ∈ [lo, hi).
            let first = px.saturating_sub(b * dx).div_ceil(sx);
            let last = (c.w + px)
                .checked_sub(b * dx)
                .map_or(0, |e| e.div_ceil(sx))
                .min(wo);
            let (lo, hi) = (first.min(last), last);
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if hi > lo && sx == 1 {
                let start = lo + b * dx - px;
                dst[lo..hi].copy_from_slice(&line[start..start + hi - lo]);
            } else {
                for (ox, d) in (lo..hi).zip(&mut dst[lo..hi]) {
                    *d = line[ox * sx + b * dx - px];
                }
            }
        }
    });
}

/// A kernel `[cout, cin, kh, kw]` as `[cin, cout, kh, kw]` rotated by 180°: the kernel whose
/// stride-1 convolution of the output's gradient is the input's gradient.
pub fn flip_transpose(weight: &[f32], cout: usize, cin: usize, kh: usize, kw: usize) -> Vec<f32> {
    let taps = kh * kw;
    let mut out = vec![0f32; weight.len()];
    for co in 0..cout {
        for ci in 0..cin {
            let src = &weight[(co * cin + ci) * taps..][..taps];
            let dst = &mut out[(ci * cout + co) * taps..][..taps];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output at a time.
    fn naive(x: &[f32], w: &[f32], bias: Option<&[f32]>, c: Conv) -> Vec<f32> {
        let [ho, wo] = c.out_size();
        let mut out = vec![0f32; c.n * c.cout * ho * wo];
        for n in 0..c.n {
            for co in 0..c.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias.map_or(0.0, |b| b[co]);
                        for ci in 0..c.cin {
                            for a in 0..c.kh {
                                for b in 0..c.kw {
                                    let iy = (oy * c.stride[0] + a * c.dilation[0]) as isize
                                        - c.padding[0] as isize;
                                    let ix = (ox * c.stride[1] + b * c.dilation[1]) as isize
                                        - c.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize
                                    {
                                        continue;
                                    }
                                    acc += x[((n * c.cin + ci) * c.h + iy as usize) * c.w
                                        + ix as usize]
                                        * w[((co * c.cin + ci) * c.kh + a) * c.kw + b];
                                }
                            }
                        }
                        out[((n * c.cout + co) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::uniform(len, seed, -0.5)
    }

    /// The kernel's gradient of `Σ conv2d(x, w) · g` by its definition: Σ over outputs of
    /// g · the input under each tap.
    fn naive_weight_grad(x: &[f32], g: &[f32], c: Conv) -> Vec<f32> {
        let [ho, wo] = c.out_size();
        let mut dw = vec![0f32; c.cout * c.cin * c.kh * c.kw];
        for (k, d) in dw.iter_mut().enumerate() {
            let (co, ci, a, b) = (
                k / (c.cin * c.kh * c.kw),
                k / (c.kh * c.kw) % c.cin,
                k / c.kw % c.kh,
                k % c.kw,
            );
            // The gradient of one weight is the convolution with that tap alone set.
            let mut unit = vec![0f32; c.cin * c.kh * c.kw];
            unit[(ci * c.kh + a) * c.kw + b] = 1.0;
            let one = Conv { cout: 1, ..c };
            let y = naive(x, &unit, None, one);
            *d = (0..c.n)
                .flat_map(|n| (0..ho * wo).map(move |p| (n, p)))
                .map(|(n, p)| y[n * ho * wo + p] * g[(n * c.cout + co) * ho * wo + p])
                .sum();
        }
        dw
    }

    #[test]
    fn equals_the_definition() {
        let cases = [
            (2, 3, 7, 9, 4, 3, 3, [1, 1], [1, 1], [1, 1]),
            (1, 2, 8, 8, 3, 3, 3, [2, 2], [1, 1], [1, 1]),
            (1, 2, 6, 5, 2, 1, 1, [1, 1], [0, 0], [1, 1]),
            (1, 1, 9, 9, 2, 3, 2, [1, 2], [2, 0], [2, 1]),
            (1, 1, 2, 2, 1, 3, 3, [1, 1], [2, 2], [1, 1]),
            (2, 5, 6, 11, 3, 3, 3, [1, 1], [0, 2], [1, 1]),
            (1, 4, 10, 10, 6, 3, 3, [1, 1], [1, 1], [1, 1]),
            // Past Winograd's threshold (33×33 outputs): conv2d takes it.
            (1, 2, 33, 33, 3, 3, 3, [1, 1], [1, 1], [1, 1]),
            // More kernels (17 · 16) than one block of the kernel transform.
            (1, 17, 8, 8, 16, 3, 3, [1, 1], [1, 1], [1, 1]),
        ];
        for (n, cin, h, w, cout, kh, kw, stride, padding, dilation) in cases {
            let c = Conv {
                n,
                cin,
                h,
                w,
                cout,
                kh,
                kw,
                stride,
                padding,
                dilation,
            };
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * kh * kw, 2);
            let b = values(cout, 3);
            let want = naive(&x, &wt, Some(&b), c);
            let mut ways = vec![
                ("conv2d", conv2d(&x, &wt, Some(&b), c)),
                ("im2col", im2col_conv2d(&x, &wt, Some(&b), c)),
                // A band of one output row at a time.
                ("im2col in bands", im2col_in_bands(&x, &wt, Some(&b), c, 1)),
            ];
            if winograd::computes(&c) {
                ways.push(("winograd", winograd::conv2d(&x, &wt, Some(&b), c)));
                // A band of one tile row at a time.
                let banded = winograd::conv2d_in_bands(&x, &wt, Some(&b), c, 1);
                ways.push(("winograd in bands", banded));
            }
            let g = values(c.n * c.cout * c.out_size()[0] * c.out_size()[1], 4);
            let dw_want = naive_weight_grad(&x, &g, c);
            for (way, dw) in [
                ("weight grad", conv2d_weight_grad(&x, &g, c)),
                ("weight grad in bands", weight_grad_in_bands(&x, &g, c, 1)),
            ] {
                let worst = crate::worst_diff(&dw, &dw_want);
                assert!(worst < 1e-4, "{way} {c:?}: {worst}");
            }
            for (way, got) in ways {
                let worst = crate::worst_diff(&got, &want);
                assert!(worst < 1e-5, "{way} {c:?}: {worst}");
            }
        }
    }
}
