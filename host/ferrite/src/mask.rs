//! `ferrite mask`: the engine's folder masking (OneTrainer's batch masking tool) with a masker
//! plugin, from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferrite::mask::{self, MaskMode, MaskOptions};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

#[derive(clap::Args)]
pub struct MaskArgs {
    /// The masker plugin: `color`, `rembg`, `rembg-human`, or another masker's id (`ferrite
    /// plugins list`).
    #[arg(long)]
    model: String,
    /// The masker's model file or folder, for maskers that have one.
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// The folder of images; each gets `<name>-masklabel.png` beside it.
    #[arg(long)]
    sample_dir: PathBuf,
    /// What to mask (the colour masker: a hex colour such as #00ff00); several prompts
    /// separated by commas.
    #[arg(long, default_value = "")]
    prompt: String,
    /// replace, fill (only images without a mask), add, subtract or blend.
    #[arg(long, default_value = "fill")]
    mode: String,
    /// A pixel is masked where the masker's map is above this.
    #[arg(long, default_value_t = 0.3)]
    threshold: f64,
    /// Smooth the map over this many pixels first.
    #[arg(long, default_value_t = 5)]
    smooth_pixels: usize,
    /// Grow the mask by this many pixels.
    #[arg(long, default_value_t = 10)]
    expand_pixels: usize,
    /// The new mask's strength (add, subtract, blend) or value (replace, fill).
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Images in subfolders too.
    #[arg(long)]
    include_subdirectories: bool,
    /// Compute device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(settings: &Settings, a: MaskArgs) -> Result<()> {
    let options = MaskOptions {
        prompt: a.prompt,
        mode: a.mode.parse::<MaskMode>().context("--mode")?,
        threshold: a.threshold,
        smooth_pixels: a.smooth_pixels,
        expand_pixels: a.expand_pixels,
        alpha: a.alpha,
        include_subdirectories: a.include_subdirectories,
    };
    if !a.sample_dir.is_dir() {
        bail!("--sample-dir {}: not a folder", a.sample_dir.display());
    }
    let (device, said) = ferrite::runtime::for_device(&a.device)?;
    eprintln!("{said}");
    let scope = ferrite::runtime::Scope::new(device);
    let _scope = scope.enter();
    let registry = Registry::discover(&search_dirs(settings), settings);
    let mut plugin_options = serde_json::json!({});
    if let Some(p) = &a.model_path {
        if !p.exists() {
            bail!("--model-path {}: no such file or folder", p.display());
        }
        plugin_options["model_path"] = serde_json::json!(p);
    }
    let mut masker = registry
        .masker(&a.model, &plugin_options.to_string())
        .with_context(|| format!("--model {}", a.model))?;
    let bar = crate::progress_bar("images");
    let report = mask::mask_folder(&mut masker, &a.sample_dir, &options, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();
    for (file, why) in &report.failed {
        eprintln!("{}: {why} (skipped)", file.display());
    }
    println!(
        "{} masks written, {} images kept their mask, {} could not be masked",
        report.written,
        report.kept,
        report.failed.len()
    );
    Ok(())
}
