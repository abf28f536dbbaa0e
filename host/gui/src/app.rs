//! The app: a top bar (preset, model type, training method, config file, workspace), tabs laid
//! out as OneTrainer's, and a bottom bar to start, pause, stop, sample and back up. It edits the
//! same `TrainConfig` that `ferrite train` reads and runs the same trainer.

use std::path::{Path, PathBuf};

use eframe::egui::{self, Color32, RichText, Ui};
use ferrite_plugin_api::abi::ComponentKind;

use super::concepts::ConceptsUi;
use super::form::{Fields, FormState, Help, problems_by_key};
use super::run::{Phase, RunView};
use super::tools::Tools;
use crate::config::{
    EmbeddingConfig, OutputFormat, SampleConfig, TimeUnit, TrainConfig, TrainingMethod,
    preset_names,
};
use crate::plugins::{ComponentInfo, LoadProblem, Registry};
use crate::settings::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    General,
    Model,
    Data,
    Concepts,
    Training,
    Sampling,
    Backup,
    Lora,
    Embedding,
    Tools,
    Plugins,
    Run,
}

impl Tab {
    pub const ALL: [Tab; 12] = [
        Tab::General,
        Tab::Model,
        Tab::Data,
        Tab::Concepts,
        Tab::Training,
        Tab::Sampling,
        Tab::Backup,
        Tab::Lora,
        Tab::Embedding,
        Tab::Tools,
        Tab::Plugins,
        Tab::Run,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tab::General => "General",
            Tab::Model => "Model",
            Tab::Data => "Data",
            Tab::Concepts => "Concepts",
            Tab::Training => "Training",
            Tab::Sampling => "Sampling",
            Tab::Backup => "Backup",
            Tab::Lora => "LoRA",
            Tab::Embedding => "Embedding",
            Tab::Tools => "Tools",
            Tab::Plugins => "Plugins",
            Tab::Run => "Run",
        }
    }
}

/// Where the app finds plugins and keeps its settings.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// Plugin search folders (the CLI's by default).
    pub plugin_dirs: Vec<PathBuf>,
    /// The settings file (enabled plugins); None: the default location.
    pub settings_path: Option<PathBuf>,
    /// A config to open.
    pub config: Option<PathBuf>,
    /// The `ferrite` executable the Tools tab runs the CLI's tools with; None: this process's
    /// own (the app is `ferrite gui`).
    pub ferrite_bin: Option<PathBuf>,
}

pub struct App {
    pub config: TrainConfig,
    /// The config file typed in the top bar (load and save use it).
    pub config_path: String,
    pub tab: Tab,
    form: FormState,
    help: Help,
    presets: Vec<String>,
    preset: String,
    options: AppOptions,
    settings: Settings,
    components: Vec<ComponentInfo>,
    load_problems: Vec<LoadProblem>,
    pub concepts: ConceptsUi,
    tools: Tools,
    /// The dataset window (captions and masks), opened from a concept or the Tools tab.
    pub dataset: super::dataset::DatasetUi,
    pub run: RunView,
    /// A message in the bottom bar (saved, loaded, why Start was refused).
    pub status: Option<(bool, String)>,
    /// Closing was asked while training: the confirmation is showing.
    confirm_close: bool,
    /// Close once the stopped run has finished writing its backup.
    pub close_when_stopped: bool,
    /// Recent frame times: seconds spent building each frame's UI, for the overlay.
    pub frame_times: Vec<f32>,
    /// Frame times while a run was active (screenshot mode prints them).
    pub training_frame_times: Vec<f32>,
    pub show_frame_times: bool,
}

impl App {
    pub fn new(options: AppOptions) -> Self {
        let settings = options
            .settings_path
            .clone()
            .or_else(|| Settings::default_path().ok())
            .and_then(|p| Settings::load(&p).ok())
            .unwrap_or_default();
        let presets = preset_names();
        let mut app = Self {
            config: TrainConfig::default(),
            config_path: String::new(),
            tab: Tab::General,
            form: FormState::default(),
            help: Help::new(),
            presets,
            preset: String::new(),
            options,
            settings,
            components: Vec::new(),
            load_problems: Vec::new(),
            concepts: ConceptsUi::default(),
            tools: Tools::default(),
            dataset: Default::default(),
            run: RunView::default(),
            status: None,
            confirm_close: false,
            close_when_stopped: false,
            frame_times: Vec::new(),
            training_frame_times: Vec::new(),
            show_frame_times: false,
        };
        app.discover_plugins();
        if let Some(p) = app.options.config.clone() {
            app.config_path = p.display().to_string();
            app.load_config();
        }
        app
    }

