//! `ferrite plugins ...` through the real binary: discovery, every bad-library case (each must
//! give one line naming the file and the reason while the other plugins still load), duplicate
//! ids, enable/disable persisted in the settings file.

use std::path::Path;

use ferrite_tests::{dylib_name, plugin_dir, run_ferrite, test_plugin, workspace_plugin};

struct Listing {
    stdout: String,
    stderr: String,
}

fn list(plugin_path: Option<&Path>, config: &Path) -> Listing {
    let out = run_ferrite(&["plugins", "list"], plugin_path, config);
    assert!(
        out.status.success(),
        "plugins list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Listing {
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The workspace's optimizer plugins, found next to the executable, are listed and enabled.
#[track_caller]
fn others_still_load(l: &Listing) {
    for id in ["adamw", "adam", "sgd"] {
        let row = l
            .stdout
            .lines()
            .find(|r| r.split_whitespace().next() == Some(id));
        let row = row.unwrap_or_else(|| panic!("`{id}` missing from:\n{}", l.stdout));
        assert!(row.contains("optimizer") && row.contains("yes"), "{row}");
    }
}

/// Exactly one error line, naming the file and containing `reason`.
#[track_caller]
fn one_error(l: &Listing, file: &str, reason: &str) {
    let errors: Vec<&str> = l
        .stderr
        .lines()
        .filter(|x| x.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "stderr:\n{}", l.stderr);
    assert!(
        errors[0].contains(file) && errors[0].contains(reason),
        "{}",
        errors[0]
    );
    assert!(
        !l.stderr.contains("panicked at"),
        "a panic leaked to stderr:\n{}",
        l.stderr
    );
}

fn bad_case(example: &str, reason: &str) {
    let config = tempfile::tempdir().unwrap();
    let name = dylib_name(example);
    let dir = plugin_dir(&[(&test_plugin(example), &name)]);
    let l = list(Some(dir.path()), config.path());
    one_error(&l, &name, reason);
    others_still_load(&l);
}

#[test]
fn lists_workspace_plugins_with_kind_version_path() {
    let config = tempfile::tempdir().unwrap();
    let l = list(None, config.path());
    others_still_load(&l);
    assert!(
        l.stdout.contains(&dylib_name("ferrite_optim_adamw")),
        "{}",
        l.stdout
    );
    assert!(l.stdout.lines().next().unwrap().contains("ID") && l.stdout.contains("0.1.0"));
    assert!(!l.stderr.contains("error"), "{}", l.stderr);
}

#[test]
fn plugin_path_adds_a_directory() {
    let config = tempfile::tempdir().unwrap();
    let name = dylib_name("regression_model");
    let dir = plugin_dir(&[(&test_plugin("regression_model"), &name)]);
    let l = list(Some(dir.path()), config.path());
    let row = l
        .stdout
        .lines()
        .find(|r| r.starts_with("test-mlp"))
        .expect("test-mlp listed");
    assert!(row.contains("architecture") && row.contains(&name), "{row}");
    others_still_load(&l);
}

#[test]
fn a_file_that_is_not_a_library() {
    let config = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = dylib_name("notes");
    std::fs::write(dir.path().join(&name), "these are my notes, not a plugin").unwrap();
    let l = list(Some(dir.path()), config.path());
    one_error(&l, &name, "cannot be loaded as a shared library");
    others_still_load(&l);
}

#[test]
fn a_library_without_the_root_symbol() {
    bad_case("no_root", "not a Ferrite plugin");
}

#[test]
fn a_library_with_an_incompatible_abi_layout() {
    bad_case("bad_layout", "incompatible plugin ABI");
}

#[test]
fn a_library_built_for_a_newer_abi_major_is_refused_with_both_versions() {
    bad_case(
        "newer_abi",
        &format!(
            "built for ABI 2.0.0, this host speaks ABI {}",
            ferrite_plugin_api::abi::ABI_VERSION
        ),
    );
}

#[test]
fn a_library_whose_init_fails() {
    bad_case(
        "init_fails",
        "failed to initialise: required model file model.onnx is missing",
    );
}

#[test]
fn a_library_whose_init_panics() {
    bad_case(
        "init_panics",
        "failed to initialise: panicked: plugin init exploded",
    );
}

#[test]
fn a_library_whose_describe_panics() {
    bad_case(
        "describe_panics",
        "failed to describe its components: panicked: describe exploded",
    );
}

#[test]
fn two_libraries_offering_one_id_name_both_paths() {
    let config = tempfile::tempdir().unwrap();
    let copy = dylib_name("my_sgd_copy");
    let original = workspace_plugin("ferrite_optim_sgd");
    let dir = plugin_dir(&[(&original, &copy)]);
    let l = list(Some(dir.path()), config.path());
    one_error(
        &l,
        &copy,
        "optimizer id `sgd` is offered by more than one library",
    );
    assert!(
        l.stderr.contains(&original.display().to_string()),
        "{}",
        l.stderr
    );
}

fn row(l: &Listing, id: &str) -> String {
    l.stdout
        .lines()
        .find(|r| r.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("`{id}` missing from:\n{}", l.stdout))
        .to_string()
}

#[test]
fn disabling_a_component_turns_its_library_off_and_back_on() {
    let config = tempfile::tempdir().unwrap();
    let out = run_ferrite(&["plugins", "disable", "adam"], None, config.path());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("disabled library `optim-adamw` (adamw, adam)"),
        "{said}"
    );
    let settings = std::fs::read_to_string(config.path().join("ferrite/settings.toml")).unwrap();
    assert!(settings.contains("optim_adamw"), "{settings}");
    // Both components of the library are listed (from the settings), as disabled.
    let l = list(None, config.path());
    assert!(row(&l, "adam").contains(" no "), "{}", row(&l, "adam"));
    assert!(row(&l, "adamw").contains(" no "), "{}", row(&l, "adamw"));
    assert!(row(&l, "sgd").contains(" yes "), "{}", row(&l, "sgd"));
    let out = run_ferrite(&["plugins", "enable", "adamw"], None, config.path());
    assert!(out.status.success());
    let l = list(None, config.path());
    others_still_load(&l);
}

#[test]
fn a_disabled_library_is_never_loaded() {
    // A library whose init fails: disabled, its init must not run, so no load error appears.
    let config = tempfile::tempdir().unwrap();
    let name = dylib_name("init_fails");
    let dir = plugin_dir(&[(&test_plugin("init_fails"), &name)]);
    let settings = format!(
        r#"[[disabled_libraries]]
path = "{}"
name = "init-fails"
components = [{{ kind = "optimizer", id = "never-loaded", version = "0.1.0" }}]
"#,
        dir.path().join(&name).display()
    );
    std::fs::create_dir_all(config.path().join("ferrite")).unwrap();
    std::fs::write(config.path().join("ferrite/settings.toml"), settings).unwrap();
    let l = list(Some(dir.path()), config.path());
    assert!(!l.stderr.contains("error:"), "init ran:\n{}", l.stderr);
    assert!(row(&l, "never-loaded").contains(" no "), "{}", l.stdout);
    others_still_load(&l);
    // Without the entry, the same library does load (and fails): the test can fail.
    std::fs::remove_file(config.path().join("ferrite/settings.toml")).unwrap();
    let l = list(Some(dir.path()), config.path());
    one_error(&l, &name, "failed to initialise");
}

#[test]
fn component_ids_disabled_by_an_older_ferrite_stay_disabled() {
    let config = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(config.path().join("ferrite")).unwrap();
    std::fs::write(
        config.path().join("ferrite/settings.toml"),
        "disabled_plugins = [\"sgd\"]\n",
    )
    .unwrap();
    let l = list(None, config.path());
    assert!(row(&l, "sgd").contains(" no "), "{}", row(&l, "sgd"));
    assert!(row(&l, "adamw").contains(" yes "), "{}", row(&l, "adamw"));
}

#[test]
fn a_broken_settings_file_is_named() {
    let config = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(config.path().join("ferrite")).unwrap();
    std::fs::write(
        config.path().join("ferrite/settings.toml"),
        "disabled_plugins = [",
    )
    .unwrap();
    let out = run_ferrite(&["plugins", "list"], None, config.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("settings.toml") && err.contains("not valid TOML"),
        "{err}"
    );
}

#[test]
fn help_lists_the_commands() {
    let config = tempfile::tempdir().unwrap();
    let out = run_ferrite(&["--help"], None, config.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("plugins") && text.contains("bench"),
        "{text}"
    );
}

#[test]
fn bench_ops_prints_ratios() {
    let config = tempfile::tempdir().unwrap();
    let out = run_ferrite(&["bench", "ops"], None, config.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in ["add [4]", "matmul 1024²"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row} missing:\n{text}"));
        assert!(line.trim_end().ends_with('x'), "{line}");
    }
}

#[test]
fn cuda_device_without_cuda_build_is_a_clear_error() {
    let config = tempfile::tempdir().unwrap();
    let out = run_ferrite(&["bench", "ops", "--device", "cuda"], None, config.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Either this binary lacks CUDA, or it has it and the machine lacks a driver.
    assert!(
        err.contains("--features cuda")
            || err.contains("CUDA requested but no NVIDIA driver found"),
        "{err}"
    );
    let out = run_ferrite(&["bench", "ops", "--device", "tpu"], None, config.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use auto, cpu, cuda or cuda:N"));
}
