//! Every ABI op: forward against a straightforward reference, gradient against central finite
//! differences (f32, CPU). Runs through `plugin-api`'s `Tensor`, exactly as a plugin would.

use ferrite_plugin_api::{
    DType, Generator, Result, Tensor, TensorId,
    ops::{self, ConvOptions, InterpolateMode},
};
use ferrite_runtime as runtime;

// ---------- helpers ----------

fn init() {
    runtime::init("cpu").unwrap();
}

/// Deterministic values in ±[0.1, 1.0], away from the kinks of relu/abs/clamp.
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 33) as f64 / (1u64 << 31) as f64) as f32;
            let v = 0.1 + 0.9 * u;
            if (s >> 17) & 1 == 0 { v } else { -v }
        })
        .collect()
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn t(d: &[f32], s: &[usize]) -> Tensor {
    Tensor::from_f32(d, s).unwrap()
}

fn r(s: &[usize], seed: u64) -> (Vec<f32>, Vec<usize>) {
    (rnd(numel(s), seed), s.to_vec())
}

fn unravel(mut i: usize, s: &[usize]) -> Vec<usize> {
    let mut out = vec![0; s.len()];
    for d in (0..s.len()).rev() {
        out[d] = i % s[d];
        i /= s[d];
    }
    out
}

fn ravel(ix: &[usize], s: &[usize]) -> usize {
    ix.iter().zip(s).fold(0, |acc, (&i, &d)| acc * d + i)
}

#[track_caller]
fn close(got: &Tensor, want: &[f32], want_shape: &[usize], tol: f32) {
    assert_eq!(got.shape().unwrap(), want_shape, "shape");
    let g = got.to_vec().unwrap();
    assert_eq!(g.len(), want.len());
    let worst = g
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "max error {worst} > {tol}\n got {g:?}\nwant {want:?}"
    );
}

