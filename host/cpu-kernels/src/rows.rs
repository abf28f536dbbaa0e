//! The elementwise passes over a block of attention scores, over GroupNorm's groups and over
//! GELU's inputs, written as plain loops over lanes of 16 so that the compiler vectorises them,
//! and run through pulp's dispatch so that they compile for AVX-512 or AVX2 where the CPU has
//! them (this crate builds for baseline x86-64). `exp` is a polynomial (Cephes' expf: within
//! 2 ulp of libm's over its clamped range, the test checks) because libm's is one call per
//! element.

const LANES: usize = 16;

/// `e^x` for `x` in [−87, 88]: below, e^−87 (a normal float; softmax sums never notice);
/// NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // x = n·ln2 + r, |r| ≤ ln2/2; the magic constant rounds to nearest.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ from t's own bits (n sits in its low mantissa bits): a float-to-int cast would
    // saturate, which keeps the loop from vectorising.
    let biased = t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

/// A pass over rows, run by [`pulp::Arch::dispatch`] compiled for the CPU's best vector width:
/// `with_simd` inlines into pulp's `#[target_feature]` functions (a closure would not).
macro_rules! pass {
    ($name:ident { $($field:ident: $ty:ty),* } |$($bind:ident),*| $body:block) => {
        struct $name<'a> { $($field: $ty),* , _life: std::marker::PhantomData<&'a ()> }
        impl pulp::WithSimd for $name<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) {
                let Self { $($bind),* , .. } = self;
                $body
            }
        }
    };
}

/// Σ over lanes (vectorisable: each lane adds in order).
#[inline(always)]
fn lane_sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

pass!(Numerators { s: &'a mut [f32], len: usize, lse: &'a mut [f32], inv: &'a mut [f32] }
|s, len, lse, inv| {
    for ((row, l), i) in s.chunks_mut(len).zip(lse.iter_mut()).zip(inv.iter_mut()) {
        let m = lane_max(row);
        row.iter_mut().for_each(|x| *x = exp(*x - m));
        let sum = lane_sum(row);
        *l = m + sum.ln();
        *i = 1.0 / sum;
    }
});

/// Each row of `s` (rows of `len`) ← `exp(row − max)`; `lse` ← `max + ln Σ`, `inv` ← `1/Σ`.
pub fn softmax_numerators(s: &mut [f32], len: usize, lse: &mut [f32], inv: &mut [f32]) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(Numerators {
        s,
        len,
        lse,
        inv,
        _life,
    });
}

pass!(Shifted { s: &'a mut [f32], len: usize, shift: &'a [f32] } |s, len, shift| {
    for (row, &m) in s.chunks_mut(len).zip(shift) {
        row.iter_mut().for_each(|x| *x = exp(*x - m));
    }
});

/// Each row of `s` ← `exp(row − shift)`, the row's own shift.
pub fn exp_shifted(s: &mut [f32], len: usize, shift: &[f32]) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(Shifted {
        s,
        len,
        shift,
        _life,
    });
}

pass!(SoftmaxBackward { ds: &'a mut [f32], p: &'a [f32], len: usize, d: &'a [f32], scale: f32 }
|ds, p, len, d, scale| {
    for ((dsr, pr), &di) in ds.chunks_mut(len).zip(p.chunks(len)).zip(d) {
        for (x, &pv) in dsr.iter_mut().zip(pr) {
            *x = pv * (*x - di) * scale;
        }
    }
});

/// `ds ← p ∘ (ds − dᵢ) · scale` row by row (the softmax backward; `ds` holds dP on entry).
pub fn softmax_backward(ds: &mut [f32], p: &[f32], len: usize, d: &[f32], scale: f32) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(SoftmaxBackward {
        ds,
        p,
        len,
        d,
        scale,
        _life,
    });
}

/// `1 / (1 + e^−z)`.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

pass!(Sum { x: &'a [f32], out: &'a mut f32 } |x, out| {
    *out = lane_sum(x);
});

