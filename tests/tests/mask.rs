//! Masking a folder with the colour masker (`plugins/mask-color`, `ferrite mask`) against the
//! masks OneTrainer's formulas make (tests/fixtures/gen/masks.py): every mode with its alpha,
//! smoothing, threshold and expansion, existing masks kept by fill; a bad image is reported and
//! skipped.

use std::path::{Path, PathBuf};

use ferrite::mask::{self, MaskMode, MaskOptions};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite_tests::{copy_dir, profile_dir, run_ferrite};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/masks")
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// (case, mode, threshold, smooth, expand, alpha), as masks.py's CASES.
const CASES: [(&str, MaskMode, f64, usize, usize, f64); 5] = [
    ("replace", MaskMode::Replace, 0.3, 2, 1, 1.0),
    ("fill", MaskMode::Fill, 0.5, 0, 0, 1.0),
    ("add", MaskMode::Add, 0.3, 1, 2, 1.0),
    ("subtract", MaskMode::Subtract, 0.4, 3, 0, 0.7),
    ("blend", MaskMode::Blend, 0.3, 2, 1, 0.5),
];

#[test]
fn the_colour_masker_makes_onetrainers_masks_in_every_mode() {
    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let mut masker = registry.masker("color", "{}").unwrap();
    for (case, mode, threshold, smooth_pixels, expand_pixels, alpha) in CASES {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixtures().join("images"), dir.path(), &|_| true);
        let options = MaskOptions {
            prompt: "#00ff00".into(),
            mode,
            threshold,
            smooth_pixels,
            expand_pixels,
            alpha,
            include_subdirectories: false,
        };
        let report = mask::mask_folder(&mut masker, dir.path(), &options, |_, _| true).unwrap();
        assert!(report.failed.is_empty(), "{case}: {:?}", report.failed);
        let expected = fixtures().join("expected").join(case);
        let mut compared = 0;
        for e in std::fs::read_dir(&expected).unwrap() {
            let want = e.unwrap().path();
            let got = rgb(&dir.path().join(want.file_name().unwrap()));
            let want = rgb(&want);
            assert_eq!(got.dimensions(), want.dimensions(), "{case}");
            let differ = got
                .pixels()
                .zip(want.pixels())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differ, 0, "{case}: {differ} pixels differ");
            compared += 1;
        }
        if mode == MaskMode::Fill {
            assert_eq!((report.written, report.kept, compared), (1, 2, 1));
            // The masks it kept are as they were.
            for stem in ["a", "c"] {
                let name = format!("{stem}-masklabel.png");
                assert_eq!(
                    std::fs::read(dir.path().join(&name)).unwrap(),
                    std::fs::read(fixtures().join("images").join(&name)).unwrap()
                );
            }
        } else {
            assert_eq!((report.written, report.kept, compared), (3, 0, 3), "{case}");
        }
    }
}

/// A run stops where its progress says so (the dataset window's Cancel): the images done stay
/// done, the rest are not touched.
#[test]
fn a_folder_run_stops_when_asked() {
    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[profile_dir()], &Settings::default());
    let mut masker = registry.masker("color", "{}").unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("images"), dir.path(), &|p| {
        !p.to_string_lossy().ends_with("-masklabel.png")
    });
    let options = MaskOptions {
        prompt: "#00ff00".into(),
        mode: MaskMode::Replace,
        ..MaskOptions::default()
    };
    let report = mask::mask_folder(&mut masker, dir.path(), &options, |done, _| done < 1).unwrap();
    assert_eq!(report.written, 1);
    let masks = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with("-masklabel.png")
        })
        .count();
    assert_eq!(masks, 1);
}

