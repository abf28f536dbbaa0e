//! f32 attention as FlashAttention's recurrence over blocks of query rows, on plain
//! slices: one gemm per product and one pass over each block's scores for the softmax, where
//! the runtime's composed version (`ferrite_runtime::attention`) runs a dozen of flex's single-threaded
//! elementwise ops (broadcast ones element by element) per chunk. Blocks run in parallel on
//! rayon's pool; each gemm runs on one thread. Inputs are contiguous `[BH, L, D]`.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::rows;

/// Query rows per block: a block's scores are `ROWS · Lk` floats (2 MiB at Lk = 4096).
const ROWS: usize = 128;

/// Sizes of one attention: `bh` batch·heads, `lq` query rows, `lk` keys, `d` the query/key
/// width, `dv` the value width.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// A row-major `rows × cols` matrix at `ptr`, or its transpose (`t`), as gemm's strides.
#[derive(Clone, Copy)]
struct Mat<P> {
    ptr: P,
    rs: isize,
    cs: isize,
}

fn mat(s: &[f32], cols: usize) -> Mat<*const f32> {
    Mat {
        ptr: s.as_ptr(),
        rs: cols as isize,
        cs: 1,
    }
}

fn t(s: &[f32], cols: usize) -> Mat<*const f32> {
    Mat {
        ptr: s.as_ptr(),
        rs: 1,
        cs: cols as isize,
    }
}

/// `dst = (acc ? dst : 0) + scale · lhs · rhs` for an `m × k` lhs and a `k × n` rhs, `dst`
/// row-major `m × n`.
#[allow(clippy::too_many_arguments)]
fn mul(
    dst: &mut [f32],
    acc: bool,
    lhs: Mat<*const f32>,
    rhs: Mat<*const f32>,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: callers pass slices holding the m×k, k×n and m×n elements these strides reach.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `softmax(q kᵀ · scale) v` and each query row's log-sum-exp of the scaled scores.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], n: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Dims { lq, lk, d, dv, .. } = n;
    let mut out = vec![0f32; n.bh * lq * dv];
    let mut lse = vec![0f32; n.bh * lq];
    let mut blocks = Vec::new();
    for (h, (o, l)) in out.chunks_mut(lq * dv).zip(lse.chunks_mut(lq)).enumerate() {
        for (b, (o, l)) in o.chunks_mut(ROWS * dv).zip(l.chunks_mut(ROWS)).enumerate() {
            blocks.push((h, b * ROWS, o, l));
        }
    }
    blocks.into_par_iter().for_each_init(
        || (vec![0f32; ROWS * lk], vec![0f32; ROWS]),
        |(s, inv), (h, r0, o, l)| {
            let rows = l.len();
            let qb = &q[(h * lq + r0) * d..][..rows * d];
            let (kh, vh) = (&k[h * lk * d..][..lk * d], &v[h * lk * dv..][..lk * dv]);
            let (s, inv) = (&mut s[..rows * lk], &mut inv[..rows]);
            mul(s, false, mat(qb, d), t(kh, d), rows, lk, d, scale);
            rows::softmax_numerators(s, lk, l, inv);
            // Normalised after the product: rows × dv values instead of rows × Lk.
            mul(o, false, mat(s, lk), mat(vh, dv), rows, dv, lk, 1.0);
            for (o, &i) in o.chunks_mut(dv).zip(inv.iter()) {
                o.iter_mut().for_each(|x| *x *= i);
            }
        },
    );
    (out, lse)
}

