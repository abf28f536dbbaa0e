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

fn ids(t: &ferrite_plugin_api::Tensor) -> Vec<[f32; 3]> {
    t.to_vec()
        .unwrap()
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect()
}

fn check_transformer(case: &str) {
    use ferrite_blocks::flux::{FluxConfig, FluxTransformer2DModel};
    runtime::init("cpu").unwrap();
    let (text, path) = config_text(case);
    let config = FluxConfig::from_json(&text, &path).unwrap();
    let w = Weights::open(&format!(
        "{}/diffusion_pytorch_model.safetensors",
        dir(case)
    ))
    .unwrap();
    let model = FluxTransformer2DModel::load(&w, &config, DType::F32).unwrap();
    let exp = expected(case);
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let (img, txt, pooled, t) = (
        get("hidden_states"),
        get("encoder_hidden_states"),
        get("pooled_projections"),
        get("timestep"),
    );
    let guidance = exp.info("guidance").map(|_| get("guidance"));
    let (txt_ids, img_ids) = (ids(&get("txt_ids")), ids(&get("img_ids")));
    // Relative to the largest expected value (up to 15 here): f32 round-off, not a term.
    let near = |what: &str, got: &ferrite_plugin_api::Tensor, want: &str| {
        let want = get(want);
        let scale = want
            .to_vec()
            .unwrap()
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(got, &want) / scale;
        println!("{case} {what}: max abs diff {d:.2e} of the largest value");
        assert!(d < 5e-5, "{case} {what}: {d}");
    };

    // Block by block, from the same embedded inputs.
    let temb = model.conditioning(&t, guidance.as_ref(), &pooled).unwrap();
    let rope = model.rope(&txt_ids, &img_ids).unwrap();
    let (x, c) = model.embed(&img, &txt).unwrap();
    let (x, c) = model.double_blocks()[0]
        .forward(&x, &c, &temb, &rope)
        .unwrap();
    near("double block img", &x, "double_0_img");
    near("double block txt", &c, "double_0_txt");
    let joint = ferrite_plugin_api::Tensor::cat(&[&c, &x], 1).unwrap();
    let single = model.single_blocks()[0]
        .forward(&joint, &temb, &rope)
        .unwrap();
    near("single block", &single, "single_0");

    let out = model
        .forward(
            &img,
            &txt,
            &pooled,
            &t,
            guidance.as_ref(),
            &txt_ids,
            &img_ids,
        )
        .unwrap();
    near("whole transformer", &out, "sample");
}

#[test]
fn flux_dev_transformer_matches_diffusers() {
    check_transformer("transformer");
}

#[test]
fn flux_schnell_transformer_without_guidance_matches_diffusers() {
    check_transformer("transformer_schnell");
}

/// The T5 tokenizer of the pipeline fixture against transformers' T5TokenizerFast
/// (`padding="max_length", max_length=16, truncation=True`): a prompt cut to keep `</s>`, and a
/// short one padded.
#[test]
fn t5_tokenizer_pads_and_truncates_as_transformers() {
    use ferrite_blocks::t5_tokenizer::T5Tokenizer;
    let dir = std::path::Path::new(&dir("pipeline")).join("model/tokenizer_2");
    let t = T5Tokenizer::from_dir(&dir, 16).unwrap();
    assert_eq!(
        t.encode("a photo of a red cat, best quality").unwrap(),
        [3, 5, 20, 8, 6, 4, 6, 3, 6, 10, 3, 5, 3, 18, 7, 1]
    );
    assert_eq!(
        t.encode("a cat").unwrap(),
        [3, 5, 21, 5, 4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

/// `ferrite sample --arch flux` from the pipeline's noise (the unpacked layout [1, 16, 8, 8]):
/// T5 + CLIP encoding, 4 flow-matching Euler steps with dynamic shifting and the embedded
/// guidance 4, unpacking, the VAE with its shift: FluxPipeline's PNG within 2/255 per pixel.
#[test]
fn flux_sample_png_equals_diffusers_pipeline() {
    let fixture = std::path::PathBuf::from(dir("pipeline"));
    let model = fixture.join("model");
    let args = ["--arch", "flux", "--model", model.to_str().unwrap()];
    let worst = ferrite_tests::sample_diff(&fixture, "expected.png", &args);
    assert!(worst <= 2, "max pixel difference {worst}/255");
}

/// The published Flux folders split the transformer over shards named by
/// `diffusion_pytorch_model.safetensors.index.json`: such a folder samples as the single file
/// does; an index naming a missing shard is an error naming it.
#[test]
fn a_sharded_transformer_loads_as_one() {
    runtime::init("cpu").unwrap();
    let fixture = std::path::PathBuf::from(dir("pipeline"));
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    ferrite_tests::copy_dir(&fixture.join("model"), &model, &|_| true);
    ferrite_tests::shard(&model, "transformer", "diffusion_pytorch_model");
    let args = ["--arch", "flux", "--model", model.to_str().unwrap()];
    let worst = ferrite_tests::sample_diff(&fixture, "expected.png", &args);
    assert!(worst <= 2, "max pixel difference {worst}/255");

    std::fs::remove_file(
        model.join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let o = ferrite_tests::run_ferrite(
        &[
            "sample",
            "--arch",
            "flux",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "16",
            "--height",
            "16",
            "--steps",
            "1",
            "--out",
            tmp.path().join("o.png").to_str().unwrap(),
        ],
        None,
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("00002-of-00002"),
        "{err}"
    );
}
