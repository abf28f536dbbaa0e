//! A plugin from outside the workspace (examples/third-party-plugin: built on its own, depending
//! only on ferrite-plugin-api and ordinary crates) with an optimizer (`signum`) and an adapter
//! with file keys of its own (`ia3`, `<layer>.ia3_scale`): `ferrite plugins list` shows them,
//! `ferrite train` trains a LoRA-method run on the demo model and data with both and saves the
//! adapter in its own keys, `ferrite lora info` names it and `ferrite sample --lora` loads it
//! back. No source file of the host names either.

use std::path::{Path, PathBuf};

use ferrite::config::presets_dir;
use ferrite::train::demo;
use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::{dylib_name, run_ferrite};

fn build_example() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = root.join("examples/third-party-plugin/Cargo.toml");
    ferrite_tests::build_outside_workspace(&manifest, "third-party", &["ferrite_example_plugin"])
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn a_plugin_built_outside_the_workspace_trains_saves_and_samples() {
    let plugins = build_example();
    ferrite::runtime::init("cpu").unwrap();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let o = run_ferrite(&["plugins", "list"], Some(&plugins), home.path());
    let listing = text(&o);
    assert!(o.status.success(), "{listing}");
    let library = dylib_name("ferrite_example_plugin");
    for line in ["signum", "ia3"] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(line) && l.contains(&library)),
            "{line} not listed from {library}:\n{listing}"
        );
    }

    demo::build_model(&presets_dir().join("demo-model"), &root.join("model"), 0).unwrap();
    demo::build_dataset(&root.join("data"), 16, 2, 0).unwrap();
    let config = root.join("ia3.toml");
    std::fs::write(
        &config,
        r#"base_model_name = "model"
workspace_dir = "workspace"
output_model_destination = "out/ia3.safetensors"
training_method = "lora"
peft_type = "ia3"
lora_layer_preset = "attn-mlp"
resolution = "16"
aspect_ratio_bucketing = false
latent_caching = false
batch_size = 4
epochs = 2
learning_rate = 0.01
sample_after_unit = "never"
backup_after_unit = "never"

[optimizer]
optimizer = "signum"
momentum = 0.5

[[concepts]]
path = "data"
"#,
    )
    .unwrap();
    let o = run_ferrite(
        &["train", "--config", config.to_str().unwrap()],
        Some(&plugins),
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = root.join("out/ia3.safetensors");
    let w = Weights::open(out.to_str().unwrap()).unwrap();
    let scales: Vec<String> = w
        .infos()
        .iter()
        .map(|i| i.key.clone())
        .filter(|k| k.ends_with(".ia3_scale"))
        .collect();
    assert!(!scales.is_empty(), "no ia3_scale keys in {}", out.display());
    // The scales start at 0 and Signum moves each by ±lr (0.01, constant) a step: every value
    // is a whole number of learning rates, and some are not 0.
    for k in &scales {
        let v = w.get(k, DType::F32).unwrap().to_vec().unwrap();
        assert!(v.iter().any(|x| *x != 0.0), "{k} did not train");
        for x in &v {
            let steps = x / 0.01;
            assert!(
                (steps - steps.round()).abs() < 1e-3,
                "{k}: {x} is not Signum's"
            );
        }
    }
    let meta: std::collections::HashMap<String, String> =
        w.metadata().unwrap().into_iter().collect();
    assert_eq!(meta["ss_network_module"], "ferrite_example.ia3");

    let o = run_ferrite(
        &["lora", "info", out.to_str().unwrap()],
        Some(&plugins),
        home.path(),
    );
    assert!(
        o.status.success() && text(&o).contains("IA3 (example plugin)"),
        "{}",
        text(&o)
    );

    let sample = |name: &str, lora: Option<&Path>| {
        let png = root.join(name);
        let mut args = vec![
            "sample".to_string(),
            "--model".into(),
            root.join("model").to_string_lossy().into(),
            "--prompt".into(),
            "a red circle".into(),
            "--steps".into(),
            "4".into(),
            "--width".into(),
            "16".into(),
            "--height".into(),
            "16".into(),
            "--out".into(),
            png.to_string_lossy().into(),
        ];
        if let Some(l) = lora {
            args.extend(["--lora".into(), format!("{}:4", l.display())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_ferrite(&args, Some(&plugins), home.path());
        assert!(o.status.success(), "{}", text(&o));
        image::open(&png).unwrap().to_rgb8()
    };
    let (plain, adapted) = (sample("plain.png", None), sample("ia3.png", Some(&out)));
    assert_ne!(plain, adapted, "the IA3 file changes the samples");

    // Outside the workspace, depending on plugin-api alone of Ferrite's crates.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(repo.join("examples/third-party-plugin/Cargo.toml")).unwrap(),
    )
    .unwrap();
    let deps: Vec<&String> = manifest["dependencies"]
        .as_table()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        deps,
        ["abi_stable", "ferrite-plugin-api", "serde", "serde_json"],
        "the example depends on ordinary crates and plugin-api only"
    );
    let members = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap();
    assert!(!members.contains("\"examples/third-party-plugin\",\n"));

    // No host source, plugin of ours or preset names them.
    let mut files = Vec::new();
    for d in ["host", "plugin-api", "plugins", "presets"] {
        sources(&repo.join(d), &mut files);
    }
    assert!(files.len() > 50, "{} files", files.len());
    for f in files {
        let Ok(s) = std::fs::read_to_string(&f) else {
            continue;
        };
        let s = s.to_lowercase();
        for word in ["\"ia3\"", "\"signum\"", "ia3_scale", "ferrite_example"] {
            assert!(!s.contains(word), "{} names `{word}`", f.display());
        }
    }
}
