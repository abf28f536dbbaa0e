//! The Concepts tab: the concept list (add, duplicate, delete, enable), concept sets saved to and
//! loaded from their own TOML files, and a window per concept with its General, Image
//! augmentation and Text options, an augmented preview of one image, and statistics (images,
//! captions found, bucket histogram, thumbnails with captions).

use std::collections::BTreeMap;
use std::path::Path;

use eframe::egui::{self, Ui};
use rand::Rng;

use super::form::Fields;
use crate::config::{ConceptConfig, ConceptType, TrainConfig, VariantArray};
use crate::data::{self, Dataset, buckets::Buckets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConceptTab {
    #[default]
    General,
    Augmentation,
    Text,
    Statistics,
}

/// What a scan of one concept found.
pub struct Stats {
    pub images: usize,
    pub captioned: usize,
    pub problems: Vec<String>,
    /// Bucket (w, h) → images.
    pub buckets: BTreeMap<(usize, usize), usize>,
    pub thumbnails: Vec<(egui::TextureHandle, String)>,
}

#[derive(Default)]
pub struct ConceptsUi {
    /// The concept whose window is open.
    pub open: Option<usize>,
    pub tab: ConceptTab,
    pub preview: Option<egui::TextureHandle>,
    pub preview_error: Option<String>,
    pub stats: Option<Stats>,
    /// A concept set file (concepts only) to save to or load from.
    pub set_path: String,
    pub message: Option<String>,
    /// A concept's folder to open in the dataset window (the app takes it).
    pub open_dataset: Option<std::path::PathBuf>,
}

/// The concepts of a set file: `[[concepts]]` tables.
#[derive(serde::Serialize, serde::Deserialize)]
struct ConceptSet {
    concepts: Vec<ConceptConfig>,
}

impl ConceptsUi {
    pub fn show(&mut self, ui: &mut Ui, config: &mut TrainConfig, base: &Path, f: &mut Fields) {
        ui.horizontal(|ui| {
            if ui.button("Add concept").clicked() {
                config.concepts.push(ConceptConfig {
                    name: format!("concept {}", config.concepts.len() + 1),
                    ..ConceptConfig::default()
                });
                self.open_window(config.concepts.len() - 1);
            }
            ui.separator();
            let label = ui.label("Concept set file");
            ui.add(egui::TextEdit::singleline(&mut self.set_path).desired_width(260.0))
                .labelled_by(label.id);
            if ui.button("Save set").clicked() {
                self.message = Some(self.save_set(config, base));
            }
            if ui.button("Load set").clicked() {
                self.message = Some(self.load_set(config, base));
            }
        });
        if let Some(m) = &self.message {
            ui.label(m);
        }
        ui.separator();
        let mut action = None;
        egui::Grid::new("concept list")
            .num_columns(6)
            .striped(true)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                for h in ["Enabled", "Name", "Type", "Path", "", ""] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, c) in config.concepts.iter_mut().enumerate() {
                    let name = display_name(i, &c.name);
                    ui.checkbox(&mut c.enabled, "")
                        .on_hover_text(f.help.get("concepts.enabled"));
                    ui.label(&name);
                    ui.label(c.kind.as_ref());
                    let problem = f.problems.get(&format!("concepts[{i}].path"));
                    ui.label(if c.path.is_empty() {
                        "(no folder)"
                    } else {
                        &c.path
                    })
                    .on_hover_text(problem.map_or("", String::as_str));
                    if ui.button(format!("Edit {name}")).clicked() {
                        action = Some(("edit", i));
                    }
                    ui.horizontal(|ui| {
                        if ui.button(format!("Duplicate {name}")).clicked() {
                            action = Some(("duplicate", i));
                        }
                        if ui.button(format!("Delete {name}")).clicked() {
                            action = Some(("delete", i));
                        }
                        if ui.button(format!("Captions and masks of {name}")).clicked() {
                            action = Some(("dataset", i));
                        }
                    });
                    ui.end_row();
                }
            });
        match action {
            Some(("edit", i)) => self.open_window(i),
            Some(("duplicate", i)) => {
                let mut c = config.concepts[i].clone();
                c.name = format!("{} (copy)", c.name);
                config.concepts.insert(i + 1, c);
            }
            Some(("delete", i)) => {
                config.concepts.remove(i);
                self.open = None;
            }
            Some(("dataset", i)) => {
                self.open_dataset = Some(TrainConfig::path(base, &config.concepts[i].path));
            }
            _ => {}
        }
        if config.concepts.is_empty() {
            ui.label("No concepts: add one and point it at a folder of images with .txt captions.");
        }
        self.window(ui, config, base, f);
    }

    fn open_window(&mut self, i: usize) {
        self.open = Some(i);
        self.tab = ConceptTab::General;
        self.preview = None;
        self.preview_error = None;
        self.stats = None;
    }

    fn save_set(&self, config: &TrainConfig, base: &Path) -> String {
        let path = TrainConfig::path(base, &self.set_path);
        let set = ConceptSet {
            concepts: config.concepts.clone(),
        };
        match toml::to_string_pretty(&set)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                crate::fsutil::write_atomic(&path, t.as_bytes()).map_err(|e| e.to_string())
            }) {
            Ok(()) => format!(
                "saved {} concepts to {}",
                set.concepts.len(),
                path.display()
            ),
            Err(e) => format!("could not save the set: {e}"),
        }
    }

    fn load_set(&mut self, config: &mut TrainConfig, base: &Path) -> String {
        let path = TrainConfig::path(base, &self.set_path);
        let read = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<ConceptSet>(&t).map_err(|e| e.to_string()));
        match read {
            Ok(set) => {
                config.concepts = set.concepts;
                self.open = None;
                format!(
                    "loaded {} concepts from {}",
                    config.concepts.len(),
                    path.display()
                )
            }
            Err(e) => format!("{}: {e}", path.display()),
        }
    }

    fn window(&mut self, ui: &mut Ui, config: &mut TrainConfig, base: &Path, f: &mut Fields) {
        let Some(i) = self.open.filter(|&i| i < config.concepts.len()) else {
            self.open = None;
            return;
        };
        let mut open = true;
        let title = format!("Concept: {}", display_name(i, &config.concepts[i].name));
        egui::Window::new(title)
            .id(egui::Id::unique("concept window"))
            .open(&mut open)
            .default_width(600.0)
            .max_width(720.0)
            .default_height(560.0)
            .default_pos(egui::pos2(440.0, 110.0))
            .show(ui.ctx(), |ui| {
                ui.horizontal(|ui| {
                    for (t, name) in [
                        (ConceptTab::General, "General"),
                        (ConceptTab::Augmentation, "Image augmentation"),
                        (ConceptTab::Text, "Text"),
                        (ConceptTab::Statistics, "Statistics"),
                    ] {
                        ui.selectable_value(&mut self.tab, t, name);
                    }
                });
                ui.separator();
                let k = |name: &str| format!("concepts[{i}].{name}");
                egui::ScrollArea::vertical().show(ui, |ui| match self.tab {
                    ConceptTab::General => {
                        let c = &mut config.concepts[i];
                        f.grid(ui, "concept general", |f, ui| {
                            f.text(ui, &k("name"), &mut c.name);
                            f.check(ui, &k("enabled"), &mut c.enabled);
                            f.choice(ui, &k("type"), &mut c.kind);
                            f.path(ui, &k("path"), &mut c.path, true);
                            f.choice(ui, &k("prompt_source"), &mut c.prompt_source);
                            f.path(ui, &k("text_file"), &mut c.text_file, false);
                            f.check(
                                ui,
                                &k("include_subdirectories"),
                                &mut c.include_subdirectories,
                            );
                            f.num(ui, &k("image_variations"), &mut c.image_variations);
                            f.num(ui, &k("text_variations"), &mut c.text_variations);
                            f.num(ui, &k("balancing"), &mut c.balancing);
                            f.choice(ui, &k("balancing_strategy"), &mut c.balancing_strategy);
                            f.num(ui, &k("loss_weight"), &mut c.loss_weight);
                        });
                    }
                    ConceptTab::Augmentation => {
                        ui.horizontal_top(|ui| {
                            let c = &mut config.concepts[i];
                            ui.vertical(|ui| {
                                f.grid(ui, "concept augmentation", |f, ui| {
                                    f.check(
                                        ui,
                                        &k("enable_crop_jitter"),
                                        &mut c.enable_crop_jitter,
                                    );
                                    f.check(
                                        ui,
                                        &k("enable_random_flip"),
                                        &mut c.enable_random_flip,
                                    );
                                    f.check(ui, &k("enable_fixed_flip"), &mut c.enable_fixed_flip);
                                    f.check(
                                        ui,
                                        &k("enable_random_rotate"),
                                        &mut c.enable_random_rotate,
                                    );
                                    f.check(
                                        ui,
                                        &k("enable_fixed_rotate"),
                                        &mut c.enable_fixed_rotate,
                                    );
                                    f.num(
                                        ui,
                                        &k("random_rotate_max_angle"),
                                        &mut c.random_rotate_max_angle,
                                    );
                                    for (r, fx, s, name) in [
                                        (
                                            &mut c.enable_random_brightness,
                                            &mut c.enable_fixed_brightness,
                                            &mut c.random_brightness_max_strength,
                                            "brightness",
                                        ),
                                        (
                                            &mut c.enable_random_contrast,
                                            &mut c.enable_fixed_contrast,
                                            &mut c.random_contrast_max_strength,
                                            "contrast",
                                        ),
                                        (
                                            &mut c.enable_random_saturation,
                                            &mut c.enable_fixed_saturation,
                                            &mut c.random_saturation_max_strength,
                                            "saturation",
                                        ),
                                        (
                                            &mut c.enable_random_hue,
                                            &mut c.enable_fixed_hue,
                                            &mut c.random_hue_max_strength,
                                            "hue",
                                        ),
                                    ] {
                                        f.check(ui, &k(&format!("enable_random_{name}")), r);
                                        f.check(ui, &k(&format!("enable_fixed_{name}")), fx);
                                        f.num(ui, &k(&format!("random_{name}_max_strength")), s);
                                    }
                                })
                            });
                            ui.vertical(|ui| {
                                if ui.button("Update preview").clicked() {
                                    self.update_preview(ui.ctx(), config, i, base);
                                }
                                if let Some(e) = &self.preview_error {
                                    ui.label(e);
                                }
                                if let Some(t) = &self.preview {
                                    ui.label("One image, augmented as for training");
                                    let size = egui::vec2(200.0, 200.0);
                                    ui.add(egui::Image::new(t).fit_to_exact_size(size));
                                }
                            });
                        });
                    }
                    ConceptTab::Text => {
                        let c = &mut config.concepts[i];
                        f.grid(ui, "concept text", |f, ui| {
                            f.check(ui, &k("enable_tag_shuffling"), &mut c.enable_tag_shuffling);
                            f.text(ui, &k("tag_delimiter"), &mut c.tag_delimiter);
                            f.num(ui, &k("keep_tags_count"), &mut c.keep_tags_count);
                            f.check(ui, &k("tag_dropout_enable"), &mut c.tag_dropout_enable);
                            f.num(
                                ui,
                                &k("tag_dropout_probability"),
                                &mut c.tag_dropout_probability,
                            );
                            f.check(
                                ui,
                                &k("caps_randomize_enable"),
                                &mut c.caps_randomize_enable,
                            );
                            f.text(ui, &k("caps_randomize_mode"), &mut c.caps_randomize_mode);
                            f.num(
                                ui,
                                &k("caps_randomize_probability"),
                                &mut c.caps_randomize_probability,
                            );
                            f.check(
                                ui,
                                &k("caps_randomize_lowercase"),
                                &mut c.caps_randomize_lowercase,
                            );
                        });
                    }
                    ConceptTab::Statistics => {
                        if ui.button("Refresh statistics").clicked() || self.stats.is_none() {
                            self.stats = Some(statistics(ui.ctx(), config, i, base));
                        }
                        if let Some(s) = &self.stats {
                            show_stats(ui, s);
                        }
                    }
                });
            });
        if !open {
            self.open = None;
        }
    }

    /// One image of the concept prepared as for training, with fresh random draws.
    pub fn update_preview(
        &mut self,
        ctx: &egui::Context,
        config: &TrainConfig,
        i: usize,
        base: &Path,
    ) {
        // One image picked from the folder listing: nothing else is read.
        let paths = data::concept_images(&config.concepts[i], base).unwrap_or_default();
        let mut r = data::rng(rand::rng().random(), 0, 0);
        let Some(path) = paths.get(r.random_range(0..paths.len().max(1))) else {
            self.preview_error = Some("no images in this concept's folder".into());
            return;
        };
        let item = match data::preview_item(path) {
            Ok(item) => item,
            Err(e) => {
                self.preview_error = Some(e);
                return;
            }
        };
        let res = config
            .resolutions()
            .ok()
            .and_then(|r| r.first().copied())
            .unwrap_or((512, 512));
        let bucket = Buckets::new(res, 8, config.aspect_ratio_bucketing)
            .nearest(item.width as usize, item.height as usize);
        match data::prepare(&item, &config.concepts[i], bucket, &mut r) {
            Ok(p) => {
                let (w, h) = bucket;
                let img = egui::ColorImage::from_rgb([w, h], &data::rgb_bytes(&p.pixels, w, h));
                self.preview =
                    Some(ctx.load_texture("concept preview", img, egui::TextureOptions::NEAREST));
                self.preview_error = None;
            }
            Err(e) => self.preview_error = Some(e),
        }
    }
}

