//! `ferrite-blocks`' CLIP text transformer against transformers (fixtures from
//! tests/fixtures/gen/clip_text.py): last and penultimate hidden states, pooled output and
//! projection, within 1e-4 max abs difference (f32, CPU).

use ferrite::runtime;
use ferrite_blocks::clip::{ClipTextConfig, ClipTextTransformer};
use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::max_abs_diff;

fn dir(case: &str) -> String {
    format!("{}/fixtures/clip/{case}", env!("CARGO_MANIFEST_DIR"))
}

fn load(case: &str) -> (ClipTextTransformer, Weights) {
    runtime::init("cpu").unwrap();
    let cfg_path = format!("{}/config.json", dir(case));
    let config =
        ClipTextConfig::from_json(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    let w = Weights::open(&format!("{}/model.safetensors", dir(case))).unwrap();
    let prefix = ClipTextTransformer::detect_prefix(&w);
    let model = ClipTextTransformer::load(&w, prefix, Some("text_projection"), &config, DType::F32)
        .unwrap();
    (
        model,
        Weights::open(&format!("{}/expected.safetensors", dir(case))).unwrap(),
    )
}

fn check(case: &str) {
    let (model, exp) = load(case);
    let ids_t = exp.get("input_ids", DType::I64).unwrap();
    let batch = ids_t.shape().unwrap()[0];
    let ids: Vec<i64> = ids_t.to_vec().unwrap().iter().map(|&v| v as i64).collect();
    let out = model.forward(&ids, batch, 0).unwrap();
    let mut pairs = vec![
        ("last_hidden_state", &out.last_hidden_state),
        ("penultimate", &out.penultimate_hidden_state),
        ("pooled", &out.pooled),
    ];
    if let Some(t) = &out.text_embeds {
        pairs.push(("text_embeds", t));
    }
    assert_eq!(
        pairs.len() == 4,
        exp.info("text_embeds").is_some(),
        "projection present in both or neither"
    );
    for (name, got) in pairs {
        let d = max_abs_diff(got, &exp.get(name, DType::F32).unwrap());
        println!("{case} {name}: max abs diff {d:.2e}");
        assert!(d < 1e-4, "{case} {name}: max abs diff {d}");
    }
}

#[test]
fn sd1_style_text_encoder_matches_transformers() {
    check("sd1_tiny");
}

#[test]
fn sdxl_style_text_encoder_with_projection_matches_transformers() {
    check("sdxl_tiny_proj");
}

#[test]
fn wrong_shapes_and_configs_are_named() {
    runtime::init("cpu").unwrap();
    let cfg_path = format!("{}/config.json", dir("sd1_tiny"));
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let mut config = ClipTextConfig::from_json(&text, &cfg_path).unwrap();
    config.intermediate_size = 65;
    let w = Weights::open(&format!("{}/model.safetensors", dir("sd1_tiny"))).unwrap();
    assert_eq!(
        ClipTextTransformer::detect_prefix(&w),
        "",
        "transformers 5 saves CLIPTextModel unprefixed"
    );
    let e = ClipTextTransformer::load(&w, "", None, &config, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`encoder.layers.0.mlp.fc1.weight`") && e.contains("[64, 32]"),
        "{e}"
    );
    let e = ClipTextConfig::from_json(
        &text.replace("\"num_attention_heads\": 1", "\"num_attention_heads\": 5"),
        "cfg.json",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cfg.json") && e.contains("not divisible"), "{e}");
    let (model, _) = load("sd1_tiny");
    assert!(
        model
            .forward(&[1, 2, 3], 2, 0)
            .err()
            .unwrap()
            .to_string()
            .contains("do not split")
    );
    assert!(
        model
            .forward(&[1, 5000], 1, 0)
            .err()
            .unwrap()
            .to_string()
            .contains("outside the vocabulary")
    );
}
