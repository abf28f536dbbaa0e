//! The safe plugin traits, and the glue that exports them through the ABI.

use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};

use abi_stable::{
    nonexhaustive_enum::NonExhaustive,
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RErr, ROk, ROption, RResult, RSlice, RStr, RString, RVec},
};

use crate::abi::*;
use crate::error::{Error, Result};
use crate::host::{res, set_host};
use crate::tensor::Tensor;

/// What a component is, for `ferrite plugins list` and the GUI.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub kind: ComponentKind,
    pub id: String,
    pub version: String,
    pub description: String,
    /// JSON schema of the options `instantiate` accepts.
    pub options_schema: serde_json::Value,
}

impl Descriptor {
    /// An optimizer whose options are `properties` (a JSON schema's, no others allowed).
    pub fn optimizer(
        id: &str,
        version: &str,
        description: &str,
        properties: serde_json::Value,
    ) -> Self {
        Self {
            kind: ComponentKind::Optimizer,
            id: id.into(),
            version: version.into(),
            description: description.into(),
            options_schema: serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "properties": properties
            }),
        }
    }
}

/// One parameter of an optimizer step.
pub struct Param<'a> {
    /// The parameter's stable name: optimizer state is kept (and saved) by it.
    pub name: &'a str,
    pub tensor: &'a Tensor,
    /// None when the parameter got no gradient this step: it is skipped and its state kept,
    /// as torch's optimizers do for `grad is None`.
    pub grad: Option<&'a Tensor>,
}

pub trait Optimizer: Send {
    /// Updates each parameter that has a gradient in place (via [`Tensor::assign`]).
    fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()>;
    /// State tensors by name (parameter names inside), to save with a backup.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()>;
}

/// A model. The diffusion methods default to "not supported" so that small test models and
/// future families implement only what they have.
pub trait Architecture: Send {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>>;
    fn forward(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let _ = inputs;
        Err(Error::msg("this model has no generic forward"))
    }
    /// See [`ArchitectureFfi::model_info`].
    fn model_info(&self) -> Result<serde_json::Value> {
        Err(Error::msg("this model is not a diffusion model"))
    }
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let _ = prompts;
        Err(Error::msg("this model has no text encoder"))
    }
    fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = image;
        Err(Error::msg("this model has no VAE"))
    }
    fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _ = latents;
        Err(Error::msg("this model has no VAE"))
    }
    fn denoise(&self, latents: &Tensor, timesteps: &Tensor, text: &[&Tensor]) -> Result<Tensor> {
        let _ = (latents, timesteps, text);
        Err(Error::msg("this model has no denoiser"))
    }
    /// See [`ArchitectureFfi::export`].
    fn export(&self, layout: &str) -> Result<Vec<(String, Tensor)>> {
        Err(Error(format!(
            "this model cannot be written in the `{layout}` layout"
        )))
    }
}

/// An adapter on one layer; see [`AdapterFfi`](crate::abi::AdapterFfi) for the contract.
pub trait Adapter: Send {
    fn bind(&mut self, weight: Tensor, bias: Option<Tensor>) -> Result<()>;
    fn parameters(&self) -> Result<Vec<(String, Tensor)>>;
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()>;
    fn set_training(&mut self, training: bool);
    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor>;
    fn merged_weight(&mut self) -> Result<Tensor>;
    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor>;
}

pub trait Captioner: Send {
    fn caption(&mut self, image: &Tensor, prompt: &str) -> Result<String>;
}

pub trait Masker: Send {
    fn mask(&mut self, image: &Tensor, prompt: &str) -> Result<Tensor>;
}

pub enum Component {
    Architecture(Box<dyn Architecture>),
    Adapter(Box<dyn Adapter>),
    Optimizer(Box<dyn Optimizer>),
    Captioner(Box<dyn Captioner>),
    Masker(Box<dyn Masker>),
}

/// A plugin library: implement this on a unit struct and call [`export_plugin!`](crate::export_plugin).
pub trait Plugin: 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    /// Runs once when the host loads the library.
    fn init() -> Result<()> {
        Ok(())
    }
    fn components() -> Vec<Descriptor>;
    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component>;
}

