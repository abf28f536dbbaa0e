//! `ferrite bench ops`: what the plugin ABI costs per op, against calling burn directly in the
//! same process. Prints figures; asserts nothing.

use std::time::{Duration, Instant};

use burn_backend::{AutodiffBackend, FloatDType, Shape, TensorData};
use ferrite_plugin_api::Tensor;

use crate as runtime;
use crate::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("the backend failed to synchronise: {0}")]
    Sync(String),
    #[error(transparent)]
    Op(#[from] ferrite_plugin_api::Error),
}

type Result<T> = std::result::Result<T, BenchError>;

fn time<T>(iters: usize, mut f: impl FnMut() -> T) -> Duration {
    // One warm-up run so allocation pools and kernels are ready.
    drop(f());
    let start = Instant::now();
    for _ in 0..iters {
        drop(f());
    }
    start.elapsed() / iters as u32
}

fn row(name: &str, direct: Duration, abi: Duration) {
    let overhead = abi.as_nanos() as i128 - direct.as_nanos() as i128;
    println!(
        "{name:<16} {:>12.3?} {:>12.3?} {:>12} ns {:>8.2}x",
        direct,
        abi,
        overhead,
        abi.as_secs_f64() / direct.as_secs_f64()
    );
}

fn run<B: AutodiffBackend>(device: B::Device) -> Result<()> {
    let sync = || B::sync(&device).map_err(|e| BenchError::Sync(e.to_string()));
    println!("device: {}", runtime::device_name());
    println!(
        "{:<16} {:>12} {:>12} {:>15} {:>9}",
        "op", "burn direct", "through ABI", "overhead/op", "ratio"
    );

    // A tiny tensor: the cost is all dispatch.
    let tiny =
        |d: &B::Device| B::float_from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [4]), d);
    let (a, b) = (tiny(&device), tiny(&device));
    let n = 20_000;
    let direct = time(n, || B::float_add(a.clone(), b.clone()));
    sync()?;
    let (ta, tb) = (
        Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[4])?,
        Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[4])?,
    );
    let abi = time(n, || ta.add(&tb));
    sync()?;
    row("add [4]", direct, abi);

    let direct = time(n, || B::float_exp(a.clone()));
    let abi = time(n, || ta.exp());
    sync()?;
    row("exp [4]", direct, abi);

    // A 1024² matmul: the cost is all compute.
    let shape = Shape::from(vec![1024, 1024]);
    let (m1, m2) = (
        B::float_ones(shape.clone(), &device, FloatDType::F32),
        B::float_ones(shape, &device, FloatDType::F32),
    );
    let iters = 10;
    let direct = time(iters, || {
        let r = B::float_matmul(m1.clone(), m2.clone());
        B::sync(&device).ok();
        r
    });
    let (t1, t2) = (
        Tensor::ones(&[1024, 1024], ferrite_plugin_api::DType::F32)?,
        Tensor::ones(&[1024, 1024], ferrite_plugin_api::DType::F32)?,
    );
    let abi = time(iters, || {
        let r = t1.matmul(&t2);
        B::sync(&device).ok();
        r
    });
    row("matmul 1024²", direct, abi);
    Ok(())
}

pub fn ops(device: &str) -> Result<()> {
    runtime::init(device)?;
    if runtime::device_name() == "cpu" {
        return run::<runtime::CpuBackend>(Default::default());
    }
    #[cfg(feature = "cuda")]
    {
        let index = runtime::device_name()
            .trim_start_matches("cuda:")
            .parse()
            .unwrap_or(0);
        return run::<runtime::CudaBackend>(burn::backend::cuda::CudaDevice::new(index));
    }
    #[allow(unreachable_code)]
    Ok(())
}
