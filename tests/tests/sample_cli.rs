//! `ferrite sample` end to end on a tiny diffusers-saved SD 1.x pipeline (fixtures from
//! tests/fixtures/gen/pipeline.py): with the same initial noise, prompt, negative prompt, steps and
//! guidance, the PNG equals StableDiffusionPipeline's within 2/255 per pixel. Bad model folders
//! give clear errors.

use std::path::{Path, PathBuf};

use ferrite_tests::run_ferrite;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline")
}

fn sample(model: &Path, sampler: &str, out: &Path) -> std::process::Output {
    sample_with(model, sampler, out, &[])
}

fn sample_with(model: &Path, sampler: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let config = tempfile::tempdir().unwrap();
    let noise = fixture().join("noise.safetensors");
    let mut args = vec![
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a red cat, best quality",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--cfg",
        "4",
        "--width",
        "16",
        "--height",
        "16",
        "--sampler",
        sampler,
        "--init-noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ferrite(&args, None, config.path())
}

fn compare(sampler: &str) {
    compare_with(sampler, &fixture().join("model"), &[]);
}

fn compare_with(sampler: &str, model: &Path, extra: &[&str]) {
    compare_to(&format!("expected_{sampler}.png"), sampler, model, extra);
}

fn compare_to(expected: &str, sampler: &str, model: &Path, extra: &[&str]) {
    let mut args = vec!["--model", model.to_str().unwrap(), "--sampler", sampler];
    args.extend(["--negative-prompt", "blurry"]);
    args.extend(extra);
    let worst = ferrite_tests::sample_diff(&fixture(), expected, &args);
    assert!(worst <= 2, "{sampler}: max pixel difference {worst}/255");
}

#[test]
fn ddim_png_equals_diffusers_pipeline() {
    compare("ddim");
}

/// CLIP skip 1 (the penultimate layer's states through the final norm, for the prompt and the
/// negative prompt): diffusers' pipeline given those embeddings (tests/fixtures/gen/clip_skip.py).
#[test]
fn clip_skip_png_equals_diffusers_pipeline() {
    compare_to(
        "expected_ddim_clip_skip1.png",
        "ddim",
        &fixture().join("model"),
        &["--clip-skip", "1"],
    );
}

/// The same model as an original single-file checkpoint (tests/fixtures/gen/ldm_checkpoint.py),
/// with the folder's configs and tokenizer as diffusers' `from_single_file(config=...)` takes them.
#[test]
fn single_file_checkpoint_png_equals_diffusers_pipeline() {
    let folder = fixture().join("model");
    let extra = ["--model-config", folder.to_str().unwrap()];
    compare_with("ddim", &fixture().join("sd15_tiny_ldm.safetensors"), &extra);
    // The same checkpoint as a legacy PyTorch `.ckpt` (tests/fixtures/gen/legacy_ckpt.py).
    let ckpt = fixture().join("../legacy/sd15_tiny_ldm.ckpt");
    compare_with("ddim", &ckpt, &extra);
}

#[test]
fn euler_png_equals_diffusers_pipeline() {
    compare("euler");
}

/// A copy of the fixture model to break in one way.
fn broken_copy(f: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("model");
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let dst = dir.path().join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dst).unwrap();
    }
    f(dir.path());
    dir
}

