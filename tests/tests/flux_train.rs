//! Training Flux (the tiny pipeline of tests/fixtures/gen/flux_pipeline.py on the CPU): LoRA
//! on the transformer and the text encoders, fine-tunes, the bundled presets.

use std::collections::BTreeMap;

use ferrite::config::{OutputFormat, TrainConfig, TrainingMethod};
use ferrite::runtime;
use ferrite::train::trainer::Trainer;
use ferrite_plugin_api::{DType, Weights};

fn dir(case: &str) -> String {
    format!("{}/fixtures/flux/{case}", env!("CARGO_MANIFEST_DIR"))
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

    // LoKr has no roles in fused modules (Flux's qkv in kohya's keys) nor a diffusers layout:
    // both refused before training, naming the adapter.
    let e = refusal(
        root,
        ferrite::config::TrainConfig {
            output_model_format: ferrite::config::OutputFormat::Safetensors,
            ..flux_config(
                root,
                "lokr",
                "peft_type = \"lokr\"\nlora_layer_preset = \"attn-only\"",
            )
        },
    );
    assert!(
        e.contains("lokr cannot be written") && e.contains("fuses"),
        "{e}"
    );
    let e = refusal(
        root,
        flux_config(
            root,
            "lokr2",
            "peft_type = \"lokr\"\nlora_layer_preset = \"attn-only\"",
        ),
    );
    assert!(e.contains("lokr has no diffusers/PEFT layout"), "{e}");

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

/// `(name, values)` of each tensor.
fn values(tensors: Vec<(String, ferrite_plugin_api::Tensor)>) -> BTreeMap<String, Vec<f32>> {
    tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_vec().unwrap()))
        .collect()
}

/// The transformer in Black Forest Labs' layout is what diffusers' converter reads back into
/// the folder's weights: the fixture written by tests/fixtures/gen/flux_bfl.py, tensor for tensor.
#[test]
fn the_transformer_exports_in_bfl_layout_as_the_reference_file() {
    let registry = registry();
    let model = std::path::Path::new(&dir("pipeline")).join("model");
    let arch = registry
        .architecture("flux", &serde_json::json!({ "model": model }).to_string())
        .unwrap();
    let exported = values(arch.export("bfl").unwrap());
    let file = Weights::open(&format!("{}/transformer.safetensors", dir("bfl"))).unwrap();
    let reference: BTreeMap<String, Vec<f32>> = file
        .infos()
        .iter()
        .map(|i| {
            let t = file.get(&i.key, DType::F32).unwrap();
            (i.key.clone(), t.to_vec().unwrap())
        })
        .collect();
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    assert!(exported == reference, "the same tensors, bit for bit");
}

