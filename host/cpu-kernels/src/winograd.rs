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
/// Each tile row is computed a row of tiles at a time: the block's four input rows are split
/// into even and odd columns, so that every one of the 16 values is an elementwise pass over
/// the row's tiles, which the compiler vectorises.
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
    // Input columns a tile row reads: 2 per tile and the last tile's 2 more.
    let width = 2 * tw + 2;
    per_channel
        .into_par_iter()
        .enumerate()
        .for_each(|(ci, mut planes)| {
            let src = &x[ci * c.h * c.w..][..c.h * c.w];
            let mut row = vec![0f32; width];
            // Bᵀ d's rows, each as its even and odd columns (tw + 1 each).
            let mut even = vec![vec![0f32; tw + 1]; 4];
            let mut odd = vec![vec![0f32; tw + 1]; 4];
            let mut d_even = vec![vec![0f32; tw + 1]; 4];
            let mut d_odd = vec![vec![0f32; tw + 1]; 4];
            for ry in 0..rows {
                let oy = 2 * (ty0 + ry);
                for i in 0..4 {
                    // The padded input row, zeros outside the image.
                    row.fill(0.0);
                    let y = (oy + i).wrapping_sub(py);
                    if y < c.h && px < width {
                        let n = c.w.min(width - px);
                        row[px..px + n].copy_from_slice(&src[y * c.w..][..n]);
                    }
                    for ((e, o), pair) in d_even[i]
                        .iter_mut()
                        .zip(&mut d_odd[i])
                        .zip(row.chunks_exact(2))
                    {
                        (*e, *o) = (pair[0], pair[1]);
                    }
                }
                // Rows: Bᵀ d, on the even and the odd columns alike.
                rows_bt(&d_even, &mut even);
                rows_bt(&d_odd, &mut odd);
                // Columns: (Bᵀ d) B. Tile t's row is (e[t], o[t], e[t + 1], o[t + 1]).
                for i in 0..4 {
                    let (e, o) = (&even[i][..tw + 1], &odd[i][..tw + 1]);
                    let [p0, p1, p2, p3] = &mut planes[4 * i..4 * i + 4] else {
                        unreachable!("16 planes")
                    };
                    let at = ry * tw;
                    let (p0, p1, p2, p3) = (
                        &mut p0[at..at + tw],
                        &mut p1[at..at + tw],
                        &mut p2[at..at + tw],
                        &mut p3[at..at + tw],
                    );
                    for t in 0..tw {
                        p0[t] = e[t] - e[t + 1];
                        p1[t] = o[t] + e[t + 1];
                        p2[t] = e[t + 1] - o[t];
                        p3[t] = o[t] - o[t + 1];
                    }
                }
            }
        });
}

/// `r = Bᵀ d` for four rows of `d`, column by column.
fn rows_bt(d: &[Vec<f32>], r: &mut [Vec<f32>]) {
    let n = d[0].len();
    let (d0, d1, d2, d3) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n]);
    let [r0, r1, r2, r3] = r else {
        unreachable!("four rows")
    };
    let (r0, r1, r2, r3) = (&mut r0[..n], &mut r1[..n], &mut r2[..n], &mut r3[..n]);
    for k in 0..n {
        r0[k] = d0[k] - d2[k];
        r1[k] = d1[k] + d2[k];
        r2[k] = d2[k] - d1[k];
        r3[k] = d1[k] - d3[k];
    }
}

/// `Y = Aᵀ M A` of each tile, plus the bias, into the output rows it covers: like the input's,
/// a row of tiles at a time, each value an elementwise pass over the row's tiles.
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
            // Aᵀ M's two rows, by column of the tile.
            let mut r = vec![vec![0f32; tw]; 8];
            for ry in 0..rows {
                let at = |p: usize| &m[(p * c.cout + co) * tiles + ry * tw..][..tw];
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (at(j), at(4 + j), at(8 + j), at(12 + j));
                    let [r0, r1] = r.get_disjoint_mut([j, 4 + j]).expect("distinct rows");
                    let (r0, r1) = (&mut r0[..tw], &mut r1[..tw]);
                    for t in 0..tw {
                        r0[t] = m0[t] + m1[t] + m2[t];
                        r1[t] = m1[t] - m2[t] - m3[t];
                    }
                }
                for i in 0..2 {
                    let y = 2 * (ty0 + ry) + i;
                    if y >= ho {
                        continue;
                    }
                    let (r0, r1, r2, r3) = (
                        &r[4 * i][..tw],
                        &r[4 * i + 1][..tw],
                        &r[4 * i + 2][..tw],
                        &r[4 * i + 3][..tw],
                    );
                    let line = &mut plane[y * wo..][..wo];
                    let mut pairs = line.chunks_exact_mut(2);
                    for (t, pair) in (&mut pairs).enumerate() {
                        pair[0] = r0[t] + r1[t] + r2[t] + b;
                        pair[1] = r1[t] - r2[t] - r3[t] + b;
                    }
                    // An odd width's last tile has only its first column inside.
                    if let [last] = pairs.into_remainder() {
                        let t = tw - 1;
                        *last = r0[t] + r1[t] + r2[t] + b;
                    }
                }
            }
        });
}
