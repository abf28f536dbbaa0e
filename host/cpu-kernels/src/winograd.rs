//! 3×3 stride-1 convolution by Winograd's F(2×2, 3×3): each 2×2 block of outputs comes from a
//! 4×4 block of inputs through 16 products instead of 36, so the channel reduction is 16
//! matrix products (`cout × cin` by `cin × tiles`, one per position of the transformed tile)
//! holding 2.25× fewer multiply-adds than im2col's one. Bands of tile rows keep the transformed
//! input and output near [`BUDGET`] floats. F(2×2, 3×3)'s transforms multiply by 0, ±1 and ½
//! only: its rounding error stays near the direct sum's (within 1e-5 of it in the tests), where
//! F(4×4, 3×3), which saves more, is known to lose digits in f32.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::conv::Conv;

/// Transformed floats per band (16 · channels · tiles): 64 MiB for the input's and as much for
/// the products'.
const BUDGET: usize = 1 << 24;

/// Output positions below which im2col is used: with few tiles the 16 products are too thin
/// for gemm, and transforming the kernel (16/9 of its size, every call) costs more than the
/// multiply-adds saved (SD 1.5's 1280-channel blocks at 256² run at 8×8 and 4×4).
const MIN_OUTPUTS: usize = 32 * 32;

/// Whether [`conv2d`] can compute `c`: a 3×3 kernel at stride 1, undilated.
pub(crate) fn computes(c: &Conv) -> bool {
    c.kh == 3 && c.kw == 3 && c.stride == [1, 1] && c.dilation == [1, 1]
}

/// Whether [`conv2d`] computes `c` faster than im2col.
pub fn applies(c: &Conv) -> bool {
    let [ho, wo] = c.out_size();
    computes(c) && ho * wo >= MIN_OUTPUTS
}

/// Kernels transformed per block: the block's 16 planes are written as runs of this many.
const KERNEL_BLOCK: usize = 256;

/// `U = G g Gᵀ` of every 3×3 kernel, as `[16][cout][cin]`: blocks of kernels in parallel, each
/// transformed into a local buffer and then written plane by plane (a write per plane and
/// kernel would stride across all 16 planes).
fn transform_kernel(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    let blocks: Vec<[Vec<f32>; 16]> = weight
        .par_chunks(9 * KERNEL_BLOCK)
        .map(|block| {
            let mut planes: [Vec<f32>; 16] = Default::default();
            for g in block.chunks(9) {
                // Rows: t = G g (4×3).
                let mut t = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                    t[0][j] = a;
                    t[1][j] = 0.5 * (a + b + c);
                    t[2][j] = 0.5 * (a - b + c);
                    t[3][j] = c;
                }
                // Columns: U = t Gᵀ (4×4).
                for (i, r) in t.iter().enumerate() {
                    let (a, b, c) = (r[0], r[1], r[2]);
                    let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (j, v) in row.into_iter().enumerate() {
                        planes[i * 4 + j].push(v);
                    }
                }
            }
            planes
        })
        .collect();
    let mut u = Vec::with_capacity(16 * plane);
    for p in 0..16 {
        for b in &blocks {
            u.extend_from_slice(&b[p]);
        }
    }
    u
}

/// `conv2d(x, weight) + bias` for a 3×3 kernel at stride 1 ([`applies`]), `[n, cout, ho, wo]`.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, c: Conv) -> Vec<f32> {
    conv2d_in_bands(x, weight, bias, c, BUDGET)
}

/// [`conv2d`] in bands of about `budget` transformed floats.
pub(crate) fn conv2d_in_bands(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c: Conv,
    budget: usize,
) -> Vec<f32> {
    let [ho, wo] = c.out_size();
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let mut out = vec![0f32; c.n * c.cout * ho * wo];
    if ho == 0 || wo == 0 {
        return out;
    }
    let u = transform_kernel(weight, c.cout, c.cin);
    let band = (budget / (16 * c.cin.max(c.cout) * tw)).clamp(1, th);
    let mut v = vec![0f32; 16 * c.cin * band * tw];
    let mut m = vec![0f32; 16 * c.cout * band * tw];
    for (img, out) in out.chunks_mut(c.cout * ho * wo).enumerate() {
        let x = &x[img * c.cin * c.h * c.w..][..c.cin * c.h * c.w];
        for ty0 in (0..th).step_by(band) {
            let rows = band.min(th - ty0);
            let tiles = rows * tw;
            let (v, m) = (&mut v[..16 * c.cin * tiles], &mut m[..16 * c.cout * tiles]);
            transform_input(x, v, &c, ty0, rows, tw);
            // One product per transformed position, in parallel.
            m.par_chunks_mut(c.cout * tiles)
                .zip(v.par_chunks(c.cin * tiles))
                .zip(u.par_chunks(c.cout * c.cin))
                .for_each(|((m, v), u)| {
                    // SAFETY: m is cout × tiles, u cout × cin and v cin × tiles, row-major.
                    unsafe {
                        gemm(
                            c.cout,
                            tiles,
                            c.cin,
                            m.as_mut_ptr(),
                            1,
                            tiles as isize,
                            false,
                            u.as_ptr(),
                            1,
                            c.cin as isize,
                            v.as_ptr(),
                            1,
                            tiles as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        )
                    }
                });
            transform_output(m, out, bias, &c, ty0, rows, tw, [ho, wo]);
        }
    }
    out
}

