//! Random and mutated bytes given to the readers of user files a run opens — the TOML config,
//! OneTrainer configs being imported, caption files, images and masks — and random text to the
//! caption options: an error (or a problem reported for the file), never a panic.

use ferrite_engine::config::{ConceptConfig, ConceptType, TrainConfig};
use ferrite_engine::data::{self, Dataset, caption};
use proptest::prelude::*;

/// A valid config to mutate: the bundled SD 1.5 LoRA preset.
fn preset_bytes() -> Vec<u8> {
    std::fs::read(ferrite_engine::config::presets_dir().join("sd15-lora.toml")).unwrap()
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    let n = bytes.len();
    if n > 0 {
        for (i, b) in edits {
            bytes[i % n] = *b;
        }
    }
    bytes
}

fn load(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, bytes).unwrap();
    // Ok or a config error; a panic fails the property.
    let _ = TrainConfig::load(Some(&p), None, &[]);
}

fn onetrainer_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onetrainer")
        .join(name)
}

/// `bytes` imported as a OneTrainer config: Ok, or an error naming the file.
fn import_onetrainer(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ot.json");
    std::fs::write(&p, bytes).unwrap();
    let src = ferrite_engine::config::onetrainer::Sources {
        config: p,
        ..Default::default()
    };
    match ferrite_engine::config::onetrainer::import(&src) {
        // What is written must be TOML that reads back.
        Ok(imported) => {
            let text = imported.to_toml(&src.config);
            assert!(text.parse::<toml::Table>().is_ok(), "{text}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A JSON value of any shape, for the importer's fields.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(|s| json!(s)),
        "[\\x00-\\x1f]{0,3}"
            .prop_map(|s| serde_json::Value::Object([(s, json!(1))].into_iter().collect())),
        Just(json!([1, "a", null])),
        Just(json!({"x": [], "__version": "v"})),
    ]
}

/// A folder with one image, its caption and its mask, each of the given bytes: scanned, and
/// when the scan takes the image, prepared for a batch with a caption drawn. An unreadable file
/// is one of the scan's problems.
fn scan(image: &[u8], caption: &[u8], mask: Option<&[u8]>) {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("a.png"), image).unwrap();
    std::fs::write(images.join("a.txt"), caption).unwrap();
    if let Some(m) = mask {
        std::fs::write(images.join("a-masklabel.png"), m).unwrap();
    }
    let c = TrainConfig {
        concepts: vec![ConceptConfig {
            path: "images".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let d = Dataset::scan(&c, dir.path(), &[ConceptType::Standard]);
    assert!(
        d.items.len() + d.problems.len() >= 1,
        "the image is taken or reported"
    );
    for item in &d.items {
        let mut r = data::rng(0, 0, 0);
        let _ = data::prepare(item, &c.concepts[0], (16, 16), &mut r);
        let _ = caption::draw(&item.captions, &c.concepts[0], &mut r);
    }
}

/// A small valid PNG to mutate.
fn png() -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_configs_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        load(&bytes);
    }

    #[test]
    fn mutated_configs_fail_cleanly(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        load(&mutate(preset_bytes(), &edits));
    }

    #[test]
    fn random_onetrainer_configs_fail_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        import_onetrainer(&bytes);
    }

    #[test]
    fn mutated_onetrainer_configs_fail_cleanly(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let bytes = std::fs::read(onetrainer_fixture("v0_sdxl_lora.json")).unwrap();
        import_onetrainer(&mutate(bytes, &edits));
    }

    #[test]
    fn onetrainer_fields_of_any_type_are_reported_not_fatal(
        key in 0usize..400,
        value in any_json(),
        version in proptest::option::of(0u64..14),
    ) {
        let text = std::fs::read_to_string(onetrainer_fixture("saved/config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let map = config.as_object_mut().unwrap();
        let name = map.keys().nth(key % map.len()).unwrap().clone();
        map.insert(name, value);
        map.insert("concepts".into(), serde_json::json!([{"path": "x", "image": 3}]));
        if let Some(v) = version {
            map.insert("__version".into(), v.into());
        }
        import_onetrainer(config.to_string().as_bytes());
    }

    #[test]
    fn random_images_captions_and_masks_are_problems(
        image in proptest::collection::vec(any::<u8>(), 0..256),
        caption in proptest::collection::vec(any::<u8>(), 0..128),
        mask in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
    ) {
        scan(&image, &caption, mask.as_deref());
    }

    #[test]
    fn mutated_images_and_masks_are_problems(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        mask_edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        scan(&mutate(png(), &edits), b"a red square", Some(&mutate(png(), &mask_edits)));
    }

    #[test]
    fn caption_options_take_any_text(
        text in ".{0,80}",
        delimiter in ".{0,3}",
        keep in 0usize..4,
        lowercase in any::<bool>(),
        placeholder in ".{0,6}",
    ) {
        let c = ConceptConfig {
            tag_delimiter: delimiter,
            keep_tags_count: keep,
            enable_tag_shuffling: true,
            tag_dropout_enable: true,
            tag_dropout_probability: 0.5,
            caps_randomize_enable: true,
            caps_randomize_probability: 0.5,
            caps_randomize_mode: "capslock, title, first, random".into(),
            caps_randomize_lowercase: lowercase,
            ..Default::default()
        };
        let mut r = data::rng(0, 0, 0);
        let v = caption::vary(&text, &c, &mut r);
        let _ = caption::keep_placeholders(v, &[placeholder.as_str()]);
    }
}
