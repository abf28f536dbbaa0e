#![allow(non_local_definitions)] // sabi_trait expands to impls the lint flags.
//! Types that cross the library boundary. Everything here is `StableAbi`: the host checks the
//! layout of the root module (and so of everything reachable from it) when it loads a plugin.

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    nonexhaustive_enum::NonExhaustive,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
};

/// The ABI's own semver: `plugin-api`'s package version, independent of Ferrite's. A minor bump
/// only adds (prefix fields, enum variants, ops) and older plugins keep loading; a major bump is
/// refused by hosts of another major ("built for ABI N, this host speaks M").
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A non-exhaustive ABI enum's value, or an error naming the variant this side does not know
/// (sent by a peer built against a newer `plugin-api`).
pub fn known_ref<'a, E, S, I>(what: &str, v: &'a NonExhaustive<E, S, I>) -> Result<&'a E, String>
where
    E: abi_stable::nonexhaustive_enum::GetEnumInfo,
    E::Discriminant: std::fmt::Debug,
{
    v.as_enum().map_err(|_| {
        format!(
            "unknown {what} #{:?} (sent by a peer built against a newer plugin-api than this \
             side's {ABI_VERSION}): update this side",
            v.get_discriminant()
        )
    })
}

/// [`known_ref`], copied out.
pub fn known<E, S, I>(what: &str, v: &NonExhaustive<E, S, I>) -> Result<E, String>
where
    E: abi_stable::nonexhaustive_enum::GetEnumInfo + Clone,
    E::Discriminant: std::fmt::Debug,
{
    known_ref(what, v).cloned()
}

/// An opaque handle to a tensor owned by the host.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u64);

impl TensorId {
    /// An optional op input that is absent (no live handle is ever 0).
    pub const NONE: TensorId = TensorId(0);
}

/// Element types. Non-exhaustive: it crosses the ABI as [`DType_NE`], so variants can be added.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[sabi(kind(WithNonExhaustive(size = 8, align = 8, traits(Debug, Clone, PartialEq))))]
#[non_exhaustive]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::F8E4M3 => "f8_e4m3",
            DType::F8E5M2 => "f8_e5m2",
        }
    }
}

impl DType {
    pub fn to_ne(self) -> DType_NE {
        NonExhaustive::new(self)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An operation code. A plain integer rather than an enum so that a plugin built against a newer
/// `plugin-api` can send a code this host does not know and get a clear error back.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpCode(pub u32);

/// A non-tensor argument of an op. Which attributes an op takes, in which order, is written
/// once in `op.rs`; both sides encode and decode through that table.
#[repr(u8)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
#[sabi(kind(WithNonExhaustive(size = [u64; 6], align = 8, traits(Debug, Clone, PartialEq))))]
#[non_exhaustive]
pub enum Attr {
    None,
    Int(i64),
    Float(f64),
    Bool(bool),
    Ints(RVec<i64>),
    Floats(RVec<f32>),
    Str(RString),
    DType(DType_NE),
}

#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
#[sabi(kind(WithNonExhaustive(size = 8, align = 8, traits(Debug, Clone, PartialEq))))]
#[non_exhaustive]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// One tensor of a safetensors file, as listed without reading its data.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct WeightEntry {
    pub key: RString,
    pub dtype: DType_NE,
    pub shape: RVec<u64>,
}

/// A [`WeightEntry`] as plugins use it.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightInfo {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// A tensor with a name: state export/import, safetensors saving.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: RString,
    pub tensor: TensorId,
}

/// One parameter of an optimizer step: its stable name (state is kept by it), the tensor, and its
/// gradient, absent when it got none this step (the optimizer then leaves it and its state).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ParamGrad {
    pub name: RString,
    pub param: TensorId,
    pub grad: ROption<TensorId>,
}

/// A tensor's values copied to host memory (as f32), for logs and tests.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: RVec<u64>,
    pub dtype: DType_NE,
    pub data: RVec<f32>,
}