/// `V = Bᵀ d B` of each 4×4 input block of tile rows `ty0..ty0 + rows`, as `[16][cin][tiles]`.
fn transform_input(x: &[f32], v: &mut [f32], c: &Conv, ty0: usize, rows: usize, tw: usize) {
    let tiles = rows * tw;
    let [py, px] = c.padding;
    // Each channel's 16 planes are `tiles` apart within the position's block of cin · tiles.
    let mut per_channel: Vec<Vec<&mut [f32]>> = (0..c.cin).map(|_| Vec::new()).collect();
    for plane in v.chunks_mut(c.cin * tiles) {
        for (ci, chunk) in plane.chunks_mut(tiles).enumerate() {
            per_channel[ci].push(chunk);
        }
    }
    per_channel
        .into_par_iter()
        .enumerate()
        .for_each(|(ci, mut planes)| {
            let src = &x[ci * c.h * c.w..][..c.h * c.w];
            let at = |iy: usize, ix: usize| -> f32 {
                // Coordinates shifted by the padding: below it wraps and reads as outside.
                let (y, x) = (iy.wrapping_sub(py), ix.wrapping_sub(px));
                if y < c.h && x < c.w {
                    src[y * c.w + x]
                } else {
                    0.0
                }
            };
            // (t indexes all 16 planes.)
            #[allow(clippy::needless_range_loop)]
            for t in 0..tiles {
                let (oy, ox) = (2 * (ty0 + t / tw), 2 * (t % tw));
                let mut d = [[0f32; 4]; 4];
                for (i, row) in d.iter_mut().enumerate() {
                    for (j, e) in row.iter_mut().enumerate() {
                        *e = at(oy + i, ox + j);
                    }
                }
                // Rows: Bᵀ d.
                let mut r = [[0f32; 4]; 4];
                for j in 0..4 {
                    r[0][j] = d[0][j] - d[2][j];
                    r[1][j] = d[1][j] + d[2][j];
                    r[2][j] = d[2][j] - d[1][j];
                    r[3][j] = d[1][j] - d[3][j];
                }
                // Columns: (Bᵀ d) B.
                for (i, r) in r.iter().enumerate() {
                    let row = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]];
                    for (j, val) in row.into_iter().enumerate() {
                        planes[i * 4 + j][t] = val;
                    }
                }
            }
        });
}

/// `Y = Aᵀ M A` of each tile, plus the bias, into the output rows it covers.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    out: &mut [f32],
    bias: Option<&[f32]>,
    c: &Conv,
    ty0: usize,
    rows: usize,
    tw: usize,
    [ho, wo]: [usize; 2],
) {
    let tiles = rows * tw;
    out.par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(co, plane)| {
            let b = bias.map_or(0.0, |b| b[co]);
            let at = |p: usize, t: usize| m[(p * c.cout + co) * tiles + t];
            for t in 0..tiles {
                let (oy, ox) = (2 * (ty0 + t / tw), 2 * (t % tw));
                // Rows: Aᵀ M (2×4).
                let (mut r0, mut r1) = ([0f32; 4], [0f32; 4]);
                for (j, (a, b)) in r0.iter_mut().zip(&mut r1).enumerate() {
                    let (m0, m1, m2, m3) = (at(j, t), at(4 + j, t), at(8 + j, t), at(12 + j, t));
                    *a = m0 + m1 + m2;
                    *b = m1 - m2 - m3;
                }
                let r = [r0, r1];
                for (i, r) in r.iter().enumerate() {
                    let y = oy + i;
                    if y >= ho {
                        continue;
                    }
                    let pair = [r[0] + r[1] + r[2], r[1] - r[2] - r[3]];
                    for (j, val) in pair.into_iter().enumerate() {
                        if ox + j < wo {
                            plane[y * wo + ox + j] = val + b;
                        }
                    }
                }
            }
        });
}