/// `Σ x`.
pub fn sum(x: &[f32]) -> f32 {
    let (mut out, _life) = (0.0, std::marker::PhantomData);
    pulp::Arch::new().dispatch(Sum {
        x,
        out: &mut out,
        _life,
    });
    out
}

pass!(CentredSquares { x: &'a [f32], mean: f32, out: &'a mut f32 } |x, mean, out| {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    *out = acc.iter().sum::<f32>() + rest;
});

/// `Σ (x − mean)²`.
pub fn centred_squares(x: &[f32], mean: f32) -> f32 {
    let (mut out, _life) = (0.0, std::marker::PhantomData);
    pulp::Arch::new().dispatch(CentredSquares {
        x,
        mean,
        out: &mut out,
        _life,
    });
    out
}

pass!(NormaliseSilu {
    x: &'a [f32], mean: f32, rstd: f32, scale: f32, shift: f32, y: &'a mut [f32],
    out: &'a mut [f32]
} |x, mean, rstd, scale, shift, y, out| {
    for ((y, o), &v) in y.iter_mut().zip(out.iter_mut()).zip(x) {
        *y = (v - mean) * rstd;
        let z = *y * scale + shift;
        *o = z * sigmoid(z);
    }
});

/// `y ← (x − mean) · rstd` and `out ← silu(y · scale + shift)`.
pub fn normalise_silu(
    x: &[f32],
    mean: f32,
    rstd: f32,
    scale: f32,
    shift: f32,
    y: &mut [f32],
    out: &mut [f32],
) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(NormaliseSilu {
        x,
        mean,
        rstd,
        scale,
        shift,
        y,
        out,
        _life,
    });
}

/// `dout · silu'(z)` at `z = y · scale + shift`: `silu'(z) = s · (1 + z · (1 − s))`.
#[inline(always)]
fn silu_dz(y: f32, dout: f32, scale: f32, shift: f32) -> f32 {
    let z = y * scale + shift;
    let s = sigmoid(z);
    dout * s * (1.0 + z * (1.0 - s))
}

pass!(SiluGrad {
    y: &'a [f32], dout: &'a [f32], scale: f32, shift: f32, dy: &'a mut [f32],
    sums: &'a mut [f32; 2]
} |y, dout, scale, shift, dy, sums| {
    let (mut dzy, mut dzs) = ([0f32; LANES], [0f32; LANES]);
    let n = y.len() / LANES * LANES;
    let lanes = dy[..n]
        .chunks_exact_mut(LANES)
        .zip(y[..n].chunks_exact(LANES))
        .zip(dout[..n].chunks_exact(LANES));
    for ((dy, y), dout) in lanes {
        for l in 0..LANES {
            let dz = silu_dz(y[l], dout[l], scale, shift);
            dzy[l] += dz * y[l];
            dzs[l] += dz;
            dy[l] = dz * scale;
        }
    }
    let (mut ty, mut ts) = (0f32, 0f32);
    for ((dy, &y), &d) in dy[n..].iter_mut().zip(&y[n..]).zip(&dout[n..]) {
        let dz = silu_dz(y, d, scale, shift);
        ty += dz * y;
        ts += dz;
        *dy = dz * scale;
    }
    *sums = [dzy.iter().sum::<f32>() + ty, dzs.iter().sum::<f32>() + ts];
});

/// SiLU's backward through `z = y · scale + shift`: `dy ← dz · scale` with
/// `dz = dout · silu'(z)`; returns `[Σ dz · y, Σ dz]`.
pub fn silu_grad(y: &[f32], dout: &[f32], scale: f32, shift: f32, dy: &mut [f32]) -> [f32; 2] {
    let (mut sums, _life) = ([0f32; 2], std::marker::PhantomData);
    pulp::Arch::new().dispatch(SiluGrad {
        y,
        dout,
        scale,
        shift,
        dy,
        sums: &mut sums,
        _life,
    });
    sums
}

