//! Adapters on the tiny SD 1.x UNet (fixtures from tests/fixtures/gen/adapters.py): the same LoRA
//! and DoRA weights applied by peft and by Ferrite give the same UNet output, LoHa matches
//! LyCORIS's formula; merging equals running the adapter; every file format round-trips; files
//! in foreign naming styles load; bad files fail clearly. Each test loads its own model, whose
//! adapters are its own, so the tests run in parallel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrite::adapters::{AdapterOptions, ModelLayers, formats::Format, select};
use ferrite::config::LayerPreset;
use ferrite::plugins::Registry;
use ferrite::runtime::{Device, Entered, Scope};
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Tensor, Weights, plugin::ArchitectureHandle};
use ferrite_tests::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

struct Setup {
    registry: Registry,
    arch: ArchitectureHandle,
    /// Each test's own model with its own adapters (tests run in parallel), in the scope its
    /// denoising runs in.
    model: Arc<ModelLayers>,
    inputs: Weights,
    _scope: Entered,
}

impl Setup {
    fn new() -> Self {
        ferrite::runtime::init("cpu").unwrap();
        let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
        let options = serde_json::json!({ "model": fixtures().join("pipeline/model") });
        let arch = registry.architecture("sd15", &options.to_string()).unwrap();
        let model = Arc::new(ModelLayers::of(&arch).unwrap());
        let device = Device::current().unwrap();
        let scope = Scope::new(device).with_adapters(model.clone()).enter();
        let inputs = Weights::open(
            fixtures()
                .join("adapters/inputs.safetensors")
                .to_str()
                .unwrap(),
        )
        .unwrap();
        Self {
            registry,
            arch,
            model,
            inputs,
            _scope: scope,
        }
    }

    fn get(&self, k: &str) -> Tensor {
        self.inputs.get(k, DType::F32).unwrap()
    }

    fn unet(&self) -> Tensor {
        self.arch
            .denoise(
                &self.get("sample"),
                &self.get("timesteps"),
                &[&self.get("encoder_hidden_states")],
            )
            .unwrap()
    }

    fn load(&self, file: &Path) -> usize {
        self.model.load(&self.registry, file, 1.0).unwrap()
    }
}

