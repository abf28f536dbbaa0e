//! OneTrainer configs into Ferrite's: `ferrite import-onetrainer` and the GUI's "Import
//! OneTrainer config…". The JSON goes through OneTrainer's own migrations first (its
//! `__version`), then each field onto Ferrite's option of the same meaning. What has no Ferrite
//! option is listed by name with its value, and what was carried over approximately is said;
//! both head the written TOML as comments.

mod map;
mod migrate;
mod source;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use source::Obj;
pub use source::Report;

use super::TrainConfig;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("this OneTrainer config cannot be imported: {0}")]
    Unsupported(String),
}

/// Where the OneTrainer settings come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The train config (OneTrainer's JSON, as saved or exported).
    pub config: PathBuf,
    /// A concepts file to use instead of the config's own (inline or `concept_file_name`).
    pub concepts: Option<PathBuf>,
    /// A samples file to use instead of the config's own.
    pub samples: Option<PathBuf>,
    /// OneTrainer's folder, which its relative paths are relative to: with it they are written
    /// as absolute paths; without it they are kept as written (and Ferrite reads them relative
    /// to the TOML's folder).
    pub onetrainer_dir: Option<PathBuf>,
}

/// An imported config and what the import has to say about it.
#[derive(Debug)]
pub struct Imported {
    pub config: TrainConfig,
    /// The OneTrainer config's `__version`.
    pub version: u64,
    pub report: Report,
    /// What Ferrite's validation finds wrong with the result (fix before training).
    pub problems: Vec<String>,
}

fn read_json(path: &Path) -> Result<Value, ImportError> {
    let fail = |message: String| ImportError::Read {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    serde_json::from_str(&strict_json(&text))
        .map_err(|e| fail(format!("not a OneTrainer JSON file: {e}")))
}

/// Python's `json` writes the non-finite floats as `Infinity`, `-Infinity` and `NaN` (Prodigy's
/// default growth_rate is infinite), which JSON has no words for: outside strings they become
/// `null`, which the importer reads as "no value" (growth_rate: no limit).
fn strict_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push_str("null");
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn objects(path: &Path, what: &str, v: Value) -> Result<Vec<Map<String, Value>>, ImportError> {
    let fail = |message: String| ImportError::Read {
        path: path.to_path_buf(),
        message,
    };
    match v {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(m),
                _ => Err(fail(format!("{what}[{i}] is not an object"))),
            })
            .collect(),
        _ => Err(fail(format!("expected a list of {what}"))),
    }
}

/// OneTrainer's relative paths are relative to its folder: made absolute when that folder is
/// given, else kept (and listed).
struct Paths {
    root: PathBuf,
    absolute: bool,
    kept: RefCell<Vec<String>>,
}

impl Paths {
    fn file(&self, p: String) -> String {
        if p.is_empty() || Path::new(&p).is_absolute() {
            p
        } else if self.absolute {
            self.root.join(&p).to_string_lossy().into_owned()
        } else {
            self.kept.borrow_mut().push(p.clone());
            p
        }
    }

    /// Whether `p` (as [`Paths::file`] wrote it) names something on disk.
    fn exists(&self, p: &str) -> bool {
        let path = Path::new(p);
        path.is_absolute() && path.exists() || self.root.join(path).exists()
    }

    /// A model: a Hugging Face id stays an id unless OneTrainer's folder holds a folder of
    /// that name.
    fn model(&self, p: String) -> String {
        if crate::hub::is_repo_id(&p) && !self.root.join(&p).exists() {
            p
        } else {
            self.file(p)
        }
    }
}

