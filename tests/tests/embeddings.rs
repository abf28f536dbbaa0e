//! Textual-inversion embeddings: files other tools write (A1111's safetensors and `.pt`,
//! diffusers' `learned_embeds`, SDXL's `clip_l`/`clip_g`) give diffusers' prompt states
//! (fixtures from tests/fixtures/gen/embeddings.py); an embedding run trains only its vectors
//! and saves them as A1111's file; additional embeddings beside a LoRA are bundled in its file
//! or written beside it.

use std::path::{Path, PathBuf};

use ferrite::config::{TrainConfig, TrainingMethod};
use ferrite::embeddings::{self, Given, Source, files};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::trainer::{Event, Trainer};
use ferrite_blocks::tokenizer::ClipTokenizer;
use ferrite_plugin_api::{DType, ModelInfo, Weights, plugin::ArchitectureHandle};

const TOKEN: &str = "<style>";
const PROMPT: &str = "a photo of <style> on a red cat";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn registry() -> Registry {
    ferrite::runtime::init("cpu").unwrap();
    Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default())
}

fn load(arch: &str, model: &Path) -> (ArchitectureHandle, ModelInfo) {
    load_with(arch, model, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// The model given `given` embeddings.
fn load_with(
    arch: &str,
    model: &Path,
    given: &[Given],
) -> Result<(ArchitectureHandle, ModelInfo), String> {
    let mut options = serde_json::json!({ "model": model });
    if !given.is_empty() {
        options["embeddings"] = embeddings::option(given);
    }
    let a = registry()
        .architecture(arch, &options.to_string())
        .map_err(|e| e.to_string())?;
    let info = ModelInfo::from_json(&a.model_info().unwrap()).unwrap();
    Ok((a, info))
}

/// The embedding in `file` (under `fixtures/embeddings/` unless absolute) as `<style>`.
fn style(file: &str) -> Given {
    let path = fixtures().join("embeddings").join(file);
    Given {
        name: file.into(),
        placeholder: TOKEN.into(),
        source: Source::Tensors(files::read(&path).unwrap_or_else(|e| panic!("{e}"))),
    }
}

fn expected(name: &str) -> ferrite_plugin_api::Tensor {
    Weights::open(
        &fixtures()
            .join("embeddings/expected.safetensors")
            .to_string_lossy(),
    )
    .unwrap()
    .get(name, DType::F32)
    .unwrap()
}

fn close(got: &ferrite_plugin_api::Tensor, want: &str) -> f32 {
    let w = expected(want);
    assert_eq!(got.shape().unwrap(), w.shape().unwrap(), "{want}");
    ferrite_tests::max_abs_diff(got, &w)
}

#[test]
fn sd15_embedding_files_of_every_form_give_diffusers_prompt_states() {
    let model = fixtures().join("pipeline/model");
    let (plain, _) = load("sd15", &model);
    let d = close(&plain.encode_text(&[PROMPT]).unwrap()[0], "sd15_states");
    assert!(d > 1e-2, "without the embedding the states differ ({d})");
    for file in [
        "sd15_a1111.safetensors",
        "sd15_learned_embeds.safetensors",
        "sd15_a1111.pt",
    ] {
        let (arch, info) = load_with("sd15", &model, &[style(file)]).unwrap();
        assert_eq!(info.embeddings.len(), 1);
        let out = arch.encode_text(&[PROMPT]).unwrap();
        let d = close(&out[0], "sd15_states");
        println!("{file}: max abs diff {d:e}");
        assert!(d < 1e-4, "{file}: max abs diff {d}");
        // Text without the placeholder reads as before.
        let out = arch
            .encode_text(&["a photo of style on a red cat"])
            .unwrap();
        assert!(close(&out[0], "sd15_plain_states") < 1e-4, "{file}");
    }
}

#[test]
fn an_sdxl_embedding_goes_to_both_text_encoders_as_diffusers_loads_it() {
    let model = fixtures().join("sdxl/model");
    let (arch, info) = load_with("sdxl", &model, &[style("sdxl.safetensors")]).unwrap();
    let out = arch.encode_text(&[PROMPT]).unwrap();
    for (got, want) in out.iter().zip(["sdxl_states", "sdxl_pooled"]) {
        let d = close(got, want);
        println!("{want}: max abs diff {d:e}");
        assert!(d < 1e-4, "{want}: max abs diff {d}");
    }
    // The vectors are the model's parameters; written and read back: SDXL's keys, the file's
    // vectors.
    let v = embeddings::of_model(&arch.parameters().unwrap(), 1).remove(0);
    let parts: Vec<&str> = v.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(parts, ["text_encoder", "text_encoder_2"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.safetensors");
    embeddings::write(&path, &v, &info, DType::F32).unwrap();
    let back = files::read(&path).unwrap();
    let original = files::read(&fixtures().join("embeddings/sdxl.safetensors")).unwrap();
    assert_eq!(back.len(), 2);
    for ((k, a), (l, b)) in back.iter().zip(&original) {
        assert_eq!(k, l);
        assert_eq!(ferrite_tests::max_abs_diff(a, b), 0.0, "{k}");
    }
    // A single-encoder file is not an SDXL embedding.
    let e = load_with("sdxl", &model, &[style("sd15_a1111.safetensors")])
        .err()
        .expect("an SD 1.5 embedding on SDXL");
    assert!(
        e.contains("sd15_a1111.safetensors: none of the keys")
            && e.contains("clip_l, clip_g")
            && e.contains("emb_params"),
        "{e}"
    );
}

#[test]
fn a_wrong_width_is_refused_naming_the_embedding() {
    let mut v = style("sdxl.safetensors");
    // clip_g's 48-wide vectors as SD 1.5's 32-wide encoder's.
    if let Source::Tensors(t) = &mut v.source {
        t.retain(|(k, _)| k == "clip_g");
    }
    let e = load_with("sd15", &fixtures().join("pipeline/model"), &[v])
        .err()
        .expect("a 48-wide embedding on a 32-wide encoder");
    assert!(
        e.contains("sdxl.safetensors: text_encoder takes vectors [tokens, 32], got [2, 48]"),
        "{e}"
    );
}

fn concept(root: &Path, caption: &str) {
    let dir = root.join("images");
    ferrite_tests::toy_dataset(&dir);
    for i in 0..6 {
        std::fs::write(dir.join(format!("{i}.txt")), caption).unwrap();
    }
}

fn config(root: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
model_type = "sd15"
base_model_name = "{}"
workspace_dir = "ws"
output_model_destination = "out/result.safetensors"
resolution = "16"
batch_size = 2
learning_rate = 0.05
lora_rank = 2
backup_after_unit = "never"
sample_after_unit = "never"
validation = true
validate_after_unit = "never"
{extra}
[optimizer]
optimizer = "adamw"
# Without decay a vector moves only with a gradient: "it changed" means "it was used".
weight_decay = 0.0
[[concepts]]
path = "images"
[[concepts]]
path = "images"
name = "held out"
type = "validation"
"#,
        fixtures().join("pipeline/model").display()
    );
    let p = root.join("c.toml");
    std::fs::write(&p, text).unwrap();
    TrainConfig::load(Some(&p), None, &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn an_embedding_run_trains_only_its_vectors_and_saves_a1111s_file() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <thing> square");
    let c = config(
        root.path(),
        r#"training_method = "embedding"
epochs = 4
[unet]
train = false
[embedding]
placeholder = "<thing>"
token_count = 5
initial_embedding_text = "red"
"#,
    );
    assert_eq!(c.training_method, TrainingMethod::Embedding);
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    let trained = t.trainable();
    let names: Vec<&str> = trained.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["<thing>/text_encoder"]);
    let start = trained[0].1.to_vec().unwrap();
    // OneTrainer's start: "red"'s tokens, then `*`'s.
    let model = fixtures().join("pipeline/model");
    let (arch, info) = load("sd15", &model);
    let tokenizer = ClipTokenizer::from_dir(&model.join("tokenizer")).unwrap();
    let table = arch
        .parameters()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "text_encoder.text_model.embeddings.token_embedding.weight")
        .unwrap()
        .1
        .to_vec()
        .unwrap();
    let rows = |text: &str| -> Vec<f32> {
        let ids = tokenizer.tokens(text).unwrap();
        ids.iter()
            .flat_map(|&i| table[i as usize * 32..(i as usize + 1) * 32].to_vec())
            .collect()
    };
    let (red, star) = (rows("red"), rows("*"));
    // The fixture's byte-level vocabulary: "red" is 3 tokens, then 2 of `*`.
    assert_eq!(red.len(), 3 * 32);
    assert_eq!(start.len(), 5 * 32);
    assert_eq!(start[..96], red[..]);
    assert_eq!(start[96..128], star[..32]);
    assert_eq!(start[128..], star[..32]);
    let model_before: Vec<(String, Vec<f32>)> = arch
        .parameters()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec().unwrap()))
        .collect();
    let before = t.validate().unwrap()[0].1;
    let mut problems = Vec::new();
    t.run(|e| {
        if let Event::Started { problems: p, .. } = e {
            problems = p;
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(problems.is_empty(), "{problems:?}");
    // The loss at fixed timesteps and noise on the concept's images.
    let after = t.validate().unwrap()[0].1;
    println!("validation loss: before {before}, after {after}");
    assert!(after < before * 0.98, "{before} -> {after}");
    let end = t.trainable()[0].1.to_vec().unwrap();
    assert_ne!(start, end, "the vectors trained");
    // The model itself is untouched (its token table included).
    for ((name, before), (_, after)) in model_before.iter().zip(t.model_parameters().unwrap()) {
        assert!(*before == after.to_vec().unwrap(), "{name} changed");
    }
    // The output: A1111's `emb_params`, the trained vectors.
    let out = root.path().join("out/result.safetensors");
    let w = Weights::open(&out.to_string_lossy()).unwrap();
    let keys: Vec<&str> = w.infos().iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["emb_params"]);
    assert_eq!(w.info("emb_params").unwrap().shape, [5, 32]);
    assert_eq!(
        w.get("emb_params", DType::F32).unwrap().to_vec().unwrap(),
        end
    );
    // Samples of "a photo of <thing>" with the trained vectors differ from those with the
    // untrained ones (the initial text's).
    let untrained = root.path().join("untrained.safetensors");
    let start_vectors = vec![(
        "text_encoder".to_string(),
        ferrite_plugin_api::Tensor::from_f32(&start, &[5, 32]).unwrap(),
    )];
    embeddings::write(&untrained, &start_vectors, &info, DType::F32).unwrap();
    let prompt = "a photo of <thing>";
    let spec = |p: &Path| format!("{}:thing", p.display());
    let before = sample("pipeline", prompt, &["--embedding", &spec(&untrained)]);
    let after = sample("pipeline", prompt, &["--embedding", &spec(&out)]);
    let d = ferrite_tests::max_pixel_diff(&before, &after);
    println!("sample of {prompt:?}, untrained vs trained embedding: max pixel difference {d}/255");
    assert!(d > 0);
}

/// The LoRA file of a run with additional embeddings: the trained one bundled under A1111's
/// keys, a frozen one loaded from a file as it was; unbundled (or in diffusers' layout), each
/// is a file beside the LoRA.
#[test]
fn additional_embeddings_train_with_a_lora_and_go_in_its_file_or_beside_it() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <thing> square, <style>");
    let style = fixtures().join("embeddings/sd15_a1111.safetensors");
    let extra = format!(
        r#"[[additional_embeddings]]
placeholder = "<thing>"
token_count = 2
[[additional_embeddings]]
placeholder = "<style>"
model_name = "{}"
train = false
"#,
        style.display()
    );
    // Bundled in kohya's layout only (diffusers refuses a file with other keys).
    for (bundle, format) in [
        (true, "safetensors"),
        (false, "safetensors"),
        (true, "diffusers"),
    ] {
        let c = config(
            root.path(),
            &format!(
                "epochs = 1\nbundle_additional_embeddings = {bundle}\n\
                 output_model_format = \"{format}\"\n{extra}"
            ),
        );
        let bundle = bundle && format == "safetensors";
        let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<String> = t.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.starts_with("unet.")), "{names:?}");
        assert!(
            names.contains(&"<thing>/text_encoder".to_string()),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.starts_with("<style>")), "{names:?}");
        let start = t
            .trainable()
            .into_iter()
            .find(|(n, _)| n.starts_with("<thing>"))
            .unwrap()
            .1
            .to_vec()
            .unwrap();
        t.run(|_| {}).unwrap_or_else(|e| panic!("{e}"));
        let lora = root.path().join("out/result.safetensors");
        let beside = root.path().join("out/result_thing.safetensors");
        let style_beside = root.path().join("out/result_style.safetensors");
        let (thing, kept) = if bundle {
            assert!(!beside.exists());
            let b = files::read_bundled(&lora).unwrap();
            let names: Vec<&str> = b.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["<style>", "<thing>"]);
            let w = Weights::open(&lora.to_string_lossy()).unwrap();
            assert!(w.info("bundle_emb.<thing>.string_to_param.*").is_some());
            assert!(w.infos().iter().any(|i| i.key.starts_with("lora_unet_")));
            (b[1].1[0].1.clone(), b[0].1[0].1.clone())
        } else {
            assert!(files::read_bundled(&lora).unwrap().is_empty());
            let w = |p: &Path| Weights::open(&p.to_string_lossy()).unwrap();
            let (a, b) = (w(&beside), w(&style_beside));
            (
                a.get("emb_params", DType::F32).unwrap(),
                b.get("emb_params", DType::F32).unwrap(),
            )
        };
        assert_eq!(thing.shape().unwrap(), [2, 32]);
        assert_ne!(thing.to_vec().unwrap(), start, "trained");
        let loaded = files::read(&style).unwrap()[0].1.clone();
        assert_eq!(ferrite_tests::max_abs_diff(&kept, &loaded), 0.0, "frozen");
        std::fs::remove_dir_all(root.path().join("out")).unwrap();
    }
}

