//! Optimizer plugins against their reference implementations' trajectories (fixtures from
//! tests/fixtures/gen/optimizers.py): torch.optim, lion-pytorch, prodigyopt, dadaptation,
//! transformers' Adafactor, came-pytorch, pytorch-optimizer's AdEMAMix. Every step's parameters
//! are compared; the worst relative difference is printed.

use ferrite::plugins::Registry;
use ferrite::runtime;
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Param, Tensor, Weights};
use ferrite_tests::profile_dir;

fn fixture(name: &str) -> String {
    format!(
        "{}/fixtures/optim/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Parameters `p0`, `p1`, ... with their gradients (None: no gradient this step).
fn named<'a>(params: &'a [Tensor], grads: &'a [Option<Tensor>]) -> Vec<Param<'a>> {
    const NAMES: [&str; 4] = ["p0", "p1", "p2", "p3"];
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

/// Runs the plugin over the fixture's gradients; returns the worst relative error of a
/// parameter at any step (relative to the element, with a floor of a thousandth of the tensor's
/// largest, so that elements near 0 do not dominate). Each of the fixture's parameters must move
/// (by a percent of its size): an optimizer that does nothing cannot pass. Where the reference logs
/// its step-size estimate `d`, the optimizer's own `d` must match it too.
fn replay(optimizer: &str, name: &str) -> f64 {
    replay_with(optimizer, name, serde_json::json!({}))
}

/// [`replay`] with options of the plugin's own merged over the fixture's.
fn replay_with(optimizer: &str, name: &str, extra: serde_json::Value) -> f64 {
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture(name)).unwrap();
    let mut options: serde_json::Value = serde_json::from_str(&meta(&w, "options")).unwrap();
    options
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let mut opt = registry.optimizer(optimizer, &options.to_string()).unwrap();
    let lrs: Vec<f64> = serde_json::from_str(&meta(&w, "lrs")).unwrap();
    let steps: usize = meta(&w, "steps").parse().unwrap();
    let get = |key: String| w.get(&key, DType::F32).unwrap().to_vec().unwrap();
    let n = w
        .infos()
        .iter()
        .filter(|i| i.key.ends_with(".init"))
        .count();
    let params: Vec<Tensor> = (0..n)
        .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
        .collect();
    let mut worst = 0.0f64;
    for (t, lr) in lrs.iter().enumerate().take(steps) {
        let grads: Vec<Option<Tensor>> = (0..n)
            .map(|i| w.get(&format!("step{t}.grad{i}"), DType::F32).ok())
            .collect();
        opt.step(&named(&params, &grads), *lr).unwrap();
        for (i, p) in params.iter().enumerate() {
            let want = get(format!("step{t}.p{i}"));
            let floor = 1e-3 * want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in p.to_vec().unwrap().iter().zip(&want) {
                worst = worst.max(((a - b).abs() / b.abs().max(floor)) as f64);
            }
        }
    }
    let moved = (0..n)
        .map(|i| {
            let (a, b) = (
                get(format!("p{i}.init")),
                get(format!("step{}.p{i}", steps - 1)),
            );
            let size = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                / size
        })
        .fold(f32::INFINITY, f32::min);
    assert!(
        moved > 1e-2,
        "{name}: a parameter of the reference barely moves ({moved:.1e})"
    );
    let d = w.metadata().unwrap().into_iter().find(|(k, _)| k == "d");
    if let Some((_, d)) = d {
        let want: f64 = d.parse().unwrap();
        let state = opt.state().unwrap();
        let got = state
            .iter()
            .find(|(k, _)| k == "d")
            .unwrap()
            .1
            .item()
            .unwrap() as f64;
        let rel = (got - want).abs() / want;
        println!("{optimizer} ({name}): d = {got:.6e}, reference {want:.6e}");
        worst = worst.max(rel);
    }
    println!(
        "{optimizer} vs its reference ({name}): worst relative error over {steps} steps = \
         {worst:.3e} (each parameter moved at least {moved:.1e} of its size)"
    );
    worst
}

/// Muon on a tall and a wide matrix and a conv kernel, Adam on a vector: Newton-Schulz in
/// float32 against the reference's iteration in float32, and in bfloat16 (the default) against
/// the released reference, whose bf16 rounding of each product and sum Ferrite reproduces; a
/// bf16 ulp is 2⁻⁸, and a sum in another order rounds to a neighbour now and then (a rounding
/// in another place, `(c·A)@A` taken as `c·(A@A)`, is off by 0.16).
#[test]
fn muon_matches_the_reference() {
    assert!(replay("muon", "muon_f32") < 1e-5);
    assert!(replay("muon", "muon_plain") < 1e-5);
    assert!(replay("muon", "muon") < 5e-3);
    // Without adam_lr the vector steps at Muon's rate: another trajectory.
    assert!(replay_with("muon", "muon_f32", serde_json::json!({"adam_lr": null})) > 1e-2);
    // With hidden_layers naming only p2, the other matrices go to Adam: another trajectory.
    assert!(
        replay_with(
            "muon",
            "muon_f32",
            serde_json::json!({"hidden_layers": ["p2"]})
        ) > 1e-2
    );
}

/// bitsandbytes' 8-bit optimizers (its CPU update, its reference quantisation): a 65×67 matrix
/// in 18 blocks (the last partial) and an 8×6 one with 32-bit moments (below min_8bit_size) or
/// 8-bit ones in one partial block. (The plugin's unit tests check its codes against the
/// fixture's bitsandbytes maps.)
#[test]
fn eight_bit_optimizers_match_bitsandbytes() {
    for name in ["adamw_8bit", "adam_8bit", "lion_8bit"] {
        assert!(replay(name, name) < 1e-5, "{name}");
    }
    // The same run with f32 moments is another: the 8-bit rounding is what matches.
    let f32_moments = replay_with(
        "adamw_8bit",
        "adamw_8bit",
        serde_json::json!({"min_8bit_size": 1_000_000}),
    );
    assert!(f32_moments > 0.1, "{f32_moments}");
    // The state: u8 codes in the parameter's shape and a scale per block of 256; f32 moments
    // for the parameter below min_8bit_size.
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture("adamw_8bit")).unwrap();
    let params: Vec<Tensor> = (0..2)
        .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
        .collect();
    let grads: Vec<Option<Tensor>> = (0..2)
        .map(|i| w.get(&format!("step0.grad{i}"), DType::F32).ok())
        .collect();
    let mut opt = registry.optimizer("adamw_8bit", "{}").unwrap();
    opt.step(&named(&params, &grads), 1e-3).unwrap();
    let state: std::collections::BTreeMap<String, (DType, Vec<usize>)> = opt
        .state()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, (t.dtype().unwrap(), t.shape().unwrap())))
        .collect();
    assert_eq!(state["p0.state1"], (DType::U8, vec![65, 67]));
    assert_eq!(state["p0.state2"], (DType::U8, vec![65, 67]));
    assert_eq!(state["p0.absmax1"], (DType::F32, vec![18]));
    assert_eq!(state["p1.exp_avg"], (DType::F32, vec![8, 6]));
}

