//! `ferrite convert`: the tiny SD 1.5 pipeline as one file samples as the folder; as a diffusers
//! folder in another dtype every weight is the input's in that dtype and everything else is the
//! same; float32 there and back changes nothing; what cannot be done yet, an existing output and
//! a model of another type are refused.

use std::path::Path;

use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::run_ferrite;

fn pipeline() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model")
}

fn convert(
    root: &Path,
    input: &Path,
    format: &str,
    dtype: &str,
    out: &Path,
) -> std::process::Output {
    run_ferrite(
        &[
            "convert",
            "--model-type",
            "sd15",
            "--input",
            input.to_str().unwrap(),
            "--output-format",
            format,
            "--output-dtype",
            dtype,
            "--output",
            out.to_str().unwrap(),
        ],
        None,
        root,
    )
}

fn said(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sample(root: &Path, args: &[&str], name: &str) -> image::RgbImage {
    let out = root.join(name);
    let mut all = vec![
        "sample", "--prompt", "a cat", "--width", "16", "--height", "16", "--steps", "2", "--seed",
        "3", "--out",
    ];
    let o = out.to_string_lossy().into_owned();
    all.push(&o);
    all.extend(args);
    let r = run_ferrite(&all, None, root);
    assert!(r.status.success(), "{}", said(&r));
    image::open(&out).unwrap().to_rgb8()
}

/// Every file of a folder, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_folder_converts_to_one_file_and_to_a_folder_in_another_dtype() {
    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let folder = pipeline();

    // One file, float32: samples as the folder.
    let file = root.join("sd15.safetensors");
    let o = convert(root, &folder, "single-file", "float32", &file);
    assert!(o.status.success(), "{}", said(&o));
    let from_folder = sample(root, &["--model", folder.to_str().unwrap()], "folder.png");
    let from_file = sample(
        root,
        &[
            "--model",
            file.to_str().unwrap(),
            "--model-config",
            folder.to_str().unwrap(),
        ],
        "file.png",
    );
    assert_eq!(ferrite_tests::max_pixel_diff(&from_file, &from_folder), 0);
    // float16: every tensor is stored so.
    let half = root.join("sd15-f16.safetensors");
    assert!(
        convert(root, &folder, "single-file", "float16", &half)
            .status
            .success()
    );
    let w = Weights::open(half.to_str().unwrap()).unwrap();
    assert!(w.infos().iter().all(|i| i.dtype == DType::F16));

    // A folder in bfloat16: the same files, each weight the input's in bfloat16.
    let bf16 = root.join("bf16");
    let o = convert(root, &folder, "diffusers", "bfloat16", &bf16);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(files(&bf16), files(&folder));
    for f in files(&folder) {
        let (a, b) = (folder.join(&f), bf16.join(&f));
        if f.ends_with(".safetensors") {
            let (wa, wb) = (
                Weights::open(a.to_str().unwrap()).unwrap(),
                Weights::open(b.to_str().unwrap()).unwrap(),
            );
            for i in wa.infos() {
                let got = wb.infos().iter().find(|j| j.key == i.key).unwrap();
                assert_eq!(
                    (got.dtype, &got.shape),
                    (DType::BF16, &i.shape),
                    "{f} {}",
                    i.key
                );
                let want = wa.get(&i.key, DType::BF16).unwrap().to_vec().unwrap();
                assert_eq!(wb.get(&i.key, DType::BF16).unwrap().to_vec().unwrap(), want);
            }
        } else {
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{f}"
            );
        }
    }
    // float32 there and back: the tensors are the input's, and it samples as the input.
    let f32s = root.join("f32");
    assert!(
        convert(root, &folder, "diffusers", "float32", &f32s)
            .status
            .success()
    );
    for f in files(&folder)
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
    {
        let (wa, wb) = (
            Weights::open(folder.join(f).to_str().unwrap()).unwrap(),
            Weights::open(f32s.join(f).to_str().unwrap()).unwrap(),
        );
        for i in wa.infos() {
            let a = wa.get(&i.key, DType::F32).unwrap().to_vec().unwrap();
            assert_eq!(
                wb.get(&i.key, DType::F32).unwrap().to_vec().unwrap(),
                a,
                "{f}"
            );
        }
    }
    let again = sample(root, &["--model", f32s.to_str().unwrap()], "again.png");
    assert_eq!(ferrite_tests::max_pixel_diff(&again, &from_folder), 0);
}