/// Problems an embedding reports when the run starts.
#[test]
fn an_unused_or_existing_word_placeholder_is_reported_at_start() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of a square");
    let c = config(
        root.path(),
        "training_method = \"embedding\"\nepochs = 1\n[embedding]\nplaceholder = \"a\"\n",
    );
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();
    t.run(|e| {
        if let Event::Started { problems: p, .. } = e {
            problems = p;
        }
    })
    .unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("a word of the model's vocabulary")),
        "{problems:?}"
    );
    let c_nowhere = |root: &Path| {
        config(
            root,
            "training_method = \"embedding\"\nepochs = 1\n[embedding]\nplaceholder = \"<nowhere>\"\n",
        )
    };
    let mut t = Trainer::new(c_nowhere(root.path()), root.path(), registry())
        .unwrap_or_else(|e| panic!("{e}"));
    t.run(|e| {
        if let Event::Started { problems: p, .. } = e {
            problems = p;
        }
    })
    .unwrap();
    assert_eq!(
        problems,
        ["embedding.placeholder: no caption contains `<nowhere>`, so the embedding will not train"]
    );
    // A caption with the placeholder in other letters trains it (the loader writes it as
    // configured): no warning.
    concept(root.path(), "a photo of <NOWHERE>");
    let mut t = Trainer::new(c_nowhere(root.path()), root.path(), registry()).unwrap();
    t.run(|e| {
        if let Event::Started { problems: p, .. } = e {
            problems = p;
        }
    })
    .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

