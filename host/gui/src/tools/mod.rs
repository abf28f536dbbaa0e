//! The Tools tab: front-ends for the CLI's tool commands: `ferrite sample` (an image from a model,
//! optionally with LoRAs, on a background thread), `ferrite init` (a starter project),
//! `ferrite lora info`, `ferrite import-onetrainer` and `ferrite video`.

mod commands;
mod import;
mod lora_info;
mod video;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};

use eframe::egui::{self, Ui};

use crate::config::TrainConfig;
use crate::plugins::Registry;
use crate::sample::{Sampler, generate};
use crate::settings::Settings;

pub struct Tools {
    model: String,
    lora: String,
    lora_weight: f64,
    prompt: String,
    negative: String,
    steps: usize,
    cfg: f64,
    seed: u64,
    size: usize,
    out: String,
    running: Option<Receiver<Result<PathBuf, String>>>,
    result: Option<Result<(PathBuf, Option<egui::TextureHandle>), String>>,
    project: String,
    project_message: Option<String>,
    pub import: import::Import,
    lora_info: lora_info::LoraInfo,
    commands: commands::Commands,
    video: video::Video,
    dataset_folder: String,
    /// A folder to open in the dataset window (the app takes it).
    pub open_dataset: Option<PathBuf>,
}

/// A tool's error, in the app's error colour.
fn show_error(ui: &mut Ui, e: &str) {
    ui.colored_label(egui::Color32::from_rgb(230, 90, 70), e);
}

/// A tool's report (its lines, scrolled) or its error.
fn show_report(ui: &mut Ui, id: &str, result: &Option<Result<Vec<String>, String>>) {
    match result {
        Some(Ok(lines)) => {
            egui::ScrollArea::vertical()
                .id_salt(id)
                .max_height(160.0)
                .show(ui, |ui| {
                    for l in lines {
                        ui.label(l);
                    }
                });
        }
        Some(Err(e)) => show_error(ui, e),
        None => {}
    }
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            model: String::new(),
            lora: String::new(),
            lora_weight: 1.0,
            prompt: "a photo of a cat".into(),
            negative: String::new(),
            steps: 20,
            cfg: 7.0,
            seed: 42,
            size: 512,
            out: "sample.png".into(),
            running: None,
            result: None,
            project: String::new(),
            project_message: None,
            import: Default::default(),
            lora_info: Default::default(),
            commands: Default::default(),
            video: Default::default(),
            dataset_folder: String::new(),
            open_dataset: None,
        }
    }
}

