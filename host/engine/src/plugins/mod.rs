//! Plugin discovery, loading and the registry of components.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use abi_stable::library::{LibraryError, lib_header_from_path};
use abi_stable::std_types::RStr;
use ferrite_plugin_api::{
    ComponentKind,
    abi::{ComponentBox, PluginLibRef, known},
    plugin::{AdapterHandle, ArchitectureHandle, CaptionerHandle, MaskerHandle, OptimizerHandle},
};

use crate::runtime::host_ref;
use crate::settings::{DisabledLibrary, ListedComponent, Settings};

/// One component offered by a loaded library.
#[derive(Debug, Clone)]
pub struct ComponentInfo {
    pub kind: ComponentKind,
    pub id: String,
    pub version: String,
    pub description: String,
    pub options_schema: String,
    pub path: PathBuf,
    pub library: String,
    pub enabled: bool,
}

/// A library that could not be used, and why. Displayed as one line.
#[derive(Debug, Clone)]
pub struct LoadProblem {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no {kind} plugin with id `{id}` (run `ferrite plugins list`)")]
    NotFound { kind: ComponentKind, id: String },
    #[error("{kind} `{id}` is disabled with its library (run `ferrite plugins enable {id}`)")]
    Disabled { kind: ComponentKind, id: String },
    #[error("{kind} id `{id}` is offered by more than one library: {}; remove or disable one", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "))]
    Duplicate {
        kind: ComponentKind,
        id: String,
        paths: Vec<PathBuf>,
    },
    #[error("plugin `{id}` ({path}) failed to create its {kind}: {reason}")]
    Instantiate {
        kind: ComponentKind,
        id: String,
        path: PathBuf,
        reason: String,
    },
}

struct Library {
    path: PathBuf,
    root: PluginLibRef,
}

#[derive(Default)]
pub struct Registry {
    libraries: Vec<Library>,
    components: Vec<ComponentInfo>,
    pub problems: Vec<LoadProblem>,
}

/// Where plugins are looked for, in order: `<exe dir>/plugins`, the executable's directory,
/// `$FERRITE_PLUGIN_PATH` (`:`-separated), then the settings' `plugin_dirs`.
pub fn search_dirs(settings: &Settings) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        dirs.push(exe_dir);
    }
    if let Some(p) = std::env::var_os("FERRITE_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    dirs.extend(settings.plugin_dirs.iter().cloned());
    dirs
}

fn is_dylib(p: &Path) -> bool {
    p.is_file() && p.extension().and_then(|e| e.to_str()) == Some(std::env::consts::DLL_EXTENSION)
}

fn describe_load_error(e: &LibraryError) -> String {
    match e {
        LibraryError::OpenError { err, .. } => format!("cannot be loaded as a shared library ({err})"),
        LibraryError::GetSymbolError { .. } => {
            "not a Ferrite plugin: it exports no Ferrite root module (was it built with `export_plugin!`?)".into()
        }
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "built for ABI {actual_version}, this host speaks ABI {expected_version} (another major version): rebuild the plugin against this Ferrite's plugin-api"
        ),
        LibraryError::AbiInstability(_) | LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            "incompatible plugin ABI: its root module layout differs from this host's plugin-api; rebuild the plugin".into()
        }
        LibraryError::RootModule { err, .. } => format!("its root module failed to load: {err}"),
        other => format!("cannot be loaded: {}", first_line(&other.to_string())),
    }
}

/// Loads one library and checks it is a Ferrite plugin of a compatible ABI.
fn load_library(path: &Path) -> Result<PluginLibRef, String> {
    let header = lib_header_from_path(path).map_err(|e| describe_load_error(&e))?;
    let root = header
        .init_root_module::<PluginLibRef>()
        .map_err(|e| describe_load_error(&e))?;
    (root.init())(host_ref())
        .into_result()
        .map_err(|e| format!("plugin `{}` failed to initialise: {e}", root.name()))?;
    Ok(root)
}

fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(300).collect()
}

