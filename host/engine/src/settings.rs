//! The user settings file (`$XDG_CONFIG_HOME/ferrite/settings.toml`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Extra directories searched for plugin libraries.
    pub plugin_dirs: Vec<PathBuf>,
    /// Libraries the user turned off (`ferrite plugins disable ID`): never loaded, so their code
    /// never runs; their components are listed from here.
    pub disabled_libraries: Vec<DisabledLibrary>,
    /// Component ids turned off by Ferrite before libraries were disabled whole. Still honoured
    /// (those components are listed as disabled, though their library loads); `ferrite plugins
    /// disable|enable` replaces the entries of the library it changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disabled_plugins: Vec<String>,
    /// The Hugging Face token sent when a repo id is downloaded (else `HF_TOKEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huggingface_token: Option<String>,
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisabledLibrary {
    pub path: PathBuf,
    pub name: String,
    /// Its components as they were when it was disabled.
    pub components: Vec<ListedComponent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedComponent {
    /// `architecture`, `adapter`, `optimizer`, `captioner` or `masker`.
    pub kind: String,
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML: {source}; fix or delete it")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("cannot write settings file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no user configuration directory (set XDG_CONFIG_HOME or HOME)")]
    NoConfigDir,
}

impl Settings {
    pub fn default_path() -> Result<PathBuf, SettingsError> {
        dirs::config_dir()
            .map(|d| d.join("ferrite").join("settings.toml"))
            .ok_or(SettingsError::NoConfigDir)
    }

    /// Reads the file; a missing file is the default settings.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s).map_err(|source| SettingsError::Parse {
                path: path.into(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(SettingsError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), SettingsError> {
        let text = toml::to_string_pretty(self).expect("settings serialise to TOML");
        crate::fsutil::write_atomic(path, text.as_bytes()).map_err(|source| SettingsError::Write {
            path: path.into(),
            source,
        })
    }

    /// The entry that disables the library at `path`, if any.
    pub fn disabled(&self, path: &Path) -> Option<&DisabledLibrary> {
        let path = canonical(path);
        self.disabled_libraries
            .iter()
            .find(|d| canonical(&d.path) == path)
    }

    pub fn disable(&mut self, library: DisabledLibrary) {
        self.enable(&library.path);
        self.disabled_plugins
            .retain(|id| !library.components.iter().any(|c| &c.id == id));
        self.disabled_libraries.push(library);
        self.disabled_libraries.sort_by(|a, b| a.path.cmp(&b.path));
    }

    /// Turns the library at `path` back on.
    pub fn enable(&mut self, path: &Path) {
        let path = canonical(path);
        self.disabled_libraries
            .retain(|d| canonical(&d.path) != path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_toggles() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ferrite/settings.toml");
        let mut s = Settings::load(&p).unwrap();
        assert_eq!(s, Settings::default());
        let lib = PathBuf::from("/opt/plugins/libferrite_optim_adamw.so");
        s.disable(DisabledLibrary {
            path: lib.clone(),
            name: "optim-adamw".into(),
            components: vec![ListedComponent {
                kind: "optimizer".into(),
                id: "adamw".into(),
                version: "0.1.0".into(),
                description: String::new(),
            }],
        });
        s.plugin_dirs.push("/opt/plugins".into());
        s.save(&p).unwrap();
        let mut back = Settings::load(&p).unwrap();
        assert_eq!(back.disabled(&lib).unwrap().components[0].id, "adamw");
        assert_eq!(back.plugin_dirs, vec![PathBuf::from("/opt/plugins")]);
        back.enable(&lib);
        assert!(back.disabled(&lib).is_none());
    }

    #[test]
    fn bad_toml_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("settings.toml");
        std::fs::write(&p, "plugin_dirs = [").unwrap();
        let e = Settings::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("settings.toml") && e.contains("not valid TOML"),
            "{e}"
        );
    }
}
