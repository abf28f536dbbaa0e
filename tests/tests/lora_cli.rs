//! `ferrite lora info` and `ferrite lora convert` on the Flux LoRA fixtures
//! (tests/fixtures/gen/flux_lora.py): what a file holds, and a conversion through kohya's fused
//! keys and back that samples the same image as the original file.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{DType, Tensor, Weights};
use ferrite_tests::run_ferrite;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/flux")
}

/// stdout, or a failure with stderr.
fn ferrite(args: &[&str], dir: &Path) -> Result<String, String> {
    let o = run_ferrite(args, None, dir);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[test]
fn info_tells_layout_type_ranks_alphas_and_family() {
    let dir = tempfile::tempdir().unwrap();
    let kohya = fixtures().join("lora/lora_kohya.safetensors");
    let out = ferrite(&["lora", "info", kohya.to_str().unwrap()], dir.path()).unwrap();
    println!("{out}");
    for line in [
        "layout: kohya",
        "type: LoRA",
        "modules: 20",
        "ranks: 6",
        "alphas: 3",
        "made for: Flux",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == line),
            "{line} not in\n{out}"
        );
    }
    let model = fixtures().join("pipeline/model");
    let peft = fixtures().join("lora/lora_peft.safetensors");
    let args = [
        "lora",
        "info",
        peft.to_str().unwrap(),
        "--arch",
        "flux",
        "--model",
        model.to_str().unwrap(),
    ];
    let out = ferrite(&args, dir.path()).unwrap();
    assert!(
        out.contains("layout: diffusers/PEFT") && out.contains("adapts 29 layers"),
        "{out}"
    );
    // Not an adapter file: a model's weights.
    let vae = model.join("vae/diffusion_pytorch_model.safetensors");
    let e = ferrite(&["lora", "info", vae.to_str().unwrap()], dir.path()).unwrap_err();
    assert!(
        e.contains("not an adapter file") && e.contains("vae"),
        "{e}"
    );
}

#[test]
fn convert_through_kohya_and_back_samples_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixtures().join("pipeline/model");
    let peft = fixtures().join("lora/lora_peft.safetensors");
    let m = model.to_str().unwrap();
    // No --arch: the file's keys say Flux.
    let convert = |from: &Path, format: &str, to: &Path| {
        let args = [
            "lora",
            "convert",
            "--model",
            m,
            "--in",
            from.to_str().unwrap(),
            "--format",
            format,
            "--out",
            to.to_str().unwrap(),
        ];
        ferrite(&args, d)
    };
    let kohya = d.join("kohya.safetensors");
    let back = d.join("back.safetensors");
    let comfy = d.join("comfy.safetensors");
    // The input in bfloat16 with training metadata, a stale hash and a rank the file belies.
    ferrite::runtime::init("cpu").unwrap();
    let w = Weights::open(peft.to_str().unwrap()).unwrap();
    let tensors: Vec<(String, Tensor)> = w
        .infos()
        .iter()
        .map(|i| (i.key.clone(), w.get(&i.key, DType::BF16).unwrap()))
        .collect();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let input = d.join("input.safetensors");
    let meta = [
        ("ss_learning_rate", "0.01"),
        ("ss_network_dim", "999"),
        ("modelspec.hash_sha256", "0xdead"),
    ];
    ferrite_plugin_api::save_safetensors(input.to_str().unwrap(), &refs, &meta).unwrap();
    let peft = input;
    convert(&peft, "kohya", &kohya).unwrap();
    let k = Weights::open(kohya.to_str().unwrap()).unwrap();
    let meta: std::collections::HashMap<String, String> =
        k.metadata().unwrap().into_iter().collect();
    assert_eq!(
        meta.get("ss_learning_rate").map(String::as_str),
        Some("0.01")
    );
    assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("4"));
    assert!(!meta.contains_key("modelspec.hash_sha256"));
    let down = k
        .info("lora_unet_single_blocks_0_linear2.lora_down.weight")
        .unwrap();
    assert_eq!(down.dtype, DType::BF16);
    convert(&kohya, "diffusers", &back).unwrap();
    convert(&back, "comfy", &comfy).unwrap();
    let sample = |lora: &Path| {
        let stem = lora
            .file_stem()
            .map_or("base".into(), |s| s.to_string_lossy());
        let out = d.join(format!("{stem}.png"));
        let args = [
            "sample", "--arch", "flux", "--model", m, "--prompt", "a cat", "--width", "16",
            "--height", "16", "--steps", "2", "--lora",
        ];
        let mut args: Vec<&str> = args[..args.len() - 1].to_vec();
        let l = lora.to_string_lossy().into_owned();
        let o = out.to_string_lossy().into_owned();
        if !l.is_empty() {
            args.extend(["--lora", l.as_str()]);
        }
        args.extend(["--out", o.as_str()]);
        ferrite(&args, d).unwrap();
        image::open(&out).unwrap().to_rgb8()
    };
    let original = sample(&peft);
    assert!(ferrite_tests::max_pixel_diff(&sample(Path::new("")), &original) > 0);
    for f in [&kohya, &back, &comfy] {
        let got = sample(f);
        assert_eq!(
            ferrite_tests::max_pixel_diff(&got, &original),
            0,
            "{}",
            f.display()
        );
    }
    // kohya's fused modules in the converted file.
    let w = ferrite(&["lora", "info", kohya.to_str().unwrap()], d).unwrap();
    assert!(
        w.contains("layout: kohya") && w.contains("modules: 22"),
        "{w}"
    );

    // Without a model there is nothing to name the keys by; a file for another model fails
    // naming it.
    let e = ferrite(
        &[
            "lora",
            "convert",
            "--in",
            peft.to_str().unwrap(),
            "--format",
            "kohya",
            "--out",
            d.join("x.safetensors").to_str().unwrap(),
        ],
        d,
    )
    .unwrap_err();
    assert!(e.contains("needs --model"), "{e}");
    let sd = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let e = ferrite(
        &[
            "lora",
            "convert",
            "--arch",
            "sd15",
            "--model",
            sd.to_str().unwrap(),
            "--in",
            peft.to_str().unwrap(),
            "--format",
            "kohya",
            "--out",
            d.join("y.safetensors").to_str().unwrap(),
        ],
        d,
    )
    .unwrap_err();
    assert!(e.contains("--in") && e.contains("match no layer"), "{e}");
}

