//! `ferrite init` and `ferrite train` from the command line: a starter config is written, and bad
//! configs or models fail with every problem named, never a panic.

use ferrite_tests::run_ferrite;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_writes_a_starter_config_that_names_what_to_fill_in() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    let o = run_ferrite(&["init", project.to_str().unwrap()], None, home.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let config = project.join("config.toml");
    assert!(config.exists() && project.join("images").is_dir());
    let again = run_ferrite(&["init", project.to_str().unwrap()], None, home.path());
    assert!(!again.status.success() && stderr(&again).contains("exists already"));

    // Training it as written: the model placeholder is not a model, and the folder is empty.
    let o = run_ferrite(
        &["train", "--config", config.to_str().unwrap()],
        None,
        home.path(),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("path/to/model") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_bad_config_lists_every_problem() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "base_model_name = \"m\"\nbatch_size = 0\nlearning_rate_scheduler = \"often\"\n\
         [[concepts]]\npath = \"images\"\nbalancing = -1\n",
    )
    .unwrap();
    let o = run_ferrite(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--set",
            "epochs=0",
        ],
        None,
        home.path(),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    for needle in [
        "batch_size",
        "learning_rate_scheduler: `often`",
        "concepts[0].balancing",
        "epochs",
    ] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
    let o = run_ferrite(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--set",
            "nonsense",
        ],
        None,
        home.path(),
    );
    assert!(
        stderr(&o).contains("--set nonsense: expected key=value"),
        "{}",
        stderr(&o)
    );
}

/// A run killed while it writes a backup leaves the previous backup whole: the next run resumes
/// from it and trains to the end. The child pauses mid-backup at a fail point (debug builds read
/// FAILPOINTS) and is killed there.
#[test]
fn killing_the_process_mid_backup_keeps_the_previous_backup() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let config = lora_config(
        root,
        "batch_size = 2\nepochs = 3\nbackup_after = 1\nbackup_after_unit = \"step\"\n\
         rolling_backup_count = 10",
    );
    let backups = root.join("ws/backup");
    // Backups 1 and 2 are written; the third pauses after its first file.
    let mut child = std::process::Command::new(ferrite_tests::ferrite_bin())
        .args(["train", "--config", config.to_str().unwrap()])
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("FERRITE_PLUGIN_PATH")
        .env("FAILPOINTS", "backup-write=2*off->sleep(120000)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = backups.join(".tmp-backup-000000003");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !partial.join("unet-optimizer.safetensors").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended ({status}) before the third backup:\n{err}");
        }
        assert!(std::time::Instant::now() < deadline, "no third backup");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        backups.join("backup-000000002/state.json").exists(),
        "the previous backup is complete"
    );
    assert!(!backups.join("backup-000000003").exists());
    assert!(!partial.join("state.json").exists());

    let o = run_ferrite(
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--set",
            "continue_last_backup=true",
        ],
        None,
        home.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("resumed from") && out.contains("backup-000000002"),
        "{out}"
    );
    assert!(root.join("out/lora.safetensors").exists());
    assert!(
        backups.join("backup-000000009/state.json").exists(),
        "trained to the end"
    );
}

/// A LoRA config on the tiny pipeline in `root` (images in `root/images`), with `extra` lines.
fn lora_config(root: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            r#"base_model_name = "{}"
workspace_dir = "ws"
output_model_destination = "out/lora.safetensors"
resolution = "16"
lora_rank = 4
sample_after_unit = "never"
{extra}
[[concepts]]
path = "images"
"#,
            model.display()
        ),
    )
    .unwrap();
    config
}

fn signal(child: &std::process::Child, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name}");
}

