//! The tiny SD 1.x pipeline saved as a diffusers folder and as a single-file original (ldm)
//! checkpoint (tests/fixtures/gen/ldm_checkpoint.py, whose layout diffusers' own conversion reads
//! back exactly) loads to identical outputs; the file's structure is read off its shapes; files
//! of other families are refused with what was found.

use std::path::{Path, PathBuf};

use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite_blocks::ldm;
use ferrite_plugin_api::{DType, Generator, Tensor, Weights, plugin::ArchitectureHandle};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline")
}

fn checkpoint() -> PathBuf {
    fixture().join("sd15_tiny_ldm.safetensors")
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

fn sd15(registry: &Registry, options: serde_json::Value) -> Result<ArchitectureHandle, String> {
    registry
        .architecture("sd15", &options.to_string())
        .map_err(|e| e.to_string())
}

#[test]
fn folder_and_single_file_give_identical_outputs() {
    let registry = registry();
    let folder = sd15(
        &registry,
        serde_json::json!({ "model": fixture().join("model") }),
    )
    .unwrap();
    let file = sd15(
        &registry,
        serde_json::json!({ "model": checkpoint(), "config": fixture().join("model") }),
    )
    .unwrap();
    assert_eq!(
        folder.model_info().unwrap(),
        file.model_info().unwrap(),
        "same configs, same adaptable layer names"
    );

    let g = Generator::new(7).unwrap();
    let latents = Tensor::randn(&[2, 4, 8, 8], &g).unwrap();
    let image = Tensor::randn(&[1, 3, 16, 16], &g).unwrap();
    let t = Tensor::from_f32(&[999.0, 10.0], &[2]).unwrap();
    let run = |m: &ArchitectureHandle| {
        let text = m.encode_text(&["a red cat", "blurry"]).unwrap().remove(0);
        let noise = m.denoise(&latents, &t, &[&text]).unwrap();
        let (mean, logvar) = m.vae_encode(&image).unwrap();
        let decoded = m.vae_decode(&latents).unwrap();
        [text, noise, mean, logvar, decoded]
    };
    let (a, b) = (run(&folder), run(&file));
    for (name, (x, y)) in ["text", "denoise", "vae mean", "vae logvar", "vae decode"]
        .iter()
        .zip(a.iter().zip(&b))
    {
        let d = ferrite_tests::max_abs_diff(x, y);
        println!("{name}: folder vs single file max abs diff {d:e}");
        assert_eq!(d, 0.0, "{name}");
    }
}

/// The inferred config agrees with the folder's `config.json` on every key it sets, apart from
/// the per-block head counts (not in a file: SD 1.x's 8 are assumed).
fn agrees_with_folder(part: &str, inferred: serde_json::Value) {
    let p = fixture().join("model").join(part).join("config.json");
    let folder: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let inferred = inferred.as_object().unwrap();
    assert!(inferred.len() >= 5, "{part}: {inferred:?}");
    for (k, v) in inferred {
        let want = &folder[k];
        match (k.as_str(), want) {
            ("attention_head_dim" | "num_attention_heads", _) => {}
            // A single number in the folder stands for every block.
            (_, serde_json::Value::Number(_)) if v.is_array() => {
                assert!(
                    v.as_array().unwrap().iter().all(|x| x == want),
                    "{part}.{k}"
                )
            }
            _ => assert_eq!(v, want, "{part}.{k}"),
        }
    }
}

/// Tensor names and shapes of a view, sorted.
fn layout(w: &Weights, strip: &str) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<_> = w
        .infos()
        .iter()
        .filter(|i| !i.key.ends_with("position_ids"))
        .map(|i| {
            let k = i.key.as_str();
            (
                k.strip_prefix(strip).unwrap_or(k).to_string(),
                i.shape.to_vec(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn single_file_structure_is_read_off_the_shapes() {
    let _ = registry();
    let w = Weights::open(checkpoint().to_str().unwrap()).unwrap();

    let te = ldm::clip(&w).unwrap();
    agrees_with_folder("unet", ldm::unet_config(&w).unwrap());
    agrees_with_folder("vae", ldm::vae_config(&w).unwrap());
    let mut clip = ldm::clip_config(&te).unwrap();
    clip.as_object_mut().unwrap().remove("num_attention_heads");
    agrees_with_folder("text_encoder", clip);

    // Every tensor maps onto the folder's name with the folder's shape, and nothing is left over.
    let open = |p: &str| Weights::open(fixture().join("model").join(p).to_str().unwrap()).unwrap();
    let unet = ldm::unet(&w, 1).unwrap();
    let vae = ldm::vae(&w, 2).unwrap();
    assert_eq!(
        layout(&unet, ""),
        layout(&open("unet/diffusion_pytorch_model.safetensors"), "")
    );
    assert_eq!(
        layout(&vae, ""),
        layout(&open("vae/diffusion_pytorch_model.safetensors"), "")
    );
    assert_eq!(
        layout(&te, "text_model."),
        layout(&open("text_encoder/model.safetensors"), "text_model.")
    );
    assert_eq!(
        unet.infos().len() + vae.infos().len() + te.infos().len(),
        w.infos().len()
    );
    // A VAE attention projection is a 1×1 conv in the file, a linear weight in the view.
    let q = "decoder.mid_block.attentions.0.to_q.weight";
    assert_eq!(vae.info(q).unwrap().shape.len(), 2);
    assert_eq!(vae.get(q, DType::F32).unwrap().shape().unwrap().len(), 2);
}

/// A checkpoint with one tensor of each given name.
fn file_with(keys: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let t = Tensor::zeros(&[2, 2], DType::F32).unwrap();
    let named: Vec<(&str, &Tensor)> = keys.iter().map(|k| (*k, &t)).collect();
    ferrite_plugin_api::save_safetensors(
        d.path().join("model.safetensors").to_str().unwrap(),
        &named,
        &[],
    )
    .unwrap();
    d
}

#[test]
fn other_families_are_refused_with_what_was_found() {
    let registry = registry();
    for (keys, needle) in [
        (
            &[
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            ][..],
            "an SDXL checkpoint",
        ),
        (
            &["double_blocks.0.img_attn.proj.weight"][..],
            "a Flux checkpoint",
        ),
        // An SD 2.x text tower is welcome (tests/tests/sd2.rs), but not without a VAE.
        (
            &[
                "model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.model.token_embedding.weight",
            ][..],
            "not a full SD 1.x/2.x checkpoint",
        ),
        (
            &["some.other.weight"][..],
            "not a full SD 1.x/2.x checkpoint",
        ),
    ] {
        let d = file_with(keys);
        let path = d.path().join("model.safetensors");
        let e = sd15(&registry, serde_json::json!({ "model": path }))
            .err()
            .unwrap();
        assert!(
            e.contains(needle) && e.contains("model.safetensors"),
            "{needle}: {e}"
        );
    }
    let e = sd15(
        &registry,
        serde_json::json!({ "model": "/no/such/model.safetensors" }),
    )
    .err()
    .unwrap();
    assert!(e.contains("does not exist"), "{e}");
}

/// Writing the model back in the original layout (what a fine-tune saved as one file holds)
/// gives the checkpoint's own names and values, from a folder or from the file itself.
#[test]
fn export_to_the_original_layout_gives_back_the_checkpoint() {
    let registry = registry();
    let file = Weights::open(&checkpoint().to_string_lossy()).unwrap();
    let want: std::collections::BTreeSet<String> = file
        .infos()
        .iter()
        .map(|i| i.key.to_string())
        .filter(|k| !k.ends_with("position_ids"))
        .collect();
    for options in [
        serde_json::json!({ "model": fixture().join("model") }),
        serde_json::json!({ "model": checkpoint(), "config": fixture().join("model") }),
    ] {
        let m = sd15(&registry, options.clone()).unwrap();
        let exported = m.export("ldm").unwrap();
        let got: std::collections::BTreeSet<String> =
            exported.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            got.symmetric_difference(&want).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "{options}"
        );
        for (k, t) in &exported {
            let orig = file.get(k, DType::F32).unwrap();
            assert_eq!(t.shape().unwrap(), orig.shape().unwrap(), "{k}");
            assert_eq!(t.to_vec().unwrap(), orig.to_vec().unwrap(), "{k}");
        }
        assert!(m.export("a layout no one writes").is_err());
    }
}
