//! What `ferrite caption` and `ferrite mask` share: the plugin's options, the device scope, the
//! progress bar and the report.

use std::path::Path;

use anyhow::{Result, bail};
use ferrite::label::LabelReport;
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

/// The plugin's options: `extra` with `model_path` when one is given (it must exist).
pub fn plugin_options(model_path: Option<&Path>, mut extra: serde_json::Value) -> Result<String> {
    if !extra.is_object() {
        bail!("--options: not a JSON object");
    }
    if let Some(p) = model_path {
        if !p.exists() {
            bail!("--model-path {}: no such file or folder", p.display());
        }
        let Some(s) = p.to_str() else {
            bail!("--model-path {}: not a UTF-8 path", p.display());
        };
        extra["model_path"] = s.into();
    }
    Ok(extra.to_string())
}

/// Runs `job` over `sample_dir` on `device` with a progress bar, then prints the report (`what`:
/// "captions" or "masks"); fails when no image could be done.
pub fn run_folder(
    settings: &Settings,
    device: &str,
    sample_dir: &Path,
    what: &str,
    job: impl FnOnce(&Registry, &mut dyn FnMut(usize, usize) -> bool) -> Result<LabelReport>,
) -> Result<()> {
    if !sample_dir.is_dir() {
        bail!("--sample-dir {}: not a folder", sample_dir.display());
    }
    let (device, said) = ferrite::runtime::for_device(device)?;
    eprintln!("{said}");
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    let registry = Registry::discover(&search_dirs(settings), settings);
    let bar = crate::progress_bar("images");
    let report = job(&registry, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();
    for (file, why) in &report.failed {
        eprintln!("{}: {why} (skipped)", file.display());
    }
    println!(
        "{} {what} written, {} images kept theirs, {} images failed",
        report.written,
        report.kept,
        report.failed.len()
    );
    if report.written + report.kept == 0 && !report.failed.is_empty() {
        bail!("no image could be done");
    }
    Ok(())
}
