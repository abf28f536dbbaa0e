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
