//! Adapters (LoRA, DoRA, LoHa, ...) attached to a model's layers. The architecture plugin lists
//! its adaptable layers and names each one at forward time; the loaded model ([`ModelLayers`])
//! keeps its adapter instances (from adapter plugins) by layer name and runs them on the layer's
//! output, reached through the `adapt` host entry from the scope its run entered. Each loaded
//! model has its own adapters.

pub mod describe;
pub mod formats;
mod fused;
mod peft_metadata;
pub mod select;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use ferrite_plugin_api::{
    AdaptableLayer, DType, ModelInfo, Tensor, TensorId,
    plugin::{AdapterHandle, ArchitectureHandle},
};
use serde::Serialize;

use crate::plugins::Registry;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdapterError(pub String);

type Result<T> = std::result::Result<T, AdapterError>;

fn err(e: impl std::fmt::Display) -> AdapterError {
    AdapterError(e.to_string())
}

/// How to make fresh adapters (OneTrainer's LoRA options).
#[derive(Debug, Clone, Serialize)]
pub struct AdapterOptions {
    /// The adapter plugin id: `lora` (with `dora` for DoRA), `loha`, `lokr`, ...
    #[serde(skip)]
    pub kind: String,
    pub rank: usize,
    pub alpha: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dropout: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dora: bool,
    pub seed: u64,
    /// The plugin's own options (the config's `[adapter]` table: LoKr's factor, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The options the host gives every adapter from OneTrainer's LoRA fields (`lora_rank`,
/// `lora_alpha`, `seed`); an adapter whose schema lists other options and not one of these does
/// not get it (OFT has neither rank nor alpha). Dropout and DoRA are sent only when set, and are
/// an error for an adapter without them.
const HOST_SET: [&str; 3] = ["rank", "alpha", "seed"];

impl AdapterOptions {
    /// These options as the adapter plugin `kind` takes them: the host's common ones its schema
    /// does not list left out.
    pub fn for_plugin(&self, registry: &Registry) -> serde_json::Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        without_undeclared(registry, &self.kind, &mut json);
        json
    }
}

