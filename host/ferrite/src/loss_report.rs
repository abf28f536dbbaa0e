//! `ferrite loss-report` (OneTrainer's calculate_loss): each training image's loss under the
//! config's model, or a LoRA on it, at the fixed timesteps and noise validation uses, highest
//! first, as CSV — the images a model finds hardest, where mislabelled or broken ones show.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrite::config::TrainConfig;
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;
use ferrite::train::trainer::Trainer;

#[derive(clap::Args)]
pub struct LossReportArgs {
    /// The training config whose model, concepts and settings to use.
    #[arg(long)]
    config: PathBuf,
    /// A preset under the config: a name from presets/ or a file.
    #[arg(long)]
    preset: Option<String>,
    /// Overrides, e.g. `--set resolution=768`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// An adapter file to measure on the model, optionally with a strength (`FILE:0.8`); the
    /// config's own adapters are left out.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    lora: Option<String>,
    /// Where the CSV goes (image, concept, caption, loss).
    #[arg(long)]
    out: PathBuf,
}

/// A CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn run(settings: &Settings, a: LossReportArgs) -> Result<()> {
    let config = TrainConfig::load(Some(&a.config), a.preset.as_deref(), &a.sets)?;
    let base = a
        .config
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let (device, said) = ferrite::runtime::for_device(&config.train_device)?;
    eprintln!("{said}");
    let registry = Registry::discover(&search_dirs(settings), settings);
    let trainer = Trainer::on(device, Default::default(), config, &base, registry)?;
    if let Some(spec) = &a.lora {
        let (path, weight) = crate::lora::lora_spec(spec);
        let n = trainer
            .use_adapter_file(&path, weight)
            .with_context(|| format!("--lora {spec}"))?;
        eprintln!("{}: {n} adapted layers, strength {weight}", path.display());
    }
    let rows = trainer.loss_report()?;
    let mut csv = String::from("image,concept,caption,loss\n");
    for (image, concept, caption, loss) in &rows {
        let _ = writeln!(
            csv,
            "{},{},{},{loss}",
            field(&image.to_string_lossy()),
            field(concept),
            field(caption)
        );
    }
    ferrite::fsutil::write_atomic(&a.out, csv.as_bytes())
        .with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "{} images, highest loss first: {}",
        rows.len(),
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_with_commas_or_quotes_are_quoted() {
        assert_eq!(super::field("a red cat"), "a red cat");
        assert_eq!(super::field("a, b"), "\"a, b\"");
        assert_eq!(super::field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
