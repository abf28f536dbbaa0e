//! `silu(group_norm(x) · w + b)`, every resnet's norm and activation, forward and backward as
//! one pass per group: the composed op runs a dozen single-threaded passes over the activation
//! (centre, square, mean, scale, affine, sigmoid, product, and as many back). Groups run in
//! parallel; the elementwise work runs through [`crate::rows`]' vectorised passes.

use rayon::prelude::*;

use crate::rows;

/// `x` as `[n, c, len]` (`len` the product of the spatial sizes), normalised in `groups`
/// groups of `c / groups` channels. The kernels take `c` and `len` above 0 and `groups`
/// dividing `c` (the runtime leaves other shapes to the composed op).
#[derive(Clone, Copy, Debug)]
pub struct Groups {
    pub n: usize,
    pub c: usize,
    pub len: usize,
    pub groups: usize,
}

impl Groups {
    /// Elements per group.
    fn size(&self) -> usize {
        self.c / self.groups * self.len
    }

    /// The weight and bias of group `i`'s channels in order (`i` counts groups across images);
    /// an absent weight is 1, an absent bias 0.
    fn affine<'a>(
        &self,
        i: usize,
        w: Option<&'a [f32]>,
        b: Option<&'a [f32]>,
    ) -> impl Iterator<Item = (f32, f32)> + 'a {
        let cpg = self.c / self.groups;
        let c0 = i % self.groups * cpg;
        (c0..c0 + cpg).map(move |c| (w.map_or(1.0, |w| w[c]), b.map_or(0.0, |b| b[c])))
    }
}

/// The normalised input, each group's reciprocal standard deviation (`[n, groups]`) and the
/// output.
pub fn forward(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    g: Groups,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let size = g.size();
    let mut y = vec![0f32; x.len()];
    let mut out = vec![0f32; x.len()];
    let mut rstd = vec![0f32; g.n * g.groups];
    y.par_chunks_mut(size)
        .zip(out.par_chunks_mut(size))
        .zip(x.par_chunks(size))
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(i, (((y, out), x), r))| {
            let inv = 1.0 / size as f32;
            let mean = rows::sum(x) * inv;
            *r = 1.0 / (rows::centred_squares(x, mean) * inv + eps).sqrt();
            let channels = y
                .chunks_mut(g.len)
                .zip(out.chunks_mut(g.len))
                .zip(x.chunks(g.len))
                .zip(g.affine(i, w, b));
            for (((y, out), x), (scale, shift)) in channels {
                rows::normalise_silu(x, mean, *r, scale, shift, y, out);
            }
        });
    (y, rstd, out)
}