fn without_undeclared(registry: &Registry, kind: &str, options: &mut serde_json::Value) {
    let declared = registry.declared_options(ferrite_plugin_api::ComponentKind::Adapter, kind);
    if let (Some(declared), Some(o)) = (declared, options.as_object_mut()) {
        o.retain(|k, _| !HOST_SET.contains(&k.as_str()) || declared.contains(k));
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for AdapterOptions {
    fn default() -> Self {
        Self {
            kind: "lora".into(),
            rank: 16,
            alpha: 1.0,
            dropout: 0.0,
            dora: false,
            seed: 0,
            extra: Default::default(),
        }
    }
}

/// A loaded model's adaptable layers and parameters, as its architecture plugin lists them, and
/// the adapters attached to it.
pub struct ModelLayers {
    /// The model's contract: its parts, layers and file metadata.
    pub info: ModelInfo,
    pub layers: Vec<AdaptableLayer>,
    params: HashMap<String, Tensor>,
    attached: Mutex<BTreeMap<String, Vec<Attached>>>,
    /// The file layouts of the registry adapters were last made from.
    layouts: Mutex<formats::Layouts>,
    /// Off: layers run as if no adapter were attached (the base model's prediction).
    enabled: AtomicBool,
}

struct Attached {
    kind: String,
    layer: AdaptableLayer,
    adapter: AdapterHandle,
    /// The layer's weight handle, when the adapter is merged into it.
    merged_into: Option<Tensor>,
}

/// How many layers and trainable values the attached adapters have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub layers: usize,
    pub parameters: usize,
}

impl ModelLayers {
    pub fn of(arch: &ArchitectureHandle) -> Result<Self> {
        let info = ModelInfo::from_json(&arch.model_info().map_err(err)?).map_err(AdapterError)?;
        let params = arch.parameters().map_err(err)?.into_iter().collect();
        Ok(Self {
            layers: info.adaptable_layers.clone(),
            info,
            params,
            attached: Mutex::default(),
            layouts: Mutex::default(),
            enabled: AtomicBool::new(true),
        })
    }

    pub fn find(&self, name: &str) -> Option<&AdaptableLayer> {
        self.layers.iter().find(|l| l.name == name)
    }

    fn tensors(&self, layer: &AdaptableLayer) -> Result<(&Tensor, Option<&Tensor>)> {
        let weight = self
            .params
            .get(&format!("{}.weight", layer.name))
            .ok_or_else(|| AdapterError(format!("the model has no weight for `{}`", layer.name)))?;
        Ok((weight, self.params.get(&format!("{}.bias", layer.name))))
    }

    fn attached(&self) -> MutexGuard<'_, BTreeMap<String, Vec<Attached>>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the adapters switched off: the base model. They are back on afterwards,
    /// even when `f` panics.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore<'a>(&'a AtomicBool, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.store(self.1, Ordering::SeqCst);
            }
        }
        let _restore = Restore(&self.enabled, self.enabled.swap(false, Ordering::SeqCst));
        f()
    }

    /// Makes one adapter from `plugin` for `layer`, bound to the model's tensors.
    fn make(
        &self,
        registry: &Registry,
        kind: &str,
        layer: &AdaptableLayer,
        mut options: serde_json::Value,
    ) -> Result<AdapterHandle> {
        without_undeclared(registry, kind, &mut options);
        options["layer"] = serde_json::to_value(layer).map_err(err)?;
        let mut a = registry.adapter(kind, &options.to_string()).map_err(err)?;
        let (w, b) = self.tensors(layer)?;
        a.bind(w, b).map_err(err)?;
        Ok(a)
    }

    /// Takes the file layouts of `registry`'s adapters (those that saving and resuming use).
    fn use_layouts(&self, registry: &Registry) -> formats::Layouts {
        let layouts = formats::Layouts::of(registry.components());
        *self.layouts.lock().unwrap_or_else(|e| e.into_inner()) = layouts.clone();
        layouts
    }

    fn attach(&self, kind: &str, layer: &AdaptableLayer, adapter: AdapterHandle) {
        self.attached()
            .entry(layer.name.clone())
            .or_default()
            .push(Attached {
                kind: kind.into(),
                layer: layer.clone(),
                adapter,
                merged_into: None,
            });
    }

    /// Attaches fresh adapters (initialised by the plugin) to `layers`.
    pub fn create(
        &self,
        registry: &Registry,
        layers: &[&AdaptableLayer],
        options: &AdapterOptions,
    ) -> Result<Summary> {
        let json = serde_json::to_value(options).map_err(err)?;
        self.use_layouts(registry);
        for layer in layers {
            let a = self.make(registry, &options.kind, layer, json.clone())?;
            self.attach(&options.kind, layer, a);
        }
        let s = self.summary()?;
        tracing::info!(
            "{}: {} layers adapted, {} trainable values",
            options.kind,
            s.layers,
            s.parameters
        );
        Ok(s)
    }

    /// Reads an adapter file in any supported format and attaches it with strength
    /// `multiplier`. Returns how many layers it adapts.
    pub fn load(
        &self,
        registry: &Registry,
        path: &std::path::Path,
        multiplier: f64,
    ) -> Result<usize> {
        let file = formats::read(self, &self.use_layouts(registry), path)?;
        let n = file.layers.len();
        let mut made = Vec::with_capacity(n);
        for l in file.layers {
            // The file's shapes say the adapter's structure (rank, factors, DoRA).
            let mut shapes = ferrite_plugin_api::adapter::FileShapes::new();
            for (k, t) in l.state.iter().filter(|(k, _)| k != "alpha") {
                shapes.insert(k.clone(), t.shape().map_err(err)?);
            }
            let options = serde_json::json!({
                "alpha": l.alpha,
                "multiplier": multiplier,
                "file_shapes": shapes,
            });
            let mut a = self
                .make(registry, &l.kind, &l.layer, options)
                .map_err(|e| AdapterError(format!("{}: {e}", path.display())))?;
            a.load_state(&l.state)
                .map_err(|e| AdapterError(format!("{}: {e}", path.display())))?;
            made.push((l.kind, l.layer, a));
        }
        // Attach only once the whole file has loaded.
        for (kind, layer, a) in made {
            self.attach(&kind, &layer, a);
        }
        Ok(n)
    }

    /// Loads a file's values into the adapters already attached (resuming training from an
    /// adapter file): each of its layers needs an attached adapter of the same kind, rank and
    /// layout.
    pub fn resume(&self, path: &std::path::Path) -> Result<usize> {
        let layouts = self
            .layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let file = formats::read(self, &layouts, path)?;
        let mut map = self.attached();
        for l in &file.layers {
            let a = map
                .get_mut(&l.layer.name)
                .and_then(|v| v.first_mut())
                .ok_or_else(|| {
                    AdapterError(format!(
                        "{}: layer `{}` has no adapter in this training (a different layer \
                         filter?)",
                        path.display(),
                        l.layer.name
                    ))
                })?;
            if a.kind != l.kind {
                return Err(AdapterError(format!(
                    "{}: layer `{}` is {} in the file but {} here",
                    path.display(),
                    l.layer.name,
                    l.kind,
                    a.kind
                )));
            }
            a.adapter
                .load_state(&l.state)
                .map_err(|e| AdapterError(format!("{}: {e}", path.display())))?;
        }
        Ok(file.layers.len())
    }

    /// Every trainable adapter tensor, as `<layer>.<suffix>`.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, list) in self.attached().iter() {
            for a in list {
                for (k, t) in a.adapter.parameters().map_err(err)? {
                    out.push((format!("{name}.{k}"), t));
                }
            }
        }
        Ok(out)
    }

    /// The layers with an adapter attached, by name.
    pub fn adapted(&self) -> Vec<String> {
        self.attached().keys().cloned().collect()
    }

    pub fn summary(&self) -> Result<Summary> {
        let parameters = self
            .parameters()?
            .iter()
            .map(|(_, t)| t.shape().map(|s| s.iter().product::<usize>()))
            .sum::<ferrite_plugin_api::Result<usize>>()
            .map_err(err)?;
        Ok(Summary {
            layers: self.attached().len(),
            parameters,
        })
    }

    pub fn set_training(&self, training: bool) -> Result<()> {
        for (layer, list) in self.attached().iter_mut() {
            for a in list {
                a.adapter
                    .set_training(training)
                    .map_err(|e| err(format!("adapter on `{layer}`: {e}")))?;
            }
        }
        Ok(())
    }

    /// Folds every attached adapter into its layer's weight (the adapters then stop running).
    pub fn merge(&self) -> Result<()> {
        for list in self.attached().values_mut() {
            for a in list.iter_mut().filter(|a| a.merged_into.is_none()) {
                let (w, _) = self.tensors(&a.layer)?;
                let merged = a.adapter.merged_weight().map_err(err)?;
                w.assign(&merged).map_err(err)?;
                a.merged_into = Some(w.clone());
            }
        }
        Ok(())
    }

    /// Undoes [`ModelLayers::merge`], newest adapter first.
    pub fn unmerge(&self) -> Result<()> {
        for list in self.attached().values_mut() {
            for a in list.iter_mut().rev() {
                if let Some(w) = a.merged_into.take() {
                    let base = a.adapter.unmerged_weight(&w).map_err(err)?;
                    w.assign(&base).map_err(err)?;
                }
            }
        }
        Ok(())
    }

    /// Detaches every adapter; merged ones stay in the weights ([`ModelLayers::unmerge`] first
    /// to undo them).
    pub fn clear(&self) {
        self.attached().clear();
    }

    /// The state of each attached adapter, for writing a file.
    fn states(&self) -> Result<Vec<formats::AdapterState>> {
        let map = self.attached();
        let mut out = Vec::new();
        for a in map.values().flatten() {
            out.push(formats::AdapterState {
                kind: a.kind.clone(),
                layer: a.layer.clone(),
                state: a.adapter.state().map_err(err)?,
            });
        }
        Ok(out)
    }

    /// Writes the attached adapters to `path` in `format`, their tensors in `dtype`, with
    /// kohya's `ss_*` metadata, the model's own and `extra`.
    pub fn save(
        &self,
        path: &std::path::Path,
        format: formats::Format,
        dtype: DType,
        extra: &[(String, String)],
    ) -> Result<()> {
        self.save_with(path, format, dtype, extra, &[])
    }

    /// [`ModelLayers::save`] with `bundled` tensors (embeddings under A1111's `bundle_emb.`
    /// keys) in the file too, in `dtype`.
    pub fn save_with(
        &self,
        path: &std::path::Path,
        format: formats::Format,
        dtype: DType,
        extra: &[(String, String)],
        bundled: &[(String, Tensor)],
    ) -> Result<()> {
        let mut states = self.states()?;
        for s in &mut states {
            for (_, t) in &mut s.state {
                *t = t.cast(dtype).map_err(err)?;
            }
        }
        let bundled = bundled
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.cast(dtype).map_err(err)?)))
            .collect::<Result<Vec<_>>>()?;
        let layouts = self
            .layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        formats::write(path, format, &layouts, &states, &self.info, extra, &bundled)
    }
}

impl crate::runtime::Adapt for ModelLayers {
    /// Runs the adapters attached to `name` on the layer's output (None: no adapter there).
    fn adapt(
        &self,
        name: &str,
        x: TensorId,
        base_out: TensorId,
    ) -> ferrite_plugin_api::Result<Option<TensorId>> {
        if !self.enabled.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let map = self.attached();
        let Some(list) = map
            .get(name)
            .filter(|l| l.iter().any(|a| a.merged_into.is_none()))
        else {
            return Ok(None);
        };
        let x = Tensor::borrow_raw(x);
        let mut out = Tensor::borrow_raw(base_out).try_clone()?;
        for a in list.iter().filter(|a| a.merged_into.is_none()) {
            out = a.adapter.forward(&x, &out)?;
        }
        Ok(Some(out.into_raw()))
    }
}
