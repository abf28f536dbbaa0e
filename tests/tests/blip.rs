//! The BLIP and BLIP-2 captioners (`plugins/caption-blip`) on small random models made by
//! transformers (tests/fixtures/gen/blip.py, blip2.py). Its own test binary: each binary may link one plugin's library
//! (their exported roots share a name).

use std::path::Path;

use ferrite_tests::run_ferrite;

/// BLIP on a small random BlipForConditionalGeneration with a tiny WordPiece tokenizer
/// (tests/fixtures/gen/blip.py): the token ids transformers' `generate` makes (greedy, 20 at
/// most) without and with an initial caption, and their text; the processor's pixel values from
/// the image (bicubic in the `image` crate, not PIL's); `ferrite caption --model blip` writes a
/// caption.
#[test]
fn blip_generates_what_transformers_generates() {
    use ferrite_plugin_api::{DType, Weights};
    ferrite::runtime::init("cpu").unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/blip");
    let o = ferrite_caption_blip::Options {
        model_path: Some(fixtures.join("model")),
        ..Default::default()
    };
    let blip = ferrite_caption_blip::BlipCaptioner::new(&o).unwrap();
    let e = Weights::open(fixtures.join("expected.safetensors").to_str().unwrap()).unwrap();
    let pixels = e.get("pixel_values", DType::F32).unwrap();
    let text = std::fs::read_to_string(fixtures.join("expected.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    for initial in ["", "a photo of"] {
        let ids = blip.generate(&pixels, initial).unwrap();
        let expected: Vec<i64> = want[initial]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(ids, expected, "`{initial}`");
        assert_eq!(
            blip.decode(&ids).unwrap(),
            want[initial]["caption"],
            "`{initial}`"
        );
    }
    let (chw, _, _) = ferrite::label::image_chw(&fixtures.join("image.png")).unwrap();
    let ours = blip.pixel_values(&chw).unwrap().to_vec().unwrap();
    let theirs = pixels.to_vec().unwrap();
    let mean = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / ours.len() as f32;
    println!("blip pixel values: mean abs diff {mean:.3} from the processor's");
    assert!(mean < 0.01, "{mean}");

    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures.join("image.png"), dir.path().join("image.png")).unwrap();
    let out = run_ferrite(
        &[
            "caption",
            "--model",
            "blip",
            "--model-path",
            fixtures.join("model").to_str().unwrap(),
            "--sample-dir",
            dir.path().to_str().unwrap(),
            "--initial-caption",
            "a photo of",
            "--device",
            "cpu",
        ],
        None,
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let caption = std::fs::read_to_string(dir.path().join("image.txt")).unwrap();
    assert!(caption.starts_with("a photo of "), "{caption}");
}

/// BLIP-2 on a small random Blip2ForConditionalGeneration (ViT, Q-Former with cross-attention
/// on its first layer only, OPT) with a tiny word-level tokenizer that starts with `</s>`
/// (tests/fixtures/gen/blip2.py): the token ids transformers' `generate` makes (greedy, 12 new
/// tokens; with the initial caption it stops at `</s>` at once) without and with an initial
/// caption, the prompt ids Blip2Processor makes, and their text; `ferrite caption --model blip2` writes a caption.
#[test]
fn blip2_generates_what_transformers_generates() {
    use ferrite_plugin_api::{DType, Weights};
    ferrite::runtime::init("cpu").unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/blip2");
    let o = ferrite_caption_blip::Blip2Options {
        model_path: Some(fixtures.join("model")),
        max_new_tokens: 12,
    };
    let blip2 = ferrite_caption_blip::Blip2Captioner::new(&o).unwrap();
    let e = Weights::open(fixtures.join("expected.safetensors").to_str().unwrap()).unwrap();
    let pixels = e.get("pixel_values", DType::F32).unwrap();
    let text = std::fs::read_to_string(fixtures.join("expected.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    for initial in ["", "a photo of"] {
        assert_eq!(
            blip2.prompt(initial).unwrap(),
            ints(&want[initial]["prompt"]),
            "`{initial}`"
        );
        let ids = blip2.generate(&pixels, initial).unwrap();
        assert_eq!(ids, ints(&want[initial]["ids"]), "`{initial}`");
        assert_eq!(
            blip2.decode(&ids).unwrap(),
            want[initial]["caption"],
            "`{initial}`"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/blip/image.png");
    std::fs::copy(image, dir.path().join("image.png")).unwrap();
    let out = run_ferrite(
        &[
            "caption",
            "--model",
            "blip2",
            "--model-path",
            fixtures.join("model").to_str().unwrap(),
            "--sample-dir",
            dir.path().to_str().unwrap(),
            "--initial-caption",
            "a photo of",
        ],
        None,
        home.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let caption = std::fs::read_to_string(dir.path().join("image.txt")).unwrap();
    assert!(caption.starts_with("a photo of"), "{caption}");
}
