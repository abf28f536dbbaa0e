//! The CLI's model tools in the Tools tab: `convert`, `lora convert`, `lora merge` and
//! `loss-report`, run as the `ferrite` command itself (the same code and messages as on the
//! command line) on a background thread, its output shown as it comes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, TryRecvError, channel};

use eframe::egui::{self, Ui};

use crate::config::TrainConfig;

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Convert,
    LoraConvert,
    LoraMerge,
    LossReport,
}

impl Tool {
    const ALL: [Self; 4] = [
        Self::Convert,
        Self::LoraConvert,
        Self::LoraMerge,
        Self::LossReport,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Convert => "Convert a model",
            Self::LoraConvert => "Convert a LoRA's keys",
            Self::LoraMerge => "Merge a LoRA into a model",
            Self::LossReport => "Loss per image",
        }
    }
}

enum Message {
    Line(String),
    Done(Result<(), String>),
}

pub struct Commands {
    tool: Tool,
    model: String,
    model_config: String,
    lora: String,
    output: String,
    /// convert: single-file or diffusers; lora convert: kohya, diffusers or comfy.
    format: String,
    dtype: String,
    running: Option<Receiver<Message>>,
    lines: Vec<String>,
    done: Option<Result<(), String>>,
    /// The model fields were filled from the config once.
    filled: bool,
}

impl Default for Commands {
    fn default() -> Self {
        Self {
            tool: Tool::Convert,
            model: String::new(),
            model_config: String::new(),
            lora: String::new(),
            output: String::new(),
            format: "single-file".into(),
            dtype: "float16".into(),
            running: None,
            lines: Vec::new(),
            done: None,
            filled: false,
        }
    }
}