/// Reads a component's options: fields given in `options` override `defaults`; an unknown field
/// or a wrong type is an error naming the component (with `deny_unknown_fields` on `T`).
pub fn parse_options<T: serde::Serialize + serde::de::DeserializeOwned>(
    id: &str,
    defaults: T,
    options: serde_json::Value,
) -> Result<T> {
    let serde_json::Value::Object(given) = options else {
        return Err(Error(format!("options of `{id}` must be a JSON object")));
    };
    let mut merged = serde_json::to_value(defaults).map_err(|e| Error(e.to_string()))?;
    if let Some(m) = merged.as_object_mut() {
        m.extend(given);
    }
    // serde_path_to_error names the field at fault ("hidden: invalid type ...").
    serde_path_to_error::deserialize(merged).map_err(|e| Error(format!("options of `{id}`: {e}")))
}

/// Exports a [`Plugin`] as this library's root module. The library depends on `abi_stable` itself
/// (its attribute macro names the crate by its absolute path).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[::abi_stable::export_root_module]
        pub fn ferrite_plugin_root() -> $crate::abi::PluginLibRef {
            $crate::plugin::root_module::<$plugin>()
        }
    };
}

/// Text of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs plugin code so that neither an error nor a panic crosses the ABI as anything but text.
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(e.0.into()),
        Err(p) => RErr(format!("panicked: {}", panic_message(&*p)).into()),
    }
}

fn borrowed(ids: RSlice<'_, TensorId>) -> Vec<ManuallyDrop<Tensor>> {
    ids.iter().map(|&id| Tensor::borrow_raw(id)).collect()
}

fn refs(v: &[ManuallyDrop<Tensor>]) -> Vec<&Tensor> {
    v.iter().map(|t| &**t).collect()
}

fn export_named(v: Vec<(String, Tensor)>) -> RVec<NamedTensor> {
    v.into_iter()
        .map(|(name, t)| NamedTensor {
            name: name.into(),
            tensor: t.into_raw(),
        })
        .collect()
}

/// Takes ownership of named handles received through the ABI.
pub fn import_named(v: impl IntoIterator<Item = NamedTensor>) -> Vec<(String, Tensor)> {
    v.into_iter()
        .map(|n| (n.name.into_string(), Tensor::from_raw(n.tensor)))
        .collect()
}

// ---- plugin side: safe traits behind the FFI traits ----

struct OptimizerShim(Box<dyn Optimizer>);

impl OptimizerFfi for OptimizerShim {
    fn step(&mut self, params: RSlice<'_, ParamGrad>, lr: f64) -> RResult<(), RString> {
        guard(|| {
            let held: Vec<(ManuallyDrop<Tensor>, Option<ManuallyDrop<Tensor>>)> = params
                .iter()
                .map(|p| {
                    (
                        Tensor::borrow_raw(p.param),
                        p.grad.into_option().map(Tensor::borrow_raw),
                    )
                })
                .collect();
            let named: Vec<Param<'_>> = params
                .iter()
                .zip(&held)
                .map(|(p, (t, g))| Param {
                    name: p.name.as_str(),
                    tensor: t,
                    grad: g.as_deref(),
                })
                .collect();
            self.0.step(&named, lr)
        })
    }
    fn state(&self) -> RResult<RVec<NamedTensor>, RString> {
        guard(|| self.0.state().map(export_named))
    }
    fn load_state(&mut self, state: RSlice<'_, NamedTensor>) -> RResult<(), RString> {
        guard(|| self.0.load_state(owned_named(state)?))
    }
}

/// The plugin's own handles to tensors the host passed (the host keeps its handles).
fn owned_named(state: RSlice<'_, NamedTensor>) -> Result<Vec<(String, Tensor)>> {
    state
        .iter()
        .map(|n| {
            Ok((
                n.name.to_string(),
                Tensor::borrow_raw(n.tensor).try_clone()?,
            ))
        })
        .collect()
}

struct ArchitectureShim(Box<dyn Architecture>);

