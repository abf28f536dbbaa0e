//! `ferrite caption` with the WD14 tagger (`plugins/caption-wd14`) on a small tagger-shaped ONNX
//! model (tests/fixtures/gen/wd14.py): the captions OneTrainer's WDModel makes, with the initial
//! caption, prefix and postfix; fill keeps a caption, add appends one, replace writes over it; a
//! broken image is named and skipped; a folder without the model says what it expected.

use std::path::{Path, PathBuf};

use ferrite_tests::{copy_dir, run_ferrite};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wd14")
}

fn expected(image: &str, key: &str) -> String {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[image][key].as_str().unwrap().to_string()
}

#[test]
fn ferrite_caption_tags_a_folder_as_onetrainer_does() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&fixtures().join("images"), &data, &|_| true);
    std::fs::write(data.join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::write(data.join("img1.txt"), "a photo\n\n").unwrap();
    let model = fixtures().join("model");
    let caption = |extra: &[&str]| {
        let mut args = vec![
            "caption",
            "--model",
            "wd14",
            "--model-path",
            model.to_str().unwrap(),
            "--sample-dir",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend(extra);
        run_ferrite(&args, None, home.path())
    };
    let read = |name: &str| std::fs::read_to_string(data.join(name)).unwrap();

    // fill: img1 keeps its caption; the others are tagged.
    let out = caption(&[]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("2 captions written, 1 images kept theirs, 1 images failed"),
        "{stdout}"
    );
    assert!(stderr.contains("broken.jpg"), "{stderr}");
    assert_eq!(read("img0.txt"), expected("img0", "caption"));
    assert_eq!(read("img2.txt"), expected("img2", "caption"));
    assert_eq!(read("img1.txt"), "a photo\n\n");
    assert!(!data.join("broken.txt").exists());

    // add: one more line; the initial caption starts the tags, prefix and postfix go around.
    let out = caption(&[
        "--mode",
        "add",
        "--initial-caption",
        "a drawing of",
        "--caption-prefix",
        "sks, ",
        "--caption-postfix",
        ", best",
    ]);
    assert!(out.status.success());
    let tagged = format!("sks, a drawing of {}, best", expected("img1", "caption"));
    assert_eq!(read("img1.txt"), format!("a photo\n{tagged}"));

    // replace, with the plugin's own option.
    let out = caption(&[
        "--mode",
        "replace",
        "--options",
        r#"{"include_rating": true}"#,
    ]);
    assert!(out.status.success());
    assert_eq!(read("img1.txt"), expected("img1", "caption_with_rating"));

    // --threshold is the tagger's general threshold: at 1 only the character tags are left.
    let out = caption(&["--mode", "replace", "--threshold", "1"]);
    assert!(out.status.success());
    let strict = read("img1.txt");
    assert!(!strict.is_empty() && !strict.contains(", "), "{strict}");
    assert!(expected("img1", "caption").starts_with(&strict), "{strict}");

    // A folder without the model, a bad mode, a bad option.
    let out = run_ferrite(
        &[
            "caption",
            "--model",
            "wd14",
            "--model-path",
            data.to_str().unwrap(),
            "--sample-dir",
            data.to_str().unwrap(),
        ],
        None,
        home.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("model.onnx is missing"),
        "{stderr}"
    );
    let out = caption(&["--mode", "append"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mode"));
    let out = caption(&["--options", r#"{"general_treshold": 0.5}"#]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("general_treshold"),
        "{stderr}"
    );
}

/// The tagger's input as Ferrite makes it (the `image` crate's bicubic) against the one
/// OneTrainer feeds (PIL's bicubic, BGR; tests/fixtures/gen/wd14.py): equal but for resampling
/// rounding.
#[test]
fn the_taggers_input_is_the_one_onetrainer_feeds() {
    ferrite::runtime::init("cpu").unwrap();
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    for name in ["img0", "img1", "img2"] {
        let (chw, _, _) =
            ferrite::label::image_chw(&fixtures().join(format!("images/{name}.png"))).unwrap();
        let got = ferrite_caption_wd14::model_input(&chw, (32, 32)).unwrap();
        let want: Vec<f64> = e[name]["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        let diffs: Vec<f64> = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        println!(
            "{name}: input differs from OneTrainer's by {mean:.2} on average, {max} at most (0..255)"
        );
        assert!(mean < 0.5 && max <= 4.0, "{name}: mean {mean}, max {max}");
    }
}
