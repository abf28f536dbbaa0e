//! Training SDXL through the family contract: per-part tables (`unet`, `text_encoder`,
//! `text_encoder_2`) pick what trains, the micro-conditioning comes from each image's size and
//! crop, cached text holds both of SDXL's text tensors, and the LoRA file has sd-scripts' SDXL
//! names and metadata.

use std::collections::BTreeSet;
use std::path::Path;

use ferrite::config::{TimeUnit, TrainConfig, TrainingMethod};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, Trainer};
use ferrite_plugin_api::{DType, Weights};

fn model() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sdxl/model")
}

fn config(root: &Path, workspace: &str, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
model_type = "sdxl"
base_model_name = "{}"
workspace_dir = "{workspace}"
output_model_destination = "{workspace}/out/lora.safetensors"
resolution = "16"
batch_size = 2
epochs = 1
learning_rate = 0.01
lora_rank = 4
lora_alpha = 4
lora_layer_preset = "attn-mlp"
backup_after_unit = "never"
sample_after_unit = "never"
{extra}
[optimizer]
optimizer = "adamw"
[[concepts]]
path = "images"
"#,
        model().display()
    );
    let p = root.join(format!("{workspace}.toml"));
    std::fs::write(&p, text).unwrap();
    TrainConfig::load(Some(&p), None, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

fn setup() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    ferrite_tests::toy_dataset(&root.path().join("images"));
    root
}

/// The parts (name prefixes) of the tensors a run trains, and the adapters whose up matrix did
/// not change.
fn train(root: &Path, c: TrainConfig) -> (BTreeSet<String>, Vec<String>) {
    let mut t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
    let before: Vec<(String, Vec<f32>)> = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    t.run(|_| {}).unwrap_or_else(|e| panic!("{e}"));
    let after = t.trainable();
    let unmoved = before
        .iter()
        .zip(&after)
        .filter(|((k, b), (_, a))| k.ends_with("lora_up.weight") && *b == a.to_vec().unwrap())
        .map(|((k, _), _)| k.clone())
        .collect();
    let parts = before
        .iter()
        .map(|(k, _)| k.split('.').next().unwrap().to_string())
        .collect();
    (parts, unmoved)
}

#[test]
fn sdxl_lora_trains_each_part_named_by_its_table() {
    let root = setup();
    let root = root.path();
    let all = config(
        root,
        "all",
        "[text_encoder]\ntrain = true\n[text_encoder_2]\ntrain = true",
    );
    let (parts, unmoved) = train(root, all);
    assert_eq!(
        parts,
        BTreeSet::from(["unet", "text_encoder", "text_encoder_2"].map(String::from))
    );
    // The first encoder's last layer feeds nothing SDXL uses (its states are the penultimate
    // layer's, its pooled output is unused), so its adapters get no gradient, as in sd-scripts.
    assert!(!unmoved.is_empty());
    for k in &unmoved {
        assert!(
            k.starts_with("text_encoder.text_model.encoder.layers.2."),
            "{k} did not train"
        );
    }

    let w = Weights::open(&root.join("all/out/lora.safetensors").to_string_lossy()).unwrap();
    let keys: Vec<&str> = w.infos().iter().map(|i| i.key.as_str()).collect();
    for want in [
        // sd-scripts' SDXL names: original UNet blocks, lora_te1_ / lora_te2_.
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
        "lora_unet_middle_block_1_proj_in.alpha",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight",
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:?}");
    }
    assert!(
        !keys.iter().any(|k| k.contains("text_projection")),
        "the pooled projection is not an adapted layer"
    );
    let meta = w.metadata().unwrap();
    let get = |k: &str| meta.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("ss_base_model_version"), Some("sdxl_base_v1-0"));
    assert_eq!(
        get("modelspec.architecture"),
        Some("stable-diffusion-xl-v1-base/lora")
    );

    // Only the second text encoder.
    let te2 = config(
        root,
        "te2",
        "[unet]\ntrain = false\n[text_encoder_2]\ntrain = true",
    );
    let (parts, unmoved) = train(root, te2);
    assert_eq!(parts, BTreeSet::from(["text_encoder_2".to_string()]));
    assert_eq!(unmoved, Vec::<String>::new());
}

/// A 24×32 image in a 16×16 bucket: scaled to 21×16 (covering the bucket), cropped 2 pixels in
/// from the left; the UNet sees (original h, w, crop top, left, target h, w).
#[test]
fn each_image_is_conditioned_on_its_size_and_crop() {
    let root = setup();
    let root = root.path();
    let images = root.join("images");
    for e in std::fs::read_dir(&images).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for i in 0..2 {
        image::RgbImage::from_pixel(32, 24, image::Rgb([200, 40, 40]))
            .save(images.join(format!("{i}.png")))
            .unwrap();
        std::fs::write(images.join(format!("{i}.txt")), "a red thing").unwrap();
    }
    for caching in [false, true] {
        let mut c = config(root, &format!("geo{caching}"), "");
        c.latent_caching = caching;
        c.aspect_ratio_bucketing = false;
        c.concepts[0].enable_crop_jitter = false;
        let t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
        // The second probe of a cached run reads the geometry back from the cache.
        for _ in 0..2 {
            let p = t.probe(0, 0).unwrap();
            assert_eq!(
                p.loaded.geometry,
                [[24.0, 32.0, 0.0, 2.0, 16.0, 16.0]; 2].concat(),
                "latent_caching {caching}"
            );
        }
    }
}