/// Checks the gradient of `sum(f(inputs) * w)` (w fixed, random) for every input against
/// central differences of the same function evaluated on the host in f64.
#[track_caller]
fn grad_check(inputs: &[(Vec<f32>, Vec<usize>)], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let leaves: Vec<Tensor> = inputs.iter().map(|(d, s)| t(d, s)).collect();
    for l in &leaves {
        l.set_requires_grad(true).unwrap();
    }
    let out = f(&leaves).unwrap();
    let out_shape = out.shape().unwrap();
    let w = rnd(numel(&out_shape), 99);
    let wt = t(&w, &out_shape);
    let grads = out.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
    let eval = |vals: &[Vec<f32>]| -> f64 {
        let ts: Vec<Tensor> = vals.iter().zip(inputs).map(|(d, (_, s))| t(d, s)).collect();
        let o = f(&ts).unwrap().to_vec().unwrap();
        o.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let eps = 1e-3f32;
    for (k, leaf) in leaves.iter().enumerate() {
        let g = grads
            .get(leaf)
            .unwrap()
            .map(|g| g.to_vec().unwrap())
            .unwrap_or_else(|| vec![0.0; inputs[k].0.len()]);
        let mut vals: Vec<Vec<f32>> = inputs.iter().map(|(d, _)| d.clone()).collect();
        for j in 0..inputs[k].0.len() {
            let x0 = vals[k][j];
            vals[k][j] = x0 + eps;
            let up = eval(&vals);
            vals[k][j] = x0 - eps;
            let down = eval(&vals);
            vals[k][j] = x0;
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let tol = 5e-3 + 1e-2 * fd.abs();
            assert!(
                (g[j] - fd).abs() <= tol,
                "input {k} element {j}: autodiff {} vs finite difference {fd}",
                g[j]
            );
        }
    }
}

fn unary_case(
    f: impl Fn(&Tensor) -> Result<Tensor>,
    reference: impl Fn(f32) -> f32,
    positive: bool,
) {
    init();
    let (mut d, s) = r(&[2, 5], 3);
    if positive {
        d.iter_mut().for_each(|x| *x = x.abs() + 0.2);
    }
    let want: Vec<f32> = d.iter().map(|&x| reference(x)).collect();
    close(&f(&t(&d, &s)).unwrap(), &want, &s, 1e-5);
    grad_check(&[(d, s)], |x| f(&x[0]));
}

fn erf(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    let x = x as f64;
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    (s * y) as f32
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ---------- creation ----------

#[test]
fn creation_ops() {
    init();
    close(
        &Tensor::zeros(&[2, 3], DType::F32).unwrap(),
        &[0.0; 6],
        &[2, 3],
        0.0,
    );
    close(
        &Tensor::ones(&[4], DType::F32).unwrap(),
        &[1.0; 4],
        &[4],
        0.0,
    );
    close(
        &Tensor::full(&[2], 2.5, DType::F32).unwrap(),
        &[2.5, 2.5],
        &[2],
        0.0,
    );
    close(
        &Tensor::arange(2, 11, 3, DType::F32).unwrap(),
        &[2.0, 5.0, 8.0],
        &[3],
        0.0,
    );
    let ai = Tensor::arange(0, 4, 1, DType::I64).unwrap();
    // Integers are stored at the backend's width (i32 on flex).
    assert!(matches!(ai.dtype().unwrap(), DType::I32 | DType::I64));
    close(&ai, &[0.0, 1.0, 2.0, 3.0], &[4], 0.0);
    close(
        &Tensor::from_i64(&[5, -2], &[2]).unwrap(),
        &[5.0, -2.0],
        &[2],
        0.0,
    );
    let e = Tensor::from_f32(&[1.0, 2.0, 3.0], &[2, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fill shape"), "{e}");
}

#[test]
fn random_ops_are_seeded_and_distributed() {
    init();
    let a = Tensor::randn(&[10000], &Generator::new(5).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    let b = Tensor::randn(&[10000], &Generator::new(5).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    let c = Tensor::randn(&[10000], &Generator::new(6).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(a, b, "same seed, same values");
    assert_ne!(a, c);
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
    assert!(
        mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
        "mean {mean} var {var}"
    );
    let u = Tensor::rand(&[10000], &Generator::new(1).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
    let um = u.iter().sum::<f32>() / u.len() as f32;
    assert!((um - 0.5).abs() < 0.02, "uniform mean {um}");
    // One generator advances: two draws differ.
    let g = Generator::new(9).unwrap();
    assert_ne!(
        Tensor::randn(&[4], &g).unwrap().to_vec().unwrap(),
        Tensor::randn(&[4], &g).unwrap().to_vec().unwrap()
    );
}

// ---------- shape ops ----------

#[test]
fn reshape_permute_transpose() {
    init();
    let (d, s) = r(&[2, 3, 4], 1);
    let x = t(&d, &s);
    close(&x.reshape(&[4, -1]).unwrap(), &d, &[4, 6], 0.0);
    let perm = [2, 0, 1];
    let ps = [4, 2, 3];
    let want: Vec<f32> = (0..24)
        .map(|o| {
            let oi = unravel(o, &ps);
            let mut ii = [0; 3];
            for (k, &p) in perm.iter().enumerate() {
                ii[p] = oi[k];
            }
            d[ravel(&ii, &s)]
        })
        .collect();
    close(&x.permute(&perm).unwrap(), &want, &ps, 0.0);
    let tw: Vec<f32> = (0..24)
        .map(|o| {
            let oi = unravel(o, &[2, 4, 3]);
            d[ravel(&[oi[0], oi[2], oi[1]], &s)]
        })
        .collect();
    close(&x.transpose(1, 2).unwrap(), &tw, &[2, 4, 3], 0.0);
    assert!(
        x.reshape(&[5, -1])
            .unwrap_err()
            .to_string()
            .contains("cannot reshape")
    );
    assert!(
        x.permute(&[0, 0, 1])
            .unwrap_err()
            .to_string()
            .contains("not a permutation")
    );
    grad_check(&[(d.clone(), s.clone())], |x| {
        x[0].permute(&perm)?.reshape(&[4, 6])
    });
    grad_check(&[(d, s)], |x| x[0].transpose(0, 2));
}

#[test]
fn narrow_cat_stack_chunk() {
    init();
    let (a, sa) = r(&[2, 3], 1);
    let (b, sb) = r(&[2, 2], 2);
    let x = t(&a, &sa);
    close(
        &x.narrow(1, 1, 2).unwrap(),
        &[a[1], a[2], a[4], a[5]],
        &[2, 2],
        0.0,
    );
    assert!(
        x.narrow(1, 2, 2)
            .unwrap_err()
            .to_string()
            .contains("exceeds")
    );
    let c = Tensor::cat(&[&x, &t(&b, &sb)], 1).unwrap();
    close(
        &c,
        &[a[0], a[1], a[2], b[0], b[1], a[3], a[4], a[5], b[2], b[3]],
        &[2, 5],
        0.0,
    );
    assert!(
        Tensor::cat(&[&x, &t(&b, &sb)], 0)
            .unwrap_err()
            .to_string()
            .contains("differ outside")
    );
    let st = Tensor::stack(&[&x, &x], 0).unwrap();
    close(&st, &[a.clone(), a.clone()].concat(), &[2, 2, 3], 0.0);
    // torch.chunk: 5 columns in 3 chunks -> sizes 2, 2, 1.
    let ch = c.chunk(3, 1).unwrap();
    let sizes: Vec<usize> = ch.iter().map(|t| t.shape().unwrap()[1]).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    close(&ch[2], &[b[1], b[3]], &[2, 1], 0.0);
    grad_check(&[(a.clone(), sa.clone()), (b.clone(), sb.clone())], |x| {
        Tensor::cat(&[&x[0], &x[1]], 1)?.narrow(1, 1, 3)
    });
    grad_check(&[(a.clone(), sa.clone()), (a.clone(), sa.clone())], |x| {
        Tensor::stack(&[&x[0], &x[1]], 2)
    });
    grad_check(&[(a, sa)], |x| x[0].chunk(2, 1)?.remove(1).mul_scalar(3.0));
}

#[test]
fn expand_index_select_gather_pad() {
    init();
    let (a, sa) = r(&[3, 1], 4);
    let e = t(&a, &sa).expand(&[2, 3, 4]).unwrap();
    let want: Vec<f32> = (0..24).map(|o| a[unravel(o, &[2, 3, 4])[1]]).collect();
    close(&e, &want, &[2, 3, 4], 0.0);
    assert!(
        t(&a, &sa)
            .expand(&[2, 4])
            .unwrap_err()
            .to_string()
            .contains("cannot expand")
    );
    grad_check(&[(a, sa)], |x| x[0].expand(&[2, 3, 4]));

    let (m, sm) = r(&[4, 3], 5);
    let idx = Tensor::from_i64(&[3, 0, 3], &[3]).unwrap();
    let sel = t(&m, &sm).index_select(0, &idx).unwrap();
    close(
        &sel,
        &[&m[9..12], &m[0..3], &m[9..12]].concat(),
        &[3, 3],
        0.0,
    );
    grad_check(&[(m.clone(), sm.clone())], |x| {
        x[0].index_select(0, &Tensor::from_i64(&[3, 0, 3], &[3])?)
    });

    let gi = [2i64, 0, 1, 1, 0, 0, 2, 2, 1, 0, 1, 2];
    let g = t(&m, &sm)
        .gather(1, &Tensor::from_i64(&gi, &[4, 3]).unwrap())
        .unwrap();
    let want: Vec<f32> = (0..12).map(|o| m[(o / 3) * 3 + gi[o] as usize]).collect();
    close(&g, &want, &[4, 3], 0.0);
    grad_check(&[(m.clone(), sm.clone())], |x| {
        x[0].gather(1, &Tensor::from_i64(&gi, &[4, 3])?)
    });

    // torch order: (left, right) of the last dim, then (top, bottom).
    let p = t(&m, &sm).pad(&[1, 2, 0, 1], -1.0).unwrap();
    let want: Vec<f32> = (0..5 * 6)
        .map(|o| {
            let (i, j) = (o / 6, o % 6);
            if i < 4 && (1..4).contains(&j) {
                m[i * 3 + j - 1]
            } else {
                -1.0
            }
        })
        .collect();
    close(&p, &want, &[5, 6], 0.0);
    grad_check(&[(m, sm)], |x| x[0].pad(&[1, 2, 0, 1], 0.5));
}

// ---------- elementwise ----------

#[test]
fn binary_ops_broadcast() {
    init();
    let (a, sa) = r(&[2, 3], 1);
    let (b, sb) = r(&[3], 2);
    let (c, sc) = r(&[2, 1], 3);
    type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
    type Reference = fn(f32, f32) -> f32;
    let cases: [(Op, Reference); 4] = [
        (|x, y| x.add(y), |x, y| x + y),
        (|x, y| x.sub(y), |x, y| x - y),
        (|x, y| x.mul(y), |x, y| x * y),
        (|x, y| x.div(y), |x, y| x / y),
    ];
    for (op, f) in cases {
        let want: Vec<f32> = (0..6).map(|i| f(a[i], b[i % 3])).collect();
        close(&op(&t(&a, &sa), &t(&b, &sb)).unwrap(), &want, &[2, 3], 1e-6);
        let want: Vec<f32> = (0..6).map(|i| f(c[i / 3], b[i % 3])).collect();
        close(&op(&t(&c, &sc), &t(&b, &sb)).unwrap(), &want, &[2, 3], 1e-6);
        grad_check(&[(a.clone(), sa.clone()), (b.clone(), sb.clone())], |x| {
            op(&x[0], &x[1])
        });
        grad_check(&[(c.clone(), sc.clone()), (b.clone(), sb.clone())], |x| {
            op(&x[0], &x[1])
        });
    }
    assert!(
        t(&a, &sa)
            .add(&t(&[1.0, 2.0], &[2]))
            .unwrap_err()
            .to_string()
            .contains("do not broadcast")
    );
    let pos: Vec<f32> = a.iter().map(|x| x.abs() + 0.5).collect();
    let want: Vec<f32> = (0..6).map(|i| pos[i].powf(b[i % 3])).collect();
    close(
        &t(&pos, &sa).pow(&t(&b, &sb)).unwrap(),
        &want,
        &[2, 3],
        1e-5,
    );
    grad_check(&[(pos.clone(), sa.clone()), (b, sb)], |x| x[0].pow(&x[1]));
}

#[test]
fn scalar_ops() {
    init();
    let (a, s) = r(&[5], 7);
    let x = t(&a, &s);
    close(
        &x.add_scalar(2.0).unwrap(),
        &a.iter().map(|v| v + 2.0).collect::<Vec<_>>(),
        &s,
        1e-6,
    );
    close(
        &x.sub_scalar(2.0).unwrap(),
        &a.iter().map(|v| v - 2.0).collect::<Vec<_>>(),
        &s,
        1e-6,
    );
    close(
        &x.mul_scalar(-3.0).unwrap(),
        &a.iter().map(|v| v * -3.0).collect::<Vec<_>>(),
        &s,
        1e-6,
    );
    close(
        &x.div_scalar(4.0).unwrap(),
        &a.iter().map(|v| v / 4.0).collect::<Vec<_>>(),
        &s,
        1e-6,
    );
    let pos: Vec<f32> = a.iter().map(|v| v.abs() + 0.3).collect();
    close(
        &t(&pos, &s).powf(1.5).unwrap(),
        &pos.iter().map(|v| v.powf(1.5)).collect::<Vec<_>>(),
        &s,
        1e-5,
    );
    grad_check(&[(a.clone(), s.clone())], |x| {
        x[0].add_scalar(1.0)?
            .mul_scalar(2.0)?
            .sub_scalar(0.5)?
            .div_scalar(3.0)
    });
    grad_check(&[(pos, s)], |x| x[0].powf(2.5));
}

#[test]
fn neg_exp_log_sqrt_rsqrt_abs() {
    unary_case(|x| x.neg(), |x| -x, false);
    unary_case(|x| x.exp(), f32::exp, false);
    unary_case(|x| x.log(), f32::ln, true);
    unary_case(|x| x.sqrt(), f32::sqrt, true);
    unary_case(|x| x.rsqrt(), |x| 1.0 / x.sqrt(), true);
    unary_case(|x| x.abs(), f32::abs, false);
}

#[test]
fn trig_and_activations() {
    unary_case(|x| x.sin(), f32::sin, false);
    unary_case(|x| x.cos(), f32::cos, false);
    unary_case(|x| x.tanh(), f32::tanh, false);
    unary_case(|x| x.sigmoid(), sigmoid, false);
    unary_case(|x| x.silu(), |x| x * sigmoid(x), false);
    unary_case(|x| x.relu(), |x| x.max(0.0), false);
    unary_case(|x| x.quick_gelu(), |x| x * sigmoid(1.702 * x), false);
    unary_case(
        |x| x.gelu(),
        |x| 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
        false,
    );
    unary_case(
        |x| x.gelu_tanh(),
        |x| {
            0.5 * x
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        },
        false,
    );
    unary_case(
        |x| x.clamp(Some(-0.5), Some(0.45)),
        |x| x.clamp(-0.5, 0.45),
        false,
    );
    unary_case(|x| x.clamp(None, Some(0.45)), |x| x.min(0.45), false);
    unary_case(|x| x.clamp(Some(-0.3), None), |x| x.max(-0.3), false);
}

#[test]
fn comparisons_and_where() {
    init();
    let (a, s) = r(&[2, 3], 1);
    let (b, sb) = r(&[3], 2);
    let as_f = |x: Tensor| x.cast(DType::F32).unwrap();
    let gt: Vec<f32> = (0..6).map(|i| (a[i] > b[i % 3]) as u8 as f32).collect();
    close(&as_f(t(&a, &s).gt(&t(&b, &sb)).unwrap()), &gt, &s, 0.0);
    let le: Vec<f32> = (0..6).map(|i| (a[i] <= b[i % 3]) as u8 as f32).collect();
    close(&as_f(t(&a, &s).le(&t(&b, &sb)).unwrap()), &le, &s, 0.0);
    let ge: Vec<f32> = (0..6).map(|i| (a[i] >= b[i % 3]) as u8 as f32).collect();
    close(&as_f(t(&a, &s).ge(&t(&b, &sb)).unwrap()), &ge, &s, 0.0);
    let lt: Vec<f32> = (0..6).map(|i| (a[i] < 0.2) as u8 as f32).collect();
    close(&as_f(t(&a, &s).lt_scalar(0.2).unwrap()), &lt, &s, 0.0);
    let eq: Vec<f32> = (0..6).map(|i| (i == 0 || i == 4) as u8 as f32).collect();
    let mut c = b.repeat(2);
    c[0] = a[0];
    c[4] = a[4];
    close(&as_f(t(&a, &s).eq(&t(&c, &s)).unwrap()), &eq, &s, 0.0);
    assert_eq!(
        t(&a, &s).gt_scalar(0.0).unwrap().dtype().unwrap(),
        DType::Bool
    );

    // where(cond, a, b) with a broadcast condition and operand.
    let cond = t(&a, &s).gt_scalar(0.0).unwrap();
    let w = Tensor::where_(&cond, &t(&a, &s), &t(&b, &sb)).unwrap();
    let want: Vec<f32> = (0..6)
        .map(|i| if a[i] > 0.0 { a[i] } else { b[i % 3] })
        .collect();
    close(&w, &want, &s, 0.0);
    let mask: Vec<f32> = a.iter().map(|&x| (x > 0.0) as u8 as f32).collect();
    grad_check(&[(a.clone(), s.clone()), (b, sb)], |x| {
        Tensor::where_(&t(&mask, &[2, 3]), &x[0], &x[1])
    });
}

// ---------- reductions ----------

#[test]
fn reductions() {
    init();
    let s = [2, 3, 4];
    let (a, _) = r(&s, 11);
    let x = t(&a, &s);
    let over = |dims: &[usize], f: &dyn Fn(&[f32]) -> f32| -> (Vec<f32>, Vec<usize>) {
        let out_shape: Vec<usize> = s
            .iter()
            .enumerate()
            .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
            .collect();
        let mut groups = vec![Vec::new(); numel(&out_shape)];
        for (i, v) in a.iter().enumerate() {
            let mut ix = unravel(i, &s);
            for &d in dims {
                ix[d] = 0;
            }
            groups[ravel(&ix, &out_shape)].push(*v);
        }
        (groups.iter().map(|g| f(g)).collect(), out_shape)
    };
    let sum = |g: &[f32]| g.iter().sum::<f32>();
    let mean = |g: &[f32]| g.iter().sum::<f32>() / g.len() as f32;
    let max = |g: &[f32]| g.iter().cloned().fold(f32::MIN, f32::max);
    let var1 = |g: &[f32]| {
        let m = mean(g);
        g.iter().map(|v| (v - m).powi(2)).sum::<f32>() / (g.len() - 1) as f32
    };
    let (w, ks) = over(&[1], &sum);
    close(&x.sum(&[1], true).unwrap(), &w, &ks, 1e-6);
    close(&x.sum(&[1], false).unwrap(), &w, &[2, 4], 1e-6);
    let (w, _) = over(&[0, 2], &mean);
    close(&x.mean(&[0, 2], false).unwrap(), &w, &[3], 1e-6);
    let (w, ks) = over(&[2], &max);
    close(&x.max(&[2], true).unwrap(), &w, &ks, 0.0);
    let (w, _) = over(&[1, 2], &var1);
    close(&x.var(&[1, 2], false, 1).unwrap(), &w, &[2], 1e-5);
    close(&x.sum_all().unwrap(), &[sum(&a)], &[1], 1e-5);
    close(&x.mean_all().unwrap(), &[mean(&a)], &[1], 1e-5);
    assert!(
        x.sum(&[3], false)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
    grad_check(&[(a.clone(), s.to_vec())], |x| x[0].sum(&[1], false));
    grad_check(&[(a.clone(), s.to_vec())], |x| x[0].mean(&[0, 2], true));
    grad_check(&[(a.clone(), s.to_vec())], |x| x[0].max(&[2], false));
    grad_check(&[(a.clone(), s.to_vec())], |x| x[0].var(&[2], true, 0));
    grad_check(&[(a, s.to_vec())], |x| x[0].var(&[1], false, 1));
}

// ---------- linear algebra ----------

fn matmul_ref(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_batched: bool,
) -> Vec<f32> {
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let bo = if b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                out[bi * m * n + i * n + j] = (0..k)
                    .map(|p| a[bi * m * k + i * k + p] * b[bo + p * n + j])
                    .sum();
            }
        }
    }
    out
}

#[test]
fn matmul_and_linear() {
    init();
    let (a, sa) = r(&[2, 3, 4], 1);
    let (b, sb) = r(&[4, 5], 2);
    let want = matmul_ref(&a, &b, 2, 3, 4, 5, false);
    close(
        &t(&a, &sa).matmul(&t(&b, &sb)).unwrap(),
        &want,
        &[2, 3, 5],
        1e-5,
    );
    let (b3, sb3) = r(&[2, 4, 5], 3);
    close(
        &t(&a, &sa).matmul(&t(&b3, &sb3)).unwrap(),
        &matmul_ref(&a, &b3, 2, 3, 4, 5, true),
        &[2, 3, 5],
        1e-5,
    );
    assert!(
        t(&a, &sa)
            .matmul(&t(&a, &sa))
            .unwrap_err()
            .to_string()
            .contains("do not multiply")
    );
    grad_check(&[(a.clone(), sa.clone()), (b.clone(), sb.clone())], |x| {
        x[0].matmul(&x[1])
    });
    grad_check(&[(a.clone(), sa.clone()), (b3, sb3)], |x| {
        x[0].matmul(&x[1])
    });

    // linear: torch layout, weight [out, in].
    let (w, sw) = r(&[5, 4], 4);
    let (bias, sbias) = r(&[5], 5);
    let want: Vec<f32> = (0..2 * 3 * 5)
        .map(|o| {
            let (row, j) = (o / 5, o % 5);
            bias[j] + (0..4).map(|p| a[row * 4 + p] * w[j * 4 + p]).sum::<f32>()
        })
        .collect();
    close(
        &ops::linear(&t(&a, &sa), &t(&w, &sw), Some(&t(&bias, &sbias))).unwrap(),
        &want,
        &[2, 3, 5],
        1e-5,
    );
    // One row alone (a 1-D input): the first row's outputs.
    close(
        &ops::linear(&t(&a[..4], &[4]), &t(&w, &sw), Some(&t(&bias, &sbias))).unwrap(),
        &want[..5],
        &[5],
        1e-5,
    );
    assert!(
        ops::linear(&t(&a, &sa), &t(&b, &sb), None)
            .unwrap_err()
            .to_string()
            .contains("[out, in]")
    );
    grad_check(&[(a, sa), (w, sw), (bias, sbias)], |x| {
        ops::linear(&x[0], &x[1], Some(&x[2]))
    });
}

fn conv2d_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: Option<&[f32]>,
    o: ConvOptions,
) -> (Vec<f32>, Vec<usize>) {
    let [n, c, h, wd] = xs;
    let [oc, icg, kh, kw] = ws;
    let g = o.groups;
    let oh = (h + 2 * o.padding[0] - o.dilation[0] * (kh - 1) - 1) / o.stride[0] + 1;
    let ow = (wd + 2 * o.padding[1] - o.dilation[1] * (kw - 1) - 1) / o.stride[1] + 1;
    let mut out = vec![0.0; n * oc * oh * ow];
    for ni in 0..n {
        for co in 0..oc {
            let grp = co / (oc / g);
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[co]);
                    for ci in 0..icg {
                        let cin = grp * icg + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * o.stride[0] + ky * o.dilation[0]) as isize
                                    - o.padding[0] as isize;
                                let ix = (xx * o.stride[1] + kx * o.dilation[1]) as isize
                                    - o.padding[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x[((ni * c + cin) * h + iy as usize) * wd + ix as usize]
                                        * w[((co * icg + ci) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    out[((ni * oc + co) * oh + y) * ow + xx] = acc;
                }
            }
        }
    }
    let _ = c;
    (out, vec![n, oc, oh, ow])
}

#[test]
fn conv2d_matches_naive_loop() {
    init();
    let cases = [
        (ConvOptions::default(), [1, 2, 5, 5], [3, 2, 3, 3]),
        (
            ConvOptions {
                stride: [2, 1],
                padding: [1, 2],
                dilation: [1, 1],
                groups: 1,
            },
            [2, 2, 6, 5],
            [3, 2, 3, 2],
        ),
        (
            ConvOptions {
                stride: [1, 1],
                padding: [2, 2],
                dilation: [2, 2],
                groups: 1,
            },
            [1, 1, 5, 6],
            [2, 1, 3, 3],
        ),
        (
            ConvOptions {
                stride: [1, 2],
                padding: [1, 1],
                dilation: [1, 1],
                groups: 2,
            },
            [1, 4, 4, 5],
            [6, 2, 3, 3],
        ),
    ];
    for (k, (o, xs, ws)) in cases.into_iter().enumerate() {
        let (x, _) = r(&xs, 10 + k as u64);
        let (w, _) = r(&ws, 20 + k as u64);
        let (b, _) = r(&[ws[0]], 30 + k as u64);
        let (want, os) = conv2d_ref(&x, xs, &w, ws, Some(&b), o);
        let got = ops::conv2d(&t(&x, &xs), &t(&w, &ws), Some(&t(&b, &[ws[0]])), o).unwrap();
        close(&got, &want, &os, 1e-5);
        grad_check(
            &[(x, xs.to_vec()), (w, ws.to_vec()), (b, vec![ws[0]])],
            |v| ops::conv2d(&v[0], &v[1], Some(&v[2]), o),
        );
    }
    let e = ops::conv2d(
        &t(&[0.0; 12], &[1, 3, 2, 2]),
        &t(&[0.0; 8], &[2, 2, 1, 2]),
        None,
        ConvOptions::default(),
    );
    assert!(e.unwrap_err().to_string().contains("does not match weight"));
    // A bias of the wrong length, and a kernel wider than the input: errors, not panics.
    let (x, w) = (t(&[0.0; 5], &[1, 1, 5, 1]), t(&[0.0; 9], &[1, 1, 3, 3]));
    let e = ops::conv2d(&x, &w, Some(&t(&[0.0; 2], &[2])), ConvOptions::padding(1));
    assert!(e.unwrap_err().to_string().contains("output channels"));
    let e = ops::conv2d(&x, &w, None, ConvOptions::default());
    assert!(e.unwrap_err().to_string().contains("does not fit input"));
}

#[test]
fn conv_transpose2d_matches_scatter_loop() {
    init();
    // (stride, padding, output_padding, groups)
    for (k, (stride, padding, out_pad, groups)) in [(1, 0, 0, 1), (2, 1, 1, 1), (2, 0, 0, 2)]
        .into_iter()
        .enumerate()
    {
        let (n, cin, h, w, cout_g, kk) = (1, 2 * groups, 3, 4, 2, 3);
        let xs = [n, cin, h, w];
        let ws = [cin, cout_g, kk, kk];
        let (x, _) = r(&xs, 40 + k as u64);
        let (wt, _) = r(&ws, 50 + k as u64);
        let cout = cout_g * groups;
        let (b, _) = r(&[cout], 60 + k as u64);
        let oh = (h - 1) * stride - 2 * padding + kk + out_pad;
        let ow = (w - 1) * stride - 2 * padding + kk + out_pad;
        let mut want = vec![0.0f32; n * cout * oh * ow];
        for co in 0..cout {
            for i in 0..oh * ow {
                want[co * oh * ow + i] = b[co];
            }
        }
        let cin_g = cin / groups;
        for ci in 0..cin {
            let g = ci / cin_g;
            for y in 0..h {
                for xx in 0..w {
                    for c2 in 0..cout_g {
                        for ky in 0..kk {
                            for kx in 0..kk {
                                let oy = (y * stride + ky) as isize - padding as isize;
                                let ox = (xx * stride + kx) as isize - padding as isize;
                                if oy >= 0 && ox >= 0 && (oy as usize) < oh && (ox as usize) < ow {
                                    let co = g * cout_g + c2;
                                    want[(co * oh + oy as usize) * ow + ox as usize] += x
                                        [(ci * h + y) * w + xx]
                                        * wt[((ci * cout_g + c2) * kk + ky) * kk + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        let o = ConvOptions {
            stride: [stride; 2],
            padding: [padding; 2],
            dilation: [1, 1],
            groups,
        };
        let got = ops::conv_transpose2d(
            &t(&x, &xs),
            &t(&wt, &ws),
            Some(&t(&b, &[cout])),
            o,
            [out_pad; 2],
        )
        .unwrap();
        close(&got, &want, &[n, cout, oh, ow], 1e-5);
        grad_check(
            &[(x, xs.to_vec()), (wt, ws.to_vec()), (b, vec![cout])],
            |v| ops::conv_transpose2d(&v[0], &v[1], Some(&v[2]), o, [out_pad; 2]),
        );
    }
}

// ---------- normalisation, softmax, attention ----------

fn normalize(g: &[f32], eps: f32) -> Vec<f32> {
    let m = g.iter().sum::<f32>() / g.len() as f32;
    let v = g.iter().map(|x| (x - m).powi(2)).sum::<f32>() / g.len() as f32;
    g.iter().map(|x| (x - m) / (v + eps).sqrt()).collect()
}

#[test]
fn group_norm_matches_formula() {
    init();
    let xs = [2, 4, 3, 2];
    let (x, _) = r(&xs, 70);
    let (w, _) = r(&[4], 71);
    let (b, _) = r(&[4], 72);
    let groups = 2;
    let per = 2 * 3 * 2;
    let mut want = Vec::new();
    for chunk in x.chunks(per) {
        want.extend(normalize(chunk, 1e-5));
    }
    let affine: Vec<f32> = want
        .iter()
        .enumerate()
        .map(|(i, v)| v * w[(i / 6) % 4] + b[(i / 6) % 4])
        .collect();
    let got = ops::group_norm(
        &t(&x, &xs),
        groups,
        Some(&t(&w, &[4])),
        Some(&t(&b, &[4])),
        1e-5,
    )
    .unwrap();
    close(&got, &affine, &xs, 1e-5);
    close(
        &ops::group_norm(&t(&x, &xs), groups, None, None, 1e-5).unwrap(),
        &want,
        &xs,
        1e-5,
    );
    assert!(
        ops::group_norm(&t(&x, &xs), 3, None, None, 1e-5)
            .unwrap_err()
            .to_string()
            .contains("do not divide")
    );
    grad_check(&[(x, xs.to_vec()), (w, vec![4]), (b, vec![4])], |v| {
        ops::group_norm(&v[0], 2, Some(&v[1]), Some(&v[2]), 1e-5)
    });
}

/// `group_norm_silu` (the op itself, not plugin-api's fallback for older hosts) is silu of the
/// group norm (with and without the affine), its gradients those of finite differences, and a
/// bad shape an error naming the op.
#[test]
fn group_norm_silu_is_silu_of_the_group_norm() {
    init();
    let fused = |x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>| {
        let args = ferrite_plugin_api::op::GroupNorm {
            groups: 2,
            eps: 1e-5,
        };
        ferrite_plugin_api::host::call1_opt(
            ferrite_plugin_api::Op::GroupNormSilu(args),
            &[x],
            &[w, b],
        )
    };
    let xs = [2, 4, 3, 2];
    let (x, _) = r(&xs, 73);
    let (w, _) = r(&[4], 74);
    let (b, _) = r(&[4], 75);
    let (x_t, w_t, b_t) = (t(&x, &xs), t(&w, &[4]), t(&b, &[4]));
    for (wo, bo) in [(Some(&w_t), Some(&b_t)), (None, None), (Some(&w_t), None)] {
        let want = ops::group_norm(&x_t, 2, wo, bo, 1e-5)
            .unwrap()
            .silu()
            .unwrap();
        let want = want.to_vec().unwrap();
        close(&fused(&x_t, wo, bo).unwrap(), &want, &xs, 1e-6);
        close(
            &ops::group_norm_silu(&x_t, 2, wo, bo, 1e-5).unwrap(),
            &want,
            &xs,
            1e-6,
        );
    }
    let e = fused(&x_t, Some(&t(&w[..3], &[3])), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group_norm_silu") && e.contains("does not match 4 channels"),
        "{e}"
    );
    grad_check(
        &[(x.clone(), xs.to_vec()), (w, vec![4]), (b, vec![4])],
        |v| fused(&v[0], Some(&v[1]), Some(&v[2])),
    );
    grad_check(&[(x, xs.to_vec())], |v| fused(&v[0], None, None));
}

/// A scalar has no last dimension to normalise over: an error naming the op, not a panic.
#[test]
fn norms_of_a_scalar_are_a_clear_error() {
    init();
    let scalar = t(&[2.0], &[]);
    for (name, r) in [
        ("layer_norm", ops::layer_norm(&scalar, None, None, 1e-5)),
        ("rms_norm", ops::rms_norm(&scalar, None, 1e-5)),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains(&format!("op {name}")) && e.contains("at least one dimension"),
            "{e}"
        );
    }
}

#[test]
fn layer_norm_and_rms_norm_match_formula() {
    init();
    let xs = [2, 3, 5];
    let (x, _) = r(&xs, 80);
    let (w, _) = r(&[5], 81);
    let (b, _) = r(&[5], 82);
    let mut want = Vec::new();
    for row in x.chunks(5) {
        want.extend(
            normalize(row, 1e-6)
                .iter()
                .enumerate()
                .map(|(j, v)| v * w[j] + b[j]),
        );
    }
    close(
        &ops::layer_norm(&t(&x, &xs), Some(&t(&w, &[5])), Some(&t(&b, &[5])), 1e-6).unwrap(),
        &want,
        &xs,
        1e-5,
    );
    grad_check(
        &[(x.clone(), xs.to_vec()), (w.clone(), vec![5]), (b, vec![5])],
        |v| ops::layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-6),
    );
    let mut want = Vec::new();
    for row in x.chunks(5) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / 5.0;
        want.extend(
            row.iter()
                .enumerate()
                .map(|(j, v)| v / (ms + 1e-6).sqrt() * w[j]),
        );
    }
    close(
        &ops::rms_norm(&t(&x, &xs), Some(&t(&w, &[5])), 1e-6).unwrap(),
        &want,
        &xs,
        1e-5,
    );
    grad_check(&[(x, xs.to_vec()), (w, vec![5])], |v| {
        ops::rms_norm(&v[0], Some(&v[1]), 1e-6)
    });
}

fn softmax_rows(v: &[f32], n: usize) -> Vec<f32> {
    v.chunks(n)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |x| x / s)
        })
        .collect()
}

#[test]
fn softmax_matches_formula() {
    init();
    let s = [2, 3, 4];
    let (a, _) = r(&s, 90);
    close(
        &t(&a, &s).softmax(2).unwrap(),
        &softmax_rows(&a, 4),
        &s,
        1e-6,
    );
    // Over dim 1: transpose, softmax rows, transpose back.
    let tr: Vec<f32> = (0..24)
        .map(|o| {
            let i = unravel(o, &[2, 4, 3]);
            a[ravel(&[i[0], i[2], i[1]], &s)]
        })
        .collect();
    let sm = softmax_rows(&tr, 3);
    let want: Vec<f32> = (0..24)
        .map(|o| {
            let i = unravel(o, &s);
            sm[ravel(&[i[0], i[2], i[1]], &[2, 4, 3])]
        })
        .collect();
    close(&t(&a, &s).softmax(1).unwrap(), &want, &s, 1e-6);
    grad_check(&[(a.clone(), s.to_vec())], |x| x[0].softmax(2));
    grad_check(&[(a, s.to_vec())], |x| x[0].softmax(0));
}

/// softmax(q kᵀ · scale + bias) v for [B, H, L, D].
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: [usize; 5],
    scale: f32,
    bias: Option<&dyn Fn(usize, usize) -> f32>,
) -> Vec<f32> {
    let [bh, lq, lk, d, dv] = dims;
    let mut out = vec![0.0; bh * lq * dv];
    for h in 0..bh {
        for i in 0..lq {
            let mut s: Vec<f32> = (0..lk)
                .map(|j| {
                    (0..d)
                        .map(|p| q[(h * lq + i) * d + p] * k[(h * lk + j) * d + p])
                        .sum::<f32>()
                        * scale
                })
                .collect();
            if let Some(b) = bias {
                for (j, x) in s.iter_mut().enumerate() {
                    *x += b(i, j);
                }
            }
            let p = softmax_rows(&s, lk);
            for c in 0..dv {
                out[(h * lq + i) * dv + c] = (0..lk).map(|j| p[j] * v[(h * lk + j) * dv + c]).sum();
            }
        }
    }
    out
}

#[test]
fn attention_matches_softmax_qk_v() {
    init();
    let (b, h, lq, lk, d) = (2, 2, 3, 4, 5);
    let (q, qs) = r(&[b, h, lq, d], 100);
    let (k, ks) = r(&[b, h, lk, d], 101);
    let (v, vs) = r(&[b, h, lk, d], 102);
    let dims = [b * h, lq, lk, d, d];
    let want = attention_ref(&q, &k, &v, dims, 1.0 / (d as f32).sqrt(), None);
    close(
        &ops::attention(&t(&q, &qs), &t(&k, &ks), &t(&v, &vs), None, None).unwrap(),
        &want,
        &[b, h, lq, d],
        1e-5,
    );
    let want = attention_ref(&q, &k, &v, dims, 0.3, None);
    close(
        &ops::attention(&t(&q, &qs), &t(&k, &ks), &t(&v, &vs), None, Some(0.3)).unwrap(),
        &want,
        &[b, h, lq, d],
        1e-5,
    );
    // An additive float mask broadcast over batch and heads.
    let (m, _) = r(&[lq, lk], 103);
    let mask = t(&m, &[1, 1, lq, lk]);
    let bias = |i: usize, j: usize| m[i * lk + j];
    let want = attention_ref(&q, &k, &v, dims, 0.3, Some(&bias));
    close(
        &ops::attention(
            &t(&q, &qs),
            &t(&k, &ks),
            &t(&v, &vs),
            Some(&mask),
            Some(0.3),
        )
        .unwrap(),
        &want,
        &[b, h, lq, d],
        1e-5,
    );
    // A bool mask hides keys (here the last one) where true.
    let hide: Vec<f32> = (0..lq * lk)
        .map(|i| (i % lk == lk - 1) as u8 as f32)
        .collect();
    let bmask = t(&hide, &[1, 1, lq, lk]).gt_scalar(0.5).unwrap();
    let bias = |_: usize, j: usize| if j == lk - 1 { f32::NEG_INFINITY } else { 0.0 };
    let want = attention_ref(&q, &k, &v, dims, 0.3, Some(&bias));
    close(
        &ops::attention(
            &t(&q, &qs),
            &t(&k, &ks),
            &t(&v, &vs),
            Some(&bmask),
            Some(0.3),
        )
        .unwrap(),
        &want,
        &[b, h, lq, d],
        1e-5,
    );
    grad_check(&[(q, qs), (k, ks), (v, vs)], |x| {
        ops::attention(&x[0], &x[1], &x[2], Some(&mask), None)
    });
}

// ---------- resampling, dropout, embedding ----------

#[test]
fn interpolate_matches_torch_semantics() {
    init();
    let xs = [1, 2, 3, 4];
    let (x, _) = r(&xs, 110);
    let (oh, ow) = (5, 7);
    // nearest: src = floor(dst * in / out)
    let want: Vec<f32> = (0..2 * oh * ow)
        .map(|o| {
            let (c, y, xx) = (o / (oh * ow), (o / ow) % oh, o % ow);
            let sy = ((y as f32 * 3.0 / oh as f32).floor() as usize).min(2);
            let sx = ((xx as f32 * 4.0 / ow as f32).floor() as usize).min(3);
            x[(c * 3 + sy) * 4 + sx]
        })
        .collect();
    close(
        &ops::interpolate(&t(&x, &xs), [oh, ow], InterpolateMode::Nearest).unwrap(),
        &want,
        &[1, 2, oh, ow],
        1e-6,
    );
    // bilinear, align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
    let coord = |d: usize, inn: usize, out: usize| -> (usize, usize, f32) {
        let s = ((d as f32 + 0.5) * inn as f32 / out as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inn - 1);
        let i1 = (i0 + 1).min(inn - 1);
        (i0, i1, s - i0 as f32)
    };
    let want: Vec<f32> = (0..2 * oh * ow)
        .map(|o| {
            let (c, y, xx) = (o / (oh * ow), (o / ow) % oh, o % ow);
            let (y0, y1, fy) = coord(y, 3, oh);
            let (x0, x1, fx) = coord(xx, 4, ow);
            let p = |yy: usize, xq: usize| x[(c * 3 + yy) * 4 + xq];
            (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1))
                + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1))
        })
        .collect();
    close(
        &ops::interpolate(&t(&x, &xs), [oh, ow], InterpolateMode::Bilinear).unwrap(),
        &want,
        &[1, 2, oh, ow],
        1e-5,
    );
    grad_check(&[(x.clone(), xs.to_vec())], |v| {
        ops::interpolate(&v[0], [oh, ow], InterpolateMode::Bilinear)
    });
    grad_check(&[(x, xs.to_vec())], |v| {
        ops::interpolate(&v[0], [6, 8], InterpolateMode::Nearest)
    });
}

#[test]
fn dropout_zeroes_and_rescales() {
    init();
    let n = 20000;
    let x = Tensor::ones(&[n], DType::F32).unwrap();
    x.set_requires_grad(true).unwrap();
    let y = ops::dropout(&x, 0.25).unwrap();
    let v = y.to_vec().unwrap();
    let zeros = v.iter().filter(|&&a| a == 0.0).count() as f32 / n as f32;
    assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
    assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.75).abs() < 1e-6));
    // The gradient is the same mask, scaled.
    let g = y
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&x)
        .unwrap()
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(g, v);
    close(&ops::dropout(&x, 0.0).unwrap(), &vec![1.0; n], &[n], 0.0);
    assert!(
        ops::dropout(&x, 1.0)
            .unwrap_err()
            .to_string()
            .contains("outside")
    );
}

