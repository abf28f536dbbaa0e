//! "What a LoRA file holds" (`ferrite lora info`): its layout, type, ranks, alphas, family and
//! training metadata.

use std::path::{Path, PathBuf};

use eframe::egui::Ui;

use crate::adapters::{describe::describe, formats::Layouts};
use crate::config::TrainConfig;
use crate::plugins::Registry;
use crate::settings::Settings;

#[derive(Default)]
pub struct LoraInfo {
    file: String,
    result: Option<Result<Vec<String>, String>>,
}

impl LoraInfo {
    pub fn show(&mut self, ui: &mut Ui, base: &Path, plugin_dirs: &[PathBuf], settings: &Settings) {
        ui.strong("What a LoRA file holds (ferrite lora info)");
        ui.horizontal(|ui| {
            let l = ui.label("Adapter file");
            ui.text_edit_singleline(&mut self.file).labelled_by(l.id);
            if ui.button("Describe").clicked() {
                let path = TrainConfig::path(base, &self.file);
                // Reading its alphas reads tensors: on the CPU, in a scope of its own.
                self.result = Some(
                    crate::runtime::for_device("cpu")
                        .map_err(|e| e.to_string())
                        .and_then(|(device, _)| {
                            let scope = crate::runtime::Scope::new(device);
                            let _scope = scope.enter();
                            // The adapter plugins say which tensors are whose.
                            let registry = Registry::discover(plugin_dirs, settings);
                            describe(&path, &Layouts::of(registry.components()))
                                .map(|d| d.lines())
                                .map_err(|e| format!("{}: {e}", path.display()))
                        }),
                );
            }
        });
        super::show_report(ui, "lora info", &self.result);
    }
}
