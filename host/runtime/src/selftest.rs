//! `ferrite selftest --device D`: every op family plugins use, and its gradients, computed on
//! `D` and on the CPU backend from the same inputs and compared. It lives in the binary so that
//! a GPU machine without a Rust toolchain can run it (the device harness, tools/device/).

use ferrite_plugin_api::{DType, Result, Tensor, checkpoint, ops};

use crate::{Device, DeviceError, Scope, TrainDtype, WeightFormat};

/// One check's outcome: the largest difference of its outputs and gradients from the CPU's,
/// relative to the CPU values' largest magnitude.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub error: f32,
    pub tolerance: f32,
    /// Wall time of the case on the device under test (the first use of a kernel includes its
    /// compilation there).
    pub elapsed: std::time::Duration,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("selftest {0}: {1}")]
    Op(&'static str, ferrite_plugin_api::Error),
}

/// Inputs as host values: every device builds its tensors from the same numbers.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
        })
        .collect()
}

fn input(shape: &[usize], seed: u64) -> Result<Tensor> {
    let t = Tensor::from_f32(&values(shape.iter().product(), seed), shape)?;
    t.set_requires_grad(true)?;
    Ok(t)
}

/// Keeps a frozen weight in `format` on the current device.
fn keep(w: &Tensor, format: WeightFormat) -> Result<()> {
    Device::current()
        .ok_or_else(|| ferrite_plugin_api::Error("no device".into()))?
        .keep_weight(w.id(), format)
        .map_err(ferrite_plugin_api::Error)
}

/// A linear layer of `ins` inputs on a weight kept in `format`.
fn kept_linear(format: WeightFormat, ins: usize) -> Result<(Vec<Tensor>, Tensor)> {
    let (x, w) = (
        input(&[3, ins], 1)?,
        Tensor::from_f32(&values(8 * ins, 2), &[8, ins])?,
    );
    keep(&w, format)?;
    let out = ops::linear(&x, &w, None)?;
    Ok((vec![x], out))
}

/// A check: builds its tracked inputs, computes an output; the suite adds the gradients of
/// `sum(out · r)` with respect to every input.
type Case = fn() -> Result<(Vec<Tensor>, Tensor)>;

fn cases() -> Vec<(&'static str, f32, Case)> {
    vec![
        ("matmul", 1e-4, || {
            let (a, b) = (input(&[2, 5, 7], 1)?, input(&[7, 3], 2)?);
            let out = a.matmul(&b)?;
            Ok((vec![a, b], out))
        }),
        ("linear", 1e-4, || {
            let (x, w, b) = (input(&[3, 8], 1)?, input(&[6, 8], 2)?, input(&[6], 3)?);
            let out = ops::linear(&x, &w, Some(&b))?;
            Ok((vec![x, w, b], out))
        }),
        ("conv2d", 1e-4, || {
            let (x, k, b) = (
                input(&[2, 4, 9, 9], 1)?,
                input(&[6, 4, 3, 3], 2)?,
                input(&[6], 3)?,
            );
            let out = ops::conv2d(
                &x,
                &k,
                Some(&b),
                ops::ConvOptions::padding(1).with_stride(2),
            )?;
            Ok((vec![x, k, b], out))
        }),
        ("conv_transpose2d", 1e-4, || {
            let (x, k) = (input(&[1, 4, 5, 5], 1)?, input(&[4, 3, 3, 3], 2)?);
            let out = ops::conv_transpose2d(&x, &k, None, ops::ConvOptions::default(), [0, 0])?;
            Ok((vec![x, k], out))
        }),
        ("group_norm+silu", 1e-4, || {
            let (x, w, b) = (input(&[2, 8, 4, 4], 1)?, input(&[8], 2)?, input(&[8], 3)?);
            let out = ops::group_norm_silu(&x, 4, Some(&w), Some(&b), 1e-5)?;
            Ok((vec![x, w, b], out))
        }),
        ("layer_norm+gelu", 1e-4, || {
            let (x, w, b) = (input(&[3, 4, 16], 1)?, input(&[16], 2)?, input(&[16], 3)?);
            let out = ops::layer_norm(&x, Some(&w), Some(&b), 1e-5)?.gelu()?;
            Ok((vec![x, w, b], out))
        }),
        ("rms_norm", 1e-4, || {
            let (x, w) = (input(&[3, 16], 1)?, input(&[16], 2)?);
            let out = ops::rms_norm(&x, Some(&w), 1e-6)?;
            Ok((vec![x, w], out))
        }),
        ("softmax", 1e-4, || {
            let x = input(&[4, 9], 1)?;
            let out = x.softmax(1)?;
            Ok((vec![x], out))
        }),
        ("attention (O(L), trained)", 1e-4, || {
            let (q, k, v) = (
                input(&[2, 2, 17, 8], 1)?,
                input(&[2, 2, 11, 8], 2)?,
                input(&[2, 2, 11, 8], 3)?,
            );
            let out = ops::attention(&q, &k, &v, None, None)?;
            Ok((vec![q, k, v], out))
        }),
        ("attention (masked)", 1e-4, || {
            let (q, k) = (input(&[1, 2, 6, 4], 1)?, input(&[1, 2, 6, 4], 2)?);
            let bias = Tensor::from_f32(&values(36, 3), &[1, 1, 6, 6])?;
            let out = ops::attention(&q, &k, &k, Some(&bias), None)?;
            Ok((vec![q, k], out))
        }),
        ("interpolate (nearest 2x)", 1e-5, || {
            let x = input(&[1, 3, 4, 4], 1)?;
            let out = ops::interpolate(&x, [8, 8], ops::InterpolateMode::Nearest)?;
            Ok((vec![x], out))
        }),
        ("elementwise and reductions", 1e-4, || {
            let (a, b) = (input(&[4, 6], 1)?, input(&[6], 2)?);
            let out = a
                .mul(&b)?
                .add(&a.exp()?)?
                .div(&b.abs()?.add_scalar(1.0)?)?
                .sub(&a.sin()?.mul(&a.tanh()?)?)?
                .sum(&[1], true)?
                .add(&a.mean(&[1], true)?)?;
            Ok((vec![a, b], out))
        }),
        ("shape ops", 1e-6, || {
            let a = input(&[2, 3, 4], 1)?;
            let out = Tensor::cat(&[&a.permute(&[2, 0, 1])?, &a.reshape(&[4, 2, 3])?], 0)?
                .narrow(0, 1, 6)?
                .transpose(1, 2)?;
            Ok((vec![a], out))
        }),
        ("linear on nfloat4 weight", 1e-4, || {
            kept_linear(WeightFormat::Nf4, 64)
        }),
        ("linear on float8 weight", 1e-4, || {
            kept_linear(WeightFormat::Float8, 16)
        }),
        ("linear on float16 weight", 1e-4, || {
            kept_linear(WeightFormat::F16, 16)
        }),
        ("conv2d on bfloat16 kernel", 1e-4, || {
            let (x, b) = (input(&[2, 4, 8, 8], 1)?, input(&[6], 3)?);
            let k = Tensor::from_f32(&values(6 * 4 * 9, 2), &[6, 4, 3, 3])?;
            keep(&k, WeightFormat::BF16)?;
            let out = ops::conv2d(
                &x,
                &k,
                Some(&b),
                ops::ConvOptions::padding(1).with_stride(2),
            )?;
            Ok((vec![x, b], out))
        }),
        ("checkpointed block", 1e-4, || {
            let (x, w) = (input(&[3, 8], 1)?, input(&[8, 8], 2)?);
            let out = checkpoint(|| ops::linear(&ops::linear(&x, &w, None)?.silu()?, &w, None))?;
            Ok((vec![x, w], out))
        }),
    ]
}

