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

fn flux_config(root: &std::path::Path, name: &str, extra: &str) -> ferrite::config::TrainConfig {
    let model = std::path::Path::new(&dir("pipeline")).join("model");
    let p = root.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "model_type = \"flux\"\nbase_model_name = {:?}\nworkspace_dir = \"{name}\"\n\
             output_model_destination = \"{name}/lora.safetensors\"\n\
             output_model_format = \"diffusers\"\nresolution = \"16\"\nbatch_size = 2\n\
             epochs = 2\nlearning_rate = 0.01\nlora_rank = 4\nlora_alpha = 4\n\
             sample_after_unit = \"never\"\nbackup_after_unit = \"never\"\n{extra}\n\
             [optimizer]\noptimizer = \"adamw\"\n[[concepts]]\npath = \"images\"\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    ferrite::config::TrainConfig::load(Some(&p), None, &[]).unwrap()
}

fn registry() -> ferrite::plugins::Registry {
    runtime::init("cpu").unwrap();
    ferrite::plugins::Registry::discover(
        &[ferrite_tests::profile_dir()],
        &ferrite::settings::Settings::default(),
    )
}

/// Why a run of `c` does not start.
fn refusal(root: &std::path::Path, c: ferrite::config::TrainConfig) -> String {
    let t = ferrite::train::trainer::Trainer::new(c, root, registry());
    t.err().unwrap().to_string()
}

fn train(root: &std::path::Path, c: ferrite::config::TrainConfig) -> Vec<f32> {
    let mut t = ferrite::train::trainer::Trainer::new(c, root, registry()).unwrap();
    let mut losses = Vec::new();
    t.run(|e| {
        if let ferrite::train::trainer::Event::Step { loss, .. } = e {
            losses.push(loss);
        }
    })
    .unwrap();
    losses
}