fn adapter_file(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

#[test]
fn peft_lora_and_dora_and_lycoris_loha_give_the_reference_output() {
    let s = Setup::new();
    let base = s.unet();
    assert!(max_abs_diff(&base, &s.get("base")) < 1e-4);
    for (file, expected) in [
        ("lora_peft.safetensors", "lora"),
        ("lora_peft_raw.safetensors", "lora"),
        ("lora_kohya.safetensors", "lora"),
        ("dora_peft.safetensors", "dora"),
        ("loha_lycoris.safetensors", "loha"),
    ] {
        s.model.clear();
        let n = s.load(&adapter_file(file));
        let d = max_abs_diff(&s.unet(), &s.get(expected));
        println!("{file}: {n} layers, UNet output max abs diff {d:.2e} against {expected}");
        assert!(n >= 20, "{file}: {n} layers");
        assert!(d < 1e-4, "{file}: max abs diff {d}");
    }
    s.model.clear();
    assert!(
        max_abs_diff(&s.unet(), &base) == 0.0,
        "cleared adapters leave nothing behind"
    );
}

#[test]
fn merging_equals_running_the_adapter_and_unmerging_restores() {
    let s = Setup::new();
    let base = s.unet();
    for file in [
        "lora_kohya.safetensors",
        "dora_peft.safetensors",
        "loha_lycoris.safetensors",
    ] {
        s.model.clear();
        s.load(&adapter_file(file));
        let adapted = s.unet();
        s.model.merge().unwrap();
        let merged = s.unet();
        s.model.unmerge().unwrap();
        let restored = s.unet();
        let (dm, du) = (
            max_abs_diff(&merged, &adapted),
            max_abs_diff(&restored, &adapted),
        );
        let db = {
            s.model.clear();
            max_abs_diff(&s.unet(), &base)
        };
        println!("{file}: merged vs adapter {dm:.2e}, unmerged vs adapter {du:.2e}, base {db:.2e}");
        assert!(dm < 1e-5 && du < 1e-5 && db < 1e-5, "{file}");
    }
}

fn values(params: Vec<(String, Tensor)>) -> Vec<(String, Vec<f32>)> {
    params
        .into_iter()
        .map(|(k, t)| (k, t.to_vec().unwrap()))
        .collect()
}

#[test]
fn every_format_round_trips() {
    let s = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "lora_kohya.safetensors",
        "dora_peft.safetensors",
        "loha_lycoris.safetensors",
    ] {
        for format in [Format::Kohya, Format::Comfy, Format::Diffusers] {
            s.model.clear();
            s.load(&adapter_file(file));
            let before = values(s.model.parameters().unwrap());
            let out = s.unet();
            let path = dir.path().join(format!("{format:?}-{file}"));
            let saved = s.model.save(&path, format, DType::F32, &[]);
            if file.starts_with("loha") && format == Format::Diffusers {
                let e = saved.unwrap_err().to_string();
                assert!(e.contains("no diffusers/PEFT format"), "{e}");
                continue;
            }
            saved.unwrap();
            s.model.clear();
            s.load(&path);
            let after = values(s.model.parameters().unwrap());
            let d = max_abs_diff(&s.unet(), &out);
            println!("{file} as {format:?}: output after the round trip differs by {d:.2e}");
            assert!(d < 1e-5, "{file} as {format:?}");
            if format == Format::Diffusers {
                // alpha is folded into lora_B: the same file comes back out.
                let again = dir.path().join("again.safetensors");
                s.model.save(&again, format, DType::F32, &[]).unwrap();
                let (a, b) = (
                    Weights::open(path.to_str().unwrap()).unwrap(),
                    Weights::open(again.to_str().unwrap()).unwrap(),
                );
                assert_eq!(a.infos().len(), b.infos().len());
                for i in a.infos() {
                    let k = i.key.as_str();
                    assert_eq!(
                        a.get(k, DType::F32).unwrap().to_vec().unwrap(),
                        b.get(k, DType::F32).unwrap().to_vec().unwrap(),
                        "{k}"
                    );
                }
            } else {
                assert_eq!(before, after, "{file} as {format:?}: identical tensors");
            }
        }
    }
    // kohya's metadata.
    let w = Weights::open(
        dir.path()
            .join("Kohya-lora_kohya.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let meta: std::collections::HashMap<String, String> =
        w.metadata().unwrap().into_iter().collect();
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "8");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert!(
        w.info("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
            .is_some()
    );
    let comfy = Weights::open(
        dir.path()
            .join("Comfy-lora_kohya.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert!(
        comfy
            .info("diffusion_model.input_blocks.1.1.proj_in.lora_down.weight")
            .is_some()
    );
}

#[test]
fn fresh_adapters_start_as_the_base_model_and_count_what_they_add() {
    let s = Setup::new();
    let base = s.unet();
    let filter = select::LayerFilter::new(LayerPreset::AttnOnly, "", false).unwrap();
    let layers = select::select(&s.model.info, &filter, |p| p == "unet");
    assert!(layers.iter().all(|l| l.name.contains("attn")));
    for (kind, dora) in [("lora", false), ("lora", true), ("loha", false)] {
        s.model.clear();
        let opts = AdapterOptions {
            kind: kind.into(),
            rank: 4,
            alpha: 4.0,
            dora,
            ..Default::default()
        };
        let summary = s.model.create(&s.registry, &layers, &opts).unwrap();
        assert_eq!(summary.layers, layers.len());
        let per_layer: usize = layers
            .iter()
            .map(|l| {
                let (out, fan_in) = (l.shape[0], l.shape[1..].iter().product::<usize>());
                match kind {
                    "loha" => 2 * 4 * (out + fan_in),
                    _ => 4 * (out + fan_in) + if dora { out } else { 0 },
                }
            })
            .sum();
        assert_eq!(summary.parameters, per_layer, "{kind} dora={dora}");
        let d = max_abs_diff(&s.unet(), &base);
        println!("fresh {kind} (dora {dora}): {summary:?}, output change {d:.1e}");
        assert!(d < 1e-5, "{kind}: a fresh adapter changes nothing");
    }
    s.model.clear();
}

#[test]
fn bad_adapter_files_fail_clearly() {
    let s = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, keys: &[&str]| {
        let t = Tensor::zeros(&[4, 4], DType::F32).unwrap();
        let named: Vec<(&str, &Tensor)> = keys.iter().map(|k| (*k, &t)).collect();
        let p = dir.path().join(name);
        ferrite_plugin_api::save_safetensors(p.to_str().unwrap(), &named, &[]).unwrap();
        p
    };
    // An SDXL LoRA (original block names, second text encoder).
    let sdxl = write(
        "sdxl.safetensors",
        &[
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        ],
    );
    let e = s
        .model
        .load(&s.registry, &sdxl, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sdxl.safetensors")
            && e.contains("match no layer")
            && e.contains("another architecture"),
        "{e}"
    );
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = s
        .model
        .load(&s.registry, &corrupt, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt.safetensors"), "{e}");
    assert!(s.model.summary().unwrap().layers == 0, "nothing attached");

    // Resuming a rank-4 file into rank-8 adapters.
    let filter = select::LayerFilter::new(
        LayerPreset::Custom,
        "to_q, to_k, to_v, to_out.0, ff.net.2, proj_in, conv1, conv_shortcut",
        false,
    )
    .unwrap();
    let layers = select::select(&s.model.info, &filter, |p| p == "unet");
    let opts = AdapterOptions {
        rank: 8,
        ..Default::default()
    };
    s.model.create(&s.registry, &layers, &opts).unwrap();
    let e = s
        .model
        .resume(&adapter_file("lora_kohya.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_kohya.safetensors") && e.contains("different rank"),
        "{e}"
    );
    s.model.clear();
    // The same rank resumes.
    let opts = AdapterOptions {
        rank: 4,
        ..Default::default()
    };
    s.model.create(&s.registry, &layers, &opts).unwrap();
    s.model
        .resume(&adapter_file("lora_kohya.safetensors"))
        .unwrap();
    let d = max_abs_diff(&s.unet(), &s.get("lora"));
    assert!(d < 1e-4, "resumed LoRA gives the reference output ({d})");
    s.model.clear();
}

/// LoKr as LyCORIS makes and saves it (tests/fixtures/gen/lokr.py: both factorisations, w1
/// whole and decomposed, w2 whole and low rank, linear and conv layers) gives LyCORIS's UNet
/// output; merging equals running it; kohya's and ComfyUI's layouts round-trip it with
/// LyCORIS' metadata, and diffusers' (which has no LoKr) is refused.
#[test]
fn lycoris_lokr_gives_the_reference_output_and_round_trips() {
    let s = Setup::new();
    let file = adapter_file("lokr_lycoris.safetensors");
    let want = Weights::open(adapter_file("lokr_outputs.safetensors").to_str().unwrap())
        .unwrap()
        .get("lokr", DType::F32)
        .unwrap();
    // The fixture has every structure: w1 whole or decomposed, w2 whole or low rank.
    let mut structures = std::collections::BTreeMap::<String, Vec<String>>::new();
    for i in Weights::open(file.to_str().unwrap()).unwrap().infos() {
        let (layer, suffix) = i.key.rsplit_once('.').unwrap();
        if suffix != "alpha" {
            structures
                .entry(layer.to_string())
                .or_default()
                .push(suffix.to_string());
        }
    }
    let kinds: std::collections::BTreeSet<String> = structures
        .values_mut()
        .map(|v| {
            v.sort();
            v.join(",")
        })
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "lokr_w1,lokr_w2",
            "lokr_w1,lokr_w2_a,lokr_w2_b",
            "lokr_w1_a,lokr_w1_b,lokr_w2_a,lokr_w2_b"
        ]
    );
    let (n, dir) = loads_merges_and_round_trips(&s, &file, &want, |w| {
        let meta: std::collections::HashMap<String, String> =
            w.metadata().unwrap().into_iter().collect();
        assert_eq!(meta["ss_network_module"], "lycoris.kohya");
        assert_eq!(meta["ss_network_args"], r#"{"algo": "lokr"}"#);
    });
    assert!(n >= 20, "{n} layers");
    let e = s
        .model
        .save(
            &dir.path().join("d.safetensors"),
            Format::Diffusers,
            DType::F32,
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("lokr has no diffusers/PEFT format"), "{e}");
    s.model.clear();

    // A Tucker core (LyCORIS' use_tucker) is refused by name, not taken for another model's.
    let key = "lycoris_down_blocks_0_resnets_0_conv1";
    let t = Tensor::zeros(&[2, 2], DType::F32).unwrap();
    let tucker = dir.path().join("tucker.safetensors");
    ferrite_plugin_api::save_safetensors(
        tucker.to_str().unwrap(),
        &[
            (&format!("{key}.lokr_w1"), &t),
            (&format!("{key}.lokr_w2_a"), &t),
            (&format!("{key}.lokr_w2_b"), &t),
            (&format!("{key}.lokr_t2"), &t),
        ],
        &[],
    )
    .unwrap();
    let e = s
        .model
        .load(&s.registry, &tucker, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tucker.safetensors") && e.contains("Tucker"),
        "{e}"
    );
}

/// Fresh LoKr adapters change nothing, have LyCORIS' structure for the options (low-rank w2
/// where the rank is small enough, w1 decomposed with decompose_both, everything whole with
/// full_matrix) and train their parameters.
#[test]
fn fresh_lokr_adapters_follow_their_options() {
    let s = Setup::new();
    let base = s.unet();
    let filter = select::LayerFilter::new(LayerPreset::AttnOnly, "", false).unwrap();
    let layers = select::select(&s.model.info, &filter, |p| p == "unet");
    let names = |options: serde_json::Value| {
        s.model.clear();
        let opts = AdapterOptions {
            kind: "lokr".into(),
            rank: 1,
            alpha: 1.0,
            extra: options.as_object().unwrap().clone(),
            ..Default::default()
        };
        s.model.create(&s.registry, &layers, &opts).unwrap();
        let d = max_abs_diff(&s.unet(), &base);
        assert!(d < 1e-5, "a fresh LoKr changes nothing ({options}: {d})");
        let mut suffixes: Vec<String> = s
            .model
            .parameters()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.rsplit('.').next().unwrap().to_string())
            .collect();
        suffixes.sort();
        suffixes.dedup();
        suffixes
    };
    assert_eq!(
        names(serde_json::json!({})),
        ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]
    );
    assert_eq!(
        names(serde_json::json!({"decompose_both": true})),
        ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]
    );
    assert_eq!(
        names(serde_json::json!({"full_matrix": true})),
        ["lokr_w1", "lokr_w2"]
    );
    s.model.clear();
}

