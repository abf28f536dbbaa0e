//! The optimizer step's per-call overhead: AdamW over many parameters, one call per tensor and
//! op (`foreach = false`) against the multi-tensor ops (`foreach = true`), on parameter sets
//! shaped like an SD 1.5 LoRA (rank 16 on 256 layers: 512 small tensors) and a fine-tune (686
//! tensors of 320×320). Prints the median step time of each and the ratio; asserts nothing.
//!
//!     cargo run --release -p ferrite-tests --example bench_optimizer -- [steps] [device]

use std::time::{Duration, Instant};

use ferrite::plugins::Registry;
use ferrite::runtime::{self, Scope};
use ferrite::settings::Settings;
use ferrite_plugin_api::{Generator, Param, Tensor};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median time of an AdamW step over `shapes`, after two warm-up steps.
fn step_time(registry: &Registry, shapes: &[Vec<usize>], foreach: bool, steps: usize) -> Duration {
    let rng = Generator::new(7).unwrap();
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(s, &rng).unwrap())
        .collect();
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(s, &rng).unwrap())
        .collect();
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("p{i}.weight")).collect();
    let options = format!(r#"{{"foreach": {foreach}}}"#);
    let mut opt = registry.optimizer("adamw", &options).unwrap();
    let named: Vec<Param<'_>> = names
        .iter()
        .zip(&params)
        .zip(&grads)
        .map(|((name, tensor), g)| Param {
            name,
            tensor,
            grad: Some(g),
        })
        .collect();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        opt.step(&named, 1e-4).unwrap();
        // The step's work is queued on the device: read one value back to wait for it.
        params[params.len() - 1].to_vec().unwrap();
        if i >= 2 {
            times.push(t.elapsed());
        }
    }
    median(times)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let device = args.get(2).cloned().unwrap_or_else(|| "cpu".into());
    runtime::init(&device).unwrap();
    let (dev, _) = runtime::for_device(&device).unwrap();
    let scope = Scope::new(dev);
    let _scope = scope.enter();
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let lora: Vec<Vec<usize>> = (0..256)
        .flat_map(|_| [vec![16, 320], vec![320, 16]])
        .collect();
    let fine_tune: Vec<Vec<usize>> = (0..686).map(|_| vec![320, 320]).collect();
    println!("AdamW step on {device}, median of {steps}:");
    for (name, shapes) in [
        ("LoRA-like, 512 tensors", &lora),
        ("fine-tune-like, 686 tensors", &fine_tune),
    ] {
        let per_tensor = step_time(&registry, shapes, false, steps);
        let foreach = step_time(&registry, shapes, true, steps);
        println!(
            "  {name}: per tensor {:.1} ms, foreach {:.1} ms, ratio {:.2}",
            per_tensor.as_secs_f64() * 1e3,
            foreach.as_secs_f64() * 1e3,
            per_tensor.as_secs_f64() / foreach.as_secs_f64()
        );
    }
}