/// `ferrite mask` on a folder with a broken image and a text file: the images are masked, the
/// broken one is named and skipped, nothing else is written; a colour that is not one, a mode
/// that is not one and a masker that does not exist are each named.
#[test]
fn ferrite_mask_skips_a_bad_image_and_masks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&fixtures().join("images"), &data, &|p| {
        !p.to_string_lossy().ends_with("-masklabel.png")
    });
    std::fs::write(data.join("broken.png"), b"not a png").unwrap();
    std::fs::write(data.join("notes.txt"), b"hello").unwrap();
    let sample_dir = data.to_str().unwrap();
    let mask = |extra: &[&str]| {
        let mut args = vec![
            "mask",
            "--model",
            "color",
            "--sample-dir",
            sample_dir,
            "--device",
            "cpu",
        ];
        args.extend(extra);
        run_ferrite(&args, None, home.path())
    };
    let out = mask(&["--prompt", "#00ff00", "--mode", "replace"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("3 masks written, 0 images kept theirs, 1 images failed"),
        "{stdout}"
    );
    assert!(stderr.contains("broken.png"), "{stderr}");
    let mut names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "a-masklabel.png",
            "a.png",
            "b-masklabel.png",
            "b.png",
            "broken.png",
            "c-masklabel.png",
            "c.png",
            "notes.txt"
        ]
    );
    let out = mask(&["--prompt", "green", "--mode", "replace"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`green` is not a hex colour"), "{stderr}");
    let out = mask(&["--prompt", "#00ff00", "--mode", "paint"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--mode"),
        "{stderr}"
    );
    let out = run_ferrite(
        &["mask", "--model", "clipsegg", "--sample-dir", sample_dir],
        None,
        home.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("clipsegg"),
        "{stderr}"
    );
}

/// `ferrite mask --model rembg` on a U²-Net-shaped model (tests/fixtures/gen/rembg.py) writes the
/// masks OneTrainer's rembg masker does with its defaults, but for the pixels at the edge that
/// Lanczos resizing in the `image` crate (not PIL's) moves across the threshold.
#[test]
fn rembg_masks_a_folder_as_onetrainer_does() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rembg");
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    copy_dir(&fixtures.join("images"), dir.path(), &|_| true);
    let out = run_ferrite(
        &[
            "mask",
            "--model",
            "rembg",
            "--model-path",
            fixtures.to_str().unwrap(),
            "--sample-dir",
            dir.path().to_str().unwrap(),
            "--mode",
            "replace",
            "--device",
            "cpu",
        ],
        None,
        home.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("2 masks written"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stem in ["img0", "img1"] {
        let name = format!("{stem}-masklabel.png");
        let (got, want) = (
            rgb(&dir.path().join(&name)),
            rgb(&fixtures.join("expected").join(&name)),
        );
        let differ = got
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a != b)
            .count();
        let total = (want.width() * want.height()) as usize;
        let masked = want.pixels().filter(|p| p[0] == 255).count();
        println!("{stem}: {differ} of {total} pixels differ ({masked} masked)");
        assert!(masked > total / 5 && masked < total * 4 / 5, "{masked}");
        assert!(differ * 200 < total, "{stem}: {differ} of {total} differ");
    }
}

/// The CLI's numbers reach the masks: with --threshold 0.5 --smooth-pixels 0 --expand-pixels 0
/// the mask is masks.py's "fill" case; --include-subdirectories takes the images of subfolders.
#[test]
fn ferrite_masks_flags_change_the_masks() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::copy(fixtures().join("images/b.png"), data.join("b.png")).unwrap();
    std::fs::copy(fixtures().join("images/b.png"), data.join("sub/b.png")).unwrap();
    let mask = |extra: &[&str]| {
        let mut args = vec![
            "mask",
            "--model",
            "color",
            "--sample-dir",
            data.to_str().unwrap(),
            "--prompt",
            "#00ff00",
            "--mode",
            "replace",
            "--device",
            "cpu",
        ];
        args.extend(extra);
        let out = run_ferrite(&args, None, home.path());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rgb(&data.join("b-masklabel.png"))
    };
    let defaults = mask(&[]);
    assert!(
        !data.join("sub/b-masklabel.png").exists(),
        "subfolders only when asked"
    );
    let tuned = mask(&[
        "--threshold",
        "0.5",
        "--smooth-pixels",
        "0",
        "--expand-pixels",
        "0",
        "--include-subdirectories",
    ]);
    assert_ne!(defaults, tuned);
    assert_eq!(
        tuned,
        rgb(&fixtures().join("expected/fill/b-masklabel.png"))
    );
    assert!(data.join("sub/b-masklabel.png").exists());
    let half = mask(&[
        "--threshold",
        "0.5",
        "--smooth-pixels",
        "0",
        "--expand-pixels",
        "0",
        "--alpha",
        "0.5",
    ]);
    assert!(
        half.pixels().all(|p| p[0] == 0 || p[0] == 127),
        "alpha 0.5 writes 127"
    );
}

/// ClipSeg on a small random CLIPSegForImageSegmentation (tests/fixtures/gen/clipseg.py, with
/// its position embeddings interpolated as the real model's are): transformers' logits for two
/// prompts from the processor's pixel values, and the processor's pixel values from the image
/// (bilinear resizing in the `image` crate, not PIL's).
#[test]
fn clipseg_gives_transformers_logits() {
    use ferrite_plugin_api::{DType, Weights};
    ferrite::runtime::init("cpu").unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clipseg");
    let m = ferrite_mask_clipseg::ClipSegMasker::new(Some(&fixtures.join("model"))).unwrap();
    let e = Weights::open(fixtures.join("expected.safetensors").to_str().unwrap()).unwrap();
    let pixels = e.get("pixel_values", DType::F32).unwrap();
    let want = e.get("logits", DType::F32).unwrap();
    let got = m.logits(&pixels, &["a red box", "green grass"]).unwrap();
    assert_eq!(got.shape().unwrap(), want.shape().unwrap());
    let d = ferrite_tests::max_abs_diff(&got, &want);
    println!("clipseg logits: max abs diff {d:.2e}");
    assert!(d < 1e-5, "{d}");
    // The prompts' effect (small in so small a model) is transformers' too: a text path left
    // out would miss it by more than the tolerance.
    let between = |t: &ferrite_plugin_api::Tensor| {
        t.narrow(0, 0, 1)
            .unwrap()
            .sub(&t.narrow(0, 1, 1).unwrap())
            .unwrap()
    };
    let (ours, theirs) = (between(&got), between(&want));
    let effect = theirs
        .abs()
        .unwrap()
        .max(&[0, 1, 2], false)
        .unwrap()
        .item()
        .unwrap();
    let off = ferrite_tests::max_abs_diff(&ours, &theirs);
    println!("the prompts' effect {effect:.2e}, ours off by {off:.2e}");
    assert!(effect > 2e-5 && off < effect / 10.0, "{effect} {off}");
    let (chw, _, _) = ferrite::label::image_chw(&fixtures.join("image.png")).unwrap();
    let ours = m.pixel_values(&chw).unwrap();
    let (a, b) = (ours.to_vec().unwrap(), pixels.to_vec().unwrap());
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    println!("clipseg pixel values: mean abs diff {mean:.3} from the processor's");
    assert!(mean < 0.1, "{mean}");
}

/// `ferrite mask --model clipseg` runs the model folder on a folder of images; a missing prompt
/// is named.
#[test]
fn ferrite_mask_runs_clipseg() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clipseg");
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures.join("image.png"), dir.path().join("image.png")).unwrap();
    let model = fixtures.join("model");
    let run = |prompt: &str| {
        run_ferrite(
            &[
                "mask",
                "--model",
                "clipseg",
                "--model-path",
                model.to_str().unwrap(),
                "--sample-dir",
                dir.path().to_str().unwrap(),
                "--prompt",
                prompt,
                "--mode",
                "replace",
                "--threshold",
                "0.5",
                "--device",
                "cpu",
            ],
            None,
            home.path(),
        )
    };
    let out = run("a red box, green grass");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mask = rgb(&dir.path().join("image-masklabel.png"));
    assert_eq!(mask.dimensions(), (40, 30));
    let out = run(" , ");
    assert!(String::from_utf8_lossy(&out.stderr).contains("clipseg needs a prompt"));
}
