//! `ferrite loss-report`: each training image's loss at fixed timesteps and noise, highest
//! first, as CSV; the same twice; a LoRA changes it; bad input named.

use std::path::Path;

fn setup(root: &Path) -> std::path::PathBuf {
    ferrite_tests::toy_dataset(&root.join("images"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "model_type = \"sd15\"\nbase_model_name = \"{}\"\nresolution = \"16\"\n\
             workspace_dir = \"ws\"\n[[concepts]]\npath = \"images\"\n",
            model.display()
        ),
    )
    .unwrap();
    config
}

fn report(root: &Path, config: &Path, extra: &[&str]) -> (std::process::Output, String) {
    let out = root.join("report.csv");
    let _ = std::fs::remove_file(&out);
    let mut args = vec![
        "loss-report",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = ferrite_tests::run_ferrite(&args, None, root);
    (o, std::fs::read_to_string(&out).unwrap_or_default())
}

/// (image file name, loss) per row.
fn rows(csv: &str) -> Vec<(String, f32)> {
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("image,concept,caption,loss"));
    lines
        .map(|l| {
            let (image, rest) = l.split_once(',').unwrap();
            let loss = rest.rsplit_once(',').unwrap().1.parse().unwrap();
            let name = Path::new(image)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, loss)
        })
        .collect()
}

#[test]
fn each_image_gets_its_loss_highest_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = setup(root);
    let (o, csv) = report(root, &config, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!("{csv}");
    let r = rows(&csv);
    let mut names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]
    );
    assert!(r.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    assert!(r.windows(2).all(|w| w[0].1 >= w[1].1), "highest first");
    assert!(r[0].1 > r[5].1, "the images differ");
    assert!(
        csv.lines().nth(1).unwrap().contains(",images,"),
        "the concept by its folder"
    );
    let (_, again) = report(root, &config, &[]);
    assert_eq!(again, csv, "fixed timesteps and noise");
    let lora =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/adapters/lora_kohya.safetensors");
    let (o, with) = report(root, &config, &["--lora", lora.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(rows(&with), r, "the LoRA changes the losses");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = setup(root);
    let (o, _) = report(root, &config, &["--lora", "/no/such/lora.safetensors"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--lora /no/such/lora.safetensors"),
        "{err}"
    );
    let (o, _) = report(root, &root.join("missing.toml"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("missing.toml"), "{err}");
    assert!(!root.join("report.csv").exists(), "nothing written");
}