#[test]
fn adamw_matches_torch() {
    assert!(replay("adamw", "adamw") < 1e-6);
}

#[test]
fn adam_matches_torch() {
    assert!(replay("adam", "adam") < 1e-6);
}

/// The multi-tensor path (`foreach = true`) follows torch as the per-tensor one (the default)
/// does, a parameter without a gradient included.
#[test]
fn adam_and_adamw_match_torch_through_the_multi_tensor_ops_too() {
    let foreach = serde_json::json!({"foreach": true});
    for (optimizer, fixture) in [
        ("adamw", "adamw"),
        ("adam", "adam"),
        ("adamw", "adamw_missing_grad"),
    ] {
        assert!(replay_with(optimizer, fixture, foreach.clone()) < 1e-6);
    }
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
fn lion_matches_lion_pytorch() {
    assert!(replay("lion", "lion") < 1e-6);
}

#[test]
fn rmsprop_matches_torch() {
    assert!(replay("rmsprop", "rmsprop") < 1e-6);
    assert!(replay("rmsprop", "rmsprop_centered_momentum") < 1e-6);
}

#[test]
fn adagrad_matches_torch() {
    assert!(replay("adagrad", "adagrad") < 1e-6);
}

// The adaptive optimizers' tolerances: their step size `d` feeds back into every step, so f32
// rounding grows along the run. The references' own f32 runs differ from the same references
// run in f64 by 1.3e-3 (Prodigy), 3.2e-5 (D-Adaptation Adam) and 3.6e-5 (CAME) by this measure;
// Ferrite is closer to the f32 runs than that.

#[test]
fn prodigy_matches_prodigyopt() {
    assert!(replay("prodigy", "prodigy") < 5e-4);
    // No first moment, coupled decay, bias correction, safeguard warmup, d_coef, a growth limit
    // and no slicing.
    assert!(replay("prodigy", "prodigy_variant") < 5e-4);
}

#[test]
fn dadapt_adam_matches_dadaptation() {
    assert!(replay("dadapt_adam", "dadapt_adam") < 1e-4);
}

#[test]
fn adafactor_matches_transformers() {
    assert!(replay("adafactor", "adafactor") < 1e-5);
    // The learning rate ignored: relative step with warmup, scaled by the parameter's RMS.
    assert!(replay("adafactor", "adafactor_relative") < 1e-5);
    assert!(replay("adafactor", "adafactor_warmup_init") < 1e-5);
}

#[test]
fn came_matches_came_pytorch() {
    assert!(replay("came", "came") < 1e-4);
}

#[test]
fn ademamix_matches_pytorch_optimizer() {
    assert!(replay("ademamix", "ademamix") < 1e-5);
}

/// Schedule-free AdamW's training point y follows schedulefree's step for step (warmup, r,
/// weight_lr_power, a parameter without a gradient), and its `eval` state is the x that
/// schedulefree's `eval()` puts in the parameters.
#[test]
fn schedule_free_adamw_matches_schedulefree() {
    assert!(replay("schedule_free_adamw", "schedule_free_adamw") < 1e-5);
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture("schedule_free_adamw")).unwrap();
    let mut opt = registry
        .optimizer("schedule_free_adamw", &meta(&w, "options"))
        .unwrap();
    let lrs: Vec<f64> = serde_json::from_str(&meta(&w, "lrs")).unwrap();
    let params: Vec<Tensor> = (0..2)
        .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
        .collect();
    for (t, lr) in lrs.iter().enumerate() {
        let grads: Vec<Option<Tensor>> = (0..2)
            .map(|i| w.get(&format!("step{t}.grad{i}"), DType::F32).ok())
            .collect();
        opt.step(&named(&params, &grads), *lr).unwrap();
    }
    let state = opt.state().unwrap();
    for (i, p) in ["p0", "p1"].iter().enumerate() {
        let x = &state
            .iter()
            .find(|(k, _)| *k == format!("{p}.eval"))
            .unwrap()
            .1;
        let want = w.get(&format!("eval.p{i}"), DType::F32).unwrap();
        let d = ferrite_tests::max_abs_diff(x, &want);
        let trained = ferrite_tests::max_abs_diff(&params[i], &want);
        println!(
            "schedule-free eval weights of {p}: max abs diff {d:.2e} (y is {trained:.2e} away)"
        );
        assert!(d < 1e-6 && trained > 1e-3, "{p}: {d} / {trained}");
    }
}