/// The concept's name, or "concept N" when it has none.
fn display_name(i: usize, name: &str) -> String {
    if name.trim().is_empty() {
        format!("concept {}", i + 1)
    } else {
        name.to_string()
    }
}

/// The config with concept `i` alone (enabled), for scanning it.
fn only_concept(config: &TrainConfig, i: usize) -> TrainConfig {
    TrainConfig {
        concepts: vec![ConceptConfig {
            enabled: true,
            ..config.concepts[i].clone()
        }],
        ..config.clone()
    }
}

fn statistics(ctx: &egui::Context, config: &TrainConfig, i: usize, base: &Path) -> Stats {
    let only = only_concept(config, i);
    let d = Dataset::scan(&only, base, ConceptType::VARIANTS);
    let res = config
        .resolutions()
        .ok()
        .and_then(|r| r.first().copied())
        .unwrap_or((512, 512));
    let buckets = Buckets::new(res, 8, config.aspect_ratio_bucketing);
    let mut hist = BTreeMap::new();
    for it in &d.items {
        *hist
            .entry(buckets.nearest(it.width as usize, it.height as usize))
            .or_insert(0) += 1;
    }
    let thumbnails = d
        .items
        .iter()
        .take(12)
        .filter_map(|it| {
            let img = image::open(&it.path).ok()?.thumbnail(96, 96).to_rgba8();
            let size = [img.width() as usize, img.height() as usize];
            let color = egui::ColorImage::from_rgba_unmultiplied(size, img.as_raw());
            let t = ctx.load_texture(it.path.display().to_string(), color, Default::default());
            Some((t, it.captions.first().cloned().unwrap_or_default()))
        })
        .collect();
    Stats {
        images: d.items.len(),
        captioned: d
            .items
            .iter()
            .filter(|it| it.captions.iter().any(|c| !c.is_empty()))
            .count(),
        problems: d.problems,
        buckets: hist,
        thumbnails,
    }
}

fn show_stats(ui: &mut Ui, s: &Stats) {
    ui.label(format!("Images: {}", s.images));
    ui.label(format!("Captions found: {}", s.captioned));
    ui.label("Buckets (width × height: images)");
    for ((w, h), n) in &s.buckets {
        ui.horizontal(|ui| {
            ui.label(format!("{w}×{h}"));
            let frac = *n as f32 / s.images.max(1) as f32;
            ui.add(
                egui::ProgressBar::new(frac)
                    .text(n.to_string())
                    .desired_width(200.0),
            );
        });
    }
    for p in &s.problems {
        ui.label(egui::RichText::new(p).color(egui::Color32::from_rgb(230, 150, 60)));
    }
    // Six to a row keeps the window narrow.
    egui::Grid::new("thumbnails").show(ui, |ui| {
        for (k, (t, caption)) in s.thumbnails.iter().enumerate() {
            ui.vertical(|ui| {
                ui.set_width(96.0);
                ui.add(egui::Image::new(t).max_size(egui::vec2(80.0, 80.0)));
                ui.small(caption);
            });
            if k % 6 == 5 {
                ui.end_row();
            }
        }
    });
}
