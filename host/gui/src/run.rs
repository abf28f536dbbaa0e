//! The training view: a run on a background thread (the same `Trainer` as `ferrite train`),
//! its events drained every frame (the UI never waits on it), live charts of loss, smoothed loss,
//! learning rate and validation loss, the latest sample per prompt, and a log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use eframe::egui::{self, Color32, RichText, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints};

use crate::config::TrainConfig;
use crate::plugins::Registry;
use crate::train::trainer::{Controls, Event, Trainer};

enum Msg {
    /// The model is loaded and the run begins.
    Started,
    /// A line for the log.
    Note(String),
    Event(Event),
    Done(Result<(), String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Starting,
    Running,
    Paused,
    Stopping,
    Finished,
    Failed,
}

/// One line of the log panel.
pub struct LogLine {
    pub warning: bool,
    pub text: String,
}

/// The latest sample of one prompt.
pub struct Sample {
    pub step: u64,
    pub path: PathBuf,
    texture: Option<egui::TextureHandle>,
}

pub struct RunView {
    pub phase: Phase,
    events: Option<Receiver<Msg>>,
    controls: Option<Arc<Controls>>,
    pub step: u64,
    pub epoch: u64,
    pub total_steps: u64,
    /// The caching pass under way: "caching latents 3/10".
    pub caching: Option<String>,
    /// When recent steps ended, for it/s and the ETA.
    step_times: Vec<Instant>,
    /// The last step's time on each process of a data-parallel run (seconds, by rank).
    pub rank_times: Vec<f32>,
    pub loss: Vec<[f64; 2]>,
    pub smoothed: Vec<[f64; 2]>,
    pub lr: Vec<[f64; 2]>,
    pub validation: BTreeMap<String, Vec<[f64; 2]>>,
    /// By sample folder (`<n>-<prompt>`).
    pub samples: BTreeMap<String, Sample>,
    pub log: Vec<LogLine>,
}

impl Default for RunView {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            events: None,
            controls: None,
            step: 0,
            epoch: 0,
            total_steps: 0,
            caching: None,
            step_times: Vec::new(),
            rank_times: Vec::new(),
            loss: Vec::new(),
            smoothed: Vec::new(),
            lr: Vec::new(),
            validation: BTreeMap::new(),
            samples: BTreeMap::new(),
            log: Vec::new(),
        }
    }
}

