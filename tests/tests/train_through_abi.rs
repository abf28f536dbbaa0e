//! A model plugin written only against plugin-api trains through the host runtime with an
//! optimizer plugin: the end-to-end shape of every training run.

mod common;

use common::train;

#[test]
fn mlp_plugin_trains_with_adamw_plugin() {
    let (first, last) = train("adamw", r#"{"weight_decay": 0.0}"#, 1e-2, 300);
    assert!(
        last.is_finite() && first / last >= 10.0,
        "loss {first} -> {last}"
    );
}

#[test]
fn mlp_plugin_trains_with_sgd_plugin() {
    let (first, last) = train("sgd", r#"{"momentum": 0.9}"#, 2e-2, 300);
    assert!(
        last.is_finite() && first / last >= 10.0,
        "loss {first} -> {last}"
    );
}

#[test]
fn plugin_errors_and_panics_come_back_as_errors() {
    use ferrite::plugins::Registry;
    use ferrite::settings::Settings;
    use ferrite_plugin_api::Tensor;
    use ferrite_tests::{dylib_name, plugin_dir, test_plugin};

    ferrite::runtime::init("cpu").unwrap();
    let dir = plugin_dir(&[(
        &test_plugin("regression_model"),
        &dylib_name("regression_model"),
    )]);
    let registry = Registry::discover(&[dir.path().to_path_buf()], &Settings::default());
    let model = registry.architecture("test-mlp", "{}").unwrap();
    let x = Tensor::zeros(&[1, 4], ferrite_plugin_api::DType::F32).unwrap();
    let e = model.forward(&[&x, &x]).err().unwrap().to_string();
    assert!(e.contains("takes one input, got 2"), "{e}");
    let e = model.forward(&[&x, &x, &x]).err().unwrap().to_string();
    assert!(e.contains("panicked: test-mlp was asked to panic"), "{e}");
    // The plugin still works after its panic.
    assert_eq!(
        model.forward(&[&x]).unwrap()[0].shape().unwrap(),
        vec![1, 1]
    );
    let e = registry
        .architecture("test-mlp", r#"{"hidden": "wide"}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("test-mlp") && e.contains("hidden"), "{e}");
}
