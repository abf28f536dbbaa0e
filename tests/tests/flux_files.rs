//! Flux files other tools write, on the tiny pipeline's transformer: LoRAs (fixtures from
//! tests/fixtures/gen/flux_lora.py) — a peft LoRA in diffusers' layout and LoRAs in sd-scripts'
//! layout, whose BFL modules fuse q, k, v (and the single blocks' MLP input) — give diffusers'
//! output; saving in every layout and reading back changes nothing, and kohya's and ComfyUI's
//! files hold the fused modules. The transformer as a Black Forest Labs single file (from
//! tests/fixtures/gen/flux_bfl.py, checked there by diffusers' reader) gives the folder's output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrite::adapters::{ModelLayers, formats::Format};
use ferrite::plugins::Registry;
use ferrite::runtime::{Device, Entered, Scope};
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Tensor, Weights, plugin::ArchitectureHandle};
use ferrite_tests::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/flux")
}

struct Setup {
    registry: Registry,
    arch: ArchitectureHandle,
    model: Arc<ModelLayers>,
    expected: Weights,
    _scope: Entered,
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

impl Setup {
    fn new() -> Self {
        Self::with(serde_json::json!({ "model": fixtures().join("pipeline/model") }))
    }

    fn with(options: serde_json::Value) -> Self {
        let registry = registry();
        let arch = registry.architecture("flux", &options.to_string()).unwrap();
        let model = Arc::new(ModelLayers::of(&arch).unwrap());
        let scope = Scope::new(Device::current().unwrap())
            .with_adapters(model.clone())
            .enter();
        let expected = Weights::open(
            fixtures()
                .join("lora/expected.safetensors")
                .to_str()
                .unwrap(),
        )
        .unwrap();
        Self {
            registry,
            arch,
            model,
            expected,
            _scope: scope,
        }
    }

    fn get(&self, k: &str) -> Tensor {
        self.expected.get(k, DType::F32).unwrap()
    }

    fn denoise(&self) -> Tensor {
        let text = [self.get("states"), self.get("pooled"), self.get("guidance")];
        self.arch
            .denoise(
                &self.get("latents"),
                &self.get("timesteps"),
                &text.iter().collect::<Vec<_>>(),
            )
            .unwrap()
    }

    /// The largest difference from an expected output, relative to its largest value (f32
    /// round-off, not a term).
    fn off(&self, got: &Tensor, expected: &str) -> f32 {
        let want = self.get(expected);
        let scale = want
            .to_vec()
            .unwrap()
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        max_abs_diff(got, &want) / scale
    }