/// The gradients of q, k and v (`[dq, dk, dv]`) given the output's, recomputing each block's
/// probabilities from the log-sum-exp. Blocks of one head share its dk and dv: the heads'
/// row ranges split into as many groups as keep every thread busy, each with its own dk and dv
/// summed at the end.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad: &[f32],
    n: Dims,
    scale: f32,
) -> [Vec<f32>; 3] {
    let Dims { lq, lk, d, dv, .. } = n;
    let blocks_per_head = lq.div_ceil(ROWS).max(1);
    let groups = rayon::current_num_threads()
        .div_ceil(n.bh)
        .clamp(1, blocks_per_head);
    let group_rows = blocks_per_head.div_ceil(groups) * ROWS;
    let mut dq = vec![0f32; n.bh * lq * d];
    let mut pk = vec![0f32; n.bh * groups * lk * d];
    let mut pv = vec![0f32; n.bh * groups * lk * dv];
    let mut tasks = Vec::new();
    for (h, ((dqh, pkh), pvh)) in dq
        .chunks_mut(lq * d)
        .zip(pk.chunks_mut(groups * lk * d))
        .zip(pv.chunks_mut(groups * lk * dv))
        .enumerate()
    {
        for (g, ((dqg, pkg), pvg)) in dqh
            .chunks_mut(group_rows * d)
            .zip(pkh.chunks_mut(lk * d))
            .zip(pvh.chunks_mut(lk * dv))
            .enumerate()
        {
            tasks.push((h, g * group_rows, dqg, pkg, pvg));
        }
    }
    tasks.into_par_iter().for_each_init(
        || (vec![0f32; ROWS * lk], vec![0f32; ROWS * lk]),
        |(p, ds), (h, r0, dqg, dkh, dvh)| {
            let (kh, vh) = (&k[h * lk * d..][..lk * d], &v[h * lk * dv..][..lk * dv]);
            for (b, dqb) in dqg.chunks_mut(ROWS * d).enumerate() {
                let start = h * lq + r0 + b * ROWS;
                let rows = dqb.len() / d;
                let qb = &q[start * d..][..rows * d];
                let (ob, gb) = (
                    &out[start * dv..][..rows * dv],
                    &grad[start * dv..][..rows * dv],
                );
                let (p, ds) = (&mut p[..rows * lk], &mut ds[..rows * lk]);
                mul(p, false, mat(qb, d), t(kh, d), rows, lk, d, scale);
                rows::exp_shifted(p, lk, &lse[start..start + rows]);
                mul(dvh, true, t(p, lk), mat(gb, dv), lk, dv, rows, 1.0);
                mul(ds, false, mat(gb, dv), t(vh, dv), rows, lk, dv, 1.0);
                // Dᵢ = Σ dOᵢ Oᵢ: the softmax backward's row term.
                let di: Vec<f32> = gb
                    .chunks(dv)
                    .zip(ob.chunks(dv))
                    .map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum())
                    .collect();
                rows::softmax_backward(ds, p, lk, &di, scale);
                mul(dqb, false, mat(ds, lk), mat(kh, d), rows, d, lk, 1.0);
                mul(dkh, true, t(ds, lk), mat(qb, d), lk, d, rows, 1.0);
            }
        },
    );
    [
        dq,
        sum_groups(pk, groups, lk * d),
        sum_groups(pv, groups, lk * dv),
    ]
}

/// `[BH, groups, len]` summed over the groups.
fn sum_groups(parts: Vec<f32>, groups: usize, len: usize) -> Vec<f32> {
    if groups == 1 {
        return parts;
    }
    parts
        .chunks(groups * len)
        .flat_map(|head| {
            let mut total = head[..len].to_vec();
            for part in head[len..].chunks(len) {
                total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
            }
            total
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::uniform(len, seed, -2.0)
    }

    /// Rows split into groups with their own dk and dv (as many as threads) sum to what one
    /// group gives: one head of 700 rows (6 blocks) on 1, 3 and 8 threads.
    #[test]
    fn groups_of_rows_sum_to_one_group() {
        let n = Dims {
            bh: 1,
            lq: 700,
            lk: 50,
            d: 8,
            dv: 6,
        };
        let (q, k) = (values(700 * 8, 1), values(50 * 8, 2));
        let (v, g) = (values(50 * 6, 3), values(700 * 6, 4));
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (out, lse) = forward(&q, &k, &v, n, 0.3);
                backward(&q, &k, &v, &out, &lse, &g, n, 0.3)
            })
        };
        let one = on(1);
        for threads in [3, 8] {
            for (a, b) in on(threads).iter().zip(&one) {
                let worst = crate::worst_diff(a, b);
                assert!(worst < 1e-4, "{threads} threads: {worst}");
            }
        }
    }
}