/// The bundled presets train an embedding.
#[test]
fn the_embedding_presets_train() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <embedding>");
    for (preset, arch, model, keys) in [
        (
            "sd15-embedding",
            "sd15",
            "pipeline/model",
            vec!["emb_params"],
        ),
        (
            "sdxl-embedding",
            "sdxl",
            "sdxl/model",
            vec!["clip_g", "clip_l"],
        ),
    ] {
        let text = format!(
            "base_model_name = \"{}\"\nworkspace_dir = \"ws-{arch}\"\n\
             output_model_destination = \"out/{arch}.safetensors\"\n[[concepts]]\npath = \"images\"\n",
            fixtures().join(model).display()
        );
        let p = root.path().join(format!("{arch}.toml"));
        std::fs::write(&p, text).unwrap();
        let sets = [
            "resolution=16".to_string(),
            "epochs=1".into(),
            "sample_after_unit=\"never\"".into(),
        ];
        let c = TrainConfig::load(Some(&p), Some(preset), &sets).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.model_type, arch);
        let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
        t.run(|_| {}).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let out = root.path().join(format!("out/{arch}.safetensors"));
        let w = Weights::open(&out.to_string_lossy()).unwrap();
        let got: Vec<&str> = w.infos().iter().map(|i| i.key.as_str()).collect();
        assert_eq!(got, keys, "{preset}");
    }
}