/// The first SIGINT (or SIGTERM) stops as the app's Stop does (the step ends, a backup and the
/// output model are written, and where they went is said); the run then resumes from that backup.
/// A second signal quits at once and the last backup stays whole.
#[test]
fn ctrl_c_stops_with_a_backup_and_the_output_and_a_second_quits_at_once() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ferrite_tests::toy_dataset(&root.join("images"));
    let config = lora_config(
        root,
        "batch_size = 1\nepochs = 200\nbackup_after = 2\nbackup_after_unit = \"step\"\nrolling_backup_count = 100",
    );
    let start = |args: &[&str]| {
        std::process::Command::new(ferrite_tests::ferrite_bin())
            .args(["train", "--config", config.to_str().unwrap()])
            .args(args)
            .env("XDG_CONFIG_HOME", home.path())
            .env_remove("FERRITE_PLUGIN_PATH")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let backups = root.join("ws/backup");
    let wait_for = |child: &mut std::process::Child, path: &std::path::Path| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !path.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let (mut out, mut err) = (String::new(), String::new());
                std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("the run ended early ({status}):\n{out}\n{err}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never came",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let mut child = start(&[]);
    wait_for(&mut child, &backups.join("backup-000000002/state.json"));
    signal(&child, "INT");
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    println!("{out}\n{err}");
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("computing on cpu (train_device auto: this ferrite was built without CUDA)"),
        "{out}"
    );
    assert!(err.contains("stopping after this step"), "{err}");
    // The stop's backup is the last one named.
    let backup = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("backup: "))
        .filter(|_| out.contains("saved: "))
        .unwrap_or_else(|| panic!("no backup and output named:\n{out}"));
    assert!(std::path::Path::new(backup).join("state.json").exists());
    assert!(root.join("out/lora.safetensors").exists());

    // Resumed from the stop; a second signal then quits at once.
    let mut child = start(&["--set", "continue_last_backup=true"]);
    let next = {
        let n: u64 = backup.rsplit('-').next().unwrap().parse().unwrap();
        // The next periodic backup (every second step).
        backups.join(format!("backup-{:09}/state.json", (n / 2 + 1) * 2))
    };
    wait_for(&mut child, &next);
    // SIGTERM stops as SIGINT does; the second signal (sent right after, before the stop can
    // have finished) quits at once.
    let pid = child.id();
    let sent = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid} && kill -INT {pid}")])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("resumed from") && out.contains(backup),
        "{out}"
    );
    assert!(!o.status.success(), "the second signal quits");
    let newest = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("backup-")
        })
        .max()
        .unwrap();
    assert!(newest.join("state.json").exists(), "{}", newest.display());
}

fn read_rgb(p: &std::path::Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// Debug mode writes each step's input exactly as it entered the VAE: a one-image concept turned
/// by a fixed 90°, then brightened, hue-shifted and flipped, shows exactly those changes.
#[test]
fn debug_inputs_show_the_fixed_augmentations() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("images")).unwrap();
    // A red block in the top-left quadrant on dark grey: every turn and flip shows.
    let original = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb(if x < 8 && y < 6 {
            [200, 0, 0]
        } else {
            [60, 60, 60]
        })
    });
    original.save(root.join("images/one.png")).unwrap();
    std::fs::write(root.join("images/one.txt"), "a red block").unwrap();
    type Expected = fn(&image::RgbImage) -> image::RgbImage;
    let cases: [(&str, &str, Expected); 4] = [
        (
            "rotate",
            "enable_fixed_rotate = true\nrandom_rotate_max_angle = 90.0",
            // Counter-clockwise, as torchvision turns.
            image::imageops::rotate270,
        ),
        (
            "brightness",
            "enable_fixed_brightness = true\nrandom_brightness_max_strength = 0.25",
            |i| {
                image::RgbImage::from_fn(16, 16, |x, y| {
                    image::Rgb(i.get_pixel(x, y).0.map(|v| (v as f32 * 1.25).round() as u8))
                })
            },
        ),
        (
            // Half the strength in turns: a third of a turn takes red to green.
            "hue",
            "enable_fixed_hue = true\nrandom_hue_max_strength = 0.6666667",
            |i| {
                image::RgbImage::from_fn(16, 16, |x, y| {
                    let [r, g, b] = i.get_pixel(x, y).0;
                    image::Rgb([b, r, g])
                })
            },
        ),
        (
            "flip",
            "enable_fixed_flip = true",
            image::imageops::flip_horizontal,
        ),
    ];
    for (name, option, expected) in cases {
        let config = lora_config(
            root,
            &format!(
                "epochs = 1\nbatch_size = 1\ndebug_mode = true\ndebug_dir = \"debug-{name}\"\n\
                 debug_after = 1\ndebug_after_unit = \"step\"\nbackup_after_unit = \"never\""
            ),
        );
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "path = \"images\"",
            &format!("path = \"images\"\nenable_crop_jitter = false\nenable_random_flip = false\n{option}"),
        );
        std::fs::write(&config, text).unwrap();
        let o = run_ferrite(
            &["train", "--config", config.to_str().unwrap()],
            None,
            home.path(),
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let debug = root.join(format!("debug-{name}"));
        let input = read_rgb(&debug.join("1-0-input.png"));
        let want = expected(&original);
        let worst = ferrite_tests::max_pixel_diff(&input, &want);
        println!("{name}: debug input vs the expected change, worst pixel difference {worst}/255");
        assert!(worst <= 1, "{name}: {worst}");
        for f in ["target", "predicted"] {
            assert!(debug.join(format!("1-0-{f}.png")).exists(), "{name}: {f}");
        }
    }
}