#[test]
fn embedding_picks_rows() {
    init();
    let (w, ws) = r(&[6, 3], 120);
    let ids = [4i64, 0, 4, 5];
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| w[i as usize * 3..i as usize * 3 + 3].to_vec())
        .collect();
    let got = ops::embedding(&t(&w, &ws), &Tensor::from_i64(&ids, &[2, 2]).unwrap()).unwrap();
    close(&got, &want, &[2, 2, 3], 0.0);
    grad_check(&[(w, ws)], |v| {
        ops::embedding(&v[0], &Tensor::from_i64(&ids, &[2, 2])?)
    });
}

// ---------- dtype, device, autodiff bookkeeping ----------

#[test]
fn cast_between_float_types() {
    init();
    let (a, s) = r(&[7], 130);
    for (dt, tol) in [(DType::F16, 1e-3), (DType::BF16, 1e-2)] {
        let h = t(&a, &s).cast(dt).unwrap();
        assert_eq!(h.dtype().unwrap(), dt);
        close(&h.cast(DType::F32).unwrap(), &a, &s, tol);
    }
    let i = t(&[1.7, -2.2], &[2]).cast(DType::I64).unwrap();
    close(&i, &[1.0, -2.0], &[2], 0.0);
    // The gradient passes through a cast (finite differences are too coarse at f16 resolution).
    let w = t(&a, &s);
    w.set_requires_grad(true).unwrap();
    let loss = w
        .cast(DType::F16)
        .unwrap()
        .mul_scalar(2.0)
        .unwrap()
        .cast(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    close(
        &loss.backward().unwrap().get(&w).unwrap().unwrap(),
        &[2.0; 7],
        &s,
        1e-3,
    );
}

#[test]
fn to_device_same_device_and_clear_error() {
    init();
    let x = t(&[1.0, 2.0], &[2]);
    close(&x.to_device("cpu").unwrap(), &[1.0, 2.0], &[2], 0.0);
    let e = x.to_device("cuda:1").unwrap_err().to_string();
    assert!(e.contains("cpu") && e.contains("cuda:1"), "{e}");
}

#[test]
fn detach_assign_and_requires_grad() {
    init();
    let w = t(&[1.0, 2.0, 3.0], &[3]);
    w.set_requires_grad(true).unwrap();
    // detach cuts the graph: only the attached branch contributes.
    let loss = w
        .mul_scalar(2.0)
        .unwrap()
        .add(&w.detach().unwrap().mul_scalar(5.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap().get(&w).unwrap().unwrap();
    close(&g, &[2.0; 3], &[3], 0.0);
    // assign updates every holder of the handle and keeps it trainable.
    let alias = w.clone();
    w.assign(&t(&[5.0, 6.0, 7.0], &[3])).unwrap();
    close(&alias, &[5.0, 6.0, 7.0], &[3], 0.0);
    let g = alias
        .powf(2.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&w)
        .unwrap()
        .unwrap();
    close(&g, &[10.0, 12.0, 14.0], &[3], 1e-6);
    assert!(
        w.assign(&t(&[1.0], &[1]))
            .unwrap_err()
            .to_string()
            .contains("shape")
    );
    // A tensor that took no part has no gradient; one that stopped requiring grad has none either.
    let other = t(&[1.0], &[1]);
    let grads = w.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&other).unwrap().is_none());
    w.set_requires_grad(false).unwrap();
    assert!(
        w.sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&w)
            .unwrap()
            .is_none()
    );
    assert!(
        t(&[1.0, 2.0], &[2])
            .backward()
            .unwrap_err()
            .to_string()
            .contains("one element")
    );
}

