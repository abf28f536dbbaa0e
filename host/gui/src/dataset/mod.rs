//! The dataset window (OneTrainer's dataset tool): a folder's images in a list with thumbnails
//! and a filter; the chosen image with its mask over it; its caption edited in place (saved on
//! Enter or on leaving the image); the mask painted with a brush that adds or erases, filled,
//! cleared and undone (saved on Enter or on leaving the image); Up and Down move through the
//! list when no text is being typed; the whole folder captioned or masked with a plugin
//! ([`batch`]), with its progress and a Cancel.

mod batch;
mod canvas;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use eframe::egui::{self, Key, Ui};

use crate::config::TrainConfig;
use crate::plugins::ComponentInfo;
use crate::settings::Settings;

#[derive(Default)]
pub struct DatasetUi {
    pub open: bool,
    /// The folder as typed.
    pub folder: String,
    /// The folder whose images are listed.
    loaded: PathBuf,
    files: Vec<PathBuf>,
    pub filter: String,
    /// Index into `files`.
    pub current: Option<usize>,
    /// The first line of the current image's caption file, as edited; the other lines are kept.
    pub caption: String,
    caption_rest: Vec<String>,
    caption_dirty: bool,
    /// The caption file could not be read: it is shown, not edited (saving would lose it).
    caption_locked: bool,
    pub canvas: canvas::Canvas,
    thumbs: HashMap<PathBuf, Option<egui::TextureHandle>>,
    pub message: Option<String>,
    pub batch: batch::Batch,
}

/// The image list's width.
const LIST_WIDTH: f32 = 240.0;

/// Thumbnails made per frame, so that a large folder does not stall the window.
const THUMBS_PER_FRAME: usize = 4;

impl DatasetUi {
    /// Opens the window on `dir`.
    pub fn open_folder(&mut self, dir: &Path) {
        self.open = true;
        self.folder = dir.display().to_string();
        self.load_folder();
    }

    fn dir(&self) -> PathBuf {
        PathBuf::from(self.folder.trim())
    }

    fn load_folder(&mut self) {
        self.leave_image();
        self.thumbs.clear();
        self.current = None;
        self.loaded = self.dir();
        match crate::label::images(&self.loaded, false) {
            Ok(files) => {
                self.message = Some(format!("{} images", files.len()));
                self.files = files;
                if !self.files.is_empty() {
                    self.select(0);
                }
            }
            Err(e) => {
                self.files.clear();
                self.message = Some(e.to_string());
            }
        }
    }

