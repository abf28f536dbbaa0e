//! `ferrite-blocks`' AutoencoderKL against diffusers (fixtures from tests/fixtures/gen/vae.py):
//! encode (mean, logvar) and decode within 1e-4 max abs difference (f32, CPU).

use ferrite::runtime;
use ferrite_blocks::vae::{AutoencoderKL, VaeConfig};
use ferrite_plugin_api::{DType, Tensor, Weights};
use ferrite_tests::max_abs_diff;

fn dir(case: &str) -> String {
    format!("{}/fixtures/vae/{case}", env!("CARGO_MANIFEST_DIR"))
}

fn config(case: &str) -> VaeConfig {
    let p = format!("{}/config.json", dir(case));
    VaeConfig::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

fn check(case: &str) {
    runtime::init("cpu").unwrap();
    let c = config(case);
    let w = Weights::open(&format!(
        "{}/diffusion_pytorch_model.safetensors",
        dir(case)
    ))
    .unwrap();
    let vae = AutoencoderKL::load(&w, "", &c, DType::F32).unwrap();
    let exp = Weights::open(&format!("{}/expected.safetensors", dir(case))).unwrap();
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let dist = vae.encode(&get("image")).unwrap();
    let decoded = vae.decode(&get("z")).unwrap();
    for (name, got) in [
        ("mean", &dist.mean),
        ("logvar", &dist.logvar),
        ("decoded", &decoded),
    ] {
        let d = max_abs_diff(got, &get(name));
        println!("{case} {name}: max abs diff {d:.2e}");
        assert!(d < 1e-4, "{case} {name}: max abs diff {d}");
    }
}

#[test]
fn two_block_vae_matches_diffusers() {
    check("tiny");
}

#[test]
fn three_block_vae_with_two_layers_per_block_matches_diffusers() {
    check("three_blocks");
    assert_eq!(
        config("three_blocks").scaling_factor,
        0.13025,
        "read from the config, not assumed"
    );
    assert_eq!(config("three_blocks").scale_factor(), 4);
}

#[test]
fn bad_inputs_are_named() {
    runtime::init("cpu").unwrap();
    let c = config("tiny");
    let w = Weights::open(&format!(
        "{}/diffusion_pytorch_model.safetensors",
        dir("tiny")
    ))
    .unwrap();
    let mut wider = c.clone();
    wider.block_out_channels = vec![8, 32];
    let e = AutoencoderKL::load(&w, "", &wider, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("encoder.down_blocks.1.resnets.0") && e.contains("expected"),
        "{e}"
    );
    let vae = AutoencoderKL::load(&w, "", &c, DType::F32).unwrap();
    let odd = Tensor::zeros(&[1, 3, 15, 16], DType::F32).unwrap();
    assert!(
        vae.encode(&odd)
            .err()
            .unwrap()
            .to_string()
            .contains("multiples of 2")
    );
    let e = VaeConfig::from_json(r#"{"down_block_types": ["X"], "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [8]}"#, "vae.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("vae.json") && e.contains("`X`"), "{e}");
}