/// The raw ABI call, as a plugin built against another plugin-api would make it.
fn raw_call(code: u32, inputs: &[TensorId]) -> String {
    use abi_stable::std_types::RSlice;
    let h = ferrite_plugin_api::host::host().unwrap();
    (h.call())(
        ferrite_plugin_api::OpCode(code),
        RSlice::from_slice(inputs),
        RSlice::from_slice(&[]),
    )
    .into_result()
    .unwrap_err()
    .into_string()
}

#[test]
fn unknown_op_code_is_a_clear_error() {
    init();
    let e = raw_call(9999, &[]);
    assert!(e.contains("9999") && e.contains("not known"), "{e}");
    let e = raw_call(ferrite_plugin_api::OpCode::EXP.0, &[TensorId(u64::MAX)]);
    assert!(e.contains("not live"), "{e}");
    // The op table checks the number of inputs before anything runs.
    let e = raw_call(ferrite_plugin_api::OpCode::EXP.0, &[]);
    assert!(e.contains("op exp: expected 1 tensor inputs, got 0"), "{e}");
}

#[test]
fn each_holder_has_its_own_handle() {
    init();
    let h = ferrite_plugin_api::host::host().unwrap();
    let a = t(&[1.0, 2.0], &[2]);
    let b = a.try_clone().unwrap();
    assert_ne!(a.id(), b.id(), "a retain gives a new handle");
    // An in-place update through one handle is seen through the other.
    b.assign(&t(&[5.0, 6.0], &[2])).unwrap();
    assert_eq!(a.to_vec().unwrap(), vec![5.0, 6.0]);
    // A holder that releases its handle twice cannot drop the other holder's reference.
    let extra = b.try_clone().unwrap().into_raw();
    (h.release())(extra);
    (h.release())(extra);
    drop(b);
    assert_eq!(a.to_vec().unwrap(), vec![5.0, 6.0]);
}