pass!(NormaliseGrad { dx: &'a mut [f32], y: &'a [f32], m1: f32, m2: f32, rstd: f32 }
|dx, y, m1, m2, rstd| {
    for (d, &y) in dx.iter_mut().zip(y) {
        *d = rstd * (*d - m1 - y * m2);
    }
});

/// The normalisation's backward: `dx ← rstd · (dy − m1 − y · m2)` (`dx` holds dy on entry;
/// `m1` is dy's mean, `m2` dy · y's).
pub fn normalise_grad(dx: &mut [f32], y: &[f32], m1: f32, m2: f32, rstd: f32) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(NormaliseGrad {
        dx,
        y,
        m1,
        m2,
        rstd,
        _life,
    });
}

/// `erf(z)` by Abramowitz and Stegun's 7.1.26 (within 1.5e-7 of it) from `e^−z²`, which the
/// caller has: GELU's gradient needs that exponential too.
#[inline(always)]
fn erf_with(z: f32, exp_minus_z2: f32) -> f32 {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4f32;
    let p = p * t - 1.453_152;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let e = 1.0 - p * t * exp_minus_z2;
    if z < 0.0 { -e } else { e }
}

/// `Φ(x)` (the normal CDF) and `e^−x²/2`.
#[inline(always)]
fn normal_cdf(x: f32) -> (f32, f32) {
    let g = exp(-0.5 * x * x);
    (
        0.5 * (1.0 + erf_with(x * std::f32::consts::FRAC_1_SQRT_2, g)),
        g,
    )
}

pass!(Gelu { x: &'a [f32], out: &'a mut [f32] } |x, out| {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * normal_cdf(v).0;
    }
});

/// `out ← x · Φ(x)` (GELU, erf form).
pub fn gelu(x: &[f32], out: &mut [f32]) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(Gelu { x, out, _life });
}

pass!(GeluGrad { x: &'a [f32], dy: &'a [f32], dx: &'a mut [f32] } |x, dy, dx| {
    // 1/√(2π): Φ'(x) = e^−x²/2 / √(2π).
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        let (cdf, e) = normal_cdf(v);
        *d = g * (cdf + v * e * INV_SQRT_2PI);
    }
});

/// `dx ← dy · (Φ(x) + x · Φ'(x))`, GELU's backward.
pub fn gelu_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let _life = std::marker::PhantomData;
    pulp::Arch::new().dispatch(GeluGrad { x, dy, dx, _life });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_gradient_are_within_3e_7_of_libm_erf() {
        let x: Vec<f32> = (0..=4000).map(|i| -10.0 + i as f32 / 200.0).collect();
        let (mut y, mut dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu(&x, &mut y);
        gelu_grad(&x, &vec![1.0; x.len()], &mut dx);
        for ((&v, y), d) in x.iter().zip(&y).zip(&dx) {
            let v64 = v as f64;
            let cdf = 0.5 * (1.0 + erf64(v64 / 2f64.sqrt()));
            let pdf = (-0.5 * v64 * v64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want, want_d) = (v64 * cdf, cdf + v64 * pdf);
            assert!(
                (*y as f64 - want).abs() < 3e-7 * (1.0 + v64.abs()),
                "gelu({v}) {y} against {want}"
            );
            assert!(
                (*d as f64 - want_d).abs() < 3e-7 * (1.0 + v64.abs()),
                "gelu'({v}) {d} against {want_d}"
            );
        }
    }

    /// erf in f64 by its Taylor series near 0 and its continued fraction beyond (the tests'
    /// reference: std has no erf).
    fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let e = if a < 2.5 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^−a² / √π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...)))).
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
        };
        if x < 0.0 { -e } else { e }
    }

    #[test]
    fn softmax_rows() {
        let mut s: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let want: Vec<f32> = {
            let m = s.iter().copied().fold(f32::MIN, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|x| x / sum).collect()
        };
        let (mut lse, mut inv) = ([0f32], [0f32]);
        softmax_numerators(&mut s, 37, &mut lse, &mut inv);
        for (got, want) in s.iter().zip(&want) {
            assert!((got * inv[0] - want).abs() < 1e-6);
        }
    }
}