/// `case`'s output and input gradients (as host values) on `device`.
fn run_case(device: &Device, case: Case, dtype: TrainDtype) -> Result<Vec<Vec<f32>>> {
    let scope = Scope::new(device.clone())
        .with_checkpointing(true)
        .with_train_dtype(dtype);
    let _entered = scope.enter();
    let (inputs, out) = case()?;
    let out = out.cast(DType::F32)?;
    let shape = out.shape()?;
    let r = Tensor::from_f32(&values(shape.iter().product(), 99), &shape)?;
    let grads = out.mul(&r)?.sum_all()?.backward()?;
    let mut all = vec![out.to_vec()?];
    for t in &inputs {
        all.push(match grads.get(t)? {
            Some(g) => g.to_vec()?,
            None => Vec::new(),
        });
    }
    Ok(all)
}

fn relative_error(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    if got.len() != want.len() || got.iter().zip(want).any(|(g, w)| g.len() != w.len()) {
        return f32::INFINITY;
    }
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(w) {
            let e = (a - b).abs() / scale;
            // NaN counts as a failure.
            worst = if e.is_nan() {
                f32::INFINITY
            } else {
                worst.max(e)
            };
        }
    }
    worst
}

/// The train dtypes each check runs in, and the least tolerance each allows (half-precision
/// kernels may round differently: accumulation order, fused casts).
const DTYPES: [(TrainDtype, &str, f32); 3] = [
    (TrainDtype::Float32, "", 0.0),
    (TrainDtype::BFloat16, " [bfloat16]", 2e-2),
    (TrainDtype::Float16, " [float16]", 5e-3),
];

/// Runs every check on `device` against the CPU backend, in f32 and in each half train dtype,
/// handing each to `on_check` as it ends (a run cut short still shows how far it came).
pub fn run(
    device: &str,
    mut on_check: impl FnMut(&Check),
) -> std::result::Result<Vec<Check>, SelftestError> {
    let (target, _) = Device::open(device)?;
    let (cpu, _) = Device::open("cpu")?;
    let mut checks = Vec::new();
    for (name, tolerance, case) in cases() {
        for (dtype, label, least) in DTYPES {
            let want = run_case(&cpu, case, dtype).map_err(|e| SelftestError::Op(name, e))?;
            let start = std::time::Instant::now();
            let got = run_case(&target, case, dtype).map_err(|e| SelftestError::Op(name, e))?;
            let check = Check {
                name: format!("{name}{label}"),
                error: relative_error(&got, &want),
                tolerance: tolerance.max(least),
                elapsed: start.elapsed(),
            };
            on_check(&check);
            checks.push(check);
        }
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite passes on the CPU against itself, and its comparison fails where results
    /// differ: a matmul in bf16 against the f32 one, and a NaN.
    #[test]
    fn the_suite_runs_and_its_comparison_can_fail() {
        let mut seen = 0;
        let checks = run("cpu", |_| seen += 1).unwrap();
        assert_eq!(checks.len(), DTYPES.len() * cases().len());
        assert_eq!(seen, checks.len());
        assert!(checks.iter().all(Check::passed));
        let (cpu, _) = Device::open("cpu").unwrap();
        let (_, tolerance, matmul) = cases()[0];
        let e = relative_error(
            &run_case(&cpu, matmul, TrainDtype::BFloat16).unwrap(),
            &run_case(&cpu, matmul, TrainDtype::Float32).unwrap(),
        );
        assert!(e > tolerance, "{e}");
        assert_eq!(
            relative_error(&[vec![f32::NAN]], &[vec![1.0]]),
            f32::INFINITY
        );
        assert_eq!(
            relative_error(&[vec![1.0]], &[vec![1.0, 2.0]]),
            f32::INFINITY
        );
    }
}