    fn visible(&self) -> Vec<usize> {
        let f = self.filter.to_lowercase();
        (0..self.files.len())
            .filter(|&i| {
                f.is_empty()
                    || self.files[i]
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().to_lowercase().contains(&f))
            })
            .collect()
    }

    /// Saves what was edited on the image being left (or before the app closes).
    pub fn leave_image(&mut self) {
        if self.caption_dirty {
            self.save_caption();
        }
        if self.canvas.dirty {
            self.save_mask();
        }
    }

    fn select(&mut self, i: usize) {
        if self.current == Some(i) {
            return;
        }
        self.leave_image();
        self.current = Some(i);
        let path = self.files[i].clone();
        let caption_file = crate::caption::caption_path(&path);
        let text = match std::fs::read_to_string(&caption_file) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(format!(
                "{}: {e}; not editable here",
                caption_file.display()
            )),
        };
        self.caption_locked = text.is_err();
        let text = text.unwrap_or_else(|e| {
            self.message = Some(e);
            String::new()
        });
        let mut lines = text.lines().map(str::to_string);
        self.caption = lines.next().unwrap_or_default();
        self.caption_rest = lines.collect();
        self.caption_dirty = false;
        if let Err(e) = self.canvas.load(&path) {
            self.message = Some(e);
        }
    }

    fn current_path(&self) -> Option<&PathBuf> {
        self.current.and_then(|i| self.files.get(i))
    }

    pub fn save_caption(&mut self) {
        if self.caption_locked {
            return;
        }
        let Some(image) = self.current_path() else {
            return;
        };
        let path = crate::caption::caption_path(image);
        let mut lines = vec![self.caption.trim().to_string()];
        lines.extend(self.caption_rest.iter().cloned());
        self.message = Some(
            match crate::fsutil::write_atomic(&path, lines.join("\n").as_bytes()) {
                Ok(()) => format!("saved {}", path.display()),
                Err(e) => e.to_string(),
            },
        );
        self.caption_dirty = false;
    }

    pub fn save_mask(&mut self) {
        let Some(image) = self.current_path().cloned() else {
            return;
        };
        self.message = Some(match self.canvas.save(&image) {
            Ok(p) => format!("saved {}", p.display()),
            Err(e) => e,
        });
    }

    /// Makes a few more thumbnails of the visible images.
    fn make_thumbs(&mut self, ctx: &egui::Context, visible: &[usize]) {
        let missing: Vec<PathBuf> = visible
            .iter()
            .map(|&i| self.files[i].clone())
            .filter(|p| !self.thumbs.contains_key(p))
            .take(THUMBS_PER_FRAME)
            .collect();
        for p in missing {
            let t = crate::label::open_image(&p).ok().map(|img| {
                let small = img.thumbnail(48, 48).to_rgba8();
                let size = [small.width() as usize, small.height() as usize];
                ctx.load_texture(
                    format!("thumb {}", p.display()),
                    egui::ColorImage::from_rgba_unmultiplied(size, small.as_raw()),
                    egui::TextureOptions::LINEAR,
                )
            });
            self.thumbs.insert(p, t);
        }
    }

    /// The window, when open; `components` lists the captioners and maskers to offer.
    pub fn show(
        &mut self,
        ctx: &egui::Context,
        components: &[ComponentInfo],
        plugin_dirs: &[PathBuf],
        settings: &Settings,
        config: &TrainConfig,
        base: &Path,
    ) {
        if !self.open {
            return;
        }
        let mut open = true;
        egui::Window::new("Dataset")
            .open(&mut open)
            .default_size([960.0, 680.0])
            .show(ctx, |ui| {
                self.contents(ui, components, plugin_dirs, settings, config, base)
            });
        if !open {
            self.leave_image();
            self.open = false;
        }
    }

    fn contents(
        &mut self,
        ui: &mut Ui,
        components: &[ComponentInfo],
        plugin_dirs: &[PathBuf],
        settings: &Settings,
        config: &TrainConfig,
        base: &Path,
    ) {
        ui.horizontal(|ui| {
            let l = ui.label("Dataset folder");
            ui.add(egui::TextEdit::singleline(&mut self.folder).desired_width(360.0))
                .labelled_by(l.id);
            if ui.button("Open folder").clicked() {
                self.load_folder();
            }
            let l = ui.label("Filter");
            ui.add(egui::TextEdit::singleline(&mut self.filter).desired_width(140.0))
                .labelled_by(l.id);
        });
        if let Some(m) = &self.message {
            ui.label(m);
        }
        match self.batch.show(ui, components) {
            Some(batch::Event::Start(caption)) if !self.files.is_empty() => {
                // What was edited is written first; nothing is edited while it runs.
                self.leave_image();
                let run = batch::Run {
                    dir: self.loaded.clone(),
                    caption,
                    plugin_dirs: plugin_dirs.to_vec(),
                    settings: settings.clone(),
                    device: config.train_device.clone(),
                    base: base.to_path_buf(),
                };
                self.batch.start(ui.ctx(), run);
            }
            Some(batch::Event::Start(_)) => {
                self.message = Some("open a folder of images first".into());
            }
            Some(batch::Event::Finished) => {
                // The batch wrote captions or masks: show the current image anew.
                if let Some(i) = self.current.take() {
                    self.select(i);
                }
            }
            None => {}
        }
        ui.separator();
        let visible = self.visible();
        self.make_thumbs(ui.ctx(), &visible);
        let typing = ui.ctx().egui_wants_keyboard_input();
        if !typing && !self.batch.running() {
            let pos = self
                .current
                .and_then(|c| visible.iter().position(|&i| i == c));
            let step = ui.input(|i| {
                if i.key_pressed(Key::ArrowDown) {
                    1
                } else if i.key_pressed(Key::ArrowUp) {
                    -1
                } else {
                    0
                }
            });
            if step != 0 && !visible.is_empty() {
                let next = match pos {
                    Some(p) => (p as i64 + step).clamp(0, visible.len() as i64 - 1) as usize,
                    None => 0,
                };
                self.select(visible[next]);
            }
            if ui.input(|i| i.key_pressed(Key::Enter)) && self.canvas.dirty {
                self.save_mask();
            }
        }
        ui.horizontal_top(|ui| {
            egui::ScrollArea::vertical()
                .id_salt("dataset images")
                .max_width(LIST_WIDTH)
                .show(ui, |ui| {
                    // One image per row (the area would otherwise take the outer row's layout).
                    ui.set_width(LIST_WIDTH);
                    ui.vertical(|ui| {
                        for &i in &visible {
                            let name = self.files[i]
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            ui.horizontal(|ui| {
                                if let Some(Some(t)) = self.thumbs.get(&self.files[i]) {
                                    ui.add(egui::Image::new(t).max_size(egui::vec2(48.0, 48.0)));
                                }
                                if ui.selectable_label(self.current == Some(i), name).clicked() {
                                    self.select(i);
                                }
                            });
                        }
                    });
                });
            let editable = !self.batch.running();
            ui.add_enabled_ui(editable, |ui| ui.vertical(|ui| self.editor(ui)));
        });
    }

    fn editor(&mut self, ui: &mut Ui) {
        if self.current.is_none() {
            ui.label("No image: open a folder of images.");
            return;
        }
        let l = ui.label("Caption");
        let edit = ui
            .add_enabled(
                !self.caption_locked,
                egui::TextEdit::singleline(&mut self.caption).desired_width(600.0),
            )
            .labelled_by(l.id);
        if edit.changed() {
            self.caption_dirty = true;
        }
        if edit.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
            self.save_caption();
        }
        ui.horizontal(|ui| {
            let l = ui.label("Brush size");
            ui.add(egui::Slider::new(&mut self.canvas.brush, 1.0..=200.0))
                .labelled_by(l.id);
            ui.checkbox(&mut self.canvas.erase, "Erase");
            if ui.button("Fill mask").clicked() {
                self.canvas.fill(255);
            }
            if ui.button("Clear mask").clicked() {
                self.canvas.fill(0);
            }
            if ui
                .add_enabled(self.canvas.can_undo(), egui::Button::new("Undo"))
                .clicked()
            {
                self.canvas.undo();
            }
            if ui.button("Save mask").clicked() {
                self.save_mask();
            }
        });
        self.canvas.show(ui);
    }
}
