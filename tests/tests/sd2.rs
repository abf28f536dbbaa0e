//! Stable Diffusion 2.x (v-prediction, OpenCLIP text encoder) on a tiny pipeline saved by
//! diffusers and as a single-file original checkpoint (tests/fixtures/gen/sd2_pipeline.py, whose
//! file diffusers' own conversion reads back exactly): both sample StableDiffusionPipeline's
//! image, the export writes that file's layout, and adapter files say SD 2.

use std::path::{Path, PathBuf};

use ferrite::config::{OutputFormat, TrainConfig};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::Trainer;
use ferrite_plugin_api::{DType, Weights, plugin::ArchitectureHandle};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd2")
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

fn load(options: serde_json::Value) -> ArchitectureHandle {
    registry()
        .architecture("sd2", &options.to_string())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The largest pixel difference from StableDiffusionPipeline's image.
fn sample(model: &Path, extra: &[&str]) -> u8 {
    let mut args = vec!["--arch", "sd2", "--model", model.to_str().unwrap()];
    args.extend(["--sampler", "ddim", "--negative-prompt", "blurry"]);
    args.extend(extra);
    ferrite_tests::sample_diff(&fixture(), "expected_ddim.png", &args)
}

/// v-prediction read from the folder's scheduler config.
#[test]
fn folder_png_equals_stable_diffusion_pipeline() {
    assert!(sample(&fixture().join("model"), &[]) <= 2);
}

/// `--prediction-type` overrides what the model says.
#[test]
fn the_prediction_type_option_overrides_the_model() {
    let model = fixture().join("model");
    assert!(sample(&model, &["--prediction-type", "v-prediction"]) <= 2);
    assert!(sample(&model, &["--prediction-type", "epsilon"]) > 20);
}

#[test]
fn single_file_png_equals_stable_diffusion_pipeline() {
    let config = fixture().join("model");
    let worst = sample(
        &fixture().join("sd2_tiny_ldm.safetensors"),
        &["--model-config", config.to_str().unwrap()],
    );
    assert!(worst <= 2);
}

/// The export writes the reference file's layout and values: OpenCLIP's with fused `in_proj`,
/// without the 24th block and the text projection that SD 2 does not use.
#[test]
fn the_export_is_the_reference_file_without_what_sd2_does_not_use() {
    let arch = load(serde_json::json!({ "model": fixture().join("model") }));
    let reference =
        Weights::open(&fixture().join("sd2_tiny_ldm.safetensors").to_string_lossy()).unwrap();
    let unused = |k: &str| k.contains("resblocks.23.") || k.ends_with("text_projection");
    let want: Vec<&str> = reference
        .infos()
        .iter()
        .map(|i| i.key.as_str())
        .filter(|k| !unused(k))
        .collect();
    let got = arch.export("ldm").unwrap();
    assert_eq!(got.len(), want.len());
    for (k, t) in &got {
        assert!(want.contains(&k.as_str()), "{k}: not in the reference file");
        let w = reference.get(k, DType::F32).unwrap();
        assert_eq!(t.to_vec().unwrap(), w.to_vec().unwrap(), "{k}");
    }
}

/// Without a config folder, a file's OpenCLIP tower is read off its shapes: the reference
/// file's tower is the folder's text encoder plus the 24th block (which SD 2 leaves unused).
#[test]
fn the_open_clip_tower_is_read_off_its_shapes() {
    registry();
    let file =
        Weights::open(&fixture().join("sd2_tiny_ldm.safetensors").to_string_lossy()).unwrap();
    let tower = ferrite_blocks::open_clip::text_model(&file, "cond_stage_model.model.").unwrap();
    let got = ferrite_blocks::open_clip::config(&tower).unwrap();
    let text = std::fs::read_to_string(fixture().join("model/text_encoder/config.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "max_position_embeddings",
    ] {
        assert_eq!(got[k], want[k], "{k}");
    }
    assert_eq!(got["num_hidden_layers"], 24);
    assert_eq!(got["hidden_act"], "gelu");
    assert_eq!(got["projection_dim"], 32);
    // q, k and v come out of the fused in_proj rows.
    let q = tower
        .get(
            "text_model.encoder.layers.3.self_attn.k_proj.weight",
            DType::F32,
        )
        .unwrap();
    let folder = Weights::open(
        &fixture()
            .join("model/text_encoder/model.safetensors")
            .to_string_lossy(),
    )
    .unwrap();
    let want = folder
        .get("encoder.layers.3.self_attn.k_proj.weight", DType::F32)
        .or_else(|_| {
            folder.get(
                "text_model.encoder.layers.3.self_attn.k_proj.weight",
                DType::F32,
            )
        })
        .unwrap();
    assert_eq!(q.to_vec().unwrap(), want.to_vec().unwrap());
}

/// A LoRA on the UNet and text encoder says SD 2 (v) in its metadata, and in ComfyUI's layout
/// names the text encoder `clip_h`.
#[test]
fn lora_files_say_sd2() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    for (format, file) in [
        (OutputFormat::Safetensors, "kohya.safetensors"),
        (OutputFormat::Comfy, "comfy.safetensors"),
    ] {
        let p = root.join("c.toml");
        std::fs::write(
            &p,
            format!(
                "model_type = \"sd2\"\nbase_model_name = \"{}\"\nworkspace_dir = \"ws\"\n\
                 output_model_destination = \"{file}\"\nresolution = \"16\"\nbatch_size = 2\n\
                 epochs = 1\nbackup_after_unit = \"never\"\nsample_after_unit = \"never\"\n\
                 [text_encoder]\ntrain = true\n[[concepts]]\npath = \"images\"\n",
                fixture().join("model").display()
            ),
        )
        .unwrap();
        let mut c = TrainConfig::load(Some(&p), None, &[]).unwrap();
        c.output_model_format = format;
        let mut t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
        t.run(|_| {}).unwrap();
        let w = Weights::open(&root.join(file).to_string_lossy()).unwrap();
        let meta = w.metadata().unwrap();
        let get = |k: &str| meta.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ss_base_model_version"), Some("sd_v2"));
        assert_eq!(get("ss_v2"), Some("True"));
        assert_eq!(get("ss_v_parameterization"), Some("True"));
        assert_eq!(
            get("modelspec.architecture"),
            Some("stable-diffusion-v2-768-v/lora")
        );
        let keys: Vec<&str> = w.infos().iter().map(|i| i.key.as_str()).collect();
        let te = match format {
            OutputFormat::Comfy => "text_encoders.clip_h.transformer.text_model.encoder.layers.0.",
            _ => "lora_te_text_model_encoder_layers_0_",
        };
        assert!(keys.iter().any(|k| k.starts_with(te)), "{te}* in {keys:?}");
    }
}

/// The `sd15` and `sd2` ids must match the model: each refuses the other's, naming the right one.
#[test]
fn sd15_and_sd2_refuse_each_others_models() {
    let registry = registry();
    let sd2 = serde_json::json!({ "model": fixture().join("model") }).to_string();
    let e = registry.architecture("sd15", &sd2).err().expect("refused");
    assert!(e.to_string().contains("use the `sd2` architecture"), "{e}");
    let sd1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let sd1 = serde_json::json!({ "model": sd1 }).to_string();
    let e = registry.architecture("sd2", &sd1).err().expect("refused");
    assert!(e.to_string().contains("use the `sd15` architecture"), "{e}");
}