    /// Loads a file alone; the number of layers it adapts.
    fn load(&self, file: &Path) -> usize {
        self.model.clear();
        self.model.load(&self.registry, file, 1.0).unwrap()
    }
}

fn lora_file(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

#[test]
fn peft_and_kohya_fused_loras_give_diffusers_output() {
    let s = Setup::new();
    let d = s.off(&s.denoise(), "base");
    println!("without an adapter: output differs by {d:.2e} of its largest value");
    assert!(d < 5e-5, "base output differs by {d}");
    // (file, expected output, layers it adapts): kohya's 20 modules are 24 layers (two qkv of
    // three), its linear1 is four.
    for (file, expected, layers) in [
        ("lora_peft.safetensors", "lora_peft", 29),
        // Alphas only in diffusers' `lora_adapter_metadata` (8, and 2 for `proj_mlp`).
        ("lora_peft_alpha.safetensors", "lora_peft_alpha", 29),
        ("lora_kohya.safetensors", "lora_kohya", 24),
        ("lora_kohya_linear1.safetensors", "lora_kohya_linear1", 4),
    ] {
        let n = s.load(&lora_file(file));
        let d = s.off(&s.denoise(), expected);
        println!(
            "{file}: {n} layers, output differs from diffusers' by {d:.2e} of its largest value"
        );
        assert_eq!(n, layers, "{file}");
        assert!(d < 5e-5, "{file}: {d}");
    }
    // OneTrainer's own names for the same LoRA: `lora_transformer_` and diffusers' module
    // flattened, kohya's suffixes.
    let peft = Weights::open(lora_file("lora_peft.safetensors").to_str().unwrap()).unwrap();
    let renamed: Vec<(String, Tensor)> = peft
        .infos()
        .iter()
        .map(|i| {
            let (module, ab) = i.key.rsplit_once(".lora_").unwrap();
            let module = module
                .strip_prefix("transformer.")
                .unwrap()
                .replace('.', "_");
            let suffix = if ab.starts_with('A') {
                "lora_down"
            } else {
                "lora_up"
            };
            (
                format!("lora_transformer_{module}.{suffix}.weight"),
                peft.get(&i.key, DType::F32).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = renamed.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("onetrainer.safetensors");
    ferrite_plugin_api::save_safetensors(path.to_str().unwrap(), &refs, &[]).unwrap();
    assert_eq!(s.load(&path), 29);
    assert!(s.off(&s.denoise(), "lora_peft") < 5e-5);
}

fn ranks(model: &ModelLayers) -> Vec<(String, Vec<usize>)> {
    model
        .parameters()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.shape().unwrap()))
        .collect()
}

#[test]
fn fused_loras_round_trip_through_every_layout() {
    let s = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "lora_peft.safetensors",
        "lora_kohya.safetensors",
        "lora_kohya_linear1.safetensors",
    ] {
        s.load(&lora_file(file));
        let (out, shapes) = (s.denoise(), ranks(&s.model));
        for format in [Format::Kohya, Format::Comfy, Format::Diffusers] {
            let path = dir.path().join(format!("{format:?}-{file}"));
            s.model.save(&path, format, DType::F32, &[]).unwrap();
            s.load(&path);
            let d = max_abs_diff(&s.denoise(), &out);
            println!("{file} as {format:?}: output after the round trip differs by {d:.2e}");
            assert!(d < 1e-5, "{file} as {format:?}: {d}");
            // A fused module written block-diagonally reads back as its layers' own adapters.
            assert_eq!(ranks(&s.model), shapes, "{file} as {format:?}");
            s.load(&lora_file(file));
        }
    }
    // Some members of a fused module adapted (OneTrainer's attn-only leaves a single block's
    // MLP input out): the others are written as zeros of the same rank and read back as absent.
    let peft = Weights::open(lora_file("lora_peft.safetensors").to_str().unwrap()).unwrap();
    let partial: Vec<(String, Tensor)> = peft
        .infos()
        .iter()
        .filter(|i| {
            !i.key.contains("proj_mlp") && !i.key.contains("transformer_blocks.0.attn.to_v")
        })
        .map(|i| (i.key.clone(), peft.get(&i.key, DType::F32).unwrap()))
        .collect();
    let refs: Vec<(&str, &Tensor)> = partial.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let partial_file = dir.path().join("partial.safetensors");
    ferrite_plugin_api::save_safetensors(partial_file.to_str().unwrap(), &refs, &[]).unwrap();
    let n = s.load(&partial_file);
    let (out, shapes) = (s.denoise(), ranks(&s.model));
    let kohya = dir.path().join("partial-kohya.safetensors");
    s.model
        .save(&kohya, Format::Kohya, DType::F32, &[])
        .unwrap();
    assert_eq!(s.load(&kohya), n, "the layers adapted, no more");
    assert!(max_abs_diff(&s.denoise(), &out) < 1e-5);
    assert_eq!(ranks(&s.model), shapes);
    let w = Weights::open(kohya.to_str().unwrap()).unwrap();
    assert_eq!(
        w.info("lora_unet_single_blocks_0_linear1.lora_down.weight")
            .map(|i| i.shape.clone()),
        Some(vec![16, 32]),
        "four members of rank 4, the MLP input's zero"
    );

    // The peft LoRA (rank 4 on q, k, v) as kohya's fused modules: down-projections stacked,
    // up-projections block-diagonal, alpha times three.
    let w = Weights::open(
        dir.path()
            .join("Kohya-lora_peft.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let shape = |k: &str| w.info(k).map(|i| i.shape.clone()).unwrap_or_default();
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    assert_eq!(shape(&format!("{qkv}.lora_down.weight")), [12, 32]);
    assert_eq!(shape(&format!("{qkv}.lora_up.weight")), [96, 12]);
    let alpha = w
        .get(&format!("{qkv}.alpha"), DType::F32)
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(alpha, [12.0]);
    let up = w.get(&format!("{qkv}.lora_up.weight"), DType::F32).unwrap();
    let off_diagonal = up.narrow(0, 0, 32).unwrap().narrow(1, 4, 8).unwrap();
    assert!(off_diagonal.to_vec().unwrap().iter().all(|v| *v == 0.0));
    assert_eq!(
        shape("lora_unet_single_blocks_0_linear1.lora_up.weight"),
        [224, 16]
    );
    assert!(
        w.info("lora_unet_single_blocks_0_linear2.lora_down.weight")
            .is_some()
    );
    let comfy = Weights::open(
        dir.path()
            .join("Comfy-lora_peft.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert!(
        comfy
            .info("diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight")
            .is_some()
    );
}

/// The transformer as Black Forest Labs' single file (fused qkv and linear1, the final
/// modulation's halves swapped, norm scales), with the folder for the other parts, gives the
/// folder's output; so does a ComfyUI checkpoint's `model.diffusion_model.` copy. Without the
/// folder, or with a tensor Ferrite cannot name, it fails saying so.
#[test]
fn a_bfl_transformer_file_loads_as_the_folder() {
    let file = fixtures().join("bfl/transformer.safetensors");
    let folder = fixtures().join("pipeline/model");
    let of_folder = Setup::new().denoise().to_vec().unwrap();
    let output = |model: &Path| {
        let s = Setup::with(serde_json::json!({ "model": model, "config": folder }));
        s.denoise().to_vec().unwrap()
    };
    assert_eq!(
        output(&file),
        of_folder,
        "the same weights, the same output"
    );

    let tmp = tempfile::tempdir().unwrap();
    let w = Weights::open(file.to_str().unwrap()).unwrap();
    let resave = |name: &str, key: &dyn Fn(&str) -> String| {
        let tensors: Vec<(String, Tensor)> = w
            .infos()
            .iter()
            .map(|i| (key(&i.key), w.get(&i.key, DType::F32).unwrap()))
            .collect();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let path = tmp.path().join(name);
        ferrite_plugin_api::save_safetensors(path.to_str().unwrap(), &refs, &[]).unwrap();
        path
    };
    for prefix in ["model.diffusion_model.", "diffusion_model."] {
        let comfy = resave("comfy.safetensors", &|k| format!("{prefix}{k}"));
        assert_eq!(output(&comfy), of_folder, "{prefix}");
    }

    let registry = registry();
    let refusal = |options: serde_json::Value| {
        registry
            .architecture("flux", &options.to_string())
            .err()
            .unwrap()
            .to_string()
    };
    let e = refusal(serde_json::json!({ "model": file }));
    assert!(
        e.contains("transformer.safetensors") && e.contains("folder"),
        "{e}"
    );
    for (name, rename, says) in [
        ("odd", "img_mlp.2.weight=img_mlp.3.weight", "img_mlp.3"),
        // fp8 "scaled" checkpoints' scales have no place in the model.
        (
            "scaled",
            "img_mlp.2.bias=img_mlp.2.scale_weight",
            "img_mlp.2.scale_weight",
        ),
        (
            "short",
            "single_blocks.0.=single_blocks.1.",
            "1 double and 2 single blocks",
        ),
    ] {
        let (from, to) = rename.split_once('=').unwrap();
        let path = resave(&format!("{name}.safetensors"), &|k| k.replace(from, to));
        let e = refusal(serde_json::json!({ "model": path, "config": folder }));
        assert!(
            e.contains(&format!("{name}.safetensors")) && e.contains(says),
            "{e}"
        );
    }
    let e = refusal(serde_json::json!({ "model": "/no/such.safetensors", "config": folder }));
    assert!(
        e.contains("/no/such.safetensors") && e.contains("does not exist"),
        "{e}"
    );
}

/// Flux as ComfyUI users hold it: the transformer in BFL's layout, CLIP-L and T5 in
/// transformers' (`clip_l`, `t5xxl`) and the VAE in BFL's (`ae`, written by
/// tests/fixtures/gen/flux_ae.py and checked there by diffusers' reader), with a folder holding
/// only configs and tokenizers: `ferrite sample --part-file` gives FluxPipeline's PNG (from the
/// folder with its weights). Without the files that folder fails naming what it lacks; a file
/// of another part fails naming the file.
#[test]
fn separate_part_files_sample_as_the_folder() {
    let pipeline = fixtures().join("pipeline");
    let tmp = tempfile::tempdir().unwrap();
    let configs = tmp.path().join("configs");
    ferrite_tests::copy_dir(&pipeline.join("model"), &configs, &|p| {
        p.extension().is_none_or(|x| x != "safetensors")
    });
    let model = pipeline.join("model");
    let files = [
        (
            "transformer",
            fixtures().join("bfl/transformer.safetensors"),
        ),
        ("text_encoder", model.join("text_encoder/model.safetensors")),
        (
            "text_encoder_2",
            model.join("text_encoder_2/model.safetensors"),
        ),
        ("vae", fixtures().join("parts/ae.safetensors")),
    ];
    let specs: Vec<String> = files
        .iter()
        .map(|(p, f)| format!("{p}={}", f.display()))
        .collect();
    let mut args = vec!["--arch", "flux", "--model", configs.to_str().unwrap()];
    for s in &specs {
        args.extend(["--part-file", s.as_str()]);
    }
    let worst = ferrite_tests::sample_diff(&pipeline, "expected.png", &args);
    assert!(worst <= 2, "max pixel difference {worst}/255");

    let registry = registry();
    let load = |part_files: serde_json::Value| {
        let options = serde_json::json!({ "model": configs, "part_files": part_files });
        registry
            .architecture("flux", &options.to_string())
            .err()
            .map(|e| e.to_string())
    };
    let all: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(p, f)| (p.to_string(), f.to_string_lossy().into()))
        .collect();
    assert_eq!(load(all.clone().into()), None);
    let mut no_vae = all.clone();
    no_vae.remove("vae");
    let e = load(no_vae.into()).unwrap();
    assert!(
        e.contains("vae") && e.contains("diffusion_pytorch_model"),
        "{e}"
    );
    let mut wrong = all;
    let t5 = model.join("text_encoder_2/model.safetensors");
    wrong.insert("vae".into(), t5.to_string_lossy().into());
    let e = load(wrong.into()).unwrap();
    assert!(e.contains(t5.to_str().unwrap()), "{e}");
}

/// Float8 files (`flux1-dev-fp8.safetensors`, `t5xxl_fp8_e4m3fn`): every e4m3fn and e5m2 code
/// reads as torch reads it (tests/fixtures/gen/float8.py), and the transformer stored in
/// e4m3fn in BFL's layout (its fused tensors split by rows, the final modulation's halves
/// swapped, all on float8 bytes) gives the output of its values written in f32.
#[test]
fn float8_files_read_as_torch_reads_them() {
    let _setup = Setup::new();
    let codes =
        Weights::open(fixtures().join("parts/codes.safetensors").to_str().unwrap()).unwrap();
    for name in ["e4m3fn", "e5m2"] {
        let got = codes.get(name, DType::F32).unwrap().to_vec().unwrap();
        let want = codes
            .get(&format!("{name}.f32"), DType::F32)
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(got.len(), 256);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{name} code {i}: {g} where torch reads {w}"
            );
        }
    }

    let fp8 = fixtures().join("parts/transformer_fp8.safetensors");
    let w = Weights::open(fp8.to_str().unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f32_file = tmp.path().join("transformer_f32.safetensors");
    let tensors: Vec<(String, Tensor)> = w
        .infos()
        .iter()
        .map(|i| (i.key.clone(), w.get(&i.key, DType::F32).unwrap()))
        .collect();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    ferrite_plugin_api::save_safetensors(f32_file.to_str().unwrap(), &refs, &[]).unwrap();
    let folder = fixtures().join("pipeline/model");
    let output = |model: &Path| {
        let s = Setup::with(serde_json::json!({ "model": model, "config": folder }));
        s.denoise().to_vec().unwrap()
    };
    let of_fp8 = output(&fp8);
    assert_eq!(of_fp8, output(&f32_file));
    // Rounded to float8, not the f32 model.
    assert_ne!(of_fp8, Setup::new().denoise().to_vec().unwrap());
}

/// LoHa and DoRA on every layer of fused modules (double block 0's image q, k, v; single block
/// 0's q, k, v and MLP input) written in kohya's and ComfyUI's fused keys read back as the same
/// adapters: LoHa's factor pairs stack as LoRA's do (the Hadamard product of row-stacked
/// products is the rows' products), DoRA's magnitudes by rows.
#[test]
fn fused_loha_and_dora_round_trip_through_fused_layouts() {
    let s = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    let members: Vec<(String, Vec<usize>)> = s
        .model
        .info
        .adaptable_layers
        .iter()
        .filter(|l| {
            l.fused.is_some()
                && (l.name.contains("single_transformer_blocks.0.")
                    || l.name.contains("transformer.transformer_blocks.0.attn.to_"))
        })
        .map(|l| (l.name.clone(), l.shape.clone()))
        .collect();
    assert_eq!(members.len(), 7, "{members:?}");
    let rng = ferrite_plugin_api::Generator::new(7).unwrap();
    let random = |shape: &[usize]| Tensor::randn(shape, &rng).unwrap().mul_scalar(0.3).unwrap();
    let rank = 3;
    for kind in ["loha", "dora"] {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, shape) in &members {
            let (out, inp) = (shape[0], shape[1]);
            let entries = match kind {
                "loha" => vec![
                    ("hada_w1_a", random(&[out, rank])),
                    ("hada_w1_b", random(&[rank, inp])),
                    ("hada_w2_a", random(&[out, rank])),
                    ("hada_w2_b", random(&[rank, inp])),
                ],
                _ => vec![
                    ("lora_down.weight", random(&[rank, inp])),
                    ("lora_up.weight", random(&[out, rank])),
                    (
                        "dora_scale",
                        random(&[out, 1]).abs().unwrap().add_scalar(0.5).unwrap(),
                    ),
                ],
            };
            for (suffix, t) in entries {
                tensors.push((format!("{name}.{suffix}"), t));
            }
            tensors.push((
                format!("{name}.alpha"),
                Tensor::from_f32(&[2.0], &[]).unwrap(),
            ));
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let per_layer = dir.path().join(format!("{kind}.safetensors"));
        ferrite_plugin_api::save_safetensors(per_layer.to_str().unwrap(), &refs, &[]).unwrap();
        assert_eq!(s.load(&per_layer), members.len());
        let (out, shapes) = (s.denoise(), ranks(&s.model));
        assert!(s.off(&out, "base") > 1e-3, "{kind} changes the output");
        for format in [Format::Kohya, Format::Comfy] {
            let path = dir.path().join(format!("{kind}-{format:?}.safetensors"));
            s.model.save(&path, format, DType::F32, &[]).unwrap();
            if format == Format::Kohya {
                let w = Weights::open(path.to_str().unwrap()).unwrap();
                let factor = if kind == "loha" {
                    "hada_w1_a"
                } else {
                    "lora_up.weight"
                };
                let shape = w
                    .info(&format!("lora_unet_single_blocks_0_linear1.{factor}"))
                    .map(|i| i.shape.clone());
                assert_eq!(shape, Some(vec![224, 4 * rank as u64]), "{kind}");
            }
            assert_eq!(s.load(&path), members.len(), "{kind} as {format:?}");
            let d = max_abs_diff(&s.denoise(), &out);
            assert!(d < 1e-5, "{kind} as {format:?}: {d}");
            assert_eq!(ranks(&s.model), shapes, "{kind} as {format:?}");
            s.load(&per_layer);
        }
    }
}
