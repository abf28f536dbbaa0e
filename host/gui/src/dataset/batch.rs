//! Captioning or masking the whole folder from the dataset window, with a captioner or masker
//! plugin, on a background thread: the engine's `caption_folder` / `mask_folder` (the CLI's),
//! their progress shown and a Cancel that stops after the image being done.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};

use eframe::egui::{self, Ui};
use ferrite_plugin_api::ComponentKind;

use crate::caption::{CaptionMode, CaptionOptions};
use crate::config::TrainConfig;
use crate::label::LabelReport;
use crate::mask::{MaskMode, MaskOptions};
use crate::plugins::{ComponentInfo, Registry};
use crate::settings::Settings;

enum Message {
    Progress(usize, usize),
    Done(Result<String, String>),
}

/// What the controls asked for this frame.
pub enum Event {
    /// Caption (true) or mask (false) the folder.
    Start(bool),
    /// A run ended: captions or masks on disk changed.
    Finished,
}

/// What a run needs from the app.
pub struct Run {
    /// The folder whose images are listed.
    pub dir: PathBuf,
    pub caption: bool,
    pub plugin_dirs: Vec<PathBuf>,
    pub settings: Settings,
    pub device: String,
    /// Model paths are relative to it (the config's folder).
    pub base: PathBuf,
}

pub struct Batch {
    pub captioner: String,
    pub masker: String,
    /// Each plugin's model folder or file (empty: none).
    pub captioner_model: String,
    pub masker_model: String,
    pub initial_caption: String,
    pub mask_prompt: String,
    pub caption_mode: String,
    pub mask_mode: String,
    running: Option<(Receiver<Message>, Arc<AtomicBool>)>,
    pub progress: (usize, usize),
    pub result: Option<Result<String, String>>,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            captioner: String::new(),
            masker: String::new(),
            captioner_model: String::new(),
            masker_model: String::new(),
            initial_caption: String::new(),
            mask_prompt: String::new(),
            caption_mode: "fill".into(),
            mask_mode: "fill".into(),
            running: None,
            progress: (0, 0),
            result: None,
        }
    }
}

fn ids(components: &[ComponentInfo], kind: ComponentKind) -> Vec<String> {
    components
        .iter()
        .filter(|c| c.kind == kind && c.enabled)
        .map(|c| c.id.clone())
        .collect()
}

fn choice(ui: &mut Ui, label: &str, value: &mut String, options: &[String]) {
    let l = ui.label(label);
    egui::ComboBox::from_id_salt(label)
        .selected_text(value.as_str())
        .show_ui(ui, |ui| {
            for o in options {
                ui.selectable_value(value, o.clone(), o);
            }
        })
        .response
        .labelled_by(l.id);
}

fn summary(what: &str, r: &LabelReport) -> String {
    let mut s = format!(
        "{} {what} written, {} kept, {} failed",
        r.written,
        r.kept,
        r.failed.len()
    );
    for (f, why) in r.failed.iter().take(3) {
        s.push_str(&format!("\n{}: {why}", f.display()));
    }
    s
}