/// Every optimizer's saved state, loaded into a fresh instance half way, continues the run
/// exactly (the adaptive ones' own scalars included).
#[test]
fn every_optimizers_state_round_trips() {
    for (optimizer, fixture) in [
        ("lion", "lion"),
        ("rmsprop", "rmsprop_centered_momentum"),
        ("adagrad", "adagrad"),
        ("prodigy", "prodigy"),
        ("dadapt_adam", "dadapt_adam"),
        ("adafactor", "adafactor"),
        ("came", "came"),
        ("ademamix", "ademamix"),
        ("schedule_free_adamw", "schedule_free_adamw"),
        ("muon", "muon"),
        ("adamw_8bit", "adamw_8bit"),
        ("lion_8bit", "lion_8bit"),
    ] {
        state_round_trips(optimizer, fixture);
    }
}

fn state_round_trips(optimizer: &str, fixture_name: &str) {
    runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let w = Weights::open(&fixture(fixture_name)).unwrap();
    let opts = meta(&w, "options");
    let lrs: Vec<f64> = serde_json::from_str(&meta(&w, "lrs")).unwrap();
    let n = w
        .infos()
        .iter()
        .filter(|i| i.key.ends_with(".init"))
        .count();
    let p = || -> Vec<Tensor> {
        (0..n)
            .map(|i| w.get(&format!("p{i}.init"), DType::F32).unwrap())
            .collect()
    };
    let (a, b) = (p(), p());
    let mut oa = registry.optimizer(optimizer, &opts).unwrap();
    let mut ob = registry.optimizer(optimizer, &opts).unwrap();
    for (t, &lr) in lrs.iter().enumerate().take(8) {
        let g: Vec<Option<Tensor>> = (0..n)
            .map(|i| w.get(&format!("step{t}.grad{i}"), DType::F32).ok())
            .collect();
        oa.step(&named(&a, &g), lr).unwrap();
        if t == 5 {
            let state = ob.state().unwrap();
            ob = registry.optimizer(optimizer, &opts).unwrap();
            ob.load_state(&state).unwrap();
        }
        ob.step(&named(&b, &g), lr).unwrap();
    }
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "{optimizer}");
    }
    // A state with an entry the optimizer does not know is refused, naming it.
    let mut state = ob.state().unwrap();
    state.push((
        "p0.nonsense".into(),
        Tensor::from_f32(&[1.0], &[1]).unwrap(),
    ));
    let e = registry
        .optimizer(optimizer, &opts)
        .unwrap()
        .load_state(&state)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("p0.nonsense"), "{optimizer}: {e}");
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
    let e = registry.optimizer("lion3", "{}").err().unwrap().to_string();
    assert!(e.contains("no optimizer plugin with id `lion3`"), "{e}");
    for (id, options, field) in [
        ("prodigy", r#"{"d_coef": 0}"#, "d_coef"),
        ("prodigy", r#"{"slice_p": "x"}"#, "slice_p"),
        ("adafactor", r#"{"warmup_init": true}"#, "relative_step"),
        ("came", r#"{"beta3": 1.5}"#, "betas"),
        ("ademamix", r#"{"gamma": 1}"#, "gamma"),
        ("rmsprop", r#"{"alpha": 2}"#, "alpha"),
    ] {
        let e = registry.optimizer(id, options).err().unwrap().to_string();
        assert!(e.contains(id) && e.contains(field), "{id}: {e}");
    }
}