#[test]
fn fused_attention_without_grad_equals_the_tracked_path() {
    // Long enough (600² scores) for flex to pick its flash kernel when nothing is tracked; the
    // tracked call goes through the runtime's O(L) op. Both must agree.
    init();
    let s = [1, 2, 600, 8];
    let (q, _) = r(&s, 140);
    let (k, _) = r(&s, 141);
    let (v, _) = r(&s, 142);
    let fused = ops::attention(&t(&q, &s), &t(&k, &s), &t(&v, &s), None, None).unwrap();
    let qt = t(&q, &s);
    qt.set_requires_grad(true).unwrap();
    let tracked = ops::attention(&qt, &t(&k, &s), &t(&v, &s), None, None).unwrap();
    close(&fused, &tracked.to_vec().unwrap(), &s, 1e-5);
}

/// Unmasked attention in training (the runtime's O(L) op) has the gradients of central
/// differences; q, k and v of different batch or head counts are refused, tracked or not.
#[test]
fn attention_gradients_in_training_match_finite_differences() {
    init();
    let attention = |x: &[Tensor]| ops::attention(&x[0], &x[1], &x[2], None, None);
    grad_check(
        &[
            r(&[1, 2, 5, 3], 150),
            r(&[1, 2, 4, 3], 151),
            r(&[1, 2, 4, 2], 152),
        ],
        attention,
    );
    let (q, k) = (r(&[2, 1, 3, 2], 153), r(&[1, 1, 4, 2], 154));
    let (q, k) = (t(&q.0, &q.1), t(&k.0, &k.1));
    q.set_requires_grad(true).unwrap();
    let e = ops::attention(&q, &k, &k, None, None).unwrap_err();
    assert!(
        e.to_string().contains("must be [B, H, L, D] and agree"),
        "{e}"
    );
}