    fn registry(&self) -> Registry {
        Registry::discover(&self.options.plugin_dirs, &self.settings)
    }

    fn discover_plugins(&mut self) {
        let r = self.registry();
        self.components = r.components().to_vec();
        self.load_problems = r.problems.clone();
    }

    fn ids(&self, kind: ComponentKind) -> Vec<String> {
        self.components
            .iter()
            .filter(|c| c.kind == kind && c.enabled)
            .map(|c| c.id.clone())
            .collect()
    }

    /// The folder relative paths of the config start from.
    pub fn base(&self) -> PathBuf {
        Path::new(&self.config_path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn set_status(&mut self, ok: bool, text: impl Into<String>) {
        self.status = Some((ok, text.into()));
    }

    pub fn load_config(&mut self) {
        let path = PathBuf::from(&self.config_path);
        match TrainConfig::load_unchecked(Some(&path), None, &[]) {
            Ok(c) => {
                self.config = c;
                self.form.reset();
                self.set_status(true, format!("loaded {}", path.display()));
            }
            Err(e) => self.set_status(false, e.to_string()),
        }
    }

    /// An imported OneTrainer config replaces the editor's, to be saved beside its JSON.
    fn use_imported(&mut self, config: TrainConfig, path: PathBuf) {
        self.config = config;
        self.form.reset();
        self.config_path = path.display().to_string();
        self.set_status(
            true,
            format!(
                "imported a OneTrainer config: check it, then Save ({}); the Tools tab lists what \
                 was not imported",
                path.display()
            ),
        );
    }

    pub fn save_config(&mut self) {
        let path = PathBuf::from(&self.config_path);
        if self.config_path.trim().is_empty() {
            self.set_status(false, "type a file name for the config first");
            return;
        }
        match crate::fsutil::write_atomic(&path, self.config.to_toml().as_bytes()) {
            Ok(()) => self.set_status(true, format!("saved {}", path.display())),
            Err(e) => self.set_status(false, e.to_string()),
        }
    }

    fn apply_preset(&mut self, name: &str) {
        match TrainConfig::load_unchecked(None, Some(name), &[]) {
            Ok(c) => {
                self.config = c;
                self.form.reset();
                self.preset = name.to_string();
                self.set_status(true, format!("preset {name} loaded over the defaults"));
            }
            Err(e) => self.set_status(false, e.to_string()),
        }
    }

    /// Validation problems, and numbers that did not parse.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.config.validate() {
            Ok(()) => Vec::new(),
            Err(crate::config::ConfigError::Invalid(v)) => v,
            Err(e) => vec![e.to_string()],
        };
        out.extend(self.form.parse_errors().map(|(k, m)| format!("{k}: {m}")));
        out
    }

    pub fn start(&mut self, ctx: &egui::Context) {
        let mut problems = self.problems();
        // The adapter's and optimizer's options against their plugins' schemas (needs the
        // plugins, so checked here rather than every frame).
        let registry = self.registry();
        if problems.is_empty()
            && let Err(e) = self.config.validate_plugin_options(&registry)
        {
            problems = match e {
                crate::config::ConfigError::Invalid(v) => v,
                e => vec![e.to_string()],
            };
        }
        if !problems.is_empty() {
            self.set_status(false, format!("Start refused: {}", problems.join("; ")));
            return;
        }
        self.set_status(true, "training started");
        self.tab = Tab::Run;
        self.run
            .start(ctx, self.config.clone(), self.base(), registry);
    }

    /// The whole app in `ui` (eframe's window, or a test harness).
    pub fn show(&mut self, ui: &mut Ui) {
        let began = std::time::Instant::now();
        self.show_inner(ui);
        let dt = began.elapsed().as_secs_f32();
        self.frame_times.push(dt);
        if self.frame_times.len() > 240 {
            self.frame_times.remove(0);
        }
        if self.run.active() {
            self.training_frame_times.push(dt);
        }
    }

