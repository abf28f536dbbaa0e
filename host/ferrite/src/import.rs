//! `ferrite import-onetrainer`: a OneTrainer config as a Ferrite one.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferrite::config::onetrainer::{self, Sources};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// OneTrainer's train config (JSON, as its UI saves or exports it).
    config: PathBuf,
    /// Its concepts file, when the config does not hold its concepts and its
    /// `concept_file_name` is not found.
    #[arg(long)]
    concepts: Option<PathBuf>,
    /// Its samples file, likewise.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// OneTrainer's folder: its relative paths (concepts, output, workspace) are relative to it,
    /// and are written as absolute paths.
    #[arg(long)]
    onetrainer_dir: Option<PathBuf>,
    /// The Ferrite config to write (TOML; not overwritten if it exists).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ImportArgs) -> Result<()> {
    if a.out.exists() {
        bail!("{} exists already: not overwriting it", a.out.display());
    }
    let imported = onetrainer::import(&Sources {
        config: a.config.clone(),
        concepts: a.concepts,
        samples: a.samples,
        onetrainer_dir: a.onetrainer_dir,
    })?;
    ferrite::fsutil::write_atomic(&a.out, imported.to_toml(&a.config).as_bytes())
        .with_context(|| format!("writing {}", a.out.display()))?;
    let r = &imported.report;
    println!(
        "{}: {} concept(s), {} sample(s) imported from OneTrainer config version {}",
        a.out.display(),
        imported.config.concepts.len(),
        imported.config.samples.len(),
        imported.version
    );
    for n in &r.notes {
        println!("changed: {n}");
    }
    for (k, v) in &r.not_imported {
        println!("not imported: {k} = {v}");
    }
    for p in &imported.problems {
        println!("to fix before training: {p}");
    }
    Ok(())
}
