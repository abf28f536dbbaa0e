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
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline/model");
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            r#"base_model_name = "{}"
workspace_dir = "ws"
output_model_destination = "out/lora.safetensors"
resolution = "16"
batch_size = 2
epochs = 3
lora_rank = 4
backup_after = 1
backup_after_unit = "step"
rolling_backup_count = 10
sample_after_unit = "never"
[[concepts]]
path = "images"
"#,
            model.display()
        ),
    )
    .unwrap();
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