#[test]
fn what_cannot_be_converted_is_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = root.join("sd15.safetensors");
    assert!(
        convert(root, &pipeline(), "single-file", "float16", &file)
            .status
            .success()
    );

    let o = convert(root, &file, "diffusers", "float16", &root.join("out"));
    assert!(!o.status.success());
    assert!(said(&o).contains("needs --input-config"), "{}", said(&o));
    assert!(!root.join("out").exists());

    let o = convert(root, &pipeline(), "single-file", "float16", &file);
    assert!(said(&o).contains("exists already"), "{}", said(&o));

    // A folder written inside its own input would copy itself.
    let copy = root.join("pipeline");
    ferrite_tests::copy_dir(&pipeline(), &copy, &|_| true);
    let o = convert(root, &copy, "diffusers", "float16", &copy.join("half"));
    assert!(said(&o).contains("is inside --input"), "{}", said(&o));
    assert!(!copy.join("half").exists() && !copy.join(".tmp-half").exists());

    let o = run_ferrite(
        &[
            "convert",
            "--model-type",
            "flux",
            "--input",
            pipeline().to_str().unwrap(),
            "--output-format",
            "single-file",
            "--output",
            root.join("f.safetensors").to_str().unwrap(),
        ],
        None,
        root,
    );
    assert!(!o.status.success());
    let text = said(&o);
    assert!(
        text.contains("--input") && text.contains("not a Flux model"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// Folder → one file → folder, per family: the folder written from the file (with the input
/// folder's configs) has the input's files, every tensor equal (float32 throughout).
#[test]
fn a_folder_round_trips_through_one_file_per_family() {
    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for (arch, folder) in [
        ("sd15", fixtures.join("pipeline/model")),
        ("sdxl", fixtures.join("sdxl/model")),
        ("flux", fixtures.join("flux/pipeline/model")),
    ] {
        let file = root.join(format!("{arch}.safetensors"));
        let back = root.join(format!("{arch}-back"));
        let run = |input: &Path, format: &str, out: &Path| {
            let mut args = vec![
                "convert",
                "--model-type",
                arch,
                "--input",
                input.to_str().unwrap(),
                "--output-format",
                format,
                "--output-dtype",
                "float32",
                "--output",
                out.to_str().unwrap(),
            ];
            // A single file takes the folder's configs (and Flux's file the other parts).
            if input.is_file() {
                args.extend(["--input-config", folder.to_str().unwrap()]);
            }
            let o = run_ferrite(&args, None, root);
            assert!(o.status.success(), "{arch}: {}", said(&o));
        };
        run(&folder, "single-file", &file);
        run(&file, "diffusers", &back);
        assert_eq!(files(&back), files(&folder), "{arch}");
        for f in files(&folder) {
            let (a, b) = (folder.join(&f), back.join(&f));
            if !f.ends_with(".safetensors") {
                assert_eq!(
                    std::fs::read(&a).unwrap(),
                    std::fs::read(&b).unwrap(),
                    "{arch} {f}"
                );
                continue;
            }
            let (wa, wb) = (
                Weights::open(a.to_str().unwrap()).unwrap(),
                Weights::open(b.to_str().unwrap()).unwrap(),
            );
            // transformers 5 saves a CLIP text model without its `text_model.` level (the
            // fixtures were made so); the written file has it, as transformers 4 and the
            // original checkpoints do. Both read the same.
            let plain = |k: &str| k.strip_prefix("text_model.").unwrap_or(k).to_string();
            let keys = |w: &Weights| {
                let mut k: Vec<_> = w
                    .infos()
                    .iter()
                    .map(|i| (plain(&i.key), i.shape.clone()))
                    .collect();
                k.sort();
                k
            };
            assert_eq!(keys(&wb), keys(&wa), "{arch} {f}");
            for i in wa.infos() {
                let same = wb.infos().iter().find(|j| plain(&j.key) == plain(&i.key));
                let x = wa.get(&i.key, DType::F32).unwrap().to_vec().unwrap();
                let y = wb
                    .get(&same.unwrap().key, DType::F32)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                assert!(x == y, "{arch} {f} {}", i.key);
            }
        }
    }
}
