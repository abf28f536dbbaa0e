//! `ferrite mask`: the engine's folder masking (OneTrainer's batch masking tool) with a masker
//! plugin, from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrite::mask::{self, MaskMode, MaskOptions};
use ferrite::settings::Settings;

#[derive(clap::Args)]
pub struct MaskArgs {
    /// The masker plugin: `clipseg`, `rembg`, `rembg-human`, `color`, or another masker's id
    /// (`ferrite plugins list`).
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
    let plugin_options =
        crate::label::plugin_options(a.model_path.as_deref(), serde_json::json!({}))?;
    crate::label::run_folder(
        settings,
        &a.device,
        &a.sample_dir,
        "masks",
        |registry, progress| {
            let mut masker = registry
                .masker(&a.model, &plugin_options)
                .with_context(|| format!("--model {}", a.model))?;
            Ok(mask::mask_folder(
                &mut masker,
                &a.sample_dir,
                &options,
                progress,
            )?)
        },
    )
}
