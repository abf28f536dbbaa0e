//! The video tool (`ferrite video frames|clips`): frames or clips from a video or a folder of
//! them, on a background thread, with its progress.

use std::path::Path;
use std::sync::mpsc::{Receiver, channel};

use eframe::egui::{self, Ui};

use crate::config::TrainConfig;
use crate::video::{self, Every, FrameOptions};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    EverySeconds,
    EveryFrames,
    Clips,
}

enum Message {
    Progress(String),
    Done(Result<String, String>),
}

pub struct Video {
    input: String,
    output: String,
    mode: Mode,
    /// Seconds or frames between kept frames, or a clip's length in seconds.
    step: f64,
    /// At most this many frames per video (0: no limit).
    max: usize,
    /// Frames below this sharpness are left out (0: none are).
    min_sharpness: f64,
    running: Option<Receiver<Message>>,
    progress: String,
    result: Option<Result<String, String>>,
}

impl Default for Video {
    fn default() -> Self {
        Self {
            input: String::new(),
            output: "frames".into(),
            mode: Mode::EverySeconds,
            step: 1.0,
            max: 0,
            min_sharpness: 0.0,
            running: None,
            progress: String::new(),
            result: None,
        }
    }
}

impl Video {
    pub fn show(&mut self, ui: &mut Ui, base: &Path) {
        ui.strong("Frames and clips from videos (ferrite video)");
        egui::Grid::new("video tool").num_columns(2).show(ui, |ui| {
            let l = ui.label("Video file or folder");
            ui.text_edit_singleline(&mut self.input).labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Output folder");
            ui.text_edit_singleline(&mut self.output).labelled_by(l.id);
            ui.end_row();
            ui.label("Extract");
            ui.horizontal(|ui| {
                ui.radio_value(
                    &mut self.mode,
                    Mode::EverySeconds,
                    "a frame every N seconds",
                );
                ui.radio_value(&mut self.mode, Mode::EveryFrames, "every Nth frame");
                ui.radio_value(&mut self.mode, Mode::Clips, "clips of N seconds");
            });
            ui.end_row();
            let l = ui.label("N");
            ui.add(
                egui::DragValue::new(&mut self.step)
                    .speed(0.1)
                    .range(0.01..=3600.0),
            )
            .labelled_by(l.id);
            ui.end_row();
            if self.mode != Mode::Clips {
                let l = ui.label("At most per video (0: all)");
                ui.add(egui::DragValue::new(&mut self.max))
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Minimum sharpness (0: off)");
                ui.add(
                    egui::DragValue::new(&mut self.min_sharpness)
                        .speed(1.0)
                        .range(0.0..=1e6),
                )
                .labelled_by(l.id);
                ui.end_row();
            }
        });
        let busy = self.running.is_some();
        if ui
            .add_enabled(!busy, egui::Button::new("Extract"))
            .clicked()
        {
            self.start(ui.ctx(), base);
        }
        while let Some(msg) = self.running.as_ref().and_then(|rx| rx.try_recv().ok()) {
            match msg {
                Message::Progress(p) => self.progress = p,
                Message::Done(r) => {
                    self.running = None;
                    self.result = Some(r);
                }
            }
        }
        if self.running.is_some() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(&self.progress);
            });
        }
        match &self.result {
            Some(Ok(s)) => {
                ui.label(s);
            }
            Some(Err(e)) => {
                super::show_error(ui, e);
            }
            None => {}
        }
    }

    fn start(&mut self, ctx: &egui::Context, base: &Path) {
        let (tx, rx) = channel();
        self.running = Some(rx);
        self.result = None;
        let input = TrainConfig::path(base, &self.input);
        let output = TrainConfig::path(base, &self.output);
        let (mode, step) = (self.mode, self.step);
        let options = FrameOptions {
            every: if mode == Mode::EveryFrames {
                Every::Frames(step.round().max(1.0) as u64)
            } else {
                Every::Seconds(step)
            },
            max: (self.max > 0).then_some(self.max),
            min_sharpness: (self.min_sharpness > 0.0).then_some(self.min_sharpness),
        };
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let progress_tx = tx.clone();
            let progress_ctx = ctx.clone();
            let mut progress = |p: video::Progress| {
                let _ = progress_tx.send(Message::Progress(format!(
                    "video {} of {}: {} — {} written",
                    p.index + 1,
                    p.of,
                    p.video.display(),
                    p.written
                )));
                progress_ctx.request_repaint();
            };
            let (what, r) = match mode {
                Mode::Clips => (
                    "clips",
                    video::extract_clips(&input, &output, step, &mut progress),
                ),
                _ => (
                    "frames",
                    video::extract_frames(&input, &output, &options, &mut progress),
                ),
            };
            let r = r.map_err(|e| e.to_string()).and_then(|r| {
                let s = r.summary(what, &output);
                if r.none_read() {
                    Err(format!("no video could be read:\n{s}"))
                } else {
                    Ok(s)
                }
            });
            let _ = tx.send(Message::Done(r));
            ctx.request_repaint();
        });
    }
}
