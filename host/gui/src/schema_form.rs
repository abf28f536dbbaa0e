//! Options a plugin describes with a JSON schema (here: the optimizer's), drawn from that
//! schema: numbers, integers, booleans and strings (a choice when the schema lists an `enum`),
//! each with the schema's description and default as its tooltip; a number that may be null
//! (`"type": ["number", "null"]`: Prodigy's beta3, Adafactor's beta1) has a box that sets it.
//! Values go into the config's `[optimizer]` table; an option left at its default (or unset)
//! stays out of it.

use eframe::egui::{self, Ui};
use serde_json::Value;

use super::form::{Fields, title};
use crate::plugins::ComponentInfo;

pub fn optimizer(
    ui: &mut Ui,
    f: &mut Fields,
    table: &mut toml::Table,
    optimizers: &[ComponentInfo],
) {
    let mut id = table
        .get("optimizer")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let ids: Vec<&str> = optimizers.iter().map(|c| c.id.as_str()).collect();
    f.grid(ui, "optimizer id", |f, ui| {
        f.choice_id(ui, "optimizer.optimizer", &mut id, &ids)
    });
    if table.get("optimizer").and_then(|v| v.as_str()) != Some(id.as_str()) {
        // Another optimizer: its own options start from their defaults.
        table.clear();
        table.insert("optimizer".into(), id.clone().into());
    }
    let Some(info) = optimizers.iter().find(|c| c.id == id) else {
        ui.label("This optimizer is not among the loaded plugins (Plugins tab).");
        return;
    };
    options(ui, f, "optimizer", table, &info.options_schema, &[]);
}

/// The adapter plugin's own options (the `[adapter]` table): those of its schema that the LoRA
/// tab's fields and the host do not set.
pub fn adapter(ui: &mut Ui, f: &mut Fields, table: &mut toml::Table, info: &ComponentInfo) {
    const SET_ELSEWHERE: [&str; 8] = [
        "rank",
        "alpha",
        "dropout",
        "dora",
        "multiplier",
        "seed",
        "layer",
        "file_shapes",
    ];
    options(
        ui,
        f,
        "adapter",
        table,
        &info.options_schema,
        &SET_ELSEWHERE,
    );
}

/// A grid of the schema's options but `skip`, their values in `table` (keys `<prefix>.<name>`).
fn options(
    ui: &mut Ui,
    f: &mut Fields,
    prefix: &str,
    table: &mut toml::Table,
    schema: &str,
    skip: &[&str],
) {
    let schema: Value = serde_json::from_str(schema).unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    egui::Grid::new(format!("{prefix} options"))
        .num_columns(2)
        .spacing([16.0, 6.0])
        .striped(true)
        .show(ui, |ui| {
            for (name, p) in props.iter().filter(|(n, _)| !skip.contains(&n.as_str())) {
                let key = format!("{prefix}.{name}");
                let default = &p["default"];
                let mut tip = p["description"].as_str().unwrap_or("").to_string();
                if !default.is_null() {
                    tip.push_str(&format!("\nDefault: {default}"));
                }
                let label = ui.label(title(&key)).on_hover_text(&tip);
                let current = table.get(name).cloned();
                ui.horizontal(|ui| {
                    let nullable = p["type"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t == "null"));
                    if nullable {
                        let mut set = current.is_some();
                        let toggled = ui
                            .checkbox(&mut set, "")
                            .on_hover_text("unset: the optimizer's own choice (see the tooltip)")
                            .changed();
                        if toggled && !set {
                            table.remove(name);
                        }
                        if !set {
                            return;
                        }
                    }
                    let new = edit(ui, f, &key, p, current.as_ref(), default, label.id, &tip);
                    match new {
                        Some(v) if serde_json::to_value(&v).ok().as_ref() == Some(default) => {
                            table.remove(name);
                        }
                        Some(v) => {
                            table.insert(name.clone(), v);
                        }
                        None if nullable && current.is_none() => {
                            // Just set: the schema's example, else its lower bound.
                            let start = p["examples"][0]
                                .as_f64()
                                .or(p["minimum"].as_f64())
                                .unwrap_or(0.0);
                            table.insert(name.clone(), toml::Value::Float(start));
                        }
                        None => {}
                    }
                });
                ui.end_row();
            }
        });
}

/// The widget for one option; the new value when it changed.
#[allow(clippy::too_many_arguments)]
fn edit(
    ui: &mut Ui,
    f: &mut Fields,
    key: &str,
    schema: &Value,
    current: Option<&toml::Value>,
    default: &Value,
    label: egui::Id,
    tip: &str,
) -> Option<toml::Value> {
    let shown = current
        .map(|v| v.to_string().trim_matches('"').to_string())
        .unwrap_or_else(|| default.to_string().trim_matches('"').to_string());
    match schema["type"].as_str() {
        Some("boolean") => {
            let mut b = shown == "true";
            ui.checkbox(&mut b, "")
                .labelled_by(label)
                .on_hover_text(tip)
                .changed()
                .then_some(toml::Value::Boolean(b))
        }
        Some("string") => {
            let mut s = shown;
            let changed = match schema["enum"].as_array() {
                Some(options) => egui::ComboBox::from_id_salt(key)
                    .selected_text(&s)
                    .show_ui(ui, |ui| {
                        options
                            .iter()
                            .filter_map(Value::as_str)
                            .any(|o| ui.selectable_value(&mut s, o.to_string(), o).changed())
                    })
                    .inner
                    .unwrap_or(false),
                None => ui.text_edit_singleline(&mut s).labelled_by(label).changed(),
            };
            changed.then_some(toml::Value::String(s))
        }
        kind => {
            let integer = kind == Some("integer");
            let mut x: f64 = shown.parse().unwrap_or(0.0);
            let before = x;
            f.num_bare(ui, key, &mut x, label, tip);
            let v = if integer {
                toml::Value::Integer(x as i64)
            } else {
                toml::Value::Float(x)
            };
            (x != before).then_some(v)
        }
    }
}