/// The gradients of the input (when `input_grad`) and of the weight and the bias (`[c]` each;
/// an absent one's is that of a weight of ones, a bias of zeros), from the output's gradient
/// `dout` and what [`forward`] kept.
pub fn backward(
    y: &[f32],
    rstd: &[f32],
    dout: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    g: Groups,
    input_grad: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let size = g.size();
    let mut dx = vec![0f32; y.len()];
    // Per image, each channel's Σ dz · y and Σ dz (the weight's and the bias's gradients).
    let mut sums = vec![[0f32; 2]; g.n * g.c];
    dx.par_chunks_mut(size)
        .zip(y.par_chunks(size))
        .zip(dout.par_chunks(size))
        .zip(rstd.par_iter())
        .zip(sums.par_chunks_mut(g.c / g.groups))
        .enumerate()
        .for_each(|(i, ((((dx, y), dout), &r), sums))| {
            // dx first holds dy = dz · w, then the input's gradient.
            let (mut m1, mut m2) = (0f32, 0f32);
            let channels = dx
                .chunks_mut(g.len)
                .zip(y.chunks(g.len))
                .zip(dout.chunks(g.len))
                .zip(g.affine(i, w, b))
                .zip(sums.iter_mut());
            for ((((dy, y), dout), (scale, shift)), sum) in channels {
                let [dzy, dz] = rows::silu_grad(y, dout, scale, shift, dy);
                *sum = [dzy, dz];
                // Σ dy = w · Σ dz and Σ dy · y = w · Σ dz · y.
                m1 += scale * dz;
                m2 += scale * dzy;
            }
            if input_grad {
                let inv = 1.0 / size as f32;
                rows::normalise_grad(dx, y, m1 * inv, m2 * inv, r);
            }
        });
    let total = |k: usize| -> Vec<f32> {
        (0..g.c)
            .map(|ch| (0..g.n).map(|img| sums[img * g.c + ch][k]).sum())
            .collect()
    };
    (input_grad.then_some(dx), total(0), total(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64: `silu((x − mean) / sqrt(var + eps) · w + b)` per group.
    fn naive(x: &[f32], w: &[f32], b: &[f32], g: Groups, eps: f64) -> Vec<f64> {
        let size = g.size();
        let mut out = vec![0f64; x.len()];
        for (i, (x, out)) in x.chunks(size).zip(out.chunks_mut(size)).enumerate() {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / size as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / size as f64;
            for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                let ch = i % g.groups * (g.c / g.groups) + j / g.len;
                let z = (v as f64 - mean) / (var + eps).sqrt() * w[ch] as f64 + b[ch] as f64;
                *o = z / (1.0 + (-z).exp());
            }
        }
        out
    }

    /// The output against the definition, and the gradients against central differences of
    /// `Σ out · dout` in f64.
    #[test]
    fn equals_the_definition_and_its_gradient() {
        let g = Groups {
            n: 2,
            c: 6,
            len: 21,
            groups: 3,
        };
        let x: Vec<f32> = crate::uniform(g.n * g.c * g.len, 1, -0.5)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        let w = crate::uniform(g.c, 2, 0.5);
        let b = crate::uniform(g.c, 3, -0.5);
        let dout = crate::uniform(x.len(), 4, -0.5);
        let eps = 1e-5;
        let (y, rstd, out) = forward(&x, Some(&w), Some(&b), g, eps);
        let want = naive(&x, &w, &b, g, eps as f64);
        for (o, w) in out.iter().zip(&want) {
            assert!((*o as f64 - w).abs() < 1e-5, "{o} against {w}");
        }
        let (dx, dw, db) = backward(&y, &rstd, &dout, Some(&w), Some(&b), g, true);
        let dx = dx.expect("asked for");
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let out = naive(x, w, b, g, eps as f64);
            out.iter().zip(&dout).map(|(o, d)| o * *d as f64).sum()
        };
        let h = 1e-2f32;
        let numeric = |v: &[f32], i: usize, at: &dyn Fn(&[f32]) -> f64| -> f64 {
            let (mut up, mut down) = (v.to_vec(), v.to_vec());
            up[i] += h;
            down[i] -= h;
            (at(&up) - at(&down)) / (2.0 * h as f64)
        };
        for i in (0..x.len()).step_by(7) {
            let d = numeric(&x, i, &|x| loss(x, &w, &b));
            assert!(
                (dx[i] as f64 - d).abs() < 2e-3,
                "dx[{i}] {} against {d}",
                dx[i]
            );
        }
        for ch in 0..g.c {
            let d = numeric(&w, ch, &|w| loss(&x, w, &b));
            assert!(
                (dw[ch] as f64 - d).abs() < 2e-3,
                "dw[{ch}] {} against {d}",
                dw[ch]
            );
            let d = numeric(&b, ch, &|b| loss(&x, &w, b));
            assert!(
                (db[ch] as f64 - d).abs() < 2e-3,
                "db[{ch}] {} against {d}",
                db[ch]
            );
        }
        let (none, dw_alone, _) = backward(&y, &rstd, &dout, Some(&w), Some(&b), g, false);
        assert!(none.is_none());
        assert_eq!(dw_alone, dw);
        // No weight or bias: the same as a weight of ones and a bias of zeros.
        let (ones, zeros) = (vec![1f32; g.c], vec![0f32; g.c]);
        let (_, _, bare) = forward(&x, None, None, g, eps);
        let (_, _, plain) = forward(&x, Some(&ones), Some(&zeros), g, eps);
        assert_eq!(bare, plain);
    }
}