/// The multi-tensor ops against the same arithmetic written out per element; lists of unequal
/// length or shape are refused naming the op; assigning keeps each target's dtype.
#[test]
fn foreach_ops_compute_each_pair_and_keep_the_targets_dtype() {
    use ferrite_plugin_api::optim::foreach;
    init();
    let (xs, ys, zs) = (
        [r(&[3, 2], 1), r(&[5], 2)],
        [r(&[3, 2], 3), r(&[5], 4)],
        [r(&[3, 2], 5), r(&[5], 6)],
    );
    let list = |v: &[(Vec<f32>, Vec<usize>); 2]| v.iter().map(|(d, s)| t(d, s)).collect::<Vec<_>>();
    let (x, y, z) = (list(&xs), list(&ys), list(&zs));
    let axpby = foreach::axpby(0.5, &x, -2.0, &y).unwrap();
    let addcmul = foreach::addcmul(0.9, &x, 0.1, &y, &z).unwrap();
    let addcdiv = foreach::addcdiv_sqrt(
        0.99,
        &x,
        -0.01,
        &y,
        2.0,
        &z.iter().map(|t| t.abs().unwrap()).collect::<Vec<_>>(),
        1e-8,
    )
    .unwrap();
    for i in 0..2 {
        let (a, b, c, s) = (&xs[i].0, &ys[i].0, &zs[i].0, &xs[i].1);
        let want: Vec<f32> = a.iter().zip(b).map(|(a, b)| 0.5 * a - 2.0 * b).collect();
        close(&axpby[i], &want, s, 1e-6);
        let want: Vec<f32> = (0..a.len())
            .map(|j| 0.9 * a[j] + 0.1 * b[j] * c[j])
            .collect();
        close(&addcmul[i], &want, s, 1e-6);
        let want: Vec<f32> = (0..a.len())
            .map(|j| 0.99 * a[j] - 0.01 * b[j] / (2.0 * c[j].abs().sqrt() + 1e-8))
            .collect();
        close(&addcdiv[i], &want, s, 1e-6);
    }
    let e = foreach::axpby(1.0, &x, 1.0, &y[..1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ in length"), "{e}");
    let swapped = [y[1].clone(), y[0].clone()];
    let e = foreach::axpby(1.0, &x, 1.0, &swapped)
        .unwrap_err()
        .to_string();
    assert!(e.contains("foreach_axpby") && e.contains("shapes"), "{e}");
    let targets: Vec<Tensor> = x.iter().map(|t| t.cast(DType::BF16).unwrap()).collect();
    foreach::assign(&targets, &axpby).unwrap();
    for (tg, v) in targets.iter().zip(&axpby) {
        assert_eq!(tg.dtype().unwrap(), DType::BF16);
        let want = v.cast(DType::BF16).unwrap().to_vec().unwrap();
        assert_eq!(tg.to_vec().unwrap(), want);
    }
}