impl Registry {
    /// Loads every library in `dirs`. Failures are collected in `problems`; loading goes on.
    pub fn discover(dirs: &[PathBuf], settings: &Settings) -> Registry {
        let mut reg = Registry::default();
        let mut seen = std::collections::HashSet::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_dylib(p))
                .collect();
            files.sort();
            for path in files {
                let canon = path.canonicalize().unwrap_or_else(|_| path.clone());
                if !seen.insert(canon) {
                    continue;
                }
                if let Some(off) = settings.disabled(&path) {
                    reg.add_disabled(path, off);
                    continue;
                }
                match load_library(&path).and_then(|root| reg.add(path.clone(), root, settings)) {
                    Ok(()) => {}
                    Err(reason) => {
                        tracing::warn!("{}: {reason}", path.display());
                        reg.problems.push(LoadProblem { path, reason });
                    }
                }
            }
        }
        reg.report_duplicates();
        reg
    }

    fn add(
        &mut self,
        path: PathBuf,
        root: PluginLibRef,
        settings: &Settings,
    ) -> Result<(), String> {
        let name = root.name();
        let described = (root.describe())()
            .into_result()
            .map_err(|e| format!("plugin `{name}` failed to describe its components: {e}"))?;
        let mut components = Vec::new();
        for d in described {
            let kind = known("component kind", &d.kind)
                .map_err(|e| format!("plugin `{name}`, component `{}`: {e}", d.id))?;
            components.push(ComponentInfo {
                kind,
                enabled: !settings.disabled_plugins.iter().any(|i| d.id.as_str() == i),
                id: d.id.into_string(),
                version: d.version.into_string(),
                description: d.description.into_string(),
                options_schema: d.options_schema.into_string(),
                path: path.clone(),
                library: name.to_string(),
            });
        }
        self.components.extend(components);
        self.libraries.push(Library { path, root });
        Ok(())
    }

    /// Lists a disabled library's components (as the settings remember them) without loading it.
    fn add_disabled(&mut self, path: PathBuf, off: &DisabledLibrary) {
        for c in &off.components {
            let Some(kind) = ComponentKind::from_name(&c.kind) else {
                tracing::warn!(
                    "settings: disabled component `{}` has an unknown kind `{}`; not listed",
                    c.id,
                    c.kind
                );
                continue;
            };
            self.components.push(ComponentInfo {
                kind,
                enabled: false,
                id: c.id.clone(),
                version: c.version.clone(),
                description: c.description.clone(),
                options_schema: "{}".into(),
                path: path.clone(),
                library: off.name.clone(),
            });
        }
    }

    fn report_duplicates(&mut self) {
        let mut by_id: HashMap<(ComponentKind, &str), Vec<&PathBuf>> = HashMap::new();
        for c in &self.components {
            by_id
                .entry((c.kind, c.id.as_str()))
                .or_default()
                .push(&c.path);
        }
        let mut dups: Vec<LoadProblem> = by_id
            .into_iter()
            .filter(|(_, paths)| paths.len() > 1)
            .map(|((kind, id), paths)| {
                let paths: Vec<PathBuf> = paths.into_iter().cloned().collect();
                let path = paths[paths.len() - 1].clone();
                let reason = PluginError::Duplicate {
                    kind,
                    id: id.to_string(),
                    paths,
                }
                .to_string();
                LoadProblem { path, reason }
            })
            .collect();
        dups.sort_by(|a, b| a.reason.cmp(&b.reason));
        self.problems.extend(dups);
    }

    pub fn components(&self) -> &[ComponentInfo] {
        &self.components
    }

    /// The one enabled component of this kind and id, or why there is none.
    pub fn find(&self, kind: ComponentKind, id: &str) -> Result<&ComponentInfo, PluginError> {
        let matches: Vec<&ComponentInfo> = self
            .components
            .iter()
            .filter(|c| c.kind == kind && c.id == id)
            .collect();
        match matches.as_slice() {
            [] => Err(PluginError::NotFound {
                kind,
                id: id.into(),
            }),
            [c] if !c.enabled => Err(PluginError::Disabled {
                kind,
                id: id.into(),
            }),
            [c] => Ok(c),
            many => Err(PluginError::Duplicate {
                kind,
                id: id.into(),
                paths: many.iter().map(|c| c.path.clone()).collect(),
            }),
        }
    }

    /// The options the component's schema lists under `properties`; `None` when it lists none
    /// (a schema that constrains nothing by name) or the component is not found.
    pub fn declared_options(
        &self,
        kind: ComponentKind,
        id: &str,
    ) -> Option<std::collections::BTreeSet<String>> {
        let schema: serde_json::Value =
            serde_json::from_str(&self.find(kind, id).ok()?.options_schema).ok()?;
        Some(
            schema
                .get("properties")?
                .as_object()?
                .keys()
                .cloned()
                .collect(),
        )
    }

    /// What is wrong with `options` for the component `id` of `kind`, by its own options schema:
    /// (the option at fault, when one is, and the problem). Not found or disabled components
    /// give one problem without an option.
    pub fn option_problems(
        &self,
        kind: ComponentKind,
        id: &str,
        options: &serde_json::Value,
    ) -> Vec<(Option<String>, String)> {
        let info = match self.find(kind, id) {
            Ok(i) => i,
            Err(e) => return vec![(None, e.to_string())],
        };
        let schema = match serde_json::from_str(&info.options_schema)
            .map_err(|e| e.to_string())
            .and_then(|s| jsonschema::validator_for(&s).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                return vec![(
                    None,
                    format!("the {kind} `{id}` has an unreadable options schema: {e}"),
                )];
            }
        };
        let mut out = Vec::new();
        for e in schema.iter_errors(options) {
            match e.kind() {
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => out
                    .extend(unexpected.iter().map(|u| {
                        (
                            Some(u.clone()),
                            format!("the {kind} `{id}` has no option `{u}`"),
                        )
                    })),
                _ => {
                    let path = e.instance_path().as_str().trim_start_matches('/');
                    let option = path.split('/').next().filter(|p| !p.is_empty());
                    out.push((option.map(str::to_string), format!("{kind} `{id}`: {e}")));
                }
            }
        }
        out
    }

    fn instantiate(
        &self,
        kind: ComponentKind,
        id: &str,
        options_json: &str,
    ) -> Result<ComponentBox, PluginError> {
        let info = self.find(kind, id)?;
        let lib = self
            .libraries
            .iter()
            .find(|l| l.path == info.path)
            .expect("component belongs to a loaded library");
        let fail = |reason: String| PluginError::Instantiate {
            kind,
            id: id.into(),
            path: info.path.clone(),
            reason,
        };
        let boxed = (lib.root.instantiate())(
            kind.to_ne(),
            RStr::from_str(id),
            RStr::from_str(options_json),
        )
        .into_result()
        .map_err(|e| fail(e.into_string()))?;
        boxed
            .into_enum()
            .map_err(|e| fail(format!("returned an unknown kind of component: {e}")))
    }

    pub fn optimizer(&self, id: &str, options_json: &str) -> Result<OptimizerHandle, PluginError> {
        match self.instantiate(ComponentKind::Optimizer, id, options_json)? {
            ComponentBox::Optimizer(o) => Ok(OptimizerHandle(o)),
            _ => Err(self.wrong_kind(ComponentKind::Optimizer, id)),
        }
    }

    pub fn adapter(&self, id: &str, options_json: &str) -> Result<AdapterHandle, PluginError> {
        match self.instantiate(ComponentKind::Adapter, id, options_json)? {
            ComponentBox::Adapter(a) => Ok(AdapterHandle(a)),
            _ => Err(self.wrong_kind(ComponentKind::Adapter, id)),
        }
    }

    pub fn captioner(&self, id: &str, options_json: &str) -> Result<CaptionerHandle, PluginError> {
        match self.instantiate(ComponentKind::Captioner, id, options_json)? {
            ComponentBox::Captioner(c) => Ok(CaptionerHandle(c)),
            _ => Err(self.wrong_kind(ComponentKind::Captioner, id)),
        }
    }

    pub fn masker(&self, id: &str, options_json: &str) -> Result<MaskerHandle, PluginError> {
        match self.instantiate(ComponentKind::Masker, id, options_json)? {
            ComponentBox::Masker(m) => Ok(MaskerHandle(m)),
            _ => Err(self.wrong_kind(ComponentKind::Masker, id)),
        }
    }

    pub fn architecture(
        &self,
        id: &str,
        options_json: &str,
    ) -> Result<ArchitectureHandle, PluginError> {
        match self.instantiate(ComponentKind::Architecture, id, options_json)? {
            ComponentBox::Architecture(a) => Ok(ArchitectureHandle(a)),
            _ => Err(self.wrong_kind(ComponentKind::Architecture, id)),
        }
    }

    fn wrong_kind(&self, kind: ComponentKind, id: &str) -> PluginError {
        let path = self
            .find(kind, id)
            .map(|c| c.path.clone())
            .unwrap_or_default();
        PluginError::Instantiate {
            kind,
            id: id.into(),
            path,
            reason: format!("returned a component that is not a {kind}"),
        }
    }
}