impl ArchitectureFfi for ArchitectureShim {
    fn parameters(&self) -> RResult<RVec<NamedTensor>, RString> {
        guard(|| self.0.parameters().map(export_named))
    }
    fn forward(&self, inputs: RSlice<'_, TensorId>) -> RResult<RVec<TensorId>, RString> {
        guard(|| {
            let i = borrowed(inputs);
            Ok(self
                .0
                .forward(&refs(&i))?
                .into_iter()
                .map(Tensor::into_raw)
                .collect())
        })
    }
    fn model_info(&self) -> RResult<RString, RString> {
        guard(|| Ok(self.0.model_info()?.to_string().into()))
    }
    fn encode_text(&self, prompts: RSlice<'_, RString>) -> RResult<RVec<TensorId>, RString> {
        guard(|| {
            let p: Vec<&str> = prompts.iter().map(RString::as_str).collect();
            Ok(self
                .0
                .encode_text(&p)?
                .into_iter()
                .map(Tensor::into_raw)
                .collect())
        })
    }
    fn vae_encode(&self, image: TensorId) -> RResult<RVec<TensorId>, RString> {
        guard(|| {
            let (m, l) = self.0.vae_encode(&Tensor::borrow_raw(image))?;
            Ok(RVec::from(vec![m.into_raw(), l.into_raw()]))
        })
    }
    fn vae_decode(&self, latents: TensorId) -> RResult<TensorId, RString> {
        guard(|| Ok(self.0.vae_decode(&Tensor::borrow_raw(latents))?.into_raw()))
    }
    fn export(&self, layout: RStr<'_>) -> RResult<RVec<NamedTensor>, RString> {
        guard(|| Ok(export_named(self.0.export(layout.as_str())?)))
    }
    fn denoise(
        &self,
        latents: TensorId,
        timesteps: TensorId,
        text: RSlice<'_, TensorId>,
    ) -> RResult<TensorId, RString> {
        guard(|| {
            let t = borrowed(text);
            let out = self.0.denoise(
                &Tensor::borrow_raw(latents),
                &Tensor::borrow_raw(timesteps),
                &refs(&t),
            )?;
            Ok(out.into_raw())
        })
    }
}

struct AdapterShim(Box<dyn Adapter>);

impl AdapterFfi for AdapterShim {
    fn bind(&mut self, weight: TensorId, bias: ROption<TensorId>) -> RResult<(), RString> {
        guard(|| {
            let weight = Tensor::borrow_raw(weight).try_clone()?;
            let bias = match bias {
                ROption::RSome(b) => Some(Tensor::borrow_raw(b).try_clone()?),
                ROption::RNone => None,
            };
            self.0.bind(weight, bias)
        })
    }
    fn parameters(&self) -> RResult<RVec<NamedTensor>, RString> {
        guard(|| self.0.parameters().map(export_named))
    }
    fn state(&self) -> RResult<RVec<NamedTensor>, RString> {
        guard(|| self.0.state().map(export_named))
    }
    fn load_state(&mut self, state: RSlice<'_, NamedTensor>) -> RResult<(), RString> {
        guard(|| self.0.load_state(owned_named(state)?))
    }
    fn set_training(&mut self, training: bool) -> RResult<(), RString> {
        guard(|| {
            self.0.set_training(training);
            Ok(())
        })
    }
    fn forward(&self, x: TensorId, base_out: TensorId) -> RResult<TensorId, RString> {
        guard(|| {
            let out = self
                .0
                .forward(&Tensor::borrow_raw(x), &Tensor::borrow_raw(base_out))?;
            Ok(out.into_raw())
        })
    }
    fn merged_weight(&mut self) -> RResult<TensorId, RString> {
        guard(|| Ok(self.0.merged_weight()?.into_raw()))
    }
    fn unmerged_weight(&self, merged: TensorId) -> RResult<TensorId, RString> {
        guard(|| {
            Ok(self
                .0
                .unmerged_weight(&Tensor::borrow_raw(merged))?
                .into_raw())
        })
    }
}

struct CaptionerShim(Box<dyn Captioner>);

impl CaptionerFfi for CaptionerShim {
    fn caption(&mut self, image: TensorId, prompt: RStr<'_>) -> RResult<RString, RString> {
        guard(|| {
            Ok(self
                .0
                .caption(&Tensor::borrow_raw(image), prompt.as_str())?
                .into())
        })
    }
}