/// The services the host offers every plugin. A prefix type: fields are only ever appended (a
/// minor ABI bump), so a plugin built against an older `plugin-api` keeps loading; fields
/// appended after 1.0's prefix are `Option`s to plugins, as an older host lacks them.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostRef)))]
#[sabi(missing_field(option))]
pub struct HostApi {
    /// Runs one op: tensor inputs (an absent optional one is [`TensorId::NONE`]), attributes as
    /// the op table in `op.rs` lists them, and the output handles (owned by the caller).
    pub call: extern "C" fn(
        OpCode,
        RSlice<'_, TensorId>,
        RSlice<'_, Attr_NE>,
    ) -> RResult<RVec<TensorId>, RString>,
    /// A new handle to the same tensor, owned by the caller: an in-place update through one is
    /// seen through the other, and each handle is released once, on its own.
    pub retain: extern "C" fn(TensorId) -> RResult<TensorId, RString>,
    /// Drops one handle. Releasing a handle that is not live is reported, never undefined.
    pub release: extern "C" fn(TensorId),
    pub shape: extern "C" fn(TensorId) -> RResult<RVec<u64>, RString>,
    pub dtype: extern "C" fn(TensorId) -> RResult<DType_NE, RString>,
    pub to_host: extern "C" fn(TensorId) -> RResult<HostTensor, RString>,
    /// Opens a safetensors file (memory-mapped; nothing is read but its header).
    pub open_weights: extern "C" fn(RStr<'_>) -> RResult<u64, RString>,
    pub weight_infos: extern "C" fn(u64) -> RResult<RVec<WeightEntry>, RString>,
    pub weight_metadata: extern "C" fn(u64) -> RResult<RVec<Tuple2<RString, RString>>, RString>,
    /// Reads one tensor of an open file onto the device, cast to the given dtype.
    pub load_weight: extern "C" fn(u64, RStr<'_>, DType_NE) -> RResult<TensorId, RString>,
    pub close_weights: extern "C" fn(u64),
    /// Writes tensors to a safetensors file atomically (temp name, fsync, rename).
    pub save_safetensors: extern "C" fn(
        RStr<'_>,
        RSlice<'_, NamedTensor>,
        RSlice<'_, Tuple2<RString, RString>>,
    ) -> RResult<(), RString>,
    /// A seeded random generator; `randn`/`rand` take its id.
    pub rng_new: extern "C" fn(u64) -> RResult<u64, RString>,
    pub rng_release: extern "C" fn(u64),
    pub log: extern "C" fn(LogLevel_NE, RStr<'_>, RStr<'_>),
    /// The name of the device tensors live on (`cpu`, `cuda:0`).
    pub device: extern "C" fn() -> RString,
    pub is_cancelled: extern "C" fn() -> bool,
    /// The output of layer `name` with its attached adapters, given the layer's input and base
    /// output; None when no adapter is attached to it.
    #[sabi(last_prefix_field)]
    pub adapt: extern "C" fn(RStr<'_>, TensorId, TensorId) -> RResult<ROption<TensorId>, RString>,
}

#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[sabi(kind(WithNonExhaustive(size = 8, align = 8, traits(Debug, Clone, PartialEq))))]
#[non_exhaustive]
pub enum ComponentKind {
    Architecture,
    Adapter,
    Optimizer,
    Captioner,
    Masker,
}

impl ComponentKind {
    pub fn name(self) -> &'static str {
        match self {
            ComponentKind::Architecture => "architecture",
            ComponentKind::Adapter => "adapter",
            ComponentKind::Optimizer => "optimizer",
            ComponentKind::Captioner => "captioner",
            ComponentKind::Masker => "masker",
        }
    }
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 5] = [
        ComponentKind::Architecture,
        ComponentKind::Adapter,
        ComponentKind::Optimizer,
        ComponentKind::Captioner,
        ComponentKind::Masker,
    ];

    pub fn from_name(name: &str) -> Option<ComponentKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn to_ne(self) -> ComponentKind_NE {
        NonExhaustive::new(self)
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ComponentDescriptor {
    pub kind: ComponentKind_NE,
    pub id: RString,
    pub version: RString,
    pub description: RString,
    /// JSON schema of the component's options.
    pub options_schema: RString,
}

/// An optimizer instance. Parameters are updated in place (`assign`); state tensors stay in the host.
#[sabi_trait]
pub trait OptimizerFfi: Send {
    fn step(&mut self, params: RSlice<'_, ParamGrad>, lr: f64) -> RResult<(), RString>;
    /// State tensors by name; the caller owns the returned handles.
    fn state(&self) -> RResult<RVec<NamedTensor>, RString>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: RSlice<'_, NamedTensor>) -> RResult<(), RString>;
}

/// A model. Every entry point of ABI 1.0 is required (a model without a VAE says so in its
/// error). No entry point can be added: abi_stable's layout check refuses a plugin whose vtable
/// has fewer entries than the host's (a prefix type may only be longer in the library loaded),
/// so a newer host would refuse every older plugin. What the host tells a model goes in its
/// JSON options, and what a model tells the host in its `model_info` and `parameters`.
#[sabi_trait]
pub trait ArchitectureFfi: Send {
    /// Trainable parameters by name; the caller owns the returned handles.
    fn parameters(&self) -> RResult<RVec<NamedTensor>, RString>;
    fn forward(&self, inputs: RSlice<'_, TensorId>) -> RResult<RVec<TensorId>, RString>;
    /// JSON facts the host needs to sample and train: latent channels, VAE scale and scaling
    /// factor, the scheduler config.
    fn model_info(&self) -> RResult<RString, RString>;
    /// Text states for each prompt (the caller owns the handles).
    fn encode_text(&self, prompts: RSlice<'_, RString>) -> RResult<RVec<TensorId>, RString>;
    /// Image `[B, 3, H, W]` in -1..1 to the latent distribution's mean and log-variance.
    fn vae_encode(&self, image: TensorId) -> RResult<RVec<TensorId>, RString>;
    /// Unscaled latents to an image in -1..1.
    fn vae_decode(&self, latents: TensorId) -> RResult<TensorId, RString>;
    /// The denoiser's prediction for noisy latents at timesteps `[B]` given text states.
    fn denoise(
        &self,
        latents: TensorId,
        timesteps: TensorId,
        text: RSlice<'_, TensorId>,
    ) -> RResult<TensorId, RString>;
    /// Every tensor of the model (VAE and text encoders included) under the names of a file
    /// `layout` (`ldm`: an original single-file checkpoint), for saving a fine-tune.
    /// `diffusers`: each component's tensors as `<component folder>.<diffusers key>` (`unet.`,
    /// `vae.`, `text_encoder.`...), for writing a diffusers folder.
    #[sabi(last_prefix_field)]
    fn export(&self, layout: RStr<'_>) -> RResult<RVec<NamedTensor>, RString>;
}

/// An adapter (LoRA, LoHa, ...) on one layer. Instantiated with the layer described in its
/// options (`layer`: name, kind, weight shape, conv options), then bound to the layer's tensors.
#[sabi_trait]
pub trait AdapterFfi: Send {
    /// Gives the adapter the layer's base weight and bias (before any other call).
    fn bind(&mut self, weight: TensorId, bias: ROption<TensorId>) -> RResult<(), RString>;
    /// The trainable tensors, under the adapter's own key suffixes (`lora_down.weight`, ...).
    fn parameters(&self) -> RResult<RVec<NamedTensor>, RString>;
    /// Everything a file holds for this layer: the parameters and constants such as `alpha`.
    fn state(&self) -> RResult<RVec<NamedTensor>, RString>;
    fn load_state(&mut self, state: RSlice<'_, NamedTensor>) -> RResult<(), RString>;
    /// Dropout and the like apply only while training.
    fn set_training(&mut self, training: bool) -> RResult<(), RString>;
    /// The adapted layer's output given its input and the base layer's output.
    fn forward(&self, x: TensorId, base_out: TensorId) -> RResult<TensorId, RString>;
    /// The base weight with the adapter merged in.
    fn merged_weight(&mut self) -> RResult<TensorId, RString>;
    /// The base weight back from a merged one.
    #[sabi(last_prefix_field)]
    fn unmerged_weight(&self, merged: TensorId) -> RResult<TensorId, RString>;
}

/// Image (`[3, H, W]`, RGB in 0..1) and the user's initial caption (a captioner that
/// continues a prompt starts from it; a tagger puts it first) to caption text. The host adds
/// the prefix and postfix and writes the file.
#[sabi_trait]
pub trait CaptionerFfi: Send {
    #[sabi(last_prefix_field)]
    fn caption(&mut self, image: TensorId, prompt: RStr<'_>) -> RResult<RString, RString>;
}

/// Image (`[3, H, W]`, RGB in 0..1) and prompt (the user's text; several prompts are separated
/// by commas) to a `[1, h, w]` map at the masker's own resolution, the host resizing it to the
/// image's: a pixel is masked where the map is above the user's threshold (OneTrainer's
/// post-processing — smoothing, threshold, expansion, modes — is the host's).
#[sabi_trait]
pub trait MaskerFfi: Send {
    #[sabi(last_prefix_field)]
    fn mask(&mut self, image: TensorId, prompt: RStr<'_>) -> RResult<TensorId, RString>;
}

pub type OptimizerBox = OptimizerFfi_TO<'static, RBox<()>>;
pub type ArchitectureBox = ArchitectureFfi_TO<'static, RBox<()>>;
pub type AdapterBox = AdapterFfi_TO<'static, RBox<()>>;
pub type CaptionerBox = CaptionerFfi_TO<'static, RBox<()>>;
pub type MaskerBox = MaskerFfi_TO<'static, RBox<()>>;

/// An instantiated component. Non-exhaustive: a new kind of component is a minor bump.
#[repr(u8)]
#[derive(StableAbi)]
#[sabi(kind(WithNonExhaustive(size = [u64; 8], align = 8, traits(Sync = false))))]
#[non_exhaustive]
pub enum ComponentBox {
    Architecture(ArchitectureBox),
    Adapter(AdapterBox),
    Optimizer(OptimizerBox),
    Captioner(CaptionerBox),
    Masker(MaskerBox),
}

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginLibRef)))]
// Entry points appended after 1.0 are `Option`s to the host: a 1.0 plugin lacks them.
#[sabi(missing_field(option))]
pub struct PluginLib {
    pub name: RStr<'static>,
    pub version: RStr<'static>,
    /// Called once after loading, before anything else; the host handle stays valid for the
    /// life of the process.
    pub init: extern "C" fn(HostRef) -> RResult<(), RString>,
    pub describe: extern "C" fn() -> RResult<RVec<ComponentDescriptor>, RString>,
    #[sabi(last_prefix_field)]
    pub instantiate:
        extern "C" fn(ComponentKind_NE, RStr<'_>, RStr<'_>) -> RResult<ComponentBox_NE, RString>,
}

impl RootModule for PluginLibRef {
    declare_root_module_statics! {PluginLibRef}
    const BASE_NAME: &'static str = "ferrite_plugin";
    const NAME: &'static str = "ferrite_plugin";
    /// [`ABI_VERSION`]: abi_stable refuses a library of another major before reading anything
    /// else of it.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