/// Turns the library offering component `id` (one of `components`, as a registry lists them)
/// off — it is not loaded from then on — or back on; says what changed. Takes effect at the next
/// discovery.
pub fn set_enabled(
    components: &[ComponentInfo],
    settings: &mut Settings,
    id: &str,
    on: bool,
) -> Result<String, String> {
    let Some(c) = components.iter().find(|c| c.id == id) else {
        return Err(format!(
            "no plugin offers a component `{id}` (see `ferrite plugins list`)"
        ));
    };
    let siblings: Vec<&ComponentInfo> = components.iter().filter(|o| o.path == c.path).collect();
    let names = siblings
        .iter()
        .map(|o| o.id.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    settings
        .disabled_plugins
        .retain(|d| !siblings.iter().any(|o| &o.id == d));
    if on {
        settings.enable(&c.path);
        return Ok(format!("enabled library `{}` ({names})", c.library));
    }
    settings.disable(DisabledLibrary {
        path: c.path.clone(),
        name: c.library.clone(),
        components: siblings
            .iter()
            .map(|o| ListedComponent {
                kind: o.kind.name().into(),
                id: o.id.clone(),
                version: o.version.clone(),
                description: o.description.clone(),
            })
            .collect(),
    });
    Ok(format!(
        "disabled library `{}` ({names}): it is no longer loaded",
        c.library
    ))
}