fn walk(p: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(p)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

#[track_caller]
fn fails_with(model: &Path, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let o = sample(model, "ddim", &dir.path().join("out.png"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !dir.path().join("out.png").exists(),
        "no image is written on failure"
    );
}

#[test]
fn folder_missing_unet() {
    let m = broken_copy(|d| std::fs::remove_dir_all(d.join("unet")).unwrap());
    fails_with(m.path(), &["has no unet/"]);
}

#[test]
fn sdxl_model_is_refused_with_what_was_found() {
    let m = broken_copy(|d| {
        let p = d.join("model_index.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("StableDiffusionPipeline", "StableDiffusionXLPipeline");
        std::fs::write(p, text).unwrap();
    });
    fails_with(
        m.path(),
        &[
            "SDXL",
            "StableDiffusionXLPipeline",
            "use the sdxl architecture",
        ],
    );
}

#[test]
fn truncated_safetensors_file() {
    let m = broken_copy(|d| {
        let p = d.join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    fails_with(
        m.path(),
        &[
            "diffusion_pytorch_model.safetensors",
            "not a valid safetensors file",
        ],
    );
}

#[test]
fn tensor_with_the_wrong_shape_names_the_key() {
    let m = broken_copy(|d| {
        // Claim a wider cross-attention than the weights have.
        let p = d.join("unet/config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48");
        std::fs::write(p, text).unwrap();
    });
    fails_with(
        m.path(),
        &["attn2.to_k.weight", "has shape [16, 32], expected [16, 48]"],
    );
}

#[test]
fn init_noise_of_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let model = fixture().join("model");
    let noise = fixture().join("noise.safetensors");
    let o = run_ferrite(
        &[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "32",
            "--height",
            "32",
            "--init-noise",
            noise.to_str().unwrap(),
            "--out",
            dir.path().join("o.png").to_str().unwrap(),
        ],
        None,
        config.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--init-noise") && err.contains("[1, 4, 16, 16]"),
        "{err}"
    );
}

#[test]
fn sd15_lists_its_adaptable_layers_by_diffusers_name() {
    use ferrite::plugins::Registry;
    use ferrite::settings::Settings;

    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let options = serde_json::json!({ "model": fixture().join("model") }).to_string();
    let arch = registry.architecture("sd15", &options).unwrap();
    let info = arch.model_info().unwrap();
    let all: Vec<ferrite_plugin_api::AdaptableLayer> =
        serde_json::from_value(info["adaptable_layers"].clone()).unwrap();
    let layers: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
    for want in [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.resnets.0.conv1",
        "unet.up_blocks.1.attentions.0.proj_in",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.1.mlp.fc2",
    ] {
        assert!(layers.contains(&want), "{want} missing");
    }
    assert!(
        !layers
            .iter()
            .any(|l| l.contains("norm") || l.contains("embeddings")),
        "norms and embeddings are not adaptable"
    );
    assert_eq!(info["latent_channels"], 4);
    assert_eq!(info["vae_scale_factor"], 2);

    // Conv options and original (single-file) names come along; the original name of every
    // UNet layer maps back to it through the single-file key mapping.
    let down = all
        .iter()
        .find(|l| l.name == "unet.down_blocks.0.downsamplers.0.conv")
        .unwrap();
    assert_eq!(down.conv.unwrap().stride, [2, 2]);
    assert_eq!(
        down.original.as_deref(),
        Some("model.diffusion_model.input_blocks.2.0.op")
    );
    for l in &all {
        let original = l.original.as_deref().unwrap();
        if let Some(m) = l.name.strip_prefix("unet.") {
            let ldm = original.strip_prefix("model.diffusion_model.").unwrap();
            assert_eq!(
                ferrite_blocks::ldm::unet_key(&format!("{ldm}.weight"), 1),
                Some(format!("{m}.weight")),
                "{original}"
            );
        } else {
            assert!(original.starts_with("cond_stage_model.transformer.text_model."));
        }
    }
}

#[test]
fn lora_option_applies_adapters_with_a_strength() {
    let lora = fixture().join("../adapters/lora_kohya.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let base = image::open(fixture().join("expected_ddim.png"))
        .unwrap()
        .to_rgb8();
    let mut changes = Vec::new();
    for weight in ["0.5", "1"] {
        let out = dir.path().join(format!("lora-{weight}.png"));
        let spec = format!("{}:{weight}", lora.display());
        let o = sample_with(&fixture().join("model"), "ddim", &out, &["--lora", &spec]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let img = image::open(&out).unwrap().to_rgb8();
        let change: u64 = img
            .as_raw()
            .iter()
            .zip(base.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum();
        changes.push(change);
    }
    println!(
        "summed pixel change from the base image: strength 0.5 {}, 1 {}",
        changes[0], changes[1]
    );
    assert!(changes[0] > 0 && changes[1] > changes[0], "{changes:?}");

    let o = sample_with(
        &fixture().join("model"),
        "ddim",
        &dir.path().join("x.png"),
        &["--lora", "/no/such/lora.safetensors"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--lora /no/such/lora.safetensors"),
        "{err}"
    );
}