/// `ferrite sample` of `prompt` as the generator's images are made (DDIM, negative prompt
/// "blurry", the fixture's noise).
fn sample(fixture: &str, prompt: &str, args: &[&str]) -> image::RgbImage {
    let fx = fixtures().join(fixture);
    let model = fx.join("model");
    let mut all = vec![
        "--model",
        model.to_str().unwrap(),
        "--negative-prompt",
        "blurry",
        "--sampler",
        "ddim",
    ];
    all.extend(args);
    ferrite_tests::sample_image(&fx, prompt, &all)
}

fn reference(name: &str) -> image::RgbImage {
    image::open(fixtures().join("embeddings").join(name))
        .unwrap()
        .to_rgb8()
}

#[test]
fn sample_with_an_embedding_makes_diffusers_image() {
    let file = fixtures().join("embeddings/sd15_a1111.safetensors");
    let spec = format!("{}:style", file.display());
    let want = reference("sd15_ddim.png");
    let got = sample("pipeline", PROMPT, &["--embedding", &spec]);
    let d = ferrite_tests::max_pixel_diff(&got, &want);
    println!("SD 1.5 with <style>: max pixel difference {d}/255");
    assert!(d <= 2, "{d}");
    // A1111's bare word, and the file's stem as the name.
    let bare = sample(
        "pipeline",
        &PROMPT.replace("<style>", "style"),
        &["--embedding", &spec],
    );
    assert_eq!(bare, got, "`style` as `<style>`");
    let dir = tempfile::tempdir().unwrap();
    let stem_copy = dir.path().join("style.safetensors");
    std::fs::copy(&file, &stem_copy).unwrap();
    let by_stem = sample(
        "pipeline",
        PROMPT,
        &["--embedding", stem_copy.to_str().unwrap()],
    );
    assert_eq!(by_stem, got, "named by the file's stem");
    let without = sample("pipeline", PROMPT, &[]);
    assert!(
        ferrite_tests::max_pixel_diff(&without, &want) > 2,
        "the embedding matters"
    );

    let xl = fixtures().join("embeddings/sdxl.safetensors");
    let spec = format!("{}:style", xl.display());
    let got = sample("sdxl", PROMPT, &["--arch", "sdxl", "--embedding", &spec]);
    let d = ferrite_tests::max_pixel_diff(&got, &reference("sdxl_ddim.png"));
    println!("SDXL with <style>: max pixel difference {d}/255");
    assert!(d <= 2, "{d}");
}