/// Reads a OneTrainer config (and its concepts and samples) as a Ferrite config.
pub fn import(src: &Sources) -> Result<Imported, ImportError> {
    let Value::Object(mut d) = read_json(&src.config)? else {
        return Err(ImportError::Read {
            path: src.config.clone(),
            message: "not a OneTrainer config: the file is not a JSON object".into(),
        });
    };
    let version = migrate::train_config(&mut d);
    let mut report = Report::default();
    let root = src
        .onetrainer_dir
        .clone()
        .unwrap_or_else(|| src.config.parent().unwrap_or(Path::new(".")).to_path_buf());

    let concept_file = d.remove("concept_file_name");
    let concepts = match (&src.concepts, d.remove("concepts").filter(|v| !v.is_null())) {
        (Some(file), _) => objects(file, "concepts", read_json(file)?)?,
        (None, Some(inline)) => objects(&src.config, "concepts", inline)?,
        (None, None) => {
            let name = concept_file
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or("training_concepts/concepts.json");
            let file = root.join(name);
            if !file.is_file() {
                return Err(ImportError::Read {
                    path: src.config.clone(),
                    message: format!(
                        "its concepts are in concept_file_name `{name}`, not found at {}: pass \
                         --concepts FILE, or --onetrainer-dir with OneTrainer's folder",
                        file.display()
                    ),
                });
            }
            objects(&file, "concepts", read_json(&file)?)?
        }
    };
    let sample_file = d.remove("sample_definition_file_name");
    let samples = match (&src.samples, d.remove("samples").filter(|v| !v.is_null())) {
        (Some(file), _) => objects(file, "samples", read_json(file)?)?,
        (None, Some(inline)) => objects(&src.config, "samples", inline)?,
        (None, None) => {
            let name = sample_file
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or("training_samples/samples.json");
            let file = root.join(name);
            if file.is_file() {
                objects(&file, "samples", read_json(&file)?)?
            } else {
                report.note(format!(
                    "no samples: sample_definition_file_name `{name}` is not at {} (pass \
                     --samples FILE)",
                    file.display()
                ));
                Vec::new()
            }
        }
    };
    let concepts = concepts
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            migrate::concept(&mut m);
            Obj::new(format!("concepts[{i}]"), m)
        })
        .collect();
    let samples = samples
        .into_iter()
        .enumerate()
        .map(|(i, m)| Obj::new(format!("samples[{i}]"), m))
        .collect();

    let paths = Paths {
        root,
        absolute: src.onetrainer_dir.is_some(),
        kept: RefCell::new(Vec::new()),
    };
    let mut o = Obj::new("", d);
    let config = map::train_config(&mut o, concepts, samples, &paths, &mut report)?;
    o.finish(&mut report);
    let kept = paths.kept.into_inner();
    if !kept.is_empty() {
        report.note(format!(
            "relative paths are kept as written ({}); OneTrainer reads them relative to its own \
             folder, Ferrite relative to this TOML's: pass --onetrainer-dir to make them absolute",
            kept.join(", ")
        ));
    }
    report.not_imported.sort();
    let mut problems = std::mem::take(&mut report.problems);
    match config.validate() {
        Ok(()) => {}
        Err(super::ConfigError::Invalid(p)) => problems.extend(p),
        Err(e) => problems.push(e.to_string()),
    }
    Ok(Imported {
        config,
        version,
        report,
        problems,
    })
}

impl Imported {
    /// The config as TOML, headed by comments saying where it came from, what changed on the
    /// way and what was not imported.
    pub fn to_toml(&self, source: &Path) -> String {
        let mut head = format!(
            "# Imported by `ferrite import-onetrainer` from {} (OneTrainer config version {}).\n",
            source
                .display()
                .to_string()
                .replace(|c: char| c.is_control(), " "),
            self.version
        );
        let mut section = |title: &str, lines: Vec<String>| {
            if !lines.is_empty() {
                head.push_str(&format!("#\n# {title}\n"));
                for l in lines {
                    // A comment is one line without control characters (the file's strings
                    // are the user's).
                    let l = l.replace(|c: char| c.is_control(), " ");
                    head.push_str(&format!("#   - {l}\n"));
                }
            }
        };
        section("Carried over with a change:", self.report.notes.clone());
        section(
            "Not imported (Ferrite has no such option; OneTrainer settings at their defaults are \
             not listed):",
            self.report
                .not_imported
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect(),
        );
        section("To fix before training:", self.problems.clone());
        format!("{head}\n{}", self.config.to_toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythons_non_finite_floats_read_as_null_outside_strings() {
        let text =
            r#"{"growth_rate": Infinity, "a": -Infinity, "b": [NaN], "s": "Infinity \" NaN"}"#;
        let v: Value = serde_json::from_str(&strict_json(text)).unwrap();
        assert!(v["growth_rate"].is_null() && v["a"].is_null() && v["b"][0].is_null());
        assert_eq!(v["s"], "Infinity \" NaN");
    }
}