/// With the text encoders frozen and caching on, both text tensors come from the cache: a second
/// run encodes nothing and trains exactly as the first.
#[test]
fn cached_text_holds_states_and_pooled_embeddings() {
    let root = setup();
    let root = root.path();
    let run = |ws: &str| {
        let mut c = config(root, ws, "");
        c.latent_caching = true;
        c.cache_dir = "cache".into();
        c.backup_after_unit = TimeUnit::Never;
        let mut t = Trainer::new(c, root, registry()).unwrap();
        let mut losses = Vec::new();
        t.run(|e| {
            if let Event::Step { loss, .. } = e {
                losses.push(loss);
            }
        })
        .unwrap();
        (t.cache_encoded(), losses)
    };
    let (first, l1) = run("one");
    assert!(first.1 > 0, "the first run encodes the captions");
    let (second, l2) = run("two");
    assert_eq!(second, (0, 0), "the second run reads everything back");
    assert_eq!(l1, l2);
    let entry = std::fs::read_dir(root.join("cache/text"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("a text cache entry");
    let w = Weights::open(&entry.to_string_lossy()).unwrap();
    assert_eq!(
        w.get("states", DType::F32).unwrap().shape().unwrap(),
        [1, 77, 80]
    );
    assert_eq!(
        w.get("pooled", DType::F32).unwrap().shape().unwrap(),
        [1, 16]
    );
}

/// A fine-tune saves a diffusers folder with each trained part's tensors in its own file,
/// `text_encoder_2/` included, that loads as the trained model.
#[test]
fn a_fine_tune_saves_a_diffusers_folder_with_every_part() {
    let root = setup();
    let root = root.path();
    let mut c = config(root, "ft", "[text_encoder_2]\ntrain = true\n");
    c.training_method = TrainingMethod::FineTune;
    c.learning_rate = 1e-3;
    c.output_model_format = ferrite::config::OutputFormat::Diffusers;
    c.output_model_destination = "ft/out/model".into();
    let mut t = Trainer::new(c, root, registry()).unwrap();
    t.run(|_| {}).unwrap();
    let trained: std::collections::HashMap<String, Vec<f32>> = t
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.to_vec().unwrap()))
        .collect();
    drop(t);
    assert!(trained.keys().any(|k| k.starts_with("text_encoder_2.")));
    let out = root.join("ft/out/model");
    let saved = registry()
        .architecture("sdxl", &serde_json::json!({ "model": out }).to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut checked = 0;
    for (k, v) in saved.parameters().unwrap() {
        if let Some(want) = trained.get(&k) {
            assert_eq!(&v.to_vec().unwrap(), want, "{k}");
            checked += 1;
        }
    }
    assert_eq!(checked, trained.len(), "every trained tensor was saved");
}

/// The bundled `sdxl-lora` preset trains the tiny SDXL model (at its size) and writes a kohya
/// file.
#[test]
fn the_sdxl_lora_preset_trains() {
    let root = setup();
    let root = root.path();
    let p = root.join("base.toml");
    std::fs::write(
        &p,
        format!(
            "base_model_name = \"{}\"\nworkspace_dir = \"ws\"\noutput_model_destination = \
             \"ws/out/lora.safetensors\"\n[[concepts]]\npath = \"images\"\n",
            model().display()
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
    let c = TrainConfig::load(Some(&p), Some("sdxl-lora"), &sets).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.model_type, "sdxl");
    let (parts, _) = train(root, c);
    assert_eq!(parts, BTreeSet::from(["unet".to_string()]));
    let w = Weights::open(&root.join("ws/out/lora.safetensors").to_string_lossy()).unwrap();
    assert!(w.infos().iter().all(|i| i.key.starts_with("lora_unet_")));
}

/// Samples during training and validation go through the same conditioning (both text tensors
/// and the geometry), and DoRA and LoHa train SDXL as LoRA does.
#[test]
fn sdxl_samples_validates_and_trains_dora_and_loha() {
    let root = setup();
    let root = root.path();
    let valid = root.join("valid");
    ferrite_tests::toy_dataset(&valid);
    for (ws, extra) in [
        ("dora", "lora_decompose = true"),
        ("loha", "peft_type = \"loha\""),
    ] {
        let mut c = config(
            root,
            ws,
            &format!(
                "{extra}\nsample_after = 1\nvalidation = true\nvalidate_after = 1\n\
                 validate_after_unit = \"epoch\"\n[[samples]]\nprompt = \"a red square\"\n\
                 width = 16\nheight = 16\ndiffusion_steps = 2"
            ),
        );
        c.sample_after_unit = TimeUnit::Epoch;
        c.concepts.push(ferrite::config::ConceptConfig {
            path: "valid".into(),
            kind: ferrite::config::ConceptType::Validation,
            ..Default::default()
        });
        let mut t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
        let (mut samples, mut validations) = (0, 0);
        t.run(|e| match e {
            Event::Sample(_) => samples += 1,
            Event::Validation { loss, .. } => {
                assert!(loss.is_finite());
                validations += 1
            }
            _ => {}
        })
        .unwrap_or_else(|e| panic!("{ws}: {e}"));
        assert!(
            samples > 0 && validations > 0,
            "{ws}: {samples} samples, {validations} validations"
        );
        let w = Weights::open(
            &root
                .join(format!("{ws}/out/lora.safetensors"))
                .to_string_lossy(),
        )
        .unwrap();
        let want = if ws == "loha" {
            ".hada_w1_a"
        } else {
            ".dora_scale"
        };
        assert!(
            w.infos().iter().any(|i| i.key.ends_with(want)),
            "{ws}: {want}"
        );
    }
}

/// One trained LoRA written in every layout Ferrite writes (kohya, diffusers/PEFT, comfy) and as
/// a kohya file with diffusers module names (what some trainers write for SDXL) reads back into
/// the same adapters: the model gives the same prediction with each.
#[test]
fn every_sdxl_lora_layout_reads_back_to_the_same_adapters() {
    use ferrite::adapters::ModelLayers;
    use ferrite_plugin_api::{Generator, Tensor};

    let root = setup();
    let root = root.path();
    let mut files = Vec::new();
    for format in [
        ferrite::config::OutputFormat::Kohya,
        ferrite::config::OutputFormat::Diffusers,
        ferrite::config::OutputFormat::Comfy,
    ] {
        let ws = format!("{format}");
        let mut c = config(
            root,
            &ws,
            "[text_encoder]\ntrain = true\n[text_encoder_2]\ntrain = true",
        );
        c.output_model_format = format;
        train(root, c);
        files.push(root.join(format!("{ws}/out/lora.safetensors")));
    }
    // The kohya file under diffusers module names: `lora_unet_down_blocks_1_attentions_0_...`.
    let registry = registry();
    let arch = registry
        .architecture("sdxl", &serde_json::json!({ "model": model() }).to_string())
        .unwrap();
    let layers = ModelLayers::of(&arch).unwrap();
    let kohya = Weights::open(&files[0].to_string_lossy()).unwrap();
    let renamed: Vec<(String, Tensor)> = kohya
        .infos()
        .iter()
        .map(|i| {
            let (module, suffix) = i.key.split_once('.').unwrap();
            let layer = layers
                .layers
                .iter()
                .find(|l| l.keys.get("kohya").map(String::as_str) == Some(module))
                .unwrap();
            let name = match layer.name.strip_prefix("unet.") {
                Some(m) => format!("lora_unet_{}", m.replace('.', "_")),
                None => module.to_string(),
            };
            (
                format!("{name}.{suffix}"),
                kohya.get(&i.key, DType::F32).unwrap(),
            )
        })
        .collect();
    assert!(
        renamed
            .iter()
            .any(|(k, _)| k.starts_with("lora_unet_down_blocks_1_"))
    );
    let diffusers_named = root.join("kohya_diffusers_names.safetensors");
    let named: Vec<(&str, &Tensor)> = renamed.iter().map(|(k, t)| (k.as_str(), t)).collect();
    ferrite_plugin_api::save_safetensors(&diffusers_named.to_string_lossy(), &named, &[]).unwrap();
    files.push(diffusers_named);

    let g = Generator::new(3).unwrap();
    let x = Tensor::randn(&[1, 4, 8, 8], &g).unwrap();
    let t = Tensor::full(&[1], 500.0, DType::F32).unwrap();
    let geometry = Tensor::from_f32(&[16.0, 16.0, 0.0, 0.0, 16.0, 16.0], &[1, 6]).unwrap();
    let predict = |file: &Path| {
        let arch = registry
            .architecture("sdxl", &serde_json::json!({ "model": model() }).to_string())
            .unwrap();
        let layers = std::sync::Arc::new(ModelLayers::of(&arch).unwrap());
        assert!(
            layers.load(&registry, file, 1.0).unwrap() > 0,
            "{}",
            file.display()
        );
        let scope = ferrite::runtime::Scope::new(ferrite::runtime::Device::current().unwrap())
            .with_adapters(layers.clone());
        let _in = scope.enter();
        let cond = arch.encode_text(&["a red square"]).unwrap();
        arch.denoise(&x, &t, &[&cond[0], &cond[1], &geometry])
            .unwrap()
            .to_vec()
            .unwrap()
    };
    let base = {
        let cond = arch.encode_text(&["a red square"]).unwrap();
        arch.denoise(&x, &t, &[&cond[0], &cond[1], &geometry])
            .unwrap()
            .to_vec()
            .unwrap()
    };
    let want = predict(&files[0]);
    assert_ne!(want, base, "the LoRA changes the prediction");
    for f in &files[1..] {
        let got = predict(f);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{}: {worst}", f.display());
    }
}