impl Tools {
    /// Shows the tools; an imported OneTrainer config comes back for the editor (with the path
    /// to save it to).
    #[allow(clippy::too_many_arguments)]
    pub fn show(
        &mut self,
        ui: &mut Ui,
        base: &Path,
        plugin_dirs: &[PathBuf],
        settings: &Settings,
        config: &TrainConfig,
        config_file: &str,
        ferrite: &[String],
    ) -> Option<(TrainConfig, PathBuf)> {
        ui.strong("Sample an image (ferrite sample)");
        if self.model.is_empty() {
            self.model = config.base_model_name.clone();
        }
        egui::Grid::new("sample tool")
            .num_columns(2)
            .show(ui, |ui| {
                let row = |ui: &mut Ui, name: &str, add: &mut dyn FnMut(&mut Ui, egui::Id)| {
                    let l = ui.label(name);
                    add(ui, l.id);
                    ui.end_row();
                };
                row(ui, "Model", &mut |ui, l| {
                    ui.text_edit_singleline(&mut self.model).labelled_by(l);
                });
                row(ui, "LoRA file (optional)", &mut |ui, l| {
                    ui.text_edit_singleline(&mut self.lora).labelled_by(l);
                });
                row(ui, "LoRA strength", &mut |ui, l| {
                    ui.add(egui::DragValue::new(&mut self.lora_weight).speed(0.05))
                        .labelled_by(l);
                });
                row(ui, "Prompt", &mut |ui, l| {
                    ui.text_edit_singleline(&mut self.prompt).labelled_by(l);
                });
                row(ui, "Negative prompt", &mut |ui, l| {
                    ui.text_edit_singleline(&mut self.negative).labelled_by(l);
                });
                row(ui, "Steps", &mut |ui, l| {
                    ui.add(egui::DragValue::new(&mut self.steps).range(1..=200))
                        .labelled_by(l);
                });
                row(ui, "CFG scale", &mut |ui, l| {
                    ui.add(egui::DragValue::new(&mut self.cfg).speed(0.1))
                        .labelled_by(l);
                });
                row(ui, "Seed", &mut |ui, l| {
                    ui.add(egui::DragValue::new(&mut self.seed)).labelled_by(l);
                });
                row(ui, "Size (square)", &mut |ui, l| {
                    ui.add(egui::DragValue::new(&mut self.size).range(8..=2048))
                        .labelled_by(l);
                });
                row(ui, "Output PNG", &mut |ui, l| {
                    ui.text_edit_singleline(&mut self.out).labelled_by(l);
                });
            });
        let busy = self.running.is_some();
        // A training may run meanwhile: this model, its adapters and its scope are its own.
        let generate = ui
            .add_enabled(!busy, egui::Button::new("Generate"))
            .on_disabled_hover_text("generating: wait for the image");
        if generate.clicked() {
            let (device, model_type) = (&config.train_device, &config.model_type);
            self.generate(ui.ctx(), base, plugin_dirs, settings, device, model_type);
        }
        if let Some(rx) = &self.running
            && let Ok(r) = rx.try_recv()
        {
            self.running = None;
            self.result = Some(r.map(|p| {
                let t = super::run::load_texture(ui.ctx(), &p);
                (p, t)
            }));
        }
        if busy {
            ui.spinner();
        }
        match &self.result {
            Some(Ok((p, t))) => {
                ui.label(format!("wrote {}", p.display()));
                if let Some(t) = t {
                    ui.add(egui::Image::new(t).fit_to_exact_size(egui::vec2(256.0, 256.0)));
                }
            }
            Some(Err(e)) => {
                show_error(ui, e);
            }
            None => {}
        }
        ui.separator();
        ui.strong("New project (ferrite init)");
        ui.horizontal(|ui| {
            let l = ui.label("Folder");
            ui.text_edit_singleline(&mut self.project).labelled_by(l.id);
            if ui.button("Create starter project").clicked() {
                let dir = TrainConfig::path(base, &self.project);
                self.project_message = Some(match TrainConfig::write_starter(&dir) {
                    Ok(p) => format!("wrote {}: load it in the top bar", p.display()),
                    Err(e) => e.to_string(),
                });
            }
        });
        if let Some(m) = &self.project_message {
            ui.label(m);
        }
        ui.separator();
        // Each section's widgets get ids of their own, so output growing in one (the model
        // tools' log) does not move the ids of the widgets after it between frames.
        ui.push_id("lora info", |ui| {
            self.lora_info.show(ui, base, plugin_dirs, settings)
        });
        ui.separator();
        ui.push_id("model tools", |ui| {
            self.commands.show(ui, base, ferrite, config, config_file)
        });
        ui.separator();
        let imported = ui.push_id("import", |ui| self.import.show(ui, base)).inner;
        ui.separator();
        ui.push_id("video", |ui| self.video.show(ui, base));
        ui.separator();
        ui.strong("Captions and masks (dataset tool)");
        ui.horizontal(|ui| {
            let l = ui.label("Image folder");
            ui.text_edit_singleline(&mut self.dataset_folder)
                .labelled_by(l.id);
            if ui.button("Open dataset tool").clicked() {
                self.open_dataset = Some(TrainConfig::path(base, &self.dataset_folder));
            }
        });
        imported
    }

    fn generate(
        &mut self,
        ctx: &egui::Context,
        base: &Path,
        plugin_dirs: &[PathBuf],
        settings: &Settings,
        device: &str,
        model_type: &str,
    ) {
        let (tx, rx) = channel();
        self.running = Some(rx);
        self.result = None;
        let model = TrainConfig::path(base, &self.model);
        let lora = (!self.lora.trim().is_empty()).then(|| TrainConfig::path(base, &self.lora));
        let out = TrainConfig::path(base, &self.out);
        let req = generate::SampleRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative.clone(),
            steps: self.steps,
            cfg: Some(self.cfg),
            seed: self.seed,
            width: self.size,
            height: self.size,
            sampler: Sampler::Euler,
            init_noise: None,
            prediction_type: None,
        };
        let (dirs, settings, device, weight) = (
            plugin_dirs.to_vec(),
            settings.clone(),
            device.to_string(),
            self.lora_weight,
        );
        let model_type = model_type.to_string();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let r = (|| -> Result<PathBuf, String> {
                let (device, _) = crate::runtime::for_device(&device).map_err(|e| e.to_string())?;
                let mut scope = crate::runtime::Scope::new(device);
                let _loading = scope.enter();
                let registry = Registry::discover(&dirs, &settings);
                let options = serde_json::json!({ "model": model });
                let arch = registry
                    .architecture(&model_type, &options.to_string())
                    .map_err(|e| e.to_string())?;
                let layers =
                    Arc::new(crate::adapters::ModelLayers::of(&arch).map_err(|e| e.to_string())?);
                scope = scope.with_adapters(layers.clone());
                let _scope = scope.enter();
                if let Some(l) = &lora {
                    layers
                        .load(&registry, l, weight)
                        .map_err(|e| e.to_string())?;
                }
                let rgb = generate::generate(&arch, &req, || {}).map_err(|e| e.to_string())?;
                generate::write_png(&out, req.width, req.height, rgb).map_err(|e| e.to_string())?;
                Ok(out)
            })();
            let _ = tx.send(r);
            ctx.request_repaint();
        });
    }
}
