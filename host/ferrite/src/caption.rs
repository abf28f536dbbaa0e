//! `ferrite caption`: the engine's folder captioning (OneTrainer's batch captioning) with a
//! captioner plugin, from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferrite::caption::{self, CaptionMode, CaptionOptions};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

#[derive(clap::Args)]
pub struct CaptionArgs {
    /// The captioner plugin: `wd14`, or another captioner's id (`ferrite plugins list`).
    #[arg(long)]
    model: String,
    /// The captioner's model folder or file (a WD tagger's folder with model.onnx and
    /// selected_tags.csv).
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// The folder of images; each gets `<name>.txt` beside it.
    #[arg(long)]
    sample_dir: PathBuf,
    /// Where each caption starts (a tagger puts it before its tags).
    #[arg(long, default_value = "")]
    initial_caption: String,
    /// Put before the caption.
    #[arg(long, default_value = "")]
    caption_prefix: String,
    /// Put after the caption.
    #[arg(long, default_value = "")]
    caption_postfix: String,
    /// replace, fill (only images without a caption) or add (one more line).
    #[arg(long, default_value = "fill")]
    mode: String,
    /// Images in subfolders too.
    #[arg(long)]
    include_subdirectories: bool,
    /// The captioner's own options as JSON (wd14: `{"general_threshold": 0.4}`).
    #[arg(long, value_name = "JSON", default_value = "{}")]
    options: String,
    /// Compute device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(settings: &Settings, a: CaptionArgs) -> Result<()> {
    let options = CaptionOptions {
        initial_caption: a.initial_caption,
        prefix: a.caption_prefix,
        postfix: a.caption_postfix,
        mode: a.mode.parse::<CaptionMode>().context("--mode")?,
        include_subdirectories: a.include_subdirectories,
    };
    if !a.sample_dir.is_dir() {
        bail!("--sample-dir {}: not a folder", a.sample_dir.display());
    }
    let mut plugin_options: serde_json::Value =
        serde_json::from_str(&a.options).context("--options: not a JSON object")?;
    if !plugin_options.is_object() {
        bail!("--options: not a JSON object");
    }
    if let Some(p) = &a.model_path {
        if !p.exists() {
            bail!("--model-path {}: no such file or folder", p.display());
        }
        plugin_options["model_path"] = serde_json::json!(p);
    }
    let (device, said) = ferrite::runtime::for_device(&a.device)?;
    eprintln!("{said}");
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    let registry = Registry::discover(&search_dirs(settings), settings);
    let mut captioner = registry
        .captioner(&a.model, &plugin_options.to_string())
        .with_context(|| format!("--model {}", a.model))?;
    let bar = crate::progress_bar("images");
    let report =
        caption::caption_folder(&mut captioner, &a.sample_dir, &options, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            true
        })?;
    bar.finish_and_clear();
    for (file, why) in &report.failed {
        eprintln!("{}: {why} (skipped)", file.display());
    }
    println!(
        "{} captions written, {} images kept their caption, {} could not be captioned",
        report.written,
        report.kept,
        report.failed.len()
    );
    Ok(())
}
