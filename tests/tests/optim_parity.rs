//! Optimizer plugins against torch.optim trajectories (fixtures from tests/fixtures/gen/optimizers.py).

use ferrite::plugins::Registry;
use ferrite::runtime;
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Param, Tensor, Weights};
use ferrite_tests::profile_dir;

const STEPS: usize = 10;

fn fixture(name: &str) -> String {
    format!(
        "{}/fixtures/optim/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Parameters `p0`, `p1`, ... with their gradients (None: no gradient this step).
fn named<'a>(params: &'a [Tensor], grads: &'a [Option<Tensor>]) -> Vec<Param<'a>> {
    const NAMES: [&str; 2] = ["p0", "p1"];
    params
        .iter()
        .zip(grads)
        .enumerate()
        .map(|(i, (tensor, grad))| Param {
            name: NAMES[i],
            tensor,
            grad: grad.as_ref(),
        })
        .collect()
}

fn meta(w: &Weights, key: &str) -> String {
    w.metadata()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap()
}

/// Runs the plugin over the fixture's gradients; returns the worst relative error per step.
fn replay(optimizer: &str, name: &str) -> f64 {
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture(name)).unwrap();
    let mut opt = registry.optimizer(optimizer, &meta(&w, "options")).unwrap();
    let lrs: Vec<f64> = serde_json::from_str(&meta(&w, "lrs")).unwrap();
    let params: Vec<Tensor> = (0..2)
        .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
        .collect();
    let mut worst = 0.0f64;
    for (t, lr) in lrs.iter().enumerate().take(STEPS) {
        let grads: Vec<Option<Tensor>> = (0..2)
            .map(|i| w.get(&format!("step{t}.grad{i}"), DType::F32).ok())
            .collect();
        opt.step(&named(&params, &grads), *lr).unwrap();
        for (i, p) in params.iter().enumerate() {
            let want = w
                .get(&format!("step{t}.p{i}"), DType::F32)
                .unwrap()
                .to_vec()
                .unwrap();
            for (a, b) in p.to_vec().unwrap().iter().zip(&want) {
                let rel = ((a - b).abs() / b.abs().max(1e-6)) as f64;
                worst = worst.max(rel);
            }
        }
    }
    println!(
        "{optimizer} vs torch ({name}): worst relative error over {STEPS} steps = {worst:.3e}"
    );
    worst
}

#[test]
fn adamw_matches_torch() {
    assert!(replay("adamw", "adamw") < 1e-6);
}

#[test]
fn adam_matches_torch() {
    assert!(replay("adam", "adam") < 1e-6);
}

#[test]
fn sgd_nesterov_matches_torch() {
    assert!(replay("sgd", "sgd_nesterov") < 1e-6);
}

#[test]
fn sgd_dampened_matches_torch() {
    assert!(replay("sgd", "sgd_dampened") < 1e-6);
}

/// A parameter without a gradient is skipped with its state kept (torch's `grad is None`), and
/// the other parameter's updates stay torch's: state goes by name, not by position.
#[test]
fn adamw_skips_a_parameter_without_a_gradient_as_torch_does() {
    assert!(replay("adamw", "adamw_missing_grad") < 1e-6);
}

#[test]
fn sgd_skips_a_parameter_without_a_gradient_as_torch_does() {
    assert!(replay("sgd", "sgd_missing_grad") < 1e-6);
}

#[test]
fn adamw_state_round_trips() {
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture("adamw")).unwrap();
    let opts = meta(&w, "options");
    let lrs: Vec<f64> = serde_json::from_str(&meta(&w, "lrs")).unwrap();
    let p = || -> Vec<Tensor> {
        (0..2)
            .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
            .collect()
    };
    let grads = |t: usize| -> Vec<Option<Tensor>> {
        (0..2)
            .map(|i| w.get(&format!("step{t}.grad{i}"), DType::F32).ok())
            .collect()
    };
    // Straight run of 4 steps vs 2 steps + export/import into a fresh optimizer + 2 steps.
    let (a, b) = (p(), p());
    let mut oa = registry.optimizer("adamw", &opts).unwrap();
    let mut ob = registry.optimizer("adamw", &opts).unwrap();
    for (t, &lr) in lrs.iter().enumerate().take(4) {
        let g = grads(t);
        oa.step(&named(&a, &g), lr).unwrap();
        if t == 2 {
            let state = ob.state().unwrap();
            assert!(
                state.iter().any(|(n, _)| n == "p0.exp_avg_sq"),
                "{:?}",
                state.iter().map(|s| &s.0).collect::<Vec<_>>()
            );
            ob = registry.optimizer("adamw", &opts).unwrap();
            ob.load_state(&state).unwrap();
        }
        ob.step(&named(&b, &g), lr).unwrap();
    }
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap());
    }
}

#[test]
fn bad_options_name_the_optimizer_and_field() {
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let e = registry
        .optimizer("adamw", r#"{"beta3": 0.5}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("adamw") && e.contains("beta3"), "{e}");
    let e = registry
        .optimizer("sgd", r#"{"momentum": -1}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("momentum"), "{e}");
    let e = registry.optimizer("lion", "{}").err().unwrap().to_string();
    assert!(e.contains("no optimizer plugin with id `lion`"), "{e}");
}