/// A LoRA file's bundled embedding is used by `ferrite sample --lora` as if given with
/// `--embedding`.
#[test]
fn a_loras_bundled_embedding_applies_in_sample() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("adapters/lora_kohya.safetensors");
    let emb = fixtures().join("embeddings/sd15_a1111.safetensors");
    let bundled = bundled_lora(dir.path());
    let with_bundle = sample("pipeline", PROMPT, &["--lora", bundled.to_str().unwrap()]);
    let spec = format!("{}:style", emb.display());
    let separate = sample(
        "pipeline",
        PROMPT,
        &["--lora", lora.to_str().unwrap(), "--embedding", &spec],
    );
    assert_eq!(with_bundle, separate);
    let lora_only = sample("pipeline", PROMPT, &["--lora", lora.to_str().unwrap()]);
    assert!(ferrite_tests::max_pixel_diff(&lora_only, &with_bundle) > 0);
}

/// `ferrite lora info` lists a file's bundled embeddings; `ferrite lora convert` keeps them
/// inside a kohya file, and writes each beside a diffusers one (which holds none).
#[test]
fn lora_convert_keeps_bundled_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = bundled_lora(dir.path());
    let model = fixtures().join("pipeline/model");
    let convert = |format: &str, out: &Path| {
        let o = ferrite_tests::run_ferrite(
            &[
                "lora",
                "convert",
                "--model",
                model.to_str().unwrap(),
                "--in",
                bundled.to_str().unwrap(),
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
            ],
            None,
            dir.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let o = ferrite_tests::run_ferrite(
        &["lora", "info", bundled.to_str().unwrap()],
        None,
        dir.path(),
    );
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("bundled embeddings: <style> (string_to_param.* [2, 32])"),
        "{info}"
    );
    let want = files::read(&fixtures().join("embeddings/sd15_a1111.safetensors")).unwrap();
    let kohya = dir.path().join("k.safetensors");
    convert("kohya", &kohya);
    let b = files::read_bundled(&kohya).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].0, "<style>");
    assert_eq!(ferrite_tests::max_abs_diff(&b[0].1[0].1, &want[0].1), 0.0);
    let diffusers = dir.path().join("d.safetensors");
    convert("diffusers", &diffusers);
    assert!(files::read_bundled(&diffusers).unwrap().is_empty());
    let beside = files::read(&dir.path().join("d_style.safetensors")).unwrap();
    assert_eq!(beside[0].0, "emb_params");
    assert_eq!(ferrite_tests::max_abs_diff(&beside[0].1, &want[0].1), 0.0);
}