impl Batch {
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// The controls and the run's state.
    pub fn show(&mut self, ui: &mut Ui, components: &[ComponentInfo]) -> Option<Event> {
        let (captioners, maskers) = (
            ids(components, ComponentKind::Captioner),
            ids(components, ComponentKind::Masker),
        );
        if self.captioner.is_empty() {
            self.captioner = captioners.first().cloned().unwrap_or_default();
        }
        if self.masker.is_empty() {
            self.masker = maskers.first().cloned().unwrap_or_default();
        }
        let modes = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let idle = !self.running();
        let mut event = None;
        ui.horizontal(|ui| {
            choice(ui, "Captioner", &mut self.captioner, &captioners);
            choice(
                ui,
                "Caption mode",
                &mut self.caption_mode,
                &modes(&["fill", "replace", "add"]),
            );
            let l = ui.label("Initial caption");
            ui.add(egui::TextEdit::singleline(&mut self.initial_caption).desired_width(140.0))
                .labelled_by(l.id);
            let l = ui.label("Captioner model");
            ui.add(egui::TextEdit::singleline(&mut self.captioner_model).desired_width(200.0))
                .labelled_by(l.id);
            let start = egui::Button::new("Caption folder");
            if ui
                .add_enabled(idle && !self.captioner.is_empty(), start)
                .clicked()
            {
                event = Some(Event::Start(true));
            }
        });
        ui.horizontal(|ui| {
            choice(ui, "Masker", &mut self.masker, &maskers);
            choice(
                ui,
                "Mask mode",
                &mut self.mask_mode,
                &modes(&["fill", "replace", "add", "subtract", "blend"]),
            );
            let l = ui.label("Mask prompt");
            ui.add(egui::TextEdit::singleline(&mut self.mask_prompt).desired_width(140.0))
                .labelled_by(l.id);
            let l = ui.label("Masker model");
            ui.add(egui::TextEdit::singleline(&mut self.masker_model).desired_width(200.0))
                .labelled_by(l.id);
            let start = egui::Button::new("Mask folder");
            if ui
                .add_enabled(idle && !self.masker.is_empty(), start)
                .clicked()
            {
                event = Some(Event::Start(false));
            }
        });
        let mut finished = false;
        if let Some((rx, cancel)) = &self.running {
            while let Ok(m) = rx.try_recv() {
                match m {
                    Message::Progress(done, total) => self.progress = (done, total),
                    Message::Done(r) => {
                        self.result = Some(r);
                        finished = true;
                    }
                }
            }
            if !finished {
                ui.horizontal(|ui| {
                    let (done, total) = self.progress;
                    ui.add(
                        egui::ProgressBar::new(done as f32 / total.max(1) as f32)
                            .text(format!("{done}/{total} images")),
                    );
                    if ui.button("Cancel").clicked() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                });
            }
        }
        if finished {
            self.running = None;
            event = Some(Event::Finished);
        }
        match &self.result {
            Some(Ok(s)) => {
                ui.label(s);
            }
            Some(Err(e)) => {
                ui.colored_label(egui::Color32::from_rgb(230, 90, 70), e);
            }
            None => {}
        }
        event
    }

    /// Starts captioning or masking `run.dir` on a background thread.
    pub fn start(&mut self, ctx: &egui::Context, run: Run) {
        let (tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.running = Some((rx, cancel.clone()));
        self.result = None;
        self.progress = (0, 0);
        let Run {
            dir,
            caption,
            plugin_dirs: dirs,
            settings,
            device,
            base,
        } = run;
        let model = if caption {
            &self.captioner_model
        } else {
            &self.masker_model
        };
        let mut options = serde_json::json!({});
        if !model.trim().is_empty() {
            let path = TrainConfig::path(&base, model.trim());
            options["model_path"] = path.to_string_lossy().into_owned().into();
        }
        let (id, prompt) = if caption {
            (self.captioner.clone(), self.initial_caption.clone())
        } else {
            (self.masker.clone(), self.mask_prompt.clone())
        };
        let (caption_mode, mask_mode) = (self.caption_mode.clone(), self.mask_mode.clone());
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let progress = |done: usize, total: usize| {
                let _ = tx.send(Message::Progress(done, total));
                ctx.request_repaint();
                !cancel.load(Ordering::Relaxed)
            };
            let r = (|| -> Result<String, String> {
                let (device, _) = crate::runtime::for_device(&device).map_err(|e| e.to_string())?;
                let scope = crate::runtime::Scope::new(device);
                let _scope = scope.enter();
                let registry = Registry::discover(&dirs, &settings);
                let options = options.to_string();
                if caption {
                    let mut c = registry
                        .captioner(&id, &options)
                        .map_err(|e| e.to_string())?;
                    let o = CaptionOptions {
                        initial_caption: prompt,
                        mode: caption_mode
                            .parse::<CaptionMode>()
                            .map_err(|e| e.to_string())?,
                        ..CaptionOptions::default()
                    };
                    let r = crate::caption::caption_folder(&mut c, &dir, &o, progress)
                        .map_err(|e| e.to_string())?;
                    Ok(summary("captions", &r))
                } else {
                    let mut m = registry.masker(&id, &options).map_err(|e| e.to_string())?;
                    let o = MaskOptions {
                        prompt,
                        mode: mask_mode.parse::<MaskMode>().map_err(|e| e.to_string())?,
                        ..MaskOptions::default()
                    };
                    let r = crate::mask::mask_folder(&mut m, &dir, &o, progress)
                        .map_err(|e| e.to_string())?;
                    Ok(summary("masks", &r))
                }
            })();
            let _ = tx.send(Message::Done(r));
            ctx.request_repaint();
        });
    }
}