impl RunView {
    pub fn active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Starting | Phase::Running | Phase::Paused | Phase::Stopping
        )
    }

    pub fn log(&mut self, warning: bool, text: impl Into<String>) {
        self.log.push(LogLine {
            warning,
            text: text.into(),
        });
    }

    /// Starts training `config` (paths relative to `base`) on a background thread.
    pub fn start(
        &mut self,
        ctx: &egui::Context,
        config: TrainConfig,
        base: PathBuf,
        registry: Registry,
    ) {
        *self = RunView {
            log: std::mem::take(&mut self.log),
            ..RunView::default()
        };
        self.phase = Phase::Starting;
        self.log(false, format!("starting: {} epochs", config.epochs));
        let (tx, rx) = channel();
        self.events = Some(rx);
        let ctx = ctx.clone();
        // Shared before the model loads, so Stop works from the first moment.
        let controls = Arc::new(Controls::default());
        self.controls = Some(controls.clone());
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                let run = || {
                    // multi_gpu: this process is rank 0 of processes it starts, one per device.
                    let (config, launched) = match config.multi_gpu {
                        true => {
                            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                            let timeouts = crate::train::multi_gpu::TIMEOUTS;
                            let l = crate::train::multi_gpu::launch(&config, &base, &exe, timeouts)
                                .map_err(|e| e.to_string())?;
                            (l.config, Some((l.parallel, l.peers)))
                        }
                        false => (config, None),
                    };
                    let (device, _) = crate::runtime::for_device(&config.train_device)
                        .map_err(|e| e.to_string())?;
                    let mut t = Trainer::on(device, controls, config, &base, registry)
                        .map_err(|e| e.to_string())?;
                    let peers = match launched {
                        Some((parallel, peers)) => {
                            t.join(parallel).map_err(|e| e.to_string())?;
                            Some(peers)
                        }
                        None => None,
                    };
                    let _ = tx.send(Msg::Started);
                    if let Some(line) = t.joined() {
                        let _ = tx.send(Msg::Note(line));
                    }
                    let result = t
                        .run(|e| {
                            let _ = tx.send(Msg::Event(e));
                            ctx.request_repaint();
                        })
                        .map_err(|e| e.to_string());
                    match peers.map(|p| p.finish(result.is_ok())) {
                        Some(Err(peers)) => Err(match result {
                            Err(e) => format!("{e}; {peers}"),
                            Ok(()) => peers,
                        }),
                        _ => result,
                    }
                };
                // A panic in the trainer ends the run as a failure with its message.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|p| {
                        Err(format!(
                            "the trainer failed: {}",
                            ferrite_plugin_api::plugin::panic_message(&*p)
                        ))
                    });
                let _ = tx.send(Msg::Done(result));
                ctx.request_repaint();
            })
            .expect("spawn the trainer thread");
    }

    pub fn pause(&mut self, paused: bool) {
        if let Some(c) = &self.controls {
            c.pause.store(paused, Ordering::Relaxed);
        }
    }

    pub fn stop(&mut self) {
        if self.active() {
            self.pause(false);
            if let Some(c) = &self.controls {
                c.cancel.cancel();
            }
            self.phase = Phase::Stopping;
            self.log(false, "stopping: a backup is written at the step reached");
        }
    }

    pub fn sample_now(&self) {
        if let Some(c) = &self.controls {
            c.sample_now.store(true, Ordering::Relaxed);
        }
    }

    pub fn backup_now(&self) {
        if let Some(c) = &self.controls {
            c.backup_now.store(true, Ordering::Relaxed);
        }
    }

    /// Takes what the trainer sent since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        let Some(rx) = &self.events else { return };
        let msgs: Vec<Msg> = rx.try_iter().collect();
        for m in msgs {
            match m {
                Msg::Started => {
                    if self.phase == Phase::Starting {
                        self.phase = Phase::Running;
                    }
                }
                Msg::Note(line) => self.log(false, line),
                Msg::Event(e) => self.on_event(ctx, e),
                Msg::Done(Ok(())) => {
                    self.caching = None;
                    self.phase = Phase::Finished;
                    self.log(false, "training finished");
                    self.controls = None;
                }
                Msg::Done(Err(e)) => {
                    self.caching = None;
                    self.phase = Phase::Failed;
                    self.log(true, format!("training failed: {e}"));
                    self.controls = None;
                }
            }
        }
    }

    fn on_event(&mut self, ctx: &egui::Context, e: Event) {
        match e {
            Event::Started {
                items,
                problems,
                steps,
            } => {
                self.total_steps = steps;
                self.log(false, format!("training on {items} images, {steps} steps"));
                for p in problems {
                    self.log(true, p);
                }
            }
            Event::Step {
                step,
                epoch,
                loss,
                lr,
                rank_times,
                ..
            } => {
                self.step = step;
                self.rank_times = rank_times;
                self.epoch = epoch;
                let s = step as f64;
                let prev = self.smoothed.last().map_or(loss as f64, |p| p[1]);
                self.loss.push([s, loss as f64]);
                self.smoothed.push([s, 0.9 * prev + 0.1 * loss as f64]);
                self.lr.push([s, lr]);
                self.step_times.push(Instant::now());
                if self.step_times.len() > 50 {
                    self.step_times.remove(0);
                }
            }
            Event::Validation {
                step,
                concept,
                loss,
            } => self
                .validation
                .entry(concept)
                .or_default()
                .push([step as f64, loss as f64]),
            Event::Sample(path) => {
                let key = path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let texture = load_texture(ctx, &path);
                if texture.is_none() {
                    self.log(true, format!("could not show {}", path.display()));
                }
                self.samples.insert(
                    key,
                    Sample {
                        step: self.step,
                        path,
                        texture,
                    },
                );
            }
            Event::Backup(p) => self.log(false, format!("backup: {}", p.display())),
            Event::Saved(p) => self.log(false, format!("saved: {}", p.display())),
            Event::Skipped { step, loss_scale } => self.log(
                true,
                format!(
                    "step {step} skipped: float16 gradients overflowed, loss scale now {loss_scale}"
                ),
            ),
            Event::Caching { what, done, total } => {
                if done == 0 {
                    self.log(false, format!("caching {total} {what}"));
                }
                self.caching = Some(format!("caching {what} {done}/{total}"));
            }
            Event::Cached(c) => {
                self.caching = None;
                self.log(false, c.to_string());
            }
            Event::Paused(true) => {
                self.phase = Phase::Paused;
                self.log(false, "paused");
            }
            Event::Paused(false) => {
                if self.phase == Phase::Paused {
                    self.phase = Phase::Running;
                }
                self.log(false, "resumed");
            }
        }
    }

    /// Steps per second over the recent steps.
    pub fn rate(&self) -> Option<f64> {
        let (first, last) = (self.step_times.first()?, self.step_times.last()?);
        let secs = last.duration_since(*first).as_secs_f64();
        (self.step_times.len() > 1 && secs > 0.0).then(|| (self.step_times.len() - 1) as f64 / secs)
    }

    /// "epoch 2 · step 14/240 · 1.9 it/s · ETA 2m 0s".
    pub fn progress_text(&self) -> String {
        if let Some(c) = &self.caching {
            return c.clone();
        }
        let mut t = format!(
            "epoch {} · step {}/{}",
            self.epoch, self.step, self.total_steps
        );
        if let Some(r) = self.rate() {
            let left = self.total_steps.saturating_sub(self.step) as f64 / r;
            let left = Duration::from_secs(left as u64);
            t.push_str(&format!(
                " · {r:.2} it/s · ETA {}m {}s",
                left.as_secs() / 60,
                left.as_secs() % 60
            ));
        }
        if !self.rank_times.is_empty() {
            let each: Vec<String> = self
                .rank_times
                .iter()
                .enumerate()
                .map(|(r, s)| format!("{r}: {s:.2} s"))
                .collect();
            t.push_str(&format!(" · per device {}", each.join(", ")));
        }
        t
    }

    /// Charts, samples and the log.
    pub fn show(&mut self, ui: &mut Ui) {
        ui.label(RichText::new(self.progress_text()).strong());
        let half = (ui.available_width() / 2.0 - 8.0).max(200.0);
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.set_width(half);
                ui.label("Loss");
                // From step 0: one step's point alone makes an empty x range, which egui_plot
                // refuses (a debug assertion).
                Plot::new("loss")
                    .height(180.0)
                    .include_x(0.0)
                    .legend(Legend::default())
                    .show(ui, |p| {
                        p.line(Line::new("loss", PlotPoints::from(self.loss.clone())));
                        p.line(Line::new(
                            "smoothed loss",
                            PlotPoints::from(self.smoothed.clone()),
                        ));
                        for (c, v) in &self.validation {
                            p.line(Line::new(
                                format!("validation: {c}"),
                                PlotPoints::from(v.clone()),
                            ));
                        }
                    });
            });
            ui.vertical(|ui| {
                ui.set_width(half);
                ui.label("Learning rate");
                Plot::new("lr").height(180.0).include_x(0.0).show(ui, |p| {
                    p.line(Line::new(
                        "learning rate",
                        PlotPoints::from(self.lr.clone()),
                    ));
                });
            });
        });
        ui.separator();
        ui.label("Samples");
        if self.samples.is_empty() {
            ui.label("No samples yet (Sampling tab: prompts and how often; or Sample now).");
        }
        ui.horizontal_wrapped(|ui| {
            for (name, s) in &self.samples {
                ui.vertical(|ui| {
                    ui.label(format!("{name} at step {}", s.step))
                        .on_hover_text(s.path.display().to_string());
                    if let Some(t) = &s.texture {
                        ui.add(egui::Image::new(t).fit_to_exact_size(egui::vec2(160.0, 160.0)));
                    }
                });
            }
        });
        ui.separator();
        ui.label("Log");
        egui::ScrollArea::vertical()
            .max_height(160.0)
            .stick_to_bottom(true)
            .show(ui, |ui| {
                for l in &self.log {
                    if l.warning {
                        ui.label(RichText::new(&l.text).color(Color32::from_rgb(230, 150, 60)));
                    } else {
                        ui.label(&l.text);
                    }
                }
            });
    }
}

/// A PNG as a texture (nearest filtering: samples of tiny models are a few pixels wide).
pub fn load_texture(ctx: &egui::Context, path: &Path) -> Option<egui::TextureHandle> {
    let img = image::open(path).ok()?.to_rgba8();
    let size = [img.width() as usize, img.height() as usize];
    let color = egui::ColorImage::from_rgba_unmultiplied(size, img.as_raw());
    Some(ctx.load_texture(
        path.display().to_string(),
        color,
        egui::TextureOptions::NEAREST,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data-parallel step's per-process times reach the progress line, by rank.
    #[test]
    fn the_progress_line_shows_each_devices_step_time() {
        let mut view = RunView::default();
        let step = |rank_times| Event::Step {
            step: 3,
            epoch: 1,
            loss: 0.5,
            lr: 1e-4,
            data_wait: Duration::ZERO,
            rank_times,
        };
        view.on_event(&egui::Context::default(), step(Vec::new()));
        assert!(!view.progress_text().contains("per device"));
        view.on_event(&egui::Context::default(), step(vec![0.41, 0.5]));
        assert!(
            view.progress_text()
                .ends_with("per device 0: 0.41 s, 1: 0.50 s"),
            "{}",
            view.progress_text()
        );
    }
}