/// The kohya LoRA fixture with the SD 1.5 embedding bundled as `<style>`.
fn bundled_lora(dir: &Path) -> PathBuf {
    ferrite::runtime::init("cpu").unwrap();
    let lora = fixtures().join("adapters/lora_kohya.safetensors");
    let emb = fixtures().join("embeddings/sd15_a1111.safetensors");
    let bundled = dir.join("bundled.safetensors");
    let w = Weights::open(&lora.to_string_lossy()).unwrap();
    let mut tensors: Vec<(String, ferrite_plugin_api::Tensor)> = w
        .infos()
        .iter()
        .map(|i| (i.key.clone(), w.get(&i.key, i.dtype).unwrap()))
        .collect();
    let v = Weights::open(&emb.to_string_lossy())
        .unwrap()
        .get("emb_params", DType::F32)
        .unwrap();
    tensors.push(("bundle_emb.<style>.string_to_param.*".into(), v));
    let named: Vec<(&str, &ferrite_plugin_api::Tensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    ferrite_plugin_api::save_safetensors(&bundled.to_string_lossy(), &named, &[]).unwrap();
    bundled
}

/// Losses and trained vectors of an embedding run (with EMA), cancelled after `stop_at` steps
/// when given.
fn embedding_run(
    root: &Path,
    ws: &str,
    resume: bool,
    stop_at: Option<u64>,
) -> (Vec<f32>, Vec<f32>) {
    let mut c = config(
        root,
        "training_method = \"embedding\"\nepochs = 2\nema = \"gpu\"\nema_decay = 0.9\n\
         ema_update_step_interval = 1\n[embedding]\nplaceholder = \"<thing>\"\ntoken_count = 2\n",
    );
    c.workspace_dir = ws.into();
    c.output_model_destination = format!("{ws}/out.safetensors");
    c.continue_last_backup = resume;
    let mut t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
    let cancel = t.controls().cancel.clone();
    let mut losses = Vec::new();
    t.run(|e| {
        if let Event::Step { step, loss, .. } = e {
            losses.push(loss);
            if Some(step) == stop_at {
                cancel.cancel();
            }
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (losses, t.trainable()[0].1.to_vec().unwrap())
}

#[test]
fn a_resumed_embedding_run_repeats_the_uninterrupted_one_exactly() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <thing> square");
    let (whole, end) = embedding_run(root.path(), "whole", false, None);
    assert_eq!(whole.len(), 6);
    let (first, _) = embedding_run(root.path(), "split", false, Some(3));
    assert_eq!(first, whole[..3]);
    let (rest, resumed_end) = embedding_run(root.path(), "split", true, None);
    assert_eq!(rest, whole[3..], "per-step losses, bitwise");
    assert!(resumed_end == end, "same vectors");
    let read = |ws: &str| {
        Weights::open(
            &root
                .path()
                .join(ws)
                .join("out.safetensors")
                .to_string_lossy(),
        )
        .unwrap()
        .get("emb_params", DType::F32)
        .unwrap()
        .to_vec()
        .unwrap()
    };
    assert!(read("whole") == read("split"), "same saved (EMA) embedding");
    assert!(read("whole") != end, "the saved one is the EMA average");
}

/// An embedding run goes on from a file (its vectors, its token count), and what it learned
/// shows in samples of its placeholder: they differ from those of the vectors it started from.
#[test]
fn an_embedding_goes_on_from_a_file_and_its_samples_change() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <style> on a red cat");
    let start = fixtures().join("embeddings/sd15_a1111.safetensors");
    let c = config(
        root.path(),
        &format!(
            "training_method = \"embedding\"\nepochs = 4\n[embedding]\nplaceholder = \"<style>\"\n\
             model_name = \"{}\"\n",
            start.display()
        ),
    );
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    let file = files::read(&start).unwrap()[0].1.to_vec().unwrap();
    assert_eq!(
        t.trainable()[0].1.to_vec().unwrap(),
        file,
        "starts from the file"
    );
    t.run(|_| {}).unwrap_or_else(|e| panic!("{e}"));
    let out = root.path().join("out/result.safetensors");
    let trained = Weights::open(&out.to_string_lossy()).unwrap();
    assert_eq!(trained.info("emb_params").unwrap().shape, [2, 32]);
    let before = sample(
        "pipeline",
        PROMPT,
        &["--embedding", &format!("{}:style", start.display())],
    );
    let after = sample(
        "pipeline",
        PROMPT,
        &["--embedding", &format!("{}:style", out.display())],
    );
    let d = ferrite_tests::max_pixel_diff(&before, &after);
    println!("sample of {PROMPT:?} before and after training: max pixel difference {d}/255");
    assert!(d > 0);
}

/// Flux takes embeddings on CLIP-L only (as OneTrainer): an SDXL file's `clip_l` applies;
/// T5 reads the placeholder as text.
#[test]
fn flux_takes_clip_l_embeddings() {
    let model = fixtures().join("flux/pipeline/model");
    let (plain, _) = load("flux", &model);
    let (arch, info) = load_with("flux", &model, &[style("sdxl.safetensors")]).unwrap();
    assert_eq!(info.embeddings.len(), 1);
    let v = embeddings::of_model(&arch.parameters().unwrap(), 1).remove(0);
    let parts: Vec<&str> = v.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(parts, ["text_encoder"], "clip_l only");
    let (without, with) = (
        plain.encode_text(&[PROMPT]).unwrap(),
        arch.encode_text(&[PROMPT]).unwrap(),
    );
    assert_eq!(
        ferrite_tests::max_abs_diff(&with[0], &without[0]),
        0.0,
        "T5"
    );
    assert!(
        ferrite_tests::max_abs_diff(&with[1], &without[1]) > 1e-4,
        "CLIP's pooled"
    );
}

/// The vectors of `<thing>` and of one LoRA tensor after a LoRA run with `<thing>` as an
/// additional embedding (cancelled after `stop_at` steps when given), and before it.
type Pair = (Vec<f32>, Vec<f32>);
fn lora_run(root: &Path, ws: &str, extra: &str, stop_at: Option<u64>) -> (Pair, Pair) {
    let mut c = config(
        root,
        &format!("epochs = 1\n{extra}\n[[additional_embeddings]]\nplaceholder = \"<thing>\"\n"),
    );
    c.workspace_dir = ws.into();
    c.output_model_destination = format!("{ws}/out.safetensors");
    let mut t = Trainer::new(c, root, registry()).unwrap_or_else(|e| panic!("{e}"));
    let get = |t: &Trainer, prefix: &str| {
        t.trainable()
            .into_iter()
            .find(|(n, _)| {
                n.starts_with(prefix) && (prefix == "<thing>" || n.ends_with("up.weight"))
            })
            .unwrap()
            .1
            .to_vec()
            .unwrap()
    };
    let before = (get(&t, "<thing>"), get(&t, "unet."));
    let cancel = t.controls().cancel.clone();
    t.run(|e| {
        if let Event::Step { step, .. } = e
            && Some(step) == stop_at
        {
            cancel.cancel();
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    ((get(&t, "<thing>"), get(&t, "unet.")), before)
}

/// `embedding_learning_rate` is the embeddings' own (0: they stay while the LoRA trains), and
/// an embedding's `stop_training_after` stops it alone.
#[test]
fn the_embedding_learning_rate_is_the_embeddings_own() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <thing> square");
    let ((moved, lora), (start, lora_start)) = lora_run(root.path(), "moved", "", None);
    assert_ne!(moved, start);
    assert_ne!(lora, lora_start);
    let ((kept, lora_kept), _) =
        lora_run(root.path(), "kept", "embedding_learning_rate = 0.0", None);
    assert_eq!(kept, start, "no learning rate, no change");
    assert_ne!(lora_kept, lora_start, "the LoRA trains");
    // Stopped after its first step: as a run cancelled then.
    let ((one, _), _) = lora_run(root.path(), "one", "", Some(1));
    let stop = "[[additional_embeddings]]\nplaceholder = \"<thing>\"\nstop_training_after = 1\n\
                stop_training_after_unit = \"step\"";
    let mut c = config(root.path(), &format!("epochs = 1\n{stop}"));
    c.workspace_dir = "stopped".into();
    c.output_model_destination = "stopped/out.safetensors".into();
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    let mut steps = 0;
    t.run(|e| {
        if let Event::Step { .. } = e {
            steps += 1;
        }
    })
    .unwrap();
    assert_eq!(steps, 3, "the LoRA goes on");
    let stopped = t
        .trainable()
        .into_iter()
        .find(|(n, _)| n.starts_with("<thing>"))
        .unwrap()
        .1
        .to_vec()
        .unwrap();
    assert_eq!(stopped, one, "the embedding stopped after step 1");
}

/// Capitalisation options change the caption's case, not the placeholder's: an embedding
/// trains with every caption in capitals.
#[test]
fn capitalised_captions_keep_the_placeholder() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <thing> square");
    let mut c = config(
        root.path(),
        "training_method = \"embedding\"\nepochs = 1\n[embedding]\nplaceholder = \"<thing>\"\n",
    );
    let k = &mut c.concepts[0];
    k.caps_randomize_enable = true;
    k.caps_randomize_probability = 1.0;
    k.caps_randomize_mode = "capslock".into();
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    let start = t.trainable()[0].1.to_vec().unwrap();
    t.run(|_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(t.trainable()[0].1.to_vec().unwrap(), start);
}

/// Additional embeddings saved beside the output need names of their own; beside a fine-tune
/// each is a file next to the model.
#[test]
fn embeddings_that_would_share_a_file_are_refused() {
    let root = tempfile::tempdir().unwrap();
    concept(root.path(), "a photo of <a b> and <ab>");
    let c = config(
        root.path(),
        "training_method = \"fine_tune\"\n[[additional_embeddings]]\nplaceholder = \"<a b>\"\n\
         [[additional_embeddings]]\nplaceholder = \"<ab>\"\n",
    );
    let e = Trainer::new(c, root.path(), registry())
        .err()
        .expect("two embeddings in one file")
        .to_string();
    assert!(e.contains("additional_embeddings[1].placeholder"), "{e}");
    // One of them beside a fine-tune: its own file next to the model's.
    let c = config(
        root.path(),
        "training_method = \"fine_tune\"\nepochs = 1\n[[additional_embeddings]]\n\
         placeholder = \"<ab>\"\n",
    );
    let mut t = Trainer::new(c, root.path(), registry()).unwrap_or_else(|e| panic!("{e}"));
    t.run(|_| {}).unwrap_or_else(|e| panic!("{e}"));
    let beside = root.path().join("out/result_ab.safetensors");
    let w = Weights::open(&beside.to_string_lossy()).unwrap();
    assert_eq!(w.info("emb_params").unwrap().shape, [1, 32]);
    assert!(root.path().join("out/result.safetensors").is_file());
}

/// SD 2.x's OpenCLIP encoder takes embeddings the same way (`emb_params`): a new one starts as
/// OneTrainer's and changes the prompt states where its placeholder is.
#[test]
fn sd2_takes_embeddings() {
    let model = fixtures().join("sd2/model");
    let new = Given {
        name: "embedding".into(),
        placeholder: "<thing>".into(),
        source: Source::New {
            text: "red".into(),
            count: 2,
        },
    };
    let (arch, info) = load_with("sd2", &model, &[new]).unwrap();
    let part = info.part("text_encoder").unwrap();
    assert_eq!(part.embedding_key.as_deref(), Some("emb_params"));
    let v = embeddings::of_model(&arch.parameters().unwrap(), 1).remove(0);
    assert_eq!(v[0].1.shape().unwrap()[0], 2);
    let (plain, _) = load("sd2", &model);
    let prompt = "a photo of <thing>";
    let d = ferrite_tests::max_abs_diff(
        &arch.encode_text(&[prompt]).unwrap()[0],
        &plain.encode_text(&[prompt]).unwrap()[0],
    );
    assert!(d > 1e-4, "{d}");
    let same = ferrite_tests::max_abs_diff(
        &arch.encode_text(&["a photo"]).unwrap()[0],
        &plain.encode_text(&["a photo"]).unwrap()[0],
    );
    assert_eq!(same, 0.0);
}