    fn show_inner(&mut self, ui: &mut Ui) {
        let ctx = ui.ctx().clone();
        self.run.poll(&ctx);
        if self.run.active() {
            // Keep the progress moving even without input.
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
        self.handle_close(&ctx);
        let problems = self.problems();
        let by_key = problems_by_key(&problems);

        egui::Panel::top("top bar").show(ui, |ui| self.top_bar(ui));
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                for t in Tab::ALL {
                    if t == Tab::Lora && self.config.training_method != TrainingMethod::Lora {
                        continue;
                    }
                    ui.selectable_value(&mut self.tab, t, t.name());
                }
            });
        });
        egui::Panel::bottom("controls").show(ui, |ui| self.bottom_bar(ui, &ctx, &problems));
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| self.tab_content(ui, &by_key));
        });
        if let Some(dir) = self
            .concepts
            .open_dataset
            .take()
            .or_else(|| self.tools.open_dataset.take())
        {
            self.dataset.open_folder(&dir);
        }
        let base = self.base();
        self.dataset.show(
            &ctx,
            &self.components,
            &self.options.plugin_dirs,
            &self.settings,
            &self.config,
            &base,
        );
        if self.show_frame_times {
            self.frame_overlay(&ctx);
        }
        self.close_dialog(&ctx);
    }

    fn top_bar(&mut self, ui: &mut Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("Ferrite");
            ui.separator();
            let label = ui.label("Preset");
            let mut picked = None;
            egui::ComboBox::from_id_salt("preset")
                .selected_text(if self.preset.is_empty() {
                    "choose…"
                } else {
                    &self.preset
                })
                .show_ui(ui, |ui| {
                    for p in &self.presets {
                        if ui.selectable_label(self.preset == *p, p).clicked() {
                            picked = Some(p.clone());
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            if let Some(p) = picked {
                self.apply_preset(&p);
            }
            let label = ui.label("Model type");
            let archs = self.ids(ComponentKind::Architecture);
            egui::ComboBox::from_id_salt("model type")
                .selected_text(&self.config.model_type)
                .show_ui(ui, |ui| {
                    for a in &archs {
                        ui.selectable_value(&mut self.config.model_type, a.clone(), a);
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("Training method");
            egui::ComboBox::from_id_salt("training method")
                .selected_text(match self.config.training_method {
                    TrainingMethod::Lora => "LoRA",
                    TrainingMethod::FineTune => "Fine tune",
                    TrainingMethod::Embedding => "Embedding",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(
                        &mut self.config.training_method,
                        TrainingMethod::Lora,
                        "LoRA",
                    );
                    ui.selectable_value(
                        &mut self.config.training_method,
                        TrainingMethod::FineTune,
                        "Fine tune",
                    );
                    ui.selectable_value(
                        &mut self.config.training_method,
                        TrainingMethod::Embedding,
                        "Embedding",
                    );
                })
                .response
                .labelled_by(label.id);
            ui.separator();
            let label = ui.label("Config file");
            ui.add(egui::TextEdit::singleline(&mut self.config_path).desired_width(220.0))
                .labelled_by(label.id);
            if ui
                .button("…")
                .on_hover_text("Browse for a config")
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("TOML", &["toml"])
                    .pick_file()
            {
                self.config_path = p.display().to_string();
            }
            if ui.button("Load").clicked() {
                self.load_config();
            }
            if ui.button("Save").clicked() {
                self.save_config();
            }
            if ui
                .button("Import OneTrainer config…")
                .on_hover_text("A OneTrainer JSON config into the editor; its report in Tools")
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("OneTrainer config", &["json"])
                    .pick_file()
            {
                self.tools.import.json = p.display().to_string();
                if let Some((config, path)) = self.tools.import.run(&self.base()) {
                    self.use_imported(config, path);
                }
                self.tab = Tab::Tools;
            }
            ui.separator();
            ui.label(format!("Workspace: {}", self.config.workspace_dir));
            ui.checkbox(&mut self.show_frame_times, "Frame time");
        });
    }

    fn bottom_bar(&mut self, ui: &mut Ui, ctx: &egui::Context, problems: &[String]) {
        ui.horizontal_wrapped(|ui| {
            let active = self.run.active();
            if ui
                .add_enabled(!active, egui::Button::new("Start training"))
                .on_hover_text(if problems.is_empty() {
                    "Start with this config".to_string()
                } else {
                    format!("{} problem(s) to fix first", problems.len())
                })
                .clicked()
            {
                self.start(ctx);
            }
            let paused = self.run.phase == Phase::Paused;
            if ui
                .add_enabled(active && !paused, egui::Button::new("Pause"))
                .clicked()
            {
                self.run.pause(true);
            }
            if ui
                .add_enabled(paused, egui::Button::new("Resume"))
                .clicked()
            {
                self.run.pause(false);
            }
            if ui.add_enabled(active, egui::Button::new("Stop")).clicked() {
                self.run.stop();
            }
            if ui
                .add_enabled(active, egui::Button::new("Sample now"))
                .clicked()
            {
                self.run.sample_now();
            }
            if ui
                .add_enabled(active, egui::Button::new("Backup now"))
                .clicked()
            {
                self.run.backup_now();
            }
            ui.separator();
            if !active && !problems.is_empty() {
                ui.label(
                    RichText::new(format!(
                        "{} problem(s) to fix before starting (marked at the fields)",
                        problems.len()
                    ))
                    .color(Color32::from_rgb(230, 150, 60)),
                )
                .on_hover_text(problems.join("\n"));
            }
            ui.label(format!("{:?}", self.run.phase).to_lowercase());
            if self.run.phase != Phase::Idle {
                ui.label(self.run.progress_text());
            }
        });
        if let Some((ok, text)) = &self.status {
            let colour = if *ok {
                ui.visuals().text_color()
            } else {
                Color32::from_rgb(230, 90, 70)
            };
            ui.label(RichText::new(text).color(colour));
        }
    }

    fn tab_content(&mut self, ui: &mut Ui, problems: &std::collections::HashMap<String, String>) {
        let base = self.base();
        let archs = self.ids(ComponentKind::Architecture);
        let adapters = self.ids(ComponentKind::Adapter);
        let optimizers: Vec<ComponentInfo> = self
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::Optimizer && c.enabled)
            .cloned()
            .collect();
        let adapter = self
            .components
            .iter()
            .find(|i| {
                i.kind == ComponentKind::Adapter && i.enabled && i.id == self.config.peft_type
            })
            .cloned();
        let mut f = Fields {
            state: &mut self.form,
            problems,
            help: &self.help,
        };
        let c = &mut self.config;
        match self.tab {
            Tab::General => f.grid(ui, "general", |f, ui| {
                f.path(ui, "workspace_dir", &mut c.workspace_dir, true);
                f.path(ui, "cache_dir", &mut c.cache_dir, true);
                f.check(ui, "continue_last_backup", &mut c.continue_last_backup);
                f.check(ui, "tensorboard", &mut c.tensorboard);
                f.check(ui, "validation", &mut c.validation);
                f.every(
                    ui,
                    "validate_after",
                    &mut c.validate_after,
                    &mut c.validate_after_unit,
                );
                f.text(ui, "train_device", &mut c.train_device);
                f.check(ui, "multi_gpu", &mut c.multi_gpu);
                if c.multi_gpu {
                    f.text(ui, "device_indexes", &mut c.device_indexes);
                }
                f.num(ui, "dataloader_threads", &mut c.dataloader_threads);
                f.num(ui, "seed", &mut c.seed);
                f.check(ui, "debug_mode", &mut c.debug_mode);
                f.path(ui, "debug_dir", &mut c.debug_dir, true);
                f.every(
                    ui,
                    "debug_after",
                    &mut c.debug_after,
                    &mut c.debug_after_unit,
                );
            }),
            Tab::Model => {
                f.grid(ui, "model", |f, ui| {
                    let archs: Vec<&str> = archs.iter().map(String::as_str).collect();
                    f.choice_id(ui, "model_type", &mut c.model_type, &archs);
                    f.path(ui, "base_model_name", &mut c.base_model_name, false);
                    f.path(ui, "base_model_config", &mut c.base_model_config, true);
                    f.path(
                        ui,
                        "output_model_destination",
                        &mut c.output_model_destination,
                        false,
                    );
                    f.choice_of(
                        ui,
                        "output_model_format",
                        &mut c.output_model_format,
                        OutputFormat::allowed(c.training_method),
                    );
                    f.choice(ui, "output_dtype", &mut c.output_dtype);
                    f.check(ui, "force_v_prediction", &mut c.force_v_prediction);
                    f.check(
                        ui,
                        "force_epsilon_prediction",
                        &mut c.force_epsilon_prediction,
                    );
                    f.num(
                        ui,
                        "text_encoder_layer_skip",
                        &mut c.text_encoder_layer_skip,
                    );
                });
                // OneTrainer's part tables; a model uses those of its parts.
                for (part, title, pc) in [
                    ("unet", "UNet", &mut c.unet),
                    ("text_encoder", "Text encoder", &mut c.text_encoder),
                    ("text_encoder_2", "Text encoder 2", &mut c.text_encoder_2),
                    ("transformer", "Transformer (Flux)", &mut c.transformer),
                ] {
                    ui.separator();
                    ui.strong(title);
                    f.grid(ui, part, |f, ui| {
                        f.path(ui, &format!("{part}.model_name"), &mut pc.model_name, false);
                        f.check(ui, &format!("{part}.train"), &mut pc.train);
                        f.opt_num(ui, &format!("{part}.learning_rate"), &mut pc.learning_rate);
                        f.num(
                            ui,
                            &format!("{part}.stop_training_after"),
                            &mut pc.stop_training_after,
                        );
                        f.choice_of(
                            ui,
                            &format!("{part}.stop_training_after_unit"),
                            &mut pc.stop_training_after_unit,
                            TimeUnit::STOPS,
                        );
                        f.choice(ui, &format!("{part}.weight_dtype"), &mut pc.weight_dtype);
                        if part == "text_encoder" {
                            f.num(
                                ui,
                                "text_encoder.dropout_probability",
                                &mut pc.dropout_probability,
                            );
                        }
                        if part == "transformer" {
                            f.num(ui, "transformer.guidance_scale", &mut pc.guidance_scale);
                        }
                    });
                }
                ui.separator();
                ui.strong("VAE");
                f.grid(ui, "vae", |f, ui| {
                    f.path(ui, "vae.model_name", &mut c.vae.model_name, false);
                });
            }
            Tab::Data => f.grid(ui, "data", |f, ui| {
                f.text(ui, "resolution", &mut c.resolution);
                f.check(ui, "aspect_ratio_bucketing", &mut c.aspect_ratio_bucketing);
                f.check(ui, "latent_caching", &mut c.latent_caching);
                f.check(
                    ui,
                    "clear_cache_before_training",
                    &mut c.clear_cache_before_training,
                );
            }),
            Tab::Concepts => self.concepts.show(ui, c, &base, &mut f),
            Tab::Training => training_tab(ui, &mut f, c, &optimizers),
            Tab::Sampling => sampling_tab(ui, &mut f, c),
            Tab::Backup => f.grid(ui, "backup", |f, ui| {
                f.every(
                    ui,
                    "backup_after",
                    &mut c.backup_after,
                    &mut c.backup_after_unit,
                );
                f.num(ui, "rolling_backup_count", &mut c.rolling_backup_count);
                f.every(ui, "save_every", &mut c.save_every, &mut c.save_every_unit);
                f.check(ui, "continue_last_backup", &mut c.continue_last_backup);
            }),
            Tab::Lora => {
                lora_tab(ui, &mut f, c, &adapters, adapter.as_ref());
                if let Some(info) = &adapter {
                    ui.separator();
                    ui.strong(format!("{} options", info.id));
                    super::schema_form::adapter(ui, &mut f, &mut c.adapter, info);
                }
            }
            Tab::Embedding => embedding_tab(ui, &mut f, c),
            Tab::Tools => {
                let dirs = &self.options.plugin_dirs;
                // The CLI as this app runs: its settings file, and never online when it is not.
                let mut ferrite = vec![
                    self.options
                        .ferrite_bin
                        .clone()
                        .or_else(|| std::env::current_exe().ok())
                        .unwrap_or_else(|| PathBuf::from("ferrite"))
                        .to_string_lossy()
                        .into_owned(),
                ];
                if let Some(s) = &self.options.settings_path {
                    ferrite.extend(["--settings".into(), s.to_string_lossy().into_owned()]);
                }
                if crate::hub::offline() {
                    ferrite.push("--offline".into());
                }
                let file = self.config_path.clone();
                let shown = self
                    .tools
                    .show(ui, &base, dirs, &self.settings, c, &file, &ferrite);
                if let Some((config, path)) = shown {
                    self.use_imported(config, path);
                }
            }
            Tab::Plugins => self.plugins_tab(ui),
            Tab::Run => self.run.show(ui),
        }
    }

    fn plugins_tab(&mut self, ui: &mut Ui) {
        ui.label(format!(
            "{} components from the plugin folders: {}",
            self.components.len(),
            self.options
                .plugin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut changed = None;
        egui::Grid::new("plugins")
            .num_columns(6)
            .striped(true)
            .show(ui, |ui| {
                for h in ["Enabled", "Kind", "Id", "Version", "Library", "Path"] {
                    ui.strong(h);
                }
                ui.end_row();
                for c in &self.components {
                    let mut on = c.enabled;
                    if ui
                        .checkbox(&mut on, "")
                        .on_hover_text(format!("Enable {}", c.id))
                        .changed()
                    {
                        changed = Some((c.id.clone(), on));
                    }
                    ui.label(c.kind.name());
                    ui.label(&c.id).on_hover_text(&c.description);
                    ui.label(&c.version);
                    ui.label(&c.library);
                    ui.label(c.path.display().to_string());
                    ui.end_row();
                }
            });
        if !self.load_problems.is_empty() {
            ui.separator();
            ui.strong("Libraries that did not load");
            for p in &self.load_problems {
                ui.label(
                    RichText::new(format!("{}: {}", p.path.display(), p.reason))
                        .color(Color32::from_rgb(230, 90, 70)),
                );
            }
        }
        if let Some((id, on)) = changed {
            // The registry that lists the components knows their libraries.
            if let Err(e) =
                crate::plugins::set_enabled(&self.components, &mut self.settings, &id, on)
            {
                self.set_status(false, e);
            }
            let path = self
                .options
                .settings_path
                .clone()
                .or_else(|| Settings::default_path().ok());
            let saved = path.map(|p| self.settings.save(&p).map_err(|e| e.to_string()));
            if let Some(Err(e)) = saved {
                self.set_status(false, e);
            }
            self.discover_plugins();
        }
    }

    /// Closing while training asks first; stopping writes a backup, then the window closes.
    fn handle_close(&mut self, ctx: &egui::Context) {
        if ctx.input(|i| i.viewport().close_requested()) {
            // The dataset window's edits are written before the app goes.
            self.dataset.leave_image();
        }
        if ctx.input(|i| i.viewport().close_requested()) && self.run.active() {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.confirm_close = true;
        }
        if self.close_when_stopped && !self.run.active() {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    fn close_dialog(&mut self, ctx: &egui::Context) {
        if !self.confirm_close {
            return;
        }
        egui::Window::new("Training is running")
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_CENTER, [0.0, 0.0])
            .show(ctx, |ui| {
                ui.label("Stop the run and save a backup before closing?");
                ui.horizontal(|ui| {
                    if ui.button("Stop, save and close").clicked() {
                        self.run.stop();
                        self.close_when_stopped = true;
                        self.confirm_close = false;
                    }
                    if ui.button("Keep training").clicked() {
                        self.confirm_close = false;
                    }
                });
            });
    }

    fn frame_overlay(&self, ctx: &egui::Context) {
        let n = self.frame_times.len().max(1) as f32;
        let mean = self.frame_times.iter().sum::<f32>() / n;
        let max = self.frame_times.iter().copied().fold(0.0, f32::max);
        egui::Area::new(egui::Id::unique("frame times"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-8.0, -40.0])
            .show(ctx, |ui| {
                ui.label(
                    RichText::new(format!(
                        "UI frame {:.1} ms mean, {:.1} ms max (last {})",
                        mean * 1000.0,
                        max * 1000.0,
                        self.frame_times.len()
                    ))
                    .monospace(),
                );
            });
    }
}

fn lora_tab(
    ui: &mut Ui,
    f: &mut Fields,
    c: &mut TrainConfig,
    adapters: &[String],
    adapter: Option<&ComponentInfo>,
) {
    // The common LoRA fields the chosen adapter's schema lists (OFT has no rank or alpha).
    let has = |option: &str| {
        adapter
            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.options_schema).ok())
            .and_then(|s| s.get("properties").map(|p| p.get(option).is_some()))
            .unwrap_or(true)
    };
    let (rank, alpha, dropout, dora) = (has("rank"), has("alpha"), has("dropout"), has("dora"));
    // A hidden field keeps no value the adapter would be refused for.
    if !dropout {
        c.lora_dropout = 0.0;
    }
    if !dora {
        c.lora_decompose = false;
    }
    f.grid(ui, "lora", |f, ui| {
        let adapters: Vec<&str> = adapters.iter().map(String::as_str).collect();
        let before = c.peft_type.clone();
        f.choice_id(ui, "peft_type", &mut c.peft_type, &adapters);
        if c.peft_type != before {
            // Another adapter: its own options start from their defaults.
            c.adapter.clear();
        }
        if rank {
            f.num(ui, "lora_rank", &mut c.lora_rank);
        }
        if alpha {
            f.num(ui, "lora_alpha", &mut c.lora_alpha);
        }
        f.choice(ui, "lora_weight_dtype", &mut c.lora_weight_dtype);
        if dropout {
            f.num(ui, "lora_dropout", &mut c.lora_dropout);
        }
        if dora {
            f.check(ui, "lora_decompose", &mut c.lora_decompose);
        }
        f.choice(ui, "lora_layer_preset", &mut c.lora_layer_preset);
        f.text(ui, "lora_layers", &mut c.lora_layers);
        f.check(ui, "layer_filter_regex", &mut c.layer_filter_regex);
        f.path(ui, "lora_base_model", &mut c.lora_base_model, false);
    });
}

fn training_tab(ui: &mut Ui, f: &mut Fields, c: &mut TrainConfig, optimizers: &[ComponentInfo]) {
    f.grid(ui, "training", |f, ui| {
        f.num(ui, "learning_rate", &mut c.learning_rate);
        f.choice(
            ui,
            "learning_rate_scheduler",
            &mut c.learning_rate_scheduler,
        );
        f.num(
            ui,
            "learning_rate_warmup_steps",
            &mut c.learning_rate_warmup_steps,
        );
        f.num(ui, "learning_rate_cycles", &mut c.learning_rate_cycles);
        f.num(
            ui,
            "learning_rate_min_factor",
            &mut c.learning_rate_min_factor,
        );
        f.num(ui, "epochs", &mut c.epochs);
        f.num(ui, "batch_size", &mut c.batch_size);
        f.num(
            ui,
            "gradient_accumulation_steps",
            &mut c.gradient_accumulation_steps,
        );
        f.choice(ui, "learning_rate_scaler", &mut c.learning_rate_scaler);
        f.choice(ui, "loss_scaler", &mut c.loss_scaler);
        f.num(ui, "clip_grad_norm", &mut c.clip_grad_norm);
        f.choice(ui, "ema", &mut c.ema);
        f.num(ui, "ema_decay", &mut c.ema_decay);
        f.num(
            ui,
            "ema_update_step_interval",
            &mut c.ema_update_step_interval,
        );
        f.choice(ui, "gradient_checkpointing", &mut c.gradient_checkpointing);
        f.choice(ui, "train_dtype", &mut c.train_dtype);
        f.choice(ui, "fallback_train_dtype", &mut c.fallback_train_dtype);
    });
    ui.separator();
    ui.strong("Optimizer");
    super::schema_form::optimizer(ui, f, &mut c.optimizer, optimizers);
    ui.separator();
    ui.strong("Noise and timesteps");
    f.grid(ui, "noise", |f, ui| {
        f.choice(ui, "timestep_distribution", &mut c.timestep_distribution);
        f.num(ui, "noising_weight", &mut c.noising_weight);
        f.num(ui, "noising_bias", &mut c.noising_bias);
        f.num(ui, "timestep_shift", &mut c.timestep_shift);
        f.check(
            ui,
            "dynamic_timestep_shifting",
            &mut c.dynamic_timestep_shifting,
        );
        f.num(ui, "min_noising_strength", &mut c.min_noising_strength);
        f.num(ui, "max_noising_strength", &mut c.max_noising_strength);
        f.num(ui, "offset_noise_weight", &mut c.offset_noise_weight);
        f.num(
            ui,
            "perturbation_noise_weight",
            &mut c.perturbation_noise_weight,
        );
    });
    ui.separator();
    ui.strong("Loss");
    f.grid(ui, "loss", |f, ui| {
        f.num(ui, "mse_strength", &mut c.mse_strength);
        f.num(ui, "mae_strength", &mut c.mae_strength);
        f.num(ui, "log_cosh_strength", &mut c.log_cosh_strength);
        f.num(ui, "huber_strength", &mut c.huber_strength);
        f.num(ui, "huber_delta", &mut c.huber_delta);
        f.choice(ui, "loss_weight_fn", &mut c.loss_weight_fn);
        f.num(ui, "loss_weight_strength", &mut c.loss_weight_strength);
        f.check(ui, "masked_training", &mut c.masked_training);
        f.num(ui, "unmasked_probability", &mut c.unmasked_probability);
        f.num(ui, "unmasked_weight", &mut c.unmasked_weight);
        f.check(
            ui,
            "normalize_masked_area_loss",
            &mut c.normalize_masked_area_loss,
        );
    });
}

fn sampling_tab(ui: &mut Ui, f: &mut Fields, c: &mut TrainConfig) {
    f.grid(ui, "sampling", |f, ui| {
        f.every(
            ui,
            "sample_after",
            &mut c.sample_after,
            &mut c.sample_after_unit,
        );
    });
    ui.separator();
    let mut remove = None;
    for (i, s) in c.samples.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            ui.strong(format!("Sample {}", i + 1));
            if ui.button(format!("Delete sample {}", i + 1)).clicked() {
                remove = Some(i);
            }
        });
        let k = |n: &str| format!("samples[{i}].{n}");
        f.grid(ui, &k("grid"), |f, ui| {
            f.text(ui, &k("prompt"), &mut s.prompt);
            f.text(ui, &k("negative_prompt"), &mut s.negative_prompt);
            f.num(ui, &k("width"), &mut s.width);
            f.num(ui, &k("height"), &mut s.height);
            f.num(ui, &k("seed"), &mut s.seed);
            f.num(ui, &k("diffusion_steps"), &mut s.diffusion_steps);
            f.num(ui, &k("cfg_scale"), &mut s.cfg_scale);
            f.choice(ui, &k("sampler"), &mut s.sampler);
        });
        ui.separator();
    }
    if let Some(i) = remove {
        c.samples.remove(i);
    }
    if ui.button("Add sample").clicked() {
        c.samples.push(SampleConfig::default());
    }
}

/// One embedding's fields under config key `key` (`embedding`, `additional_embeddings[0]`).
fn embedding_fields(f: &mut Fields, ui: &mut Ui, key: &str, e: &mut EmbeddingConfig, train: bool) {
    f.grid(ui, key, |f, ui| {
        f.path(ui, &format!("{key}.model_name"), &mut e.model_name, false);
        f.text(ui, &format!("{key}.placeholder"), &mut e.placeholder);
        if train {
            f.check(ui, &format!("{key}.train"), &mut e.train);
        }
        f.num(ui, &format!("{key}.token_count"), &mut e.token_count);
        f.text(
            ui,
            &format!("{key}.initial_embedding_text"),
            &mut e.initial_embedding_text,
        );
        f.num(
            ui,
            &format!("{key}.stop_training_after"),
            &mut e.stop_training_after,
        );
        f.choice_of(
            ui,
            &format!("{key}.stop_training_after_unit"),
            &mut e.stop_training_after_unit,
            TimeUnit::STOPS,
        );
    });
}

/// The embedding an embedding run trains, and the additional embeddings of any run.
fn embedding_tab(ui: &mut Ui, f: &mut Fields, c: &mut TrainConfig) {
    f.grid(ui, "embeddings", |f, ui| {
        f.opt_num(
            ui,
            "embedding_learning_rate",
            &mut c.embedding_learning_rate,
        );
        f.check(
            ui,
            "bundle_additional_embeddings",
            &mut c.bundle_additional_embeddings,
        );
    });
    ui.separator();
    if c.training_method == TrainingMethod::Embedding {
        ui.strong("Embedding (what this run trains)");
        embedding_fields(f, ui, "embedding", &mut c.embedding, false);
    } else {
        ui.label("The training method Embedding trains one embedding; its options show here then.");
    }
    ui.separator();
    ui.strong("Additional embeddings");
    let mut remove = None;
    for (i, e) in c.additional_embeddings.iter_mut().enumerate() {
        ui.push_id(i, |ui| {
            embedding_fields(f, ui, &format!("additional_embeddings[{i}]"), e, true);
            if ui.button("Remove").clicked() {
                remove = Some(i);
            }
        });
        ui.separator();
    }
    if let Some(i) = remove {
        c.additional_embeddings.remove(i);
    }
    if ui.button("Add embedding").clicked() {
        let n = c.additional_embeddings.len();
        c.additional_embeddings.push(EmbeddingConfig {
            placeholder: format!("<embedding{}>", n + 1),
            ..Default::default()
        });
    }
}
