//! SDXL end to end on a tiny diffusers-saved pipeline (fixtures from
//! tests/fixtures/gen/sdxl_pipeline.py and the scripts named at each test): both text encoders
//! against `encode_prompt`, `ferrite sample` against StableDiffusionXLPipeline from the same noise
//! (DDIM, Euler, the zero embeddings of an absent negative prompt, a peft LoRA, the single file),
//! the single-file export, sd-scripts' names, and the folder refusals.

use std::path::{Path, PathBuf};

use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Weights, plugin::ArchitectureHandle};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sdxl")
}

fn load(options: serde_json::Value) -> ArchitectureHandle {
    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    registry
        .architecture("sdxl", &options.to_string())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn both_text_encoders_match_diffusers_encode_prompt() {
    for (skip, suffix) in [(0, ""), (1, "_clip_skip1")] {
        let arch = load(serde_json::json!({
            "model": fixture().join("model"),
            "text_encoder_layer_skip": skip,
        }));
        let want = Weights::open(&fixture().join("text.safetensors").to_string_lossy()).unwrap();
        let out = arch
            .encode_text(&["a photo of a red cat, best quality"])
            .unwrap();
        assert_eq!(out.len(), 2, "states and pooled");
        for (got, name) in out.iter().zip(["prompt_embeds", "pooled_prompt_embeds"]) {
            let w = want.get(&format!("{name}{suffix}"), DType::F32).unwrap();
            assert_eq!(got.shape().unwrap(), w.shape().unwrap(), "{name}{suffix}");
            let d = ferrite_tests::max_abs_diff(got, &w);
            println!("{name}{suffix}: max abs diff {d:e}");
            assert!(d < 1e-4, "{name}{suffix}: max abs diff {d}");
        }
    }
}

fn compare(expected: &str, sampler: &str, negative: Option<&str>) {
    compare_model(expected, sampler, negative, &fixture().join("model"), &[]);
}

fn compare_model(
    expected: &str,
    sampler: &str,
    negative: Option<&str>,
    model: &Path,
    extra: &[&str],
) {
    let mut args = vec!["--arch", "sdxl", "--model", model.to_str().unwrap()];
    args.extend(["--sampler", sampler]);
    if let Some(n) = negative {
        args.extend(["--negative-prompt", n]);
    }
    args.extend(extra);
    let worst = ferrite_tests::sample_diff(&fixture(), expected, &args);
    assert!(worst <= 2, "{expected}: max pixel difference {worst}/255");
}

#[test]
fn ddim_png_equals_stable_diffusion_xl_pipeline() {
    compare("expected_ddim.png", "ddim", Some("blurry"));
}

#[test]
fn euler_png_equals_stable_diffusion_xl_pipeline() {
    compare("expected_euler.png", "euler", Some("blurry"));
}

/// No negative prompt: zero text embeddings for the unconditional half, as the model's
/// `force_zeros_for_empty_prompt` says (the encoded empty prompt gives another image).
#[test]
fn an_empty_negative_prompt_is_zero_embeddings() {
    compare("expected_euler_no_negative.png", "euler", None);
}

#[test]
fn other_families_are_refused_naming_what_was_found() {
    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let sd15 = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let e = registry
        .architecture("sdxl", &serde_json::json!({ "model": sd15 }).to_string())
        .err()
        .expect("an SD 1.x folder is refused");
    assert!(e.to_string().contains("not an SDXL model"), "{e}");
    assert!(e.to_string().contains("use sd15"), "{e}");
    let sd15_file = sd15.with_file_name("sd15_tiny_ldm.safetensors");
    let e = registry
        .architecture(
            "sdxl",
            &serde_json::json!({ "model": sd15_file }).to_string(),
        )
        .err()
        .expect("an SD 1.x file is refused");
    assert!(e.to_string().contains("SD 1.x/2.x checkpoint"), "{e}");
    // And the other way round.
    let xl_file = fixture().join("sdxl_tiny_ldm.safetensors");
    let e = registry
        .architecture("sd15", &serde_json::json!({ "model": xl_file }).to_string())
        .err()
        .expect("an SDXL file is refused by sd15");
    assert!(e.to_string().contains("use the sdxl architecture"), "{e}");
}

/// sd-scripts' names for the first layers of each kind in the real SDXL base UNet (layers per
/// block 2, depth [1, 2, 10]), each checked against diffusers' kohya converter by
/// tests/fixtures/gen/sdxl_kohya_names.py, are exactly the ones Ferrite gives.
#[test]
fn kohya_names_of_the_real_sdxl_unet_are_sd_scripts_names() {
    let text = std::fs::read_to_string(fixture().join("kohya_names.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layout = ferrite_blocks::ldm::UnetLayout {
        layers_per_block: v["layers_per_block"].as_u64().unwrap() as usize,
        cross_up: serde_json::from_value(v["up_blocks_with_attention"].clone()).unwrap(),
    };
    let pairs = v["kohya_to_diffusers"].as_object().unwrap();
    assert!(pairs.len() >= 20);
    for (kohya, module) in pairs {
        assert_eq!(&layout.kohya(module.as_str().unwrap()).unwrap(), kohya);
    }
}

/// A LoRA that peft and diffusers' `save_lora_weights` wrote for the UNet and both text encoders
/// (tests/fixtures/gen/sdxl_lora.py) applies as in diffusers: the same image.
#[test]
fn a_peft_lora_saved_by_diffusers_applies_as_in_diffusers() {
    let lora = fixture().join("peft_lora.safetensors");
    compare_model(
        "expected_euler_peft_lora.png",
        "euler",
        Some("blurry"),
        &fixture().join("model"),
        &["--lora", lora.to_str().unwrap()],
    );
}

/// The tiny pipeline as an `sd_xl_base`-layout single file written independently by
/// tests/fixtures/gen/sdxl_ldm_checkpoint.py (diffusers' conversion reads it back exactly, and
/// from_single_file gives the folder's image): it loads to the folder's image, and Ferrite's
/// export of the folder is that file, key for key and value for value.
#[test]
fn the_reference_single_file_loads_and_equals_ferrites_export() {
    let reference = fixture().join("sdxl_tiny_ldm.safetensors");
    compare_model(
        "expected_euler.png",
        "euler",
        Some("blurry"),
        &reference,
        &["--model-config", fixture().join("model").to_str().unwrap()],
    );
    let arch = load(serde_json::json!({ "model": fixture().join("model") }));
    let want = Weights::open(&reference.to_string_lossy()).unwrap();
    let got = arch.export("ldm").unwrap();
    assert_eq!(got.len(), want.infos().len());
    for (k, t) in &got {
        let w = want
            .get(k, DType::F32)
            .unwrap_or_else(|e| panic!("{k}: not in the reference file: {e}"));
        assert_eq!(t.shape().unwrap(), w.shape().unwrap(), "{k}");
        assert_eq!(t.to_vec().unwrap(), w.to_vec().unwrap(), "{k}");
    }
}

/// Without a config folder, the UNet and the second text encoder are read off the file's shapes
/// (`label_emb` gives the added time embedding width): what the folder's configs say.
#[test]
fn a_single_files_structure_is_read_off_its_shapes() {
    load(serde_json::json!({ "model": fixture().join("model") }));
    let file = Weights::open(
        &fixture()
            .join("sdxl_tiny_ldm.safetensors")
            .to_string_lossy(),
    )
    .unwrap();
    let config = |part: &str| -> serde_json::Value {
        let text =
            std::fs::read_to_string(fixture().join(format!("model/{part}/config.json"))).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let te2 =
        ferrite_blocks::open_clip::text_model(&file, "conditioner.embedders.1.model.").unwrap();
    let got = ferrite_blocks::open_clip::config(&te2).unwrap();
    let want = config("text_encoder_2");
    for k in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "projection_dim",
    ] {
        assert_eq!(got[k], want[k], "text_encoder_2 {k}");
    }
    let got = ferrite_blocks::ldm::sdxl_unet_config(&file, 16).unwrap();
    let want = config("unet");
    for k in [
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "transformer_layers_per_block",
        "cross_attention_dim",
        "use_linear_projection",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    ] {
        assert_eq!(got[k], want[k], "unet {k}");
    }
    assert!(ferrite_blocks::ldm::sdxl_unet_config(&file, 15).is_err());
}
