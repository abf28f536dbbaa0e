//! The desktop app (egui/eframe): `ferrite` with no arguments or `ferrite gui`. It edits the same
//! `TrainConfig` as the CLI and runs the same trainer, on a background thread.

mod app;
mod concepts;
mod dataset;
mod form;
mod run;
mod schema_form;
mod tools;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

// The engine's modules under the names the views use.
use ferrite_engine::{
    adapters, caption, config, data, fsutil, hub, label, mask, plugins, runtime, sample, settings,
    train, video,
};

pub use app::{App, AppOptions, Tab};
use concepts::ConceptTab;
pub use dataset::DatasetUi;
/// The egui version the app is built with (for tests and tools driving it).
pub use eframe::egui;
pub use run::Phase;

/// What screenshot mode captures, in order: every tab, the concept window's augmentation
/// preview and statistics, and the dataset window over the first concept's folder (the last
/// field).
const SHOTS: [(&str, Tab, Option<ConceptTab>, bool); 15] = [
    ("general", Tab::General, None, false),
    ("model", Tab::Model, None, false),
    ("data", Tab::Data, None, false),
    ("concepts", Tab::Concepts, Some(ConceptTab::General), false),
    (
        "concept-augmentation",
        Tab::Concepts,
        Some(ConceptTab::Augmentation),
        false,
    ),
    (
        "concept-statistics",
        Tab::Concepts,
        Some(ConceptTab::Statistics),
        false,
    ),
    ("training", Tab::Training, None, false),
    ("sampling", Tab::Sampling, None, false),
    ("backup", Tab::Backup, None, false),
    ("lora", Tab::Lora, None, false),
    ("embedding", Tab::Embedding, None, false),
    ("tools", Tab::Tools, None, false),
    ("plugins", Tab::Plugins, None, false),
    ("dataset", Tab::Concepts, None, true),
    ("run", Tab::Run, None, false),
];

/// Screenshot mode: each of [`SHOTS`] in turn is shown, captured and written as
/// `<dir>/<name>.png`; the window then closes. Frame times seen meanwhile are printed.
struct Screenshots {
    dir: PathBuf,
    next: usize,
    frames_on_tab: u32,
    /// When the current shot was first shown: windows fade in over time, not frames.
    shown_at: std::time::Instant,
    pending: Arc<Mutex<Option<Result<PathBuf, String>>>>,
    waiting: bool,
    done: bool,
    /// Whole-frame CPU time (UI and rendering) while a run was active, from eframe.
    frame_cpu: Vec<f32>,
}

struct Window {
    app: App,
    screenshots: Option<Screenshots>,
}

impl eframe::App for Window {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        self.app.show(ui);
        if let Some(s) = &mut self.screenshots {
            if let (Some(cpu), true) = (frame.info().cpu_usage, self.app.run.active()) {
                s.frame_cpu.push(cpu);
            }
            let ctx = ui.ctx().clone();
            screenshot_step(&mut self.app, s, &ctx);
        }
    }
}

fn screenshot_step(app: &mut App, s: &mut Screenshots, ctx: &egui::Context) {
    if s.done {
        return;
    }
    // Repaint steadily but leave the CPU to the trainer (software GL under Xvfb is costly).
    ctx.request_repaint_after(std::time::Duration::from_millis(100));
    if s.waiting {
        let done = s.pending.lock().map(|mut p| p.take()).unwrap_or(None);
        match done {
            Some(Ok(p)) => println!("wrote {}", p.display()),
            Some(Err(e)) => eprintln!("screenshot: {e}"),
            None => return,
        }
        s.waiting = false;
        s.next += 1;
        s.frames_on_tab = 0;
        s.shown_at = std::time::Instant::now();
    }
    let Some(&(name, tab, concept_tab, dataset)) = SHOTS.get(s.next) else {
        print_frame_times("UI time per frame, last 240 frames", &app.frame_times);
        print_frame_times(
            "UI time per frame while training",
            &app.training_frame_times,
        );
        print_frame_times("whole frame (UI + rendering) while training", &s.frame_cpu);
        s.done = true;
        if app.run.active() {
            app.run.stop();
            app.close_when_stopped = true;
        } else {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        return;
    };
    app.tab = tab;
    // The concept window shows over the Concepts tab.
    match concept_tab {
        Some(t) if !app.config.concepts.is_empty() => {
            app.concepts.open.get_or_insert(0);
            app.concepts.tab = t;
            if t == ConceptTab::Augmentation && app.concepts.preview.is_none() {
                let base = app.base();
                app.concepts.update_preview(ctx, &app.config, 0, &base);
            }
        }
        _ => app.concepts.open = None,
    }
    match (dataset, app.config.concepts.first()) {
        (true, Some(c)) if !app.dataset.open => {
            app.dataset
                .open_folder(&crate::config::TrainConfig::path(&app.base(), &c.path));
        }
        (true, _) => {}
        (false, _) => app.dataset.open = false,
    }
    s.frames_on_tab += 1;
    // Let layout settle (combo widths, textures) before capturing; the Run tab waits (up to
    // about four minutes) for samples from a few epochs in, so they show what was learned.
    let latest = app.run.samples.values().map(|s| s.step).max().unwrap_or(0);
    let waiting_for_sample =
        tab == Tab::Run && app.run.active() && latest < 96 && s.frames_on_tab < 2400;
    let settling = s.shown_at.elapsed() < std::time::Duration::from_millis(500);
    if s.frames_on_tab < 8 || settling || waiting_for_sample {
        return;
    }
    let path = s.dir.join(format!("{name}.png"));
    let pending = s.pending.clone();
    s.waiting = true;
    ctx.request_screenshot(move |image| {
        let size = image.size;
        let rgba: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
        let saved = image::RgbaImage::from_raw(size[0] as u32, size[1] as u32, rgba)
            .ok_or_else(|| "the screenshot does not match its size".to_string())
            .and_then(|img| {
                let mut png = Vec::new();
                img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| e.to_string())?;
                crate::fsutil::write_atomic(&path, &png).map_err(|e| e.to_string())?;
                Ok(path)
            });
        if let Ok(mut p) = pending.lock() {
            *p = Some(saved);
        }
    });
}

fn print_frame_times(what: &str, times: &[f32]) {
    if times.is_empty() {
        return;
    }
    let mut sorted = times.to_vec();
    sorted.sort_by(f32::total_cmp);
    let ms = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize] * 1000.0;
    let mean = times.iter().sum::<f32>() / times.len() as f32 * 1000.0;
    println!(
        "frame time, {what}: {} frames, mean {mean:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        times.len(),
        ms(0.5),
        ms(0.95),
        ms(1.0)
    );
}

/// Opens the app window; with `screenshots`, captures every tab into that folder and closes
/// (with `start`, training starts first, so the Run tab and the frame times show a live run).
pub fn run(options: AppOptions, screenshots: Option<PathBuf>, start: bool) -> Result<(), String> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1180.0, 800.0])
            .with_title("Ferrite"),
        ..Default::default()
    };
    let mut app = App::new(options);
    let screenshots = screenshots.map(|dir| {
        app.show_frame_times = true;
        Screenshots {
            dir,
            next: 0,
            frames_on_tab: 0,
            shown_at: std::time::Instant::now(),
            pending: Default::default(),
            waiting: false,
            done: false,
            frame_cpu: Vec::new(),
        }
    });
    eframe::run_native(
        "Ferrite",
        native,
        Box::new(move |cc| {
            if start {
                app.start(&cc.egui_ctx);
            }
            Ok(Box::new(Window { app, screenshots }))
        }),
    )
    .map_err(|e| e.to_string())
}
