//! Option rows: a label whose tooltip says what the option does and its default (from the
//! config's doc comments, through its JSON schema), the widget, and the validation message of
//! that option when it has one. Numbers are typed as text and parsed, so a half-typed value is
//! marked at the field instead of being lost.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use eframe::egui::{self, Color32, RichText, Ui};
use serde_json::Value;

use crate::config::{Choice, ConceptConfig, EmbeddingConfig, SampleConfig, TimeUnit, TrainConfig};

/// Descriptions and defaults of every option, by key path (`unet.learning_rate`,
/// `concepts.path`: list entries without their index).
pub struct Help {
    text: HashMap<String, String>,
}

impl Help {
    pub fn new() -> Self {
        let schema = serde_json::to_value(schemars::schema_for!(TrainConfig)).unwrap_or_default();
        let defs = schema.get("$defs").cloned().unwrap_or_default();
        let mut text = HashMap::new();
        let defaults = [
            (
                "",
                serde_json::to_value(TrainConfig::default()).unwrap_or_default(),
            ),
            (
                "concepts.",
                serde_json::to_value(ConceptConfig::default()).unwrap_or_default(),
            ),
            (
                "samples.",
                serde_json::to_value(SampleConfig::default()).unwrap_or_default(),
            ),
        ];
        let mut visit = |prefix: &str, props: &Value, defaults: &Value| {
            let Some(props) = props.as_object() else {
                return;
            };
            for (k, p) in props {
                let key = format!("{prefix}{k}");
                let mut t = p["description"].as_str().unwrap_or("").replace('\n', " ");
                match &defaults[k] {
                    Value::Null | Value::Object(_) | Value::Array(_) => {}
                    Value::String(s) if s.is_empty() => t.push_str("\nDefault: empty"),
                    d => t.push_str(&format!("\nDefault: {}", d.to_string().trim_matches('"'))),
                }
                text.insert(key, t);
            }
        };
        visit("", &schema["properties"], &defaults[0].1);
        for (part, def) in [("unet.", "PartConfig"), ("text_encoder.", "PartConfig")] {
            let d = &defaults[0].1[part.trim_end_matches('.')];
            visit(part, &defs[def]["properties"], d);
        }
        let embedding = serde_json::to_value(EmbeddingConfig::default()).unwrap_or_default();
        for prefix in ["embedding.", "additional_embeddings."] {
            visit(prefix, &defs["EmbeddingConfig"]["properties"], &embedding);
        }
        visit(
            "concepts.",
            &defs["ConceptConfig"]["properties"],
            &defaults[1].1,
        );
        visit(
            "samples.",
            &defs["SampleConfig"]["properties"],
            &defaults[2].1,
        );
        Self { text }
    }

    /// What the option at `key` does, and its default; list indices are ignored.
    pub fn get(&self, key: &str) -> &str {
        let plain: String = {
            let mut out = String::new();
            let mut skip = false;
            for ch in key.chars() {
                match ch {
                    '[' => skip = true,
                    ']' => skip = false,
                    c if !skip => out.push(c),
                    _ => {}
                }
            }
            out
        };
        self.text.get(&plain).map_or("", String::as_str)
    }
}

/// `learning_rate` → "Learning rate", `ema_decay` → "EMA decay".
pub fn title(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let words: Vec<String> = last
        .split('_')
        .enumerate()
        .map(|(i, w)| match w {
            "ema" | "mse" | "mae" | "cfg" | "snr" | "peft" | "gpu" => w.to_uppercase(),
            "lora" => "LoRA".into(),
            "unet" => "UNet".into(),
            _ if i == 0 => {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            }
            _ => w.to_string(),
        })
        .collect();
    words.join(" ")
}

/// The validation messages by option key: `key: message` and `a, b: message` lines.
pub fn problems_by_key(problems: &[String]) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    for p in problems {
        if let Some((keys, message)) = p.split_once(": ") {
            for k in keys.split(", ") {
                out.entry(k.trim().to_string())
                    .and_modify(|m| {
                        m.push_str("; ");
                        m.push_str(message);
                    })
                    .or_insert_with(|| message.to_string());
            }
        }
    }
    out
}

/// Text being typed into number fields, and what did not parse, by key.
#[derive(Default)]
pub struct FormState {
    buffers: HashMap<String, String>,
    parse_errors: HashMap<String, String>,
}

impl FormState {
    /// Forget typed text (after the config was replaced).
    pub fn reset(&mut self) {
        self.buffers.clear();
        self.parse_errors.clear();
    }