/// A Flux fine-tune (the transformer) saves a diffusers folder that loads as the trained model,
/// also from a base given as a BFL transformer file with its folder; and one file in Black
/// Forest Labs' layout (the transformer alone, as OneTrainer writes it) that loads with the
/// folder as the trained model. A run that also trains a text encoder is refused that file.
#[test]
fn a_flux_fine_tune_saves_a_diffusers_folder_and_a_bfl_file() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let folder = std::path::Path::new(&dir("pipeline")).join("model");
    let bfl_file = format!("{}/transformer.safetensors", dir("bfl"));
    let fine_tune = |name: &str, format: OutputFormat, out: &str| TrainConfig {
        training_method: TrainingMethod::FineTune,
        learning_rate: 1e-3,
        output_model_format: format,
        output_model_destination: format!("{name}/{out}"),
        ..flux_config(root, name, "")
    };
    let run = |c: TrainConfig| {
        let mut t = Trainer::new(c, root, registry()).unwrap();
        t.run(|_| {}).unwrap();
        values(t.trainable())
    };
    let load = |options: serde_json::Value| {
        let arch = registry()
            .architecture("flux", &options.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        values(arch.parameters().unwrap())
    };
    let base = load(serde_json::json!({ "model": folder }));
    let saved_as_trained = |saved: &BTreeMap<String, Vec<f32>>,
                            trained: &BTreeMap<String, Vec<f32>>| {
        assert!(trained.keys().all(|k| k.starts_with("transformer.")));
        let transformer = base.keys().filter(|k| k.starts_with("transformer."));
        assert_eq!(trained.len(), transformer.count());
        for (k, v) in trained {
            assert_eq!(saved.get(k), Some(v), "{k}");
        }
        assert!(trained.iter().any(|(k, v)| base[k] != *v), "trained");
    };

    // From a folder whose transformer is sharded: its shards and their index are not copied.
    let sharded = root.join("sharded");
    runtime::init("cpu").unwrap();
    ferrite_tests::copy_dir(&folder, &sharded, &|_| true);
    ferrite_tests::shard(&sharded, "transformer", "diffusion_pytorch_model");
    let trained = run(TrainConfig {
        base_model_name: sharded.to_string_lossy().into(),
        ..fine_tune("ft", OutputFormat::Diffusers, "model")
    });
    let mut written: Vec<String> = std::fs::read_dir(root.join("ft/model/transformer"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["config.json", "diffusion_pytorch_model.safetensors"]
    );
    saved_as_trained(
        &load(serde_json::json!({ "model": root.join("ft/model") })),
        &trained,
    );

    let mut from_file = fine_tune("ff", OutputFormat::Diffusers, "model");
    from_file.base_model_name = bfl_file.clone();
    from_file.base_model_config = folder.to_string_lossy().into();
    let trained = run(from_file);
    let out = root.join("ff/model");
    saved_as_trained(&load(serde_json::json!({ "model": out })), &trained);

    let trained = run(fine_tune(
        "st",
        OutputFormat::Safetensors,
        "flux.safetensors",
    ));
    let file = root.join("st/flux.safetensors");
    let w = Weights::open(file.to_str().unwrap()).unwrap();
    for k in [
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "single_blocks.0.linear1.weight",
        "final_layer.adaLN_modulation.1.weight",
    ] {
        assert!(w.info(k).is_some(), "{k} not in the file");
    }
    let saved = load(serde_json::json!({ "model": file, "config": folder }));
    saved_as_trained(&saved, &trained);

    // The VAE from a file of its own is not in the base folder a diffusers output copies.
    let mut vae_file = fine_tune("vf", OutputFormat::Diffusers, "model");
    vae_file.vae.model_name = format!("{}/ae.safetensors", dir("parts"));
    let e = refusal(root, vae_file);
    assert!(e.contains("vae.model_name"), "{e}");

    let e = Trainer::new(
        TrainConfig {
            text_encoder: ferrite::config::PartConfig {
                train: true,
                ..Default::default()
            },
            ..fine_tune("te", OutputFormat::Safetensors, "flux.safetensors")
        },
        root,
        registry(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("single file holds only transformer") && e.contains("text_encoder"),
        "{e}"
    );
}

/// LoRAs on CLIP-L and T5 train with the transformer's (the text is encoded each step, not
/// cached) and are written under sd-scripts' names (`lora_te1_`, `lora_te3_`), ComfyUI's and
/// diffusers'; each file reads back with every layer trained.
#[test]
fn flux_text_encoder_loras_train_and_save_in_every_layout() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let extra = "lora_layer_preset = \"attn-only\"\n[text_encoder]\ntrain = true\n\
                 [text_encoder_2]\ntrain = true";
    let registry = registry();
    let options =
        serde_json::json!({ "model": std::path::Path::new(&dir("pipeline")).join("model") });
    let arch = registry.architecture("flux", &options.to_string()).unwrap();
    let layers = ferrite::adapters::ModelLayers::of(&arch).unwrap();
    let mut all_losses = Vec::new();
    for (name, format, te1, te3) in [
        (
            "kohya",
            OutputFormat::Safetensors,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight",
        ),
        (
            "comfy",
            OutputFormat::Comfy,
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight",
        ),
        (
            "diffusers",
            OutputFormat::Diffusers,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight",
        ),
    ] {
        let c = TrainConfig {
            output_model_format: format,
            ..flux_config(root, name, extra)
        };
        let losses = train(root, c);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        all_losses.push(losses);
        let path = root.join(format!("{name}/lora.safetensors"));
        let file = Weights::open(path.to_str().unwrap()).unwrap();
        for k in [te1, te3] {
            assert!(file.info(k).is_some(), "{name}: {k} not in the file");
        }
        // Every layer of the text encoders (the preset picks the transformer's, as
        // OneTrainer's), each once.
        let expected = layers
            .info
            .adaptable_layers
            .iter()
            .filter(|l| {
                let n = &l.name;
                n.starts_with("text_encoder") || n.starts_with("transformer.") && n.contains("attn")
            })
            .count();
        assert_eq!(
            layers.load(&registry, &path, 1.0).unwrap(),
            expected,
            "{name}"
        );
    }
    // The same run in every layout.
    assert!(
        all_losses.windows(2).all(|w| w[0] == w[1]),
        "{all_losses:?}"
    );
    // Trained text encoders change the run.
    assert_ne!(
        all_losses[0],
        train(
            root,
            flux_config(
                root,
                "transformer_only",
                "lora_layer_preset = \"attn-only\""
            )
        )
    );
}

/// `fallback_train_dtype`: a float16 run computes T5 in the fallback dtype (bfloat16 unless set),
/// as OneTrainer does. Here T5's feed-forward is scaled so that its activations overflow
/// float16: trained in a float16 run, every step is still taken with finite losses, and the
/// fallback dtype changes them.
#[test]
fn a_float16_run_computes_t5_in_the_fallback_dtype() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let fixture = std::path::Path::new(&dir("pipeline")).join("model");
    let model = root.join("model");
    let t5_file = fixture.join("text_encoder_2/model.safetensors");
    runtime::init("cpu").unwrap();
    ferrite_tests::copy_dir(&fixture, &model, &|p| p != t5_file);
    let w = Weights::open(t5_file.to_str().unwrap()).unwrap();
    let tensors: Vec<(String, ferrite_plugin_api::Tensor)> = w
        .infos()
        .iter()
        .map(|i| {
            let t = w.get(&i.key, DType::F32).unwrap();
            let big = i.key.contains("DenseReluDense.wi");
            let t = if big { t.mul_scalar(300.0).unwrap() } else { t };
            (i.key.clone(), t)
        })
        .collect();
    let refs: Vec<(&str, &ferrite_plugin_api::Tensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let out = model.join("text_encoder_2/model.safetensors");
    ferrite_plugin_api::save_safetensors(out.to_str().unwrap(), &refs, &[]).unwrap();

    let run = |name: &str, fallback: &str| {
        let c = TrainConfig {
            base_model_name: model.to_string_lossy().into(),
            ..flux_config(
                root,
                name,
                &format!(
                    "train_dtype = \"float16\"\nfallback_train_dtype = \"{fallback}\"\n\
                     [text_encoder_2]\ntrain = true"
                ),
            )
        };
        let mut t = Trainer::new(c, root, registry()).unwrap();
        let (mut losses, mut skipped) = (Vec::new(), 0);
        t.run(|e| match e {
            ferrite::train::trainer::Event::Step { loss, .. } => losses.push(loss),
            ferrite::train::trainer::Event::Skipped { .. } => skipped += 1,
            _ => {}
        })
        .unwrap();
        assert_eq!(skipped, 0, "{name}: steps skipped");
        assert!(
            !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
            "{name}: {losses:?}"
        );
        losses
    };
    let bf16 = run("bf16", "bfloat16");
    let f32 = run("f32", "float32");
    assert_ne!(bf16, f32);
}

/// `<part>.model_name` and `vae.model_name` (OneTrainer's): a run over a folder of configs and
/// tokenizers only takes each part's weights from its file (ComfyUI's layouts) and trains as the
/// full folder does. A model that takes no part files refuses them, naming the option.
#[test]
fn a_run_takes_parts_from_their_model_name_files() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let model = std::path::Path::new(&dir("pipeline")).join("model");
    let configs = root.join("configs");
    runtime::init("cpu").unwrap();
    ferrite_tests::copy_dir(&model, &configs, &|p| {
        p.extension().is_none_or(|x| x != "safetensors")
    });
    // Uncached: a cache entry's draws follow the model's identity (its path among them).
    let uncached = "latent_caching = false";
    let folder = train(root, flux_config(root, "folder", uncached));
    let mut c = flux_config(root, "files", uncached);
    c.base_model_name = configs.to_string_lossy().into();
    c.transformer.model_name = format!("{}/transformer.safetensors", dir("bfl"));
    c.text_encoder.model_name = model
        .join("text_encoder/model.safetensors")
        .to_string_lossy()
        .into();
    c.text_encoder_2.model_name = model
        .join("text_encoder_2/model.safetensors")
        .to_string_lossy()
        .into();
    c.vae.model_name = format!("{}/ae.safetensors", dir("parts"));
    assert_eq!(train(root, c), folder);

    let sd = format!("{}/fixtures/pipeline/model", env!("CARGO_MANIFEST_DIR"));
    let mut c = flux_config(root, "sd", "");
    c.model_type = "sd15".into();
    c.base_model_name = sd;
    c.vae.model_name = "vae.safetensors".into();
    let e = refusal(root, c);
    assert!(
        e.contains("vae.model_name") && e.contains("takes no part from a file"),
        "{e}"
    );
    // Flux has no UNet.
    let mut c = flux_config(root, "unet", "");
    c.unet.model_name = "unet.safetensors".into();
    let e = refusal(root, c);
    assert!(
        e.contains("unet.model_name") && e.contains("has no part `unet`"),
        "{e}"
    );
}

