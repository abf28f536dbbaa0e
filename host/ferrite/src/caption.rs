//! `ferrite caption`: the engine's folder captioning (OneTrainer's batch captioning) with a
//! captioner plugin, from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferrite::caption::{self, CaptionMode, CaptionOptions};
use ferrite::settings::Settings;
use ferrite_plugin_api::ComponentKind;

#[derive(clap::Args)]
pub struct CaptionArgs {
    /// The captioner plugin: `blip`, `blip2`, `wd14`, or another captioner's id (`ferrite plugins list`).
    #[arg(long)]
    model: String,
    /// The captioner's model folder or file (BLIP's Hugging Face folder; a WD tagger's folder
    /// with model.onnx and selected_tags.csv).
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
    /// The captioner's threshold (wd14: the general tags').
    #[arg(long)]
    threshold: Option<f64>,
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
    let mut extra: serde_json::Value =
        serde_json::from_str(&a.options).context("--options: not JSON")?;
    let model = a.model.clone();
    crate::label::run_folder(
        settings,
        &a.device,
        &a.sample_dir,
        "captions",
        |registry, progress| {
            if let Some(t) = a.threshold {
                // The captioner's threshold (a tagger's general one).
                let declared = registry
                    .declared_options(ComponentKind::Captioner, &model)
                    .unwrap_or_default();
                match ["threshold", "general_threshold"]
                    .into_iter()
                    .find(|k| declared.contains(*k))
                {
                    Some(k) => extra[k] = t.into(),
                    None => bail!("--threshold: the captioner `{model}` has no threshold"),
                }
            }
            let plugin_options = crate::label::plugin_options(a.model_path.as_deref(), extra)?;
            let mut captioner = registry
                .captioner(&model, &plugin_options)
                .with_context(|| format!("--model {model}"))?;
            Ok(caption::caption_folder(
                &mut captioner,
                &a.sample_dir,
                &options,
                progress,
            )?)
        },
    )
}
