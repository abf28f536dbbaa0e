//! `ferrite-blocks`' UNet2DConditionModel against diffusers (fixtures from
//! tests/fixtures/gen/unet.py): output within 1e-4 max abs difference (f32, CPU), for an SD 1.x
//! layout with several heads, an SD 2.x layout with linear projections, and an SDXL layout with
//! added time/text embeddings and per-level transformer depth.

use ferrite::runtime;
use ferrite_blocks::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use ferrite_plugin_api::{DType, Weights};

fn dir(case: &str) -> String {
    format!("{}/fixtures/unet/{case}", env!("CARGO_MANIFEST_DIR"))
}

fn config(case: &str) -> UNetConfig {
    let p = format!("{}/config.json", dir(case));
    UNetConfig::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

fn load(case: &str) -> UNet2DConditionModel {
    runtime::init("cpu").unwrap();
    let w = Weights::open(&format!(
        "{}/diffusion_pytorch_model.safetensors",
        dir(case)
    ))
    .unwrap();
    UNet2DConditionModel::load(&w, "", &config(case), DType::F32).unwrap()
}

fn check(case: &str) {
    let unet = load(case);
    let exp = Weights::open(&format!("{}/expected.safetensors", dir(case))).unwrap();
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let (text_embeds, time_ids) = (
        exp.get("text_embeds", DType::F32),
        exp.get("time_ids", DType::F32),
    );
    let added = match (&text_embeds, &time_ids) {
        (Ok(text_embeds), Ok(time_ids)) => Some(AddedCond {
            text_embeds,
            time_ids,
        }),
        _ => None,
    };
    let out = unet
        .forward_with(
            &get("sample"),
            &get("timesteps"),
            &get("encoder_hidden_states"),
            added.as_ref(),
        )
        .unwrap();
    let d = ferrite_tests::max_abs_diff(&out, &get("output"));
    println!("{case} unet output: max abs diff {d:.2e}");
    assert!(d < 1e-4, "{case}: max abs diff {d}");
}

#[test]
fn sd1_layout_unet_matches_diffusers() {
    check("sd1_tiny");
}

#[test]
fn sd2_layout_unet_with_linear_projection_matches_diffusers() {
    check("sd2_tiny_linear");
}

#[test]
fn sdxl_layout_unet_with_added_embeddings_matches_diffusers() {
    check("sdxl_tiny");
}

/// Without its added conditioning an SDXL UNet says what it needs instead of running without.
#[test]
fn sdxl_unet_without_text_embeds_and_time_ids_is_a_clear_error() {
    let unet = load("sdxl_tiny");
    let exp = Weights::open(&format!("{}/expected.safetensors", dir("sdxl_tiny"))).unwrap();
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let e = unet
        .forward(
            &get("sample"),
            &get("timesteps"),
            &get("encoder_hidden_states"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_embeds and time_ids"), "{e}");
}

#[test]
fn unet_backward_reaches_the_input() {
    // Training needs a backward pass through every block type.
    let unet = load("sd1_tiny");
    let exp = Weights::open(&format!("{}/expected.safetensors", dir("sd1_tiny"))).unwrap();
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let sample = get("sample");
    sample.set_requires_grad(true).unwrap();
    let loss = unet
        .forward(&sample, &get("timesteps"), &get("encoder_hidden_states"))
        .unwrap()
        .powf(2.0)
        .unwrap()
        .mean_all()
        .unwrap();
    let g = loss
        .backward()
        .unwrap()
        .get(&sample)
        .unwrap()
        .expect("gradient reaches the input");
    let norm: f32 = g
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

#[test]
fn bad_configs_and_inputs_are_named() {
    let text = std::fs::read_to_string(format!("{}/config.json", dir("sd1_tiny"))).unwrap();
    let e = UNetConfig::from_json(
        &text.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\""),
        "unet/config.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unet/config.json") && e.contains("SimpleCrossAttnDownBlock2D"),
        "{e}"
    );
    let mut c = config("sd1_tiny");
    c.cross_attention_dim = 32;
    runtime::init("cpu").unwrap();
    let w = Weights::open(&format!(
        "{}/diffusion_pytorch_model.safetensors",
        dir("sd1_tiny")
    ))
    .unwrap();
    let e = UNet2DConditionModel::load(&w, "", &c, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("attn2.to_k.weight") && e.contains("[32, 32]"),
        "{e}"
    );
    let unet = load("sd1_tiny");
    let x = ferrite_plugin_api::Tensor::zeros(&[1, 4, 7, 8], DType::F32).unwrap();
    let t = ferrite_plugin_api::Tensor::zeros(&[1], DType::F32).unwrap();
    let ctx = ferrite_plugin_api::Tensor::zeros(&[1, 5, 16], DType::F32).unwrap();
    assert!(
        unet.forward(&x, &t, &ctx)
            .err()
            .unwrap()
            .to_string()
            .contains("multiples of 2")
    );
}