struct MaskerShim(Box<dyn Masker>);

impl MaskerFfi for MaskerShim {
    fn mask(&mut self, image: TensorId, prompt: RStr<'_>) -> RResult<TensorId, RString> {
        guard(|| {
            Ok(self
                .0
                .mask(&Tensor::borrow_raw(image), prompt.as_str())?
                .into_raw())
        })
    }
}

impl From<Component> for ComponentBox {
    fn from(c: Component) -> Self {
        match c {
            Component::Architecture(b) => ComponentBox::Architecture(
                ArchitectureFfi_TO::from_value(ArchitectureShim(b), TD_Opaque),
            ),
            Component::Adapter(b) => {
                ComponentBox::Adapter(AdapterFfi_TO::from_value(AdapterShim(b), TD_Opaque))
            }
            Component::Optimizer(b) => {
                ComponentBox::Optimizer(OptimizerFfi_TO::from_value(OptimizerShim(b), TD_Opaque))
            }
            Component::Captioner(b) => {
                ComponentBox::Captioner(CaptionerFfi_TO::from_value(CaptionerShim(b), TD_Opaque))
            }
            Component::Masker(b) => {
                ComponentBox::Masker(MaskerFfi_TO::from_value(MaskerShim(b), TD_Opaque))
            }
        }
    }
}

extern "C" fn init<P: Plugin>(host: HostRef) -> RResult<(), RString> {
    guard(|| {
        set_host(host);
        // This library has its own copy of std and so its own panic hook: report panics through
        // the host's log instead of raw stderr (the error itself reaches the host via `guard`).
        std::panic::set_hook(Box::new(|info| {
            crate::host::log(LogLevel::Debug, P::NAME, &format!("panic: {info}"));
        }));
        P::init()
    })
}

extern "C" fn describe<P: Plugin>() -> RResult<RVec<ComponentDescriptor>, RString> {
    guard(|| {
        Ok(P::components()
            .into_iter()
            .map(|d| ComponentDescriptor {
                kind: d.kind.to_ne(),
                id: d.id.into(),
                version: d.version.into(),
                description: d.description.into(),
                options_schema: d.options_schema.to_string().into(),
            })
            .collect())
    })
}

extern "C" fn instantiate<P: Plugin>(
    kind: ComponentKind_NE,
    id: RStr<'_>,
    options_json: RStr<'_>,
) -> RResult<ComponentBox_NE, RString> {
    guard(|| {
        let kind = known("component kind", &kind).map_err(Error)?;
        let json = options_json.as_str().trim();
        let options = if json.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(json)
                .map_err(|e| Error(format!("options of `{id}` are not valid JSON: {e}")))?
        };
        P::instantiate(kind, id.as_str(), options)
            .map(|c| NonExhaustive::new(ComponentBox::from(c)))
    })
}

/// Builds the root module of a plugin library (used by [`export_plugin!`](crate::export_plugin)).
pub fn root_module<P: Plugin>() -> PluginLibRef {
    PluginLib {
        name: RStr::from_str(P::NAME),
        version: RStr::from_str(P::VERSION),
        init: init::<P>,
        describe: describe::<P>,
        instantiate: instantiate::<P>,
    }
    .leak_into_prefix()
}

// ---- host side: safe wrappers over the FFI trait objects ----

/// An optimizer instance loaded from a plugin.
pub struct OptimizerHandle(pub OptimizerBox);

impl OptimizerHandle {
    /// One step over named parameters (those without a gradient are skipped).
    pub fn step(&mut self, params: &[Param<'_>], lr: f64) -> Result<()> {
        let p: Vec<ParamGrad> = params
            .iter()
            .map(|p| ParamGrad {
                name: p.name.into(),
                param: p.tensor.id(),
                grad: p.grad.map(|g| g.id()).into(),
            })
            .collect();
        res(self.0.step(RSlice::from_slice(&p), lr))
    }

    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(import_named(res(self.0.state())?))
    }

    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        res(self.0.load_state(RSlice::from_slice(&export_refs(state))))
    }
}

