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