/// `ferrite bench step` on the tiny pipeline: one JSON line whose trained parameter count
/// follows the method and the options given, in a work folder it removes; a bad option is named.
#[test]
fn bench_step_prints_its_figures_as_one_json_line() {
    let home = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "step", "--resolution", "16", "--steps", "2"];
        if !extra.iter().any(|a| a.starts_with("--model")) {
            args.extend(["--model", model.to_str().unwrap()]);
        }
        args.extend(extra);
        let out = std::process::Command::new(ferrite_tests::ferrite_bin())
            .args(&args)
            .env("XDG_CONFIG_HOME", home.path())
            .env("TMPDIR", tmp.path())
            .env("FERRITE_PLUGIN_PATH", ferrite_tests::profile_dir())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr(&out),
        )
    };
    let figures = |extra: &[&str]| {
        let (ok, out, err) = bench(extra);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(v["step_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["peak_mem_mib"].as_f64().unwrap() > 0.0, "{v}");
        v["trainable"].as_u64().unwrap()
    };
    let rank16 = figures(&[]);
    assert_eq!(
        figures(&["--set", "lora_rank=4", "--train-dtype", "bfloat16"]) * 4,
        rank16
    );
    assert!(figures(&["--method", "fine_tune"]) > rank16);

    // The same models as folders of config files only: built with random weights, they train
    // the same parameters.
    let configs = tempfile::tempdir().unwrap();
    let fixtures = model.parent().unwrap().parent().unwrap();
    for (arch, from) in [
        ("sd15", "pipeline/model"),
        ("sdxl", "sdxl/model"),
        ("flux", "flux/pipeline/model"),
    ] {
        let to = configs.path().join(arch);
        // The config files only.
        let no_weights = |p: &std::path::Path| p.extension().is_none_or(|x| x != "safetensors");
        ferrite_tests::copy_dir(&fixtures.join(from), &to, &no_weights);
        let (cfg, full) = (to.to_str().unwrap(), fixtures.join(from));
        // --weight-dtype goes to the denoiser table the family has (unet or transformer).
        let halves = ["--weight-dtype", "bfloat16"];
        assert_eq!(
            figures(&[&["--arch", arch, "--model-config", cfg][..], &halves].concat()),
            figures(&["--arch", arch, "--model", full.to_str().unwrap()]),
            "{arch}"
        );
        // Without the flag the folder is what it is: a model with no weights.
        let (ok, _, err) = bench(&["--arch", arch, "--model", cfg]);
        assert!(
            !ok && err.contains("safetensors") && !err.contains("panicked"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "work folder left behind"
    );

    let (ok, _, err) = bench(&["--train-dtype", "float64"]);
    assert!(
        !ok && err.contains("train_dtype") && !err.contains("panicked"),
        "{err}"
    );
}

/// A Hugging Face repo id as the model: its snapshot in the local cache (`HF_HUB_CACHE`,
/// diffusers' layout: `models--org--name/refs/main` naming `snapshots/<commit>`) samples as the
/// folder does and trains; not in the cache, it fails naming it.
#[test]
fn a_hugging_face_repo_id_is_read_from_the_local_cache() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let cache = root.join("hub");
    let repo = cache.join("models--tiny--sd15");
    ferrite_tests::copy_dir(&folder, &repo.join("snapshots/0123abc"), &|_| true);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    let run = |args: &[&str], hub: &std::path::Path| {
        std::process::Command::new(ferrite_tests::ferrite_bin())
            .args(args)
            .current_dir(root)
            .env("XDG_CONFIG_HOME", root)
            .env("HF_HUB_CACHE", hub)
            .env_remove("FERRITE_PLUGIN_PATH")
            .output()
            .unwrap()
    };
    let sample = |model: &str, out: &str| {
        let args = [
            "sample", "--model", model, "--prompt", "a cat", "--width", "16", "--height", "16",
            "--steps", "2", "--out", out,
        ];
        run(&args, &cache)
    };
    let o = sample("tiny/sd15", "hub.png");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sample(folder.to_str().unwrap(), "folder.png");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read_rgb(&root.join("hub.png")),
        read_rgb(&root.join("folder.png"))
    );

    ferrite_tests::toy_dataset(&root.join("images"));
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        "base_model_name = \"tiny/sd15\"\nworkspace_dir = \"ws\"\n\
         output_model_destination = \"out/lora.safetensors\"\nresolution = \"16\"\nepochs = 1\n\
         lora_rank = 4\nsample_after_unit = \"never\"\n[[concepts]]\npath = \"images\"\n",
    )
    .unwrap();
    let o = run(&["train", "--config", config.to_str().unwrap()], &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(root.join("out/lora.safetensors").exists());

    let o = run(
        &["--offline", "train", "--config", config.to_str().unwrap()],
        &root.join("empty"),
    );
    assert!(
        !o.status.success()
            && stderr(&o).contains("tiny/sd15 is not in the local Hugging Face cache"),
        "{}",
        stderr(&o)
    );
}