/// `ferrite lora merge`: the model with a LoRA merged in, written as one file in its original
/// layout (SD 1.5's ldm checkpoint; Flux's transformer in BFL's layout), samples as the model
/// with the LoRA applied; a LoRA on a Flux text encoder is refused the transformer-only file.
#[test]
fn a_merged_model_samples_as_the_model_with_the_lora() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let sd = root.join("pipeline/model");
    let flux = fixtures().join("pipeline/model");
    for (arch, folder, lora, weight) in [
        (
            "sd15",
            &sd,
            root.join("adapters/lora_kohya.safetensors"),
            "0.5",
        ),
        (
            "flux",
            &flux,
            fixtures().join("lora/lora_peft.safetensors"),
            "1",
        ),
    ] {
        let merged = d.join(format!("{arch}-merged.safetensors"));
        let spec = format!("{}:{weight}", lora.display());
        ferrite(
            &[
                "lora",
                "merge",
                "--arch",
                arch,
                "--model",
                folder.to_str().unwrap(),
                "--lora",
                &spec,
                "--dtype",
                "float32",
                "--out",
                merged.to_str().unwrap(),
            ],
            d,
        )
        .unwrap();
        let sample = |name: &str, extra: &[&str]| {
            let out = d.join(format!("{arch}-{name}.png"));
            let mut args = vec![
                "sample", "--arch", arch, "--prompt", "a cat", "--width", "16", "--height", "16",
                "--steps", "2", "--seed", "3",
            ];
            args.extend(extra);
            let o = out.to_string_lossy().into_owned();
            args.extend(["--out", o.as_str()]);
            ferrite(&args, d).unwrap();
            image::open(&out).unwrap().to_rgb8()
        };
        let f = folder.to_str().unwrap();
        let with_lora = sample("lora", &["--model", f, "--lora", &spec]);
        let from_merged = sample(
            "merged",
            &["--model", merged.to_str().unwrap(), "--model-config", f],
        );
        let base = sample("base", &["--model", f]);
        let d_merged = ferrite_tests::max_pixel_diff(&from_merged, &with_lora);
        println!("{arch}: merged vs LoRA applied {d_merged}/255");
        assert!(d_merged <= 1, "{arch}: {d_merged}");
        assert!(
            ferrite_tests::max_pixel_diff(&base, &with_lora) > 2,
            "{arch}"
        );
    }
    // A CLIP-L LoRA would be dropped by Flux's transformer-only file.
    let te_lora = d.join("te.safetensors");
    ferrite::runtime::init("cpu").unwrap();
    let q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    let (a, b) = (
        Tensor::ones(&[2, 32], DType::F32).unwrap(),
        Tensor::ones(&[32, 2], DType::F32).unwrap(),
    );
    let (ka, kb) = (format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight"));
    ferrite_plugin_api::save_safetensors(
        te_lora.to_str().unwrap(),
        &[(ka.as_str(), &a), (kb.as_str(), &b)],
        &[],
    )
    .unwrap();
    let e = ferrite(
        &[
            "lora",
            "merge",
            "--arch",
            "flux",
            "--model",
            flux.to_str().unwrap(),
            "--lora",
            te_lora.to_str().unwrap(),
            "--out",
            d.join("x.safetensors").to_str().unwrap(),
        ],
        d,
    )
    .unwrap_err();
    assert!(e.contains("holds only transformer"), "{e}");
}