fn oft_output(name: &str) -> Tensor {
    Weights::open(adapter_file("oft_outputs.safetensors").to_str().unwrap())
        .unwrap()
        .get(name, DType::F32)
        .unwrap()
}

/// OFT as OneTrainer trains and saves it (tests/fixtures/gen/oft.py: peft's rotation module on
/// the linear layers, OneTrainer's weight rotation on the conv layers, block sizes 8 and 4, some
/// layers sharing one block) gives the reference UNet output; merging equals running it and
/// unmerging restores the base; kohya's and ComfyUI's layouts round-trip it.
#[test]
fn onetrainer_oft_gives_the_reference_output_and_round_trips() {
    let s = Setup::new();
    let file = adapter_file("oft_onetrainer.safetensors");
    let want = oft_output("oft");
    let base = s.unet();
    let (n, _dir) = loads_merges_and_round_trips(&s, &file, &want, |w| {
        let meta: std::collections::HashMap<String, String> =
            w.metadata().unwrap().into_iter().collect();
        assert_eq!(meta["ss_network_args"], r#"{"algo": "oft_2"}"#);
        // OneTrainer's file has no alpha, and neither has ours.
        assert!(w.infos().iter().all(|i| i.key.ends_with(".oft_R.weight")));
    });
    assert!(n >= 20, "{n} layers");
    // The strength: none gives the base model, half another output.
    for (strength, like_base) in [(0.0, true), (0.5, false)] {
        s.model.clear();
        s.model.load(&s.registry, &file, strength).unwrap();
        let out = s.unet();
        let (to_base, to_full) = (max_abs_diff(&out, &base), max_abs_diff(&out, &want));
        assert_eq!(to_base < 1e-5, like_base, "{strength}: {to_base}");
        assert!(to_full > 1e-2, "{strength}: {to_full}");
    }
    s.model.clear();
    assert!(max_abs_diff(&s.unet(), &base) < 1e-5, "unmerged");
}

/// Loads `file`, checks the UNet output against `want`, merging against running and
/// unmerging, then saves in kohya's and ComfyUI's layouts (each file checked by `check`) and
/// reads each back to the same values. Returns the layer count and the folder of the files.
fn loads_merges_and_round_trips(
    s: &Setup,
    file: &Path,
    want: &Tensor,
    check: impl Fn(&Weights),
) -> (usize, tempfile::TempDir) {
    let base = s.unet();
    let n = s.load(file);
    let out = s.unet();
    let d = max_abs_diff(&out, want);
    println!(
        "{}: {n} layers, UNet output max abs diff {d:.2e} (the adapter moves it by {:.2})",
        file.display(),
        max_abs_diff(want, &base)
    );
    assert!(d < 1e-4, "max abs diff {d}");
    s.model.merge().unwrap();
    assert!(max_abs_diff(&s.unet(), &out) < 1e-5, "merged");
    s.model.unmerge().unwrap();
    assert!(max_abs_diff(&s.unet(), &out) < 1e-5, "unmerged");
    let dir = tempfile::tempdir().unwrap();
    let before = values(s.model.parameters().unwrap());
    for format in [Format::Kohya, Format::Comfy] {
        let path = dir.path().join(format!("{format:?}.safetensors"));
        s.model.save(&path, format, DType::F32, &[]).unwrap();
        check(&Weights::open(path.to_str().unwrap()).unwrap());
        let loaded = ModelLayers::of(&s.arch).unwrap();
        assert_eq!(loaded.load(&s.registry, &path, 1.0).unwrap(), n);
        assert_eq!(values(loaded.parameters().unwrap()), before, "{format:?}");
    }
    (n, dir)
}

/// Constrained OFT: fresh adapters with `coft` take the fixture's unprojected values and give
/// the output of peft's projected rotations; afterwards every linear layer's block lies within
/// coft_eps/√blocks, the blocks that started inside are as they were, and the conv layers (which
/// OneTrainer does not project) are untouched. Without `coft` the output is another.
#[test]
fn constrained_oft_projects_its_blocks_as_peft_does() {
    let s = Setup::new();
    let filter = select::LayerFilter::new(LayerPreset::Full, "", false).unwrap();
    let layers = select::select(&s.model.info, &filter, |p| p == "unet");
    let file = adapter_file("oft_coft.safetensors");
    let run = |coft: bool| {
        s.model.clear();
        let opts = AdapterOptions {
            kind: "oft".into(),
            extra: serde_json::json!({"block_size": 8, "coft": coft, "coft_eps": 0.05})
                .as_object()
                .unwrap()
                .clone(),
            ..Default::default()
        };
        s.model.create(&s.registry, &layers, &opts).unwrap();
        assert!(s.model.resume(&file).unwrap() >= 20);
        s.unet()
    };
    let want = oft_output("oft_coft");
    let d = max_abs_diff(&run(true), &want);
    println!("coft: UNet output max abs diff {d:.2e}");
    assert!(d < 1e-4, "max abs diff {d}");
    let start: std::collections::HashMap<String, Vec<f32>> = {
        let w = Weights::open(file.to_str().unwrap()).unwrap();
        w.infos()
            .iter()
            .map(|i| {
                (
                    i.key.clone(),
                    w.get(&i.key, DType::F32).unwrap().to_vec().unwrap(),
                )
            })
            .collect()
    };
    let (mut moved, mut kept, mut convs) = (0, 0, 0);
    for (name, t) in s.model.parameters().unwrap() {
        let layer = s
            .model
            .info
            .adaptable_layers
            .iter()
            .find(|l| name.starts_with(&format!("{}.", l.name)))
            .unwrap();
        let key = format!("{}.oft_R.weight", layer.keys["kohya"]);
        let Some(before) = start.get(&key) else {
            continue;
        };
        let now = t.to_vec().unwrap();
        if layer.conv.is_some() {
            // OneTrainer projects on linear layers only.
            assert_eq!(&now, before, "{key}");
            convs += 1;
            continue;
        }
        let shape = t.shape().unwrap();
        let eps = 0.05 / (shape[0] as f32).sqrt();
        for (row, was) in now.chunks(shape[1]).zip(before.chunks(shape[1])) {
            let norm = |v: &[f32]| (2.0 * v.iter().map(|x| x * x).sum::<f32>()).sqrt();
            assert!(norm(row) <= eps * 1.0001, "{key}: {} > {eps}", norm(row));
            if norm(was) <= eps {
                assert_eq!(row, was, "{key}: a block inside the ball is left alone");
                kept += 1;
            } else {
                moved += 1;
            }
        }
    }
    assert!(
        moved > 50 && kept > 50 && convs > 5,
        "{moved} blocks projected, {kept} kept, {convs} conv layers"
    );
    let unconstrained = max_abs_diff(&run(false), &want);
    assert!(unconstrained > 1e-2, "without coft: {unconstrained}");
    s.model.clear();
}