    pub fn parse_errors(&self) -> impl Iterator<Item = (&String, &String)> {
        self.parse_errors.iter()
    }
}

/// Draws option rows into a two-column grid (label, widget + message).
pub struct Fields<'a> {
    pub state: &'a mut FormState,
    pub problems: &'a HashMap<String, String>,
    pub help: &'a Help,
}

impl Fields<'_> {
    /// A grid of rows; `id` keeps grids apart.
    pub fn grid(&mut self, ui: &mut Ui, id: &str, add: impl FnOnce(&mut Self, &mut Ui)) {
        egui::Grid::new(id)
            .num_columns(2)
            .spacing([16.0, 6.0])
            .striped(true)
            .show(ui, |ui| add(self, ui));
    }

    fn row(
        &mut self,
        ui: &mut Ui,
        key: &str,
        widget: impl FnOnce(&mut Ui, egui::Id) -> egui::Response,
    ) {
        let help = self.help.get(key);
        let label = ui.label(title(key)).on_hover_text(help);
        ui.horizontal(|ui| {
            let r = widget(ui, label.id);
            r.on_hover_text(help);
            let message = self
                .state
                .parse_errors
                .get(key)
                .or_else(|| self.problems.get(key));
            if let Some(m) = message {
                ui.label(RichText::new(format!("(!) {m}")).color(Color32::from_rgb(230, 90, 70)));
            }
        });
        ui.end_row();
    }

    pub fn check(&mut self, ui: &mut Ui, key: &str, v: &mut bool) {
        self.row(ui, key, |ui, label| ui.checkbox(v, "").labelled_by(label));
    }

    pub fn text(&mut self, ui: &mut Ui, key: &str, v: &mut String) {
        self.row(ui, key, |ui, label| {
            ui.add(egui::TextEdit::singleline(v).desired_width(320.0))
                .labelled_by(label)
        });
    }

    /// A path typed in, or picked with the native dialog (a folder when `folder`).
    pub fn path(&mut self, ui: &mut Ui, key: &str, v: &mut String, folder: bool) {
        self.row(ui, key, |ui, label| {
            let r = ui
                .add(egui::TextEdit::singleline(v).desired_width(320.0))
                .labelled_by(label);
            if ui.button("…").on_hover_text("Browse").clicked() {
                let d = rfd::FileDialog::new();
                let picked = if folder {
                    d.pick_folder()
                } else {
                    d.pick_file()
                };
                if let Some(p) = picked {
                    *v = p.display().to_string();
                }
            }
            r
        });
    }

    /// Keeps or clears the parse error of `key`.
    fn record(&mut self, key: &str, parsed: Result<(), String>) {
        match parsed {
            Ok(()) => self.state.parse_errors.remove(key),
            Err(e) => self.state.parse_errors.insert(key.to_string(), e),
        };
    }

    pub fn num<T: FromStr + Display>(&mut self, ui: &mut Ui, key: &str, v: &mut T) {
        if let Some(text) = self.number_row(ui, key, v.to_string()) {
            let parsed = text.trim().parse::<T>().map(|x| *v = x);
            self.record(key, parsed.map_err(|_| format!("`{text}` is not a number")));
        }
    }

    /// A number that may be left empty (None: the global value applies).
    pub fn opt_num(&mut self, ui: &mut Ui, key: &str, v: &mut Option<f64>) {
        let shown = v.map(|x| x.to_string()).unwrap_or_default();
        if let Some(text) = self.number_row(ui, key, shown) {
            let t = text.trim();
            let parsed = if t.is_empty() {
                *v = None;
                Ok(())
            } else {
                t.parse::<f64>()
                    .map(|x| *v = Some(x))
                    .map_err(|_| format!("`{text}` is not a number (empty: the global value)"))
            };
            self.record(key, parsed);
        }
    }

    /// A number field without its row (for rows drawn elsewhere, such as plugin options).
    pub fn num_bare(&mut self, ui: &mut Ui, key: &str, v: &mut f64, label: egui::Id, tip: &str) {
        let mut text = self.typed(key, v.to_string());
        let r = ui
            .add(egui::TextEdit::singleline(&mut text).desired_width(120.0))
            .labelled_by(label)
            .on_hover_text(tip);
        if r.changed() {
            self.state.buffers.insert(key.to_string(), text.clone());
            let parsed = text.trim().parse::<f64>().map(|x| *v = x);
            self.record(key, parsed.map_err(|_| format!("`{text}` is not a number")));
        }
        if let Some(m) = self.state.parse_errors.get(key) {
            ui.label(RichText::new(format!("(!) {m}")).color(Color32::from_rgb(230, 90, 70)));
        }
    }

    /// What the number field of `key` shows: the text typed into it, unless the value `shown`
    /// was changed elsewhere (a loaded config or preset).
    fn typed(&mut self, key: &str, shown: String) -> String {
        let buffer = self
            .state
            .buffers
            .entry(key.to_string())
            .or_insert_with(|| shown.clone());
        if !self.state.parse_errors.contains_key(key)
            && buffer.trim().parse::<f64>().ok() != shown.parse::<f64>().ok()
        {
            *buffer = shown;
        }
        buffer.clone()
    }

    /// A text field over the number `shown`; the typed text when it changed.
    fn number_row(&mut self, ui: &mut Ui, key: &str, shown: String) -> Option<String> {
        let mut text = self.typed(key, shown);
        let mut changed = false;
        self.row(ui, key, |ui, label| {
            // Only optional numbers are ever empty: then the global value applies.
            let edit = egui::TextEdit::singleline(&mut text)
                .desired_width(120.0)
                .hint_text("global");
            let r = ui.add(edit).labelled_by(label);
            changed = r.changed();
            r
        });
        if changed {
            self.state.buffers.insert(key.to_string(), text.clone());
            Some(text)
        } else {
            None
        }
    }

    /// A drop-down of plugin ids (a set plugins extend).
    pub fn choice_id(&mut self, ui: &mut Ui, key: &str, v: &mut String, ids: &[&str]) {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.combo(ui, key, v, &ids);
    }

    /// A drop-down of every value of `C`.
    pub fn choice<C: Choice>(&mut self, ui: &mut Ui, key: &str, v: &mut C) {
        self.combo(ui, key, v, C::VARIANTS);
    }

    /// A drop-down of `options`, some values of `C`.
    pub fn choice_of<C: Choice>(&mut self, ui: &mut Ui, key: &str, v: &mut C, options: &[C]) {
        self.combo(ui, key, v, options);
    }

    fn combo<T: PartialEq + Clone + AsRef<str>>(
        &mut self,
        ui: &mut Ui,
        key: &str,
        v: &mut T,
        options: &[T],
    ) {
        self.row(ui, key, |ui, label| {
            egui::ComboBox::from_id_salt(key)
                .selected_text(v.as_ref())
                .show_ui(ui, |ui| {
                    for o in options {
                        ui.selectable_value(v, o.clone(), o.as_ref());
                    }
                })
                .response
                .labelled_by(label)
        });
    }

    /// `every` units, e.g. sample_after + sample_after_unit, on one row.
    pub fn every(&mut self, ui: &mut Ui, key: &str, v: &mut f64, unit: &mut TimeUnit) {
        self.num(ui, key, v);
        self.choice(ui, &format!("{key}_unit"), unit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_a_description_and_the_plain_ones_their_default() {
        let help = Help::new();
        let keys = |prefix: &str, v: Value| -> Vec<String> {
            v.as_object()
                .unwrap()
                .keys()
                .map(|k| format!("{prefix}{k}"))
                .collect()
        };
        let mut all = keys("", serde_json::to_value(TrainConfig::default()).unwrap());
        all.extend(keys(
            "unet.",
            serde_json::to_value(TrainConfig::default().unet).unwrap(),
        ));
        all.extend(keys(
            "concepts.",
            serde_json::to_value(ConceptConfig::default()).unwrap(),
        ));
        all.extend(keys(
            "samples.",
            serde_json::to_value(SampleConfig::default()).unwrap(),
        ));
        for k in &all {
            let text = help.get(k);
            let description = text.split("\nDefault:").next().unwrap_or("");
            assert!(!description.trim().is_empty(), "`{k}` has no description");
        }
        assert!(help.get("epochs").ends_with("Default: 100"));
        assert!(
            help.get("concepts[3].balancing_strategy")
                .contains("Default: repeats")
        );
        assert!(help.get("unet.learning_rate").contains("global"));
    }

    #[test]
    fn titles_and_problem_keys() {
        assert_eq!(title("learning_rate"), "Learning rate");
        assert_eq!(title("unet.stop_training_after"), "Stop training after");
        assert_eq!(title("ema_decay"), "EMA decay");
        assert_eq!(title("lora_rank"), "LoRA rank");
        let p = problems_by_key(&[
            "learning_rate: must be above 0".into(),
            "min_noising_strength, max_noising_strength: need min < max".into(),
        ]);
        assert_eq!(p["learning_rate"], "must be above 0");
        assert_eq!(p["max_noising_strength"], "need min < max");
    }
}