/// DoRA (diffusers' layout: peft's magnitudes) and LoHa (kohya's fused keys) train Flux's
/// transformer.
#[test]
fn flux_dora_and_loha_train() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let lora = train(root, flux_config(root, "lora", ""));
    for (name, extra, format, key) in [
        (
            "dora",
            "lora_decompose = true",
            OutputFormat::Diffusers,
            "transformer.single_transformer_blocks.0.attn.to_q.lora_magnitude_vector",
        ),
        (
            "loha",
            "peft_type = \"loha\"\nlora_layer_preset = \"blocks\"",
            OutputFormat::Safetensors,
            "lora_unet_single_blocks_0_linear1.hada_w2_b",
        ),
    ] {
        let c = TrainConfig {
            output_model_format: format,
            ..flux_config(root, name, extra)
        };
        let losses = train(root, c);
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert_ne!(losses, lora, "{name}");
        let path = root.join(format!("{name}/lora.safetensors"));
        let w = Weights::open(path.to_str().unwrap()).unwrap();
        assert!(w.info(key).is_some(), "{name}: no {key}");
    }
}

/// The caches know every file the model is read from: the same VAE from another file encodes
/// the latents again; the same files again encode nothing.
#[test]
fn a_changed_part_file_re_encodes_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let ae = std::path::PathBuf::from(format!("{}/ae.safetensors", dir("parts")));
    let copy = root.join("ae-copy.safetensors");
    std::fs::copy(&ae, &copy).unwrap();
    let run = |name: &str, vae: &std::path::Path| {
        let mut c = flux_config(root, name, "");
        c.epochs = 1;
        c.cache_dir = "cache".into();
        c.vae.model_name = vae.to_string_lossy().into();
        let mut t = Trainer::new(c, root, registry()).unwrap();
        t.run(|_| {}).unwrap();
        t.cache_encoded().0
    };
    assert!(run("a", &ae) > 0, "the first run encodes");
    assert_eq!(run("b", &ae), 0, "the same files: all cached");
    assert!(run("c", &copy) > 0, "another VAE file: encoded again");
    // Nor may the output replace one of them.
    let mut c = flux_config(root, "d", "");
    c.vae.model_name = copy.to_string_lossy().into();
    c.output_model_destination = copy.to_string_lossy().into();
    let e = refusal(root, c);
    assert!(e.contains("model file") && e.contains("ae-copy"), "{e}");
}
