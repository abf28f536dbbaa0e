//! The random-weight manifests hold exactly the tensors (names and shapes) of the models
//! diffusers and transformers build: the published SD 1.5, SD 2.1, SDXL and FLUX.1-dev configs (key lists
//! written by tests/fixtures/gen/published_configs.py) and the tiny saved test pipelines.

use std::path::{Path, PathBuf};

use ferrite_blocks::manifest;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sorted(mut v: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
    v.sort();
    v
}

fn manifest_of(dir: &Path, part: &str) -> Vec<(String, Vec<usize>)> {
    sorted(
        manifest::of_part(dir, part)
            .unwrap_or_else(|e| panic!("{}/{part}: {e}", dir.display()))
            .0,
    )
}

/// `key d,d,...` lines.
fn key_list(path: &Path) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(path).unwrap();
    sorted(
        text.lines()
            .map(|l| {
                let (k, s) = l.split_once(' ').unwrap();
                (
                    k.to_string(),
                    s.split(',').map(|d| d.parse().unwrap()).collect(),
                )
            })
            .collect(),
    )
}

/// The names and shapes in a safetensors file's header.
fn safetensors_keys(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    sorted(
        header
            .into_iter()
            .filter(|(k, _)| k != "__metadata__")
            .map(|(k, v)| {
                let shape = v["shape"].as_array().unwrap().iter();
                (k, shape.map(|d| d.as_u64().unwrap() as usize).collect())
            })
            .collect(),
    )
}

fn assert_same(what: &str, got: &[(String, Vec<usize>)], want: &[(String, Vec<usize>)]) {
    let missing: Vec<_> = want.iter().filter(|t| !got.contains(t)).take(5).collect();
    let extra: Vec<_> = got.iter().filter(|t| !want.contains(t)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && got.len() == want.len(),
        "{what}: {} tensors, want {}; missing {missing:?}; not in the model {extra:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn manifests_of_the_published_configs_are_the_reference_models_tensors() {
    let configs = fixtures().join("configs");
    let mut checked = 0;
    for (family, parts) in [
        ("sd15", &["unet", "vae", "text_encoder"][..]),
        ("sd21", &["unet", "vae", "text_encoder"][..]),
        (
            "sdxl",
            &["unet", "vae", "text_encoder", "text_encoder_2"][..],
        ),
        (
            "flux_dev",
            &["transformer", "vae", "text_encoder", "text_encoder_2"][..],
        ),
    ] {
        let dir = configs.join(family);
        for part in parts {
            let want = key_list(&dir.join(part).join("keys.txt"));
            assert_same(&format!("{family}/{part}"), &manifest_of(&dir, part), &want);
            checked += want.len();
        }
    }
    // SDXL's UNet alone has 1680 tensors: the lists are the real models'.
    assert!(checked > 4000, "{checked}");
}

#[test]
fn manifests_of_the_tiny_test_pipelines_are_their_files_tensors() {
    for (model, parts) in [
        ("pipeline/model", &["unet", "vae", "text_encoder"][..]),
        ("sd2/model", &["unet", "vae", "text_encoder"][..]),
        (
            "flux/pipeline/model",
            &["transformer", "vae", "text_encoder", "text_encoder_2"][..],
        ),
        (
            "sdxl/model",
            &["unet", "vae", "text_encoder", "text_encoder_2"][..],
        ),
    ] {
        let dir = fixtures().join(model);
        for part in parts {
            let file = std::fs::read_dir(dir.join(part))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .unwrap();
            let what = format!("{model}/{part}");
            assert_same(&what, &manifest_of(&dir, part), &safetensors_keys(&file));
        }
    }
}

#[test]
fn a_part_of_an_unknown_class_is_refused_naming_its_config() {
    let dir = tempfile_dir();
    std::fs::create_dir_all(dir.join("transformer")).unwrap();
    std::fs::write(
        dir.join("transformer/config.json"),
        r#"{"_class_name": "SD3Transformer2DModel"}"#,
    )
    .unwrap();
    let e = manifest::of_part(&dir, "transformer")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transformer/config.json") && e.contains("SD3Transformer2DModel"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrite-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_unet_setting_the_model_does_not_build_is_refused_naming_it() {
    let path = fixtures().join("configs/sd15/unet/config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let source = path.to_string_lossy();
    ferrite_blocks::unet::UNetConfig::from_json(&text, &source).unwrap();
    for (field, value) in [
        ("resnet_time_scale_shift", "\"scale_shift\""),
        ("conv_in_kernel", "7"),
        ("class_embed_type", "\"timestep\""),
    ] {
        let changed = text.replacen('{', &format!("{{\"{field}\": {value},"), 1);
        let changed = changed.replacen(&format!("  \"{field}\":"), "  \"_was\":", 1);
        let e = ferrite_blocks::unet::UNetConfig::from_json(&changed, &source)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains("config.json"), "{e}");
    }
}
