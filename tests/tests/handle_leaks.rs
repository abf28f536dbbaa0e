//! Alone in its own process so that the live-handle count is this test's only.

use ferrite::runtime;

mod common;

#[test]
fn training_returns_every_tensor_handle() {
    runtime::init("cpu").unwrap();
    let before = runtime::live_tensors();
    common::train("adamw", "{}", 1e-2, 5);
    assert_eq!(
        runtime::live_tensors(),
        before,
        "model, optimizer state, grads and activations all released"
    );
}
