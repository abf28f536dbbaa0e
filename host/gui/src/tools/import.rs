//! "Import OneTrainer config": a OneTrainer JSON into the editor, with the import's report
//! (what changed on the way, what has no Ferrite option, what to fix) kept on screen.

use std::path::{Path, PathBuf};

use eframe::egui::{self, Ui};

use crate::config::TrainConfig;
use crate::config::onetrainer::{self, Sources};

#[derive(Default)]
pub struct Import {
    pub json: String,
    concepts: String,
    onetrainer_dir: String,
    /// The last import's lines, or its error.
    result: Option<Result<Vec<String>, String>>,
}

impl Import {
    /// Imports `self.json`; on success the config for the editor and the TOML path beside the
    /// JSON it should be saved to.
    pub fn run(&mut self, base: &Path) -> Option<(TrainConfig, PathBuf)> {
        let optional = |s: &str| (!s.trim().is_empty()).then(|| TrainConfig::path(base, s));
        let json = TrainConfig::path(base, &self.json);
        let src = Sources {
            config: json.clone(),
            concepts: optional(&self.concepts),
            samples: None,
            onetrainer_dir: optional(&self.onetrainer_dir),
        };
        match onetrainer::import(&src) {
            Ok(imported) => {
                let r = &imported.report;
                let mut lines = vec![format!(
                    "imported {} (OneTrainer config version {}): {} concept(s), {} sample(s); \
                     save it with Save in the top bar",
                    json.display(),
                    imported.version,
                    imported.config.concepts.len(),
                    imported.config.samples.len()
                )];
                lines.extend(r.notes.iter().map(|n| format!("changed: {n}")));
                lines.extend(
                    r.not_imported
                        .iter()
                        .map(|(k, v)| format!("not imported: {k} = {v}")),
                );
                lines.extend(imported.problems.iter().map(|p| format!("to fix: {p}")));
                self.result = Some(Ok(lines));
                // Beside the JSON, under a name nothing has yet: Save never overwrites a file
                // the user did not choose.
                let path = (1..)
                    .map(|n| match n {
                        1 => json.with_extension("ferrite.toml"),
                        n => json.with_extension(format!("ferrite-{n}.toml")),
                    })
                    .find(|p| !p.exists())
                    .expect("some name is free");
                Some((imported.config, path))
            }
            Err(e) => {
                self.result = Some(Err(e.to_string()));
                None
            }
        }
    }

    pub fn show(&mut self, ui: &mut Ui, base: &Path) -> Option<(TrainConfig, PathBuf)> {
        ui.strong("Import a OneTrainer config (ferrite import-onetrainer)");
        let mut imported = None;
        egui::Grid::new("import tool")
            .num_columns(2)
            .show(ui, |ui| {
                for (name, value) in [
                    ("OneTrainer config (JSON)", &mut self.json),
                    ("Concepts file (optional)", &mut self.concepts),
                    ("OneTrainer folder (optional)", &mut self.onetrainer_dir),
                ] {
                    let l = ui.label(name);
                    ui.text_edit_singleline(value).labelled_by(l.id);
                    ui.end_row();
                }
            });
        if ui.button("Import into the editor").clicked() {
            imported = self.run(base);
        }
        super::show_report(ui, "import report", &self.result);
        imported
    }
}