/// A Flux LoRA (OneTrainer's attn-mlp preset for Flux) trains with the flow-matching objective
/// and the embedded guidance, and is saved in diffusers' layout and in kohya's;
/// `transformer.guidance_scale` is the guidance the transformer is given.
#[test]
fn flux_lora_trains_and_saves_in_diffusers_and_kohya_layouts() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let losses = train(root, flux_config(root, "a", ""));
    println!("losses {losses:?}");
    assert!(!losses.is_empty());
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    let file = Weights::open(root.join("a/lora.safetensors").to_str().unwrap()).unwrap();
    let keys: Vec<String> = file.infos().iter().map(|i| i.key.clone()).collect();
    let has = |k: &str| keys.iter().any(|x| x == k);
    for k in [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight",
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight",
        "transformer.transformer_blocks.0.ff.net.2.lora_B.weight",
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
        "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight",
    ] {
        assert!(has(k), "{k} not in {keys:?}");
    }
    // Not in OneTrainer's preset: the context stream's feed-forward, the modulation,
    // embedders and output projections.
    assert!(
        !keys.iter().any(|k| k.contains("ff_context")
            || k.contains("norm1.linear")
            || k.contains("x_embedder")
            || k.contains("proj_out")
            || k.contains("text_encoder")),
        "{keys:?}"
    );

    // The same run in kohya's layout (the default format): BFL's fused modules, which read
    // back as the layers trained.
    let mut kohya = flux_config(root, "k", "");
    kohya.output_model_format = ferrite::config::OutputFormat::Safetensors;
    assert_eq!(train(root, kohya), losses);
    let path = root.join("k/lora.safetensors");
    let file = Weights::open(path.to_str().unwrap()).unwrap();
    for k in [
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_txt_attn_qkv.alpha",
        "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight",
        "lora_unet_single_blocks_0_linear1.lora_up.weight",
    ] {
        assert!(file.info(k).is_some(), "{k} not in the kohya file");
    }
    let registry = registry();
    let options =
        serde_json::json!({ "model": std::path::Path::new(&dir("pipeline")).join("model") });
    let arch = registry.architecture("flux", &options.to_string()).unwrap();
    let layers = ferrite::adapters::ModelLayers::of(&arch).unwrap();
    assert_eq!(layers.load(&registry, &path, 1.0).unwrap(), keys.len() / 2);
    // A layer BFL's layout names differently (norm_out's halves are swapped there) is refused
    // before training.
    let e = refusal(
        root,
        ferrite::config::TrainConfig {
            output_model_format: ferrite::config::OutputFormat::Safetensors,
            ..flux_config(root, "f", "lora_layer_preset = \"full\"")
        },
    );
    assert!(
        e.contains("output_model_format") && e.contains("transformer.norm_out.linear"),
        "{e}"
    );

    // DoRA cannot fill in the magnitudes of a fused module's layers it leaves out (attn-only
    // adapts a single block's q, k, v but not its MLP input, all one `linear1` in kohya's keys).
    let e = refusal(
        root,
        ferrite::config::TrainConfig {
            output_model_format: ferrite::config::OutputFormat::Safetensors,
            ..flux_config(
                root,
                "dora",
                "lora_decompose = true\nlora_layer_preset = \"attn-only\"",
            )
        },
    );
    assert!(
        e.contains("DoRA") && e.contains("single_blocks_0_linear1"),
        "{e}"
    );

    // OneTrainer's `blocks` preset: every layer of the double and single blocks (the context
    // stream's feed-forward and the modulations too), not the embedders or the output layers.
    train(
        root,
        flux_config(root, "blocks", "lora_layer_preset = \"blocks\""),
    );
    let file = Weights::open(root.join("blocks/lora.safetensors").to_str().unwrap()).unwrap();
    let keys: Vec<String> = file.infos().iter().map(|i| i.key.clone()).collect();
    for part in [
        "ff_context.net.2",
        "norm1.linear",
        "single_transformer_blocks.0.proj_out",
    ] {
        assert!(
            keys.iter().any(|k| k.contains(part)),
            "{part} not in {keys:?}"
        );
    }
    assert!(
        !keys.iter().any(|k| k.contains("x_embedder")
            || k.contains("transformer.proj_out")
            || k.contains("norm_out")),
        "{keys:?}"
    );

    // The same run with another guidance value: the transformer sees it.
    let guided = train(
        root,
        flux_config(root, "b", "[transformer]\nguidance_scale = 4.0"),
    );
    assert_eq!(guided.len(), losses.len());
    assert_ne!(guided, losses);
    // With the shift from the image size (1 token here: e^mu ≈ 1.58) other timesteps are drawn.
    let shifted = train(
        root,
        flux_config(root, "c", "dynamic_timestep_shifting = true"),
    );
    assert_eq!(shifted.len(), losses.len());
    assert_ne!(shifted, losses);

    // A sample definition the model cannot sample is refused before training (this tiny VAE's
    // factor is 2, so sizes go by 4).
    let mut bad = flux_config(root, "d", "");
    bad.samples = vec![ferrite::config::SampleConfig {
        width: 18,
        ..Default::default()
    }];
    let e = refusal(root, bad);
    assert!(
        e.contains("samples[0]") && e.contains("multiples of 4"),
        "{e}"
    );
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
    let single = fixture.join("model/transformer/diffusion_pytorch_model.safetensors");
    ferrite_tests::copy_dir(&fixture.join("model"), &model, &|p| p != single);
    let w = Weights::open(single.to_str().unwrap()).unwrap();
    let keys: Vec<String> = w.infos().iter().map(|i| i.key.clone()).collect();
    let mut map = serde_json::Map::new();
    for (n, half) in keys.chunks(keys.len().div_ceil(2)).enumerate() {
        let name = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", n + 1);
        let tensors: Vec<(String, ferrite_plugin_api::Tensor)> = half
            .iter()
            .map(|k| (k.clone(), w.get(k, DType::F32).unwrap()))
            .collect();
        let refs: Vec<(&str, &ferrite_plugin_api::Tensor)> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let path = model.join("transformer").join(&name);
        ferrite_plugin_api::save_safetensors(path.to_str().unwrap(), &refs, &[]).unwrap();
        for k in half {
            map.insert(k.clone(), name.clone().into());
        }
    }
    let index = model.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(&index, json.to_string()).unwrap();
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

/// The bundled `flux-dev-lora` and `flux-dev-lora-24gb` presets train the tiny Flux pipeline (at
/// its size) and write diffusers' layout; they keep the transformer's frozen weights in nfloat4
/// and float8, so the same run's losses differ.
#[test]
fn the_flux_presets_train() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let model = std::path::Path::new(&dir("pipeline")).join("model");
    let mut losses = Vec::new();
    for preset in ["flux-dev-lora", "flux-dev-lora-24gb"] {
        let p = root.join(format!("{preset}.toml"));
        std::fs::write(
            &p,
            format!(
                "base_model_name = {:?}\nworkspace_dir = \"{preset}\"\n\
                 output_model_destination = \"{preset}/lora.safetensors\"\n\
                 [[concepts]]\npath = \"images\"\n",
                model.to_str().unwrap()
            ),
        )
        .unwrap();
        let sets = [
            "resolution=\"16\"",
            "batch_size=2",
            "epochs=1",
            "sample_after_unit=never",
            "backup_after_unit=never",
        ]
        .map(String::from);
        let c = ferrite::config::TrainConfig::load(Some(&p), Some(preset), &sets)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.model_type, "flux");
        let l = train(root, c);
        assert!(
            !l.is_empty() && l.iter().all(|v| v.is_finite()),
            "{preset}: {l:?}"
        );
        let out = root.join(format!("{preset}/lora.safetensors"));
        let w = Weights::open(out.to_str().unwrap()).unwrap();
        assert!(
            w.info("transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
                .is_some(),
            "{preset}"
        );
        losses.push(l);
    }
    println!("losses {losses:?}");
    assert_ne!(losses[0], losses[1]);
}
