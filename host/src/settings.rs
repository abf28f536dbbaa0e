//! The user settings file (`$XDG_CONFIG_HOME/ferrite/settings.toml`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Extra directories searched for plugin libraries.
    pub plugin_dirs: Vec<PathBuf>,
    /// Component ids the user turned off (`ferrite plugins disable ID`).
    pub disabled_plugins: Vec<String>,
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

    pub fn is_enabled(&self, id: &str) -> bool {
        !self.disabled_plugins.iter().any(|d| d == id)
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) {
        self.disabled_plugins.retain(|d| d != id);
        if !enabled {
            self.disabled_plugins.push(id.to_string());
            self.disabled_plugins.sort();
        }
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
        s.set_enabled("adamw", false);
        s.plugin_dirs.push("/opt/plugins".into());
        s.save(&p).unwrap();
        let back = Settings::load(&p).unwrap();
        assert!(!back.is_enabled("adamw"));
        assert_eq!(back.plugin_dirs, vec![PathBuf::from("/opt/plugins")]);
        let mut back = back;
        back.set_enabled("adamw", true);
        assert!(back.is_enabled("adamw"));
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
