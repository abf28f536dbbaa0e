//! Shared by the training tests.

use ferrite::plugins::Registry;
use ferrite::runtime;
use ferrite::settings::Settings;
use ferrite_plugin_api::{Generator, Param, Tensor};
use ferrite_tests::{dylib_name, plugin_dir, profile_dir, test_plugin};

/// Trains the test MLP plugin on a small regression task; returns the first and last loss.
pub fn train(optimizer: &str, options: &str, lr: f64, steps: usize) -> (f32, f32) {
    runtime::init("cpu").unwrap();
    let model_lib = test_plugin("regression_model");
    let dir = plugin_dir(&[(&model_lib, &dylib_name("regression_model"))]);
    let registry = Registry::discover(
        &[profile_dir(), dir.path().to_path_buf()],
        &Settings::default(),
    );
    assert!(registry.problems.is_empty(), "{:?}", registry.problems);
    let model = registry
        .architecture("test-mlp", r#"{"inputs": 4, "hidden": 32, "seed": 7}"#)
        .unwrap();
    let mut opt = registry.optimizer(optimizer, options).unwrap();

    // y = sin(x0) + 0.5 x1 - x2 x3, on 128 fixed samples.
    let rng = Generator::new(42).unwrap();
    let x = Tensor::randn(&[128, 4], &rng).unwrap();
    let col = |i| x.narrow(1, i, 1).unwrap();
    let y = col(0)
        .sin()
        .unwrap()
        .add(&col(1).mul_scalar(0.5).unwrap())
        .unwrap()
        .sub(&col(2).mul(&col(3)).unwrap())
        .unwrap();

    let params: Vec<(String, Tensor)> = model.parameters().unwrap();
    assert_eq!(params.len(), 4, "fc1/fc2 weight and bias");
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..steps {
        let pred = model.forward(&[&x]).unwrap().remove(0);
        let loss = pred.sub(&y).unwrap().powf(2.0).unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Option<Tensor>> = params.iter().map(|(_, p)| grads.get(p).unwrap()).collect();
        assert!(
            g.iter().all(Option::is_some),
            "every parameter has a gradient"
        );
        let named: Vec<Param<'_>> = params
            .iter()
            .zip(&g)
            .map(|((name, tensor), grad)| Param {
                name,
                tensor,
                grad: grad.as_ref(),
            })
            .collect();
        opt.step(&named, lr).unwrap();
        // Reading the loss back is the one host sync per step, as a logged figure would be.
        let l = loss.item().unwrap();
        if step == 0 {
            first = l;
        }
        last = l;
    }
    println!(
        "{optimizer}: loss {first:.4} -> {last:.4} in {steps} steps ({:.1}x lower)",
        first / last
    );
    (first, last)
}
