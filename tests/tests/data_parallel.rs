//! Data-parallel training between processes (`ferrite train --nodes 2 --node-rank R
//! --coordinator HOST:PORT`): two processes with `batch_size` b each take the same steps as one
//! process with 2b, and only rank 0 writes the output.

use std::path::Path;
use std::process::{Command, Stdio};

use ferrite::config::presets_dir;
use ferrite::train::demo;
use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::ferrite_bin;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn train(dir: &Path, home: &Path, extra: &[String]) -> Command {
    let mut cmd = Command::new(ferrite_bin());
    cmd.args([
        "train",
        "--config",
        dir.join("config.toml").to_str().unwrap(),
    ])
    .args(extra)
    .env("XDG_CONFIG_HOME", home)
    .env_remove("FERRITE_PLUGIN_PATH")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn unet(dir: &Path, out: &str) -> Vec<(String, Vec<f32>)> {
    let w = Weights::open(
        dir.join(out)
            .join("unet/diffusion_pytorch_model.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let mut all: Vec<(String, Vec<f32>)> = w
        .infos()
        .iter()
        .map(|i| {
            let t = w.get(&i.key, DType::F32).unwrap();
            (i.key.clone(), t.to_vec().unwrap())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Worst difference between two models relative to the largest weight of each tensor.
fn worst(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            x.iter()
                .zip(y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs() / scale))
        })
        .fold(0f32, f32::max)
}

/// The demo model (text encoder and UNet trained, AdamW, warmup, caption dropout) for 12 steps
/// of 8 images: one process with `batch_size` 8 against two with 4 each (rank 0 writing).
#[test]
fn two_processes_with_half_batches_train_as_one_with_the_whole() {
    ferrite::runtime::init("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo::build_model(&presets_dir().join("demo-model"), &d.join("model"), 0).unwrap();
    demo::build_dataset(&d.join("data"), 16, 4, 0).unwrap();
    std::fs::copy(presets_dir().join("demo.toml"), d.join("config.toml")).unwrap();
    let sets = |batch: usize, out: &str| -> Vec<String> {
        [
            "epochs=2".to_string(),
            format!("batch_size={batch}"),
            "sample_after_unit=\"never\"".into(),
            "backup_after_unit=\"never\"".into(),
            format!("output_model_destination=\"{out}\""),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    let one = train(d, home.path(), &sets(8, "one/model"))
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );

    let coordinator = format!("127.0.0.1:{}", free_port());
    let peers: Vec<_> = (0..2)
        .map(|rank| {
            let mut args = sets(4, "two/model");
            args.extend(
                [
                    "--nodes",
                    "2",
                    "--node-rank",
                    &rank.to_string(),
                    "--coordinator",
                    &coordinator,
                    "--data-port",
                    &free_port().to_string(),
                ]
                .map(String::from),
            );
            train(d, home.path(), &args).spawn().unwrap()
        })
        .collect();
    let outputs: Vec<_> = peers
        .into_iter()
        .map(|p| p.wait_with_output().unwrap())
        .collect();
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {rank}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let said = String::from_utf8_lossy(&outputs[0].stdout);
    assert!(
        said.contains("rank 0 of 2, 4 images of each batch of 8"),
        "{said}"
    );
    assert!(!String::from_utf8_lossy(&outputs[1].stdout).contains("saved:"));

    let (base, single, parallel) = (unet(d, "model"), unet(d, "one/model"), unet(d, "two/model"));
    let moved = worst(&base, &single);
    let apart = worst(&single, &parallel);
    println!("the run moved the UNet by {moved:.2e}; two processes are {apart:.2e} from one");
    assert!(moved > 1e-3, "{moved}");
    // Measured 8.5e-5 (the two sum their gradients in another order, and AdamW divides by
    // square roots of tiny second moments); drawing each process's noise for its own rows
    // instead of cutting it from the whole batch's gives 1.7.
    assert!(apart < 1e-3, "{apart}");
}

/// A process whose peers never come stops with a line saying what to start, and a rank out of
/// range is refused.
#[test]
fn a_missing_peer_or_a_bad_rank_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo::build_model(&presets_dir().join("demo-model"), &d.join("model"), 0).unwrap();
    demo::build_dataset(&d.join("data"), 16, 4, 0).unwrap();
    std::fs::copy(presets_dir().join("demo.toml"), d.join("config.toml")).unwrap();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let flags = |rank: &str| -> Vec<String> {
        [
            "--nodes",
            "2",
            "--node-rank",
            rank,
            "--coordinator",
            &coordinator,
            "--join-timeout",
            "3",
        ]
        .map(String::from)
        .to_vec()
    };
    let alone = train(d, home.path(), &flags("0")).output().unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success());
    assert!(
        err.contains("not every one of the 2 processes joined") && err.contains(&coordinator),
        "{err}"
    );
    let bad = train(d, home.path(), &flags("2")).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--node-rank 2 of --nodes 2"),
        "{err}"
    );
    assert!(!d.join("output").exists());
}