fn export_refs(state: &[(String, Tensor)]) -> Vec<NamedTensor> {
    state
        .iter()
        .map(|(n, t)| NamedTensor {
            name: n.as_str().into(),
            tensor: t.id(),
        })
        .collect()
}

/// An adapter instance loaded from a plugin.
pub struct AdapterHandle(pub AdapterBox);

impl AdapterHandle {
    pub fn bind(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let bias = bias.map(Tensor::id).into();
        res(self.0.bind(weight.id(), bias))
    }
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(import_named(res(self.0.parameters())?))
    }
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(import_named(res(self.0.state())?))
    }
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        res(self.0.load_state(RSlice::from_slice(&export_refs(state))))
    }
    pub fn set_training(&mut self, training: bool) -> Result<()> {
        res(self.0.set_training(training))
    }
    pub fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_raw(res(self
            .0
            .forward(x.id(), base_out.id()))?))
    }
    pub fn merged_weight(&mut self) -> Result<Tensor> {
        Ok(Tensor::from_raw(res(self.0.merged_weight())?))
    }
    pub fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_raw(res(self.0.unmerged_weight(merged.id()))?))
    }
}

/// A captioner loaded from a plugin; see [`CaptionerFfi`](crate::abi::CaptionerFfi) for the
/// contract.
pub struct CaptionerHandle(pub crate::abi::CaptionerBox);

impl CaptionerHandle {
    pub fn caption(&mut self, image: &Tensor, prompt: &str) -> Result<String> {
        Ok(res(self.0.caption(image.id(), RStr::from_str(prompt)))?.into_string())
    }
}

/// A masker loaded from a plugin; see [`MaskerFfi`](crate::abi::MaskerFfi) for the contract.
pub struct MaskerHandle(pub crate::abi::MaskerBox);

impl MaskerHandle {
    pub fn mask(&mut self, image: &Tensor, prompt: &str) -> Result<Tensor> {
        Ok(Tensor::from_raw(res(self
            .0
            .mask(image.id(), RStr::from_str(prompt)))?))
    }
}

/// A model instance loaded from a plugin.
pub struct ArchitectureHandle(pub ArchitectureBox);

impl ArchitectureHandle {
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(import_named(res(self.0.parameters())?))
    }

    pub fn forward(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let ids: Vec<TensorId> = inputs.iter().map(|t| t.id()).collect();
        Ok(res(self.0.forward(RSlice::from_slice(&ids)))?
            .into_iter()
            .map(Tensor::from_raw)
            .collect())
    }

    pub fn model_info(&self) -> Result<serde_json::Value> {
        let text = res(self.0.model_info())?;
        serde_json::from_str(&text).map_err(|e| Error(format!("model_info is not JSON: {e}")))
    }

    pub fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let p: Vec<RString> = prompts.iter().map(|&s| s.into()).collect();
        let out = res(self.0.encode_text(RSlice::from_slice(&p)))?;
        Ok(out.into_iter().map(Tensor::from_raw).collect())
    }

    pub fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = res(self.0.vae_encode(image.id()))?;
        let mut t: Vec<Tensor> = out.into_iter().map(Tensor::from_raw).collect();
        match (t.pop(), t.pop()) {
            (Some(logvar), Some(mean)) if t.is_empty() => Ok((mean, logvar)),
            _ => Err(Error::msg("vae_encode must return mean and logvar")),
        }
    }

    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_raw(res(self.0.vae_decode(latents.id()))?))
    }

    /// Every tensor under the names of a file `layout` (`ldm`).
    pub fn export(&self, layout: &str) -> Result<Vec<(String, Tensor)>> {
        let out = res(self.0.export(RStr::from_str(layout)))?;
        Ok(import_named(out))
    }

    pub fn denoise(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        text: &[&Tensor],
    ) -> Result<Tensor> {
        let ids: Vec<TensorId> = text.iter().map(|t| t.id()).collect();
        let out = res(self
            .0
            .denoise(latents.id(), timesteps.id(), RSlice::from_slice(&ids)))?;
        Ok(Tensor::from_raw(out))
    }
}