impl Commands {
    /// `ferrite` is the command the tools run as (with the app's settings file and offline
    /// choice before its arguments); `config_file` the saved config the loss report reads.
    pub fn show(
        &mut self,
        ui: &mut Ui,
        base: &Path,
        ferrite: &[String],
        config: &TrainConfig,
        config_file: &str,
    ) {
        ui.strong("Model tools (ferrite convert, lora convert, lora merge, loss-report)");
        ui.horizontal(|ui| {
            for t in Tool::ALL {
                if ui.selectable_label(self.tool == t, t.name()).clicked() && self.tool != t {
                    self.tool = t;
                    self.format = match t {
                        Tool::LoraConvert => "kohya".into(),
                        _ => "single-file".into(),
                    };
                }
            }
        });
        if !self.filled {
            self.filled = true;
            self.model = config.base_model_name.clone();
            self.model_config = config.base_model_config.clone();
        }
        egui::Grid::new("model tools")
            .num_columns(2)
            .show(ui, |ui| {
                let text = |ui: &mut Ui, name: &str, value: &mut String| {
                    let l = ui.label(name);
                    ui.text_edit_singleline(value).labelled_by(l.id);
                    ui.end_row();
                };
                match self.tool {
                    Tool::LossReport => {
                        ui.label("Config");
                        ui.label(if config_file.is_empty() {
                            "save the config first (top bar)"
                        } else {
                            config_file
                        });
                        ui.end_row();
                        text(ui, "LoRA file (optional)", &mut self.lora);
                    }
                    _ => {
                        text(ui, "Model or checkpoint", &mut self.model);
                        text(
                            ui,
                            "Its config folder (for a single file)",
                            &mut self.model_config,
                        );
                        if self.tool != Tool::Convert {
                            text(ui, "LoRA file (FILE or FILE:WEIGHT)", &mut self.lora);
                        }
                    }
                }
                let formats: &[&str] = match self.tool {
                    Tool::Convert => &["single-file", "diffusers"],
                    Tool::LoraConvert => &["kohya", "diffusers", "comfy"],
                    _ => &[],
                };
                if !formats.is_empty() {
                    let l = ui.label("Format");
                    egui::ComboBox::from_id_salt("tool format")
                        .selected_text(self.format.clone())
                        .show_ui(ui, |ui| {
                            for f in formats {
                                ui.selectable_value(&mut self.format, f.to_string(), *f);
                            }
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                }
                if matches!(self.tool, Tool::Convert | Tool::LoraMerge) {
                    let l = ui.label("Dtype");
                    egui::ComboBox::from_id_salt("tool dtype")
                        .selected_text(self.dtype.clone())
                        .show_ui(ui, |ui| {
                            for d in ["float32", "float16", "bfloat16"] {
                                ui.selectable_value(&mut self.dtype, d.to_string(), d);
                            }
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                }
                text(ui, "Output", &mut self.output);
            });
        let busy = self.running.is_some();
        let missing = self.missing(config_file);
        let run = ui
            .add_enabled(
                !busy && missing.is_none(),
                egui::Button::new("Run the tool"),
            )
            .on_disabled_hover_text(missing.unwrap_or("running"));
        if run.clicked() {
            let args = self.args(base, &config.model_type, config_file);
            self.start(ui.ctx(), ferrite, args);
        }
        while let Some(rx) = &self.running {
            match rx.try_recv() {
                Ok(Message::Line(l)) => self.lines.push(l),
                Ok(Message::Done(r)) => {
                    self.running = None;
                    self.done = Some(r);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.running = None;
                    self.done = Some(Err("the tool's thread ended without a result".into()));
                }
            }
        }
        if busy {
            ui.spinner();
        }
        egui::ScrollArea::vertical()
            .id_salt("tool output")
            .max_height(140.0)
            .stick_to_bottom(true)
            .show(ui, |ui| {
                for l in &self.lines {
                    ui.monospace(l);
                }
            });
        match &self.done {
            Some(Ok(())) => {
                ui.label("finished");
            }
            Some(Err(e)) => {
                super::show_error(ui, e);
            }
            None => {}
        }
    }

    /// What the chosen tool still needs typed in.
    fn missing(&self, config_file: &str) -> Option<&'static str> {
        let empty = |s: &str| s.trim().is_empty();
        match self.tool {
            Tool::LossReport if empty(config_file) => Some("save the config first"),
            Tool::LossReport => None,
            _ if empty(&self.model) => Some("give a model"),
            Tool::LoraConvert | Tool::LoraMerge if empty(&self.lora) => Some("give a LoRA file"),
            _ if empty(&self.output) => Some("give an output"),
            _ => None,
        }
    }

    /// The command line of the chosen tool (paths made absolute against the config's folder).
    fn args(&self, base: &Path, model_type: &str, config_file: &str) -> Vec<String> {
        let path = |s: &str| TrainConfig::path(base, s).to_string_lossy().into_owned();
        let model = || {
            // A Hugging Face id is no path (unless the config's folder holds one of that name).
            let as_path = TrainConfig::path(base, &self.model);
            if crate::hub::is_repo_id(&self.model) && !as_path.exists() {
                self.model.clone()
            } else {
                as_path.to_string_lossy().into_owned()
            }
        };
        let mut a: Vec<String> = match self.tool {
            Tool::Convert => vec![
                "convert".into(),
                "--model-type".into(),
                model_type.into(),
                "--input".into(),
                model(),
                "--output-format".into(),
                self.format.clone(),
                "--output-dtype".into(),
                self.dtype.clone(),
            ],
            Tool::LoraConvert => vec![
                "lora".into(),
                "convert".into(),
                "--model".into(),
                model(),
                "--in".into(),
                path(&self.lora),
                "--format".into(),
                self.format.clone(),
            ],
            Tool::LoraMerge => vec![
                "lora".into(),
                "merge".into(),
                "--model".into(),
                model(),
                // FILE[:WEIGHT]: the command splits off a weight.
                "--lora".into(),
                path(&self.lora),
                "--dtype".into(),
                self.dtype.clone(),
            ],
            Tool::LossReport => {
                let mut a = vec!["loss-report".into(), "--config".into(), path(config_file)];
                if !self.lora.trim().is_empty() {
                    a.extend(["--lora".into(), path(&self.lora)]);
                }
                a
            }
        };
        if self.tool != Tool::LossReport && !self.model_config.trim().is_empty() {
            let flag = if self.tool == Tool::Convert {
                "--input-config"
            } else {
                "--model-config"
            };
            a.extend([flag.into(), path(&self.model_config)]);
        }
        let out_flag = match self.tool {
            Tool::Convert => "--output",
            _ => "--out",
        };
        a.extend([out_flag.into(), path(&self.output)]);
        a
    }

    fn start(&mut self, ctx: &egui::Context, ferrite: &[String], args: Vec<String>) {
        let (tx, rx) = channel();
        self.running = Some(rx);
        self.done = None;
        self.lines = vec![format!("$ ferrite {}", args.join(" "))];
        let (ferrite, ctx) = (ferrite.to_vec(), ctx.clone());
        std::thread::spawn(move || {
            let child = Command::new(&ferrite[0])
                .args(&ferrite[1..])
                .args(&args)
                // Its progress lines rewrite themselves with `\r`: read as they end.
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Message::Done(Err(format!("{}: {e}", ferrite[0]))));
                    ctx.request_repaint();
                    return;
                }
            };
            let mut readers = Vec::new();
            for stream in [
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let (tx, ctx) = (tx.clone(), ctx.clone());
                readers.push(std::thread::spawn(move || {
                    for line in BufReader::new(stream).split(b'\n').map_while(|l| l.ok()) {
                        let line = String::from_utf8_lossy(&line);
                        let last = line.rsplit('\r').find(|p| !p.trim().is_empty());
                        if let Some(l) = last {
                            let _ = tx.send(Message::Line(l.trim_end().to_string()));
                            ctx.request_repaint();
                        }
                    }
                }));
            }
            for r in readers {
                let _ = r.join();
            }
            let r = match child.wait() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("the command failed ({s}); its messages are above")),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Message::Done(r));
            ctx.request_repaint();
        });
    }
}
