//! The ABI promise: plugins built against the frozen plugin-api 1.0 (`tests/compat/`) load, are
//! listed, and train a step in the current host — an optimizer (`compat-sgd`) and an adapter
//! (`compat-lora`) on the tiny SD 1.x pipeline.

use std::path::{Path, PathBuf};

use ferrite::config::TrainConfig;
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, Trainer};
use ferrite_plugin_api::ComponentKind;
use ferrite_tests::{profile_dir, toy_dataset};

/// Builds the compat workspace (its own Cargo.lock) next to this build's target dir and returns
/// the folder holding its two libraries.
fn build_compat_plugins() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/Cargo.toml");
    ferrite_tests::build_outside_workspace(&manifest, "compat", &["compat_optim", "compat_adapter"])
}

#[test]
fn plugins_built_against_plugin_api_1_0_load_and_train_a_step() {
    let compat = build_compat_plugins();
    ferrite::runtime::init("cpu").unwrap();
    // The workspace's model plugin (sd15) next to the compat libraries.
    let registry = Registry::discover(&[profile_dir(), compat.clone()], &Settings::default());
    assert!(registry.problems.is_empty(), "{:?}", registry.problems);
    for (kind, id, lib) in [
        (ComponentKind::Optimizer, "compat-sgd", "compat-optim"),
        (ComponentKind::Adapter, "compat-lora", "compat-adapter"),
    ] {
        let c = registry.find(kind, id).unwrap();
        assert_eq!(c.library, lib);
        assert!(c.path.starts_with(&compat), "{}", c.path.display());
    }

    let root = tempfile::tempdir().unwrap();
    toy_dataset(&root.path().join("images"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let text = format!(
        r#"
base_model_name = "{}"
workspace_dir = "ws"
output_model_destination = "ws/out/lora.safetensors"
resolution = "16"
batch_size = 2
epochs = 1
learning_rate = 0.5
peft_type = "compat-lora"
lora_rank = 2
lora_alpha = 2
lora_layer_preset = "attn-only"
sample_after_unit = "never"
backup_after_unit = "never"
[optimizer]
optimizer = "compat-sgd"
[[concepts]]
path = "images"
"#,
        model.display()
    );
    let p = root.path().join("compat.toml");
    std::fs::write(&p, text).unwrap();
    let config = TrainConfig::load(Some(&p), None, &[]).unwrap();
    let mut t = Trainer::new(config, root.path(), registry).unwrap();
    let mut steps = Vec::new();
    t.run(|e| {
        if let Event::Step { step, loss, .. } = e {
            steps.push((step, loss));
        }
    })
    .unwrap();
    assert!(
        !steps.is_empty() && steps.iter().all(|(_, l)| l.is_finite()),
        "{steps:?}"
    );
    // `lora_up` starts at zero: after the steps it moved, so the adapter's output took part in
    // the loss and the optimizer updated it.
    let ups: Vec<(String, Vec<f32>)> = t
        .trainable()
        .into_iter()
        .filter(|(k, _)| k.ends_with("lora_up.weight"))
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    assert!(!ups.is_empty(), "no compat-lora parameters were trained");
    let moved = ups
        .iter()
        .filter(|(_, v)| v.iter().any(|x| *x != 0.0))
        .count();
    assert_eq!(moved, ups.len(), "some lora_up weights never moved");
}
