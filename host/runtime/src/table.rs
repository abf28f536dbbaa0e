//! The tensor table: every live tensor of one runtime, keyed by the handles plugins hold.

// Handles are sequential integers: SipHash's resistance to chosen keys buys nothing per op.
use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use burn_backend::{
    AutodiffBackend, DType as BDType, FloatDType, TensorData, TensorMetadata, get_device_settings,
    read_sync,
    tensor::{BoolTensor, FloatTensor, IntTensor},
};
use ferrite_plugin_api::{DType, TensorId};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::RtResult;
use crate::autocast::TrainDtype;
use crate::checkpoint::{Frames, Replay, SeedQueue};
use crate::kept::{Kept, WeightFormat};

/// A table entry. Integer and bool tensors exist for indices and masks.
pub enum Value<B: AutodiffBackend> {
    Float(FloatTensor<B>),
    Int(IntTensor<B>),
    Bool(BoolTensor<B>),
    /// Gradients of one backward pass (behind a mutex: burn's are Send but not Sync).
    Grads(Arc<Mutex<B::Gradients>>),
    /// A frozen weight kept in less memory (a part's `weight_dtype`, [`crate::kept`]): ops read
    /// it as f32.
    Kept(Kept<B>),
}

impl<B: AutodiffBackend> Clone for Value<B> {
    fn clone(&self) -> Self {
        match self {
            Value::Float(t) => Value::Float(t.clone()),
            Value::Int(t) => Value::Int(t.clone()),
            Value::Bool(t) => Value::Bool(t.clone()),
            Value::Grads(g) => Value::Grads(g.clone()),
            Value::Kept(k) => Value::Kept(k.clone()),
        }
    }
}

impl<B: AutodiffBackend> Value<B> {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Float(_) => "float tensor",
            Value::Int(_) => "int tensor",
            Value::Bool(_) => "bool tensor",
            Value::Grads(_) => "gradients",
            Value::Kept(_) => "kept weight",
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Value::Float(t) => t.shape().to_vec(),
            Value::Kept(k) => k.shape(),
            Value::Int(t) => t.shape().to_vec(),
            Value::Bool(t) => t.shape().to_vec(),
            Value::Grads(_) => vec![],
        }
    }
}

/// Whether a float tensor takes part in an autodiff graph. burn's `AutodiffBackend` does not say;
/// burn's `Autodiff` does, and it is the only autodiff backend the runtime is built on.
pub trait Tracking: AutodiffBackend {
    fn is_tracked(t: &FloatTensor<Self>) -> bool;
    /// The device as the backend under autodiff names it (collectives run there).
    fn inner_device(d: &Self::Device) -> burn_backend::tensor::Device<Self::InnerBackend>;
    /// Unmasked attention of `[B, H, L, D]` tensors in O(L) extra memory, its matmuls in
    /// `compute` where given ([`crate::attention`]).
    fn memory_efficient_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self>;
    /// Unmasked f32 attention with no gradient by the backend's own kernel, where it has one
    /// ([`crate::fused::Fused::attention_no_grad`]).
    fn attention_no_grad(
        q: &FloatTensor<Self>,
        k: &FloatTensor<Self>,
        v: &FloatTensor<Self>,
        scale: f64,
    ) -> Option<FloatTensor<Self>>;
    /// `conv2d(x, w) + b` on the backend's own kernels where it has them ([`crate::conv`]).
    fn conv2d_fused(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
        options: burn_backend::ops::ConvOptions<2>,
    ) -> FloatTensor<Self>;
    /// `(x − mean) / sqrt(var + eps)` over the last dimension, keeping one tensor for backward
    /// ([`crate::normalize`]).
    fn normalize_last(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    /// `x · sigmoid(a·x)` (SiLU, quick GELU), keeping only `x` for backward ([`crate::gated`]).
    fn x_sigmoid(x: FloatTensor<Self>, a: f64) -> FloatTensor<Self>;
    /// `x · Φ(x)` (GELU, erf form) on the backend's kernels ([`crate::gated::gelu`]).
    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `silu(group_norm(x))`, keeping the normalised input for backward
    /// ([`crate::group_norm_silu`]).
    fn group_norm_silu(
        x: FloatTensor<Self>,
        groups: usize,
        w: Option<FloatTensor<Self>>,
        b: Option<FloatTensor<Self>>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `x · wᵀ + b` for a weight kept below f32, keeping the kept weight (not an f32 copy)
    /// for backward, its matmuls in `compute` where given ([`crate::kept`]).
    fn kept_linear(
        x: FloatTensor<Self>,
        w: Kept<Self>,
        b: Option<FloatTensor<Self>>,
        int_dtype: burn_backend::IntDType,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self>;
    /// A 2-D convolution by a kernel kept below f32, keeping the kept kernel for backward
    /// ([`crate::kept_ops`]).
    fn kept_conv2d(
        x: FloatTensor<Self>,
        w: Kept<Self>,
        b: Option<FloatTensor<Self>>,
        options: burn_backend::ops::ConvOptions<2>,
        int_dtype: burn_backend::IntDType,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self>;
    /// A checkpointed block's output (computed untracked) as one node over its tracked inputs,
    /// whose gradients `replay` gives ([`crate::checkpoint`]).
    fn checkpoint(
        parents: Vec<FloatTensor<Self>>,
        output: FloatTensor<Self::InnerBackend>,
        replay: Arc<dyn Replay<Self::InnerBackend>>,
    ) -> FloatTensor<Self>;
}

impl<B: crate::fused::Fused> Tracking for burn::backend::Autodiff<B> {
    fn is_tracked(t: &FloatTensor<Self>) -> bool {
        t.is_tracked()
    }

    fn inner_device(d: &Self::Device) -> B::Device {
        d.clone()
    }

    fn memory_efficient_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self> {
        crate::attention::attention::<B, NoCheckpointing>(q, k, v, scale, compute)
    }

    fn attention_no_grad(
        q: &FloatTensor<Self>,
        k: &FloatTensor<Self>,
        v: &FloatTensor<Self>,
        scale: f64,
    ) -> Option<FloatTensor<Self>> {
        B::attention_no_grad(&q.primitive, &k.primitive, &v.primitive, scale).map(Self::from_inner)
    }

    fn conv2d_fused(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
        options: burn_backend::ops::ConvOptions<2>,
    ) -> FloatTensor<Self> {
        crate::conv::conv2d::<B, NoCheckpointing>(x, w, b, options)
    }

    fn normalize_last(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        crate::normalize::normalize_last::<B, NoCheckpointing>(x, eps)
    }

    fn x_sigmoid(x: FloatTensor<Self>, a: f64) -> FloatTensor<Self> {
        crate::gated::x_sigmoid::<B, NoCheckpointing>(x, a)
    }

    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::gated::gelu::<B, NoCheckpointing>(x)
    }

    fn group_norm_silu(
        x: FloatTensor<Self>,
        groups: usize,
        w: Option<FloatTensor<Self>>,
        b: Option<FloatTensor<Self>>,
        eps: f64,
    ) -> FloatTensor<Self> {
        crate::group_norm_silu::group_norm_silu::<B, NoCheckpointing>(x, groups, w, b, eps)
    }

    fn kept_linear(
        x: FloatTensor<Self>,
        w: Kept<Self>,
        b: Option<FloatTensor<Self>>,
        int_dtype: burn_backend::IntDType,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self> {
        crate::kept_ops::linear::<B>(x, w, b, int_dtype, compute)
    }

    fn kept_conv2d(
        x: FloatTensor<Self>,
        w: Kept<Self>,
        b: Option<FloatTensor<Self>>,
        options: burn_backend::ops::ConvOptions<2>,
        int_dtype: burn_backend::IntDType,
        compute: Option<FloatDType>,
    ) -> FloatTensor<Self> {
        crate::kept_ops::conv2d::<B>(x, w, b, options, int_dtype, compute)
    }

    fn checkpoint(
        parents: Vec<FloatTensor<Self>>,
        output: FloatTensor<B>,
        replay: Arc<dyn Replay<B>>,
    ) -> FloatTensor<Self> {
        crate::checkpoint::block_node::<B, NoCheckpointing>(parents, output, replay)
    }
}

/// `burn::backend::Autodiff`'s default strategy: no recomputation.
type NoCheckpointing = burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;

pub struct TensorTable<B: AutodiffBackend> {
    pub device: B::Device,
    pub device_name: String,
    /// Held only to look up or store values, never while an op computes: runs on other threads
    /// sharing this runtime wait for a map access, not for each other's kernels.
    live: Mutex<Live<B>>,
    rngs: Mutex<Rngs>,
    /// Where dropout masks come from outside any [`crate::Scope`]; a scope's run draws from
    /// its own.
    dropout: Mutex<ChaCha8Rng>,
    /// Blocks being recorded for gradient checkpointing, per thread.
    pub(crate) frames: Frames<B>,
    /// Dropout seeds to use first (a checkpointed block's replay draws its masks again).
    replay_seeds: SeedQueue,
    /// The train dtype a checkpointed block's replay computes in: the one it was recorded in,
    /// whichever scope backward runs under.
    pinned_train_dtype: OnceLock<TrainDtype>,
}

/// The backend keeps one generator per process: seeding it and drawing from it happen under
/// this lock, so draws of two runtimes never interleave.
static BACKEND_RNG: Mutex<()> = Mutex::new(());

/// The handles and values of one runtime.
struct Live<B: AutodiffBackend> {
    /// Handle → slot. Each holder has its own handle (`retain` makes a new one), so a holder
    /// that releases one handle too many cannot drop another holder's reference.
    handles: HashMap<u64, u64>,
    /// Slot → value and number of handles: an in-place update (`assign`, `set_requires_grad`)
    /// through one handle is seen by every holder, as with a torch Parameter.
    slots: HashMap<u64, (Value<B>, u32)>,
    next: u64,
}

/// Host-side generators (`rng_new`), for draws that repeat whatever the device.
struct Rngs {
    map: HashMap<u64, ChaCha8Rng>,
    next: u64,
}

/// Handles and generator ids carry their runtime's number in the top bits, so a handle alone
/// says which runtime holds it.
pub const RUNTIME_SHIFT: u32 = 48;

/// The runtime number a handle or generator id belongs to.
pub fn runtime_of(id: u64) -> u16 {
    (id >> RUNTIME_SHIFT) as u16
}

fn not_live(id: TensorId) -> String {
    format!(
        "tensor handle {} is not live (released or never created)",
        id.0
    )
}

pub fn to_burn_dtype(d: DType) -> RtResult<BDType> {
    Ok(match d {
        DType::F32 => BDType::F32,
        DType::F16 => BDType::F16,
        DType::BF16 => BDType::BF16,
        DType::F64 => BDType::F64,
        DType::I64 => BDType::I64,
        DType::I32 => BDType::I32,
        DType::U8 => BDType::U8,
        DType::Bool => BDType::Bool(burn_backend::BoolStore::Native),
        _ => {
            return Err(format!("dtype {d} is not supported by this backend"));
        }
    })
}

pub fn from_burn_dtype(d: BDType) -> DType {
    match d {
        BDType::F32 | BDType::Flex32 => DType::F32,
        BDType::F16 => DType::F16,
        BDType::BF16 => DType::BF16,
        BDType::F64 => DType::F64,
        BDType::I64 | BDType::U64 => DType::I64,
        BDType::I32 | BDType::U32 | BDType::I16 | BDType::U16 | BDType::I8 => DType::I32,
        BDType::U8 => DType::U8,
        _ => DType::Bool,
    }
}

pub fn int_dtype(d: DType) -> RtResult<burn_backend::IntDType> {
    use burn_backend::IntDType;
    match d {
        DType::I64 => Ok(IntDType::I64),
        DType::I32 => Ok(IntDType::I32),
        DType::U8 => Ok(IntDType::U8),
        other => Err(format!("{other} is not an integer dtype")),
    }
}

pub fn float_dtype(d: DType) -> RtResult<FloatDType> {
    match d {
        DType::F32 => Ok(FloatDType::F32),
        DType::F16 => Ok(FloatDType::F16),
        DType::BF16 => Ok(FloatDType::BF16),
        DType::F64 => Ok(FloatDType::F64),
        other => Err(format!(
            "{other} is not a float dtype this backend computes in"
        )),
    }
}

impl<B: AutodiffBackend> TensorTable<B> {
    /// An empty table; its handles are numbered in runtime `index`'s range.
    pub fn new(device: B::Device, device_name: String, index: u16) -> Self {
        let first = (u64::from(index) << RUNTIME_SHIFT) | 1;
        Self {
            device,
            device_name,
            live: Mutex::new(Live {
                handles: HashMap::default(),
                slots: HashMap::default(),
                next: first,
            }),
            rngs: Mutex::new(Rngs {
                map: HashMap::default(),
                next: first,
            }),
            dropout: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            frames: Frames::default(),
            replay_seeds: SeedQueue::default(),
            pinned_train_dtype: OnceLock::new(),
        }
    }

    /// Makes this table's ops compute in `dtype` whatever the calling scope says.
    pub(crate) fn pin_train_dtype(&self, dtype: TrainDtype) {
        let _ = self.pinned_train_dtype.set(dtype);
    }

    /// The dtype matmul, convolutions and attention compute in now ([`crate::autocast`]).
    pub(crate) fn train_dtype(&self) -> TrainDtype {
        self.pinned_train_dtype
            .get()
            .copied()
            .unwrap_or_else(crate::scope::train_dtype)
    }

    /// [`Self::train_dtype`] as the cast ops apply (None: f32 as they are).
    pub(crate) fn compute_dtype(&self) -> Option<FloatDType> {
        self.train_dtype().compute()
    }

    /// Seeds the next dropout draws take, before any other.
    pub(crate) fn queue_seeds(&self, seeds: &[u64]) {
        self.replay_seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(seeds);
    }

    /// Runs `draw` (a backend random op) seeded from the calling run's dropout generator (the
    /// runtime's own outside any run).
    pub fn backend_random<T>(&self, draw: impl FnOnce() -> T) -> T
    where
        B: Tracking,
    {
        let queued = self
            .replay_seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let seed = match (queued, crate::scope::current()) {
            (Some(seed), _) => seed,
            (None, Some(s)) => s.next_dropout_seed(),
            (None, None) => self
                .dropout
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_u64(),
        };
        self.note_seed(seed);
        let _backend = BACKEND_RNG.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(&self.device, seed);
        draw()
    }

    fn lock(&self) -> MutexGuard<'_, Live<B>> {
        // Every update below leaves the maps consistent, so a panic elsewhere does not poison
        // them in any way that matters.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_rngs(&self) -> MutexGuard<'_, Rngs> {
        self.rngs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of live handles.
    pub fn live(&self) -> usize {
        self.lock().handles.len()
    }

    pub fn insert(&self, v: Value<B>) -> TensorId {
        let mut l = self.lock();
        let id = l.next;
        l.next += 1;
        l.handles.insert(id, id);
        l.slots.insert(id, (v, 1));
        TensorId(id)
    }

    /// A new handle to the same tensor.
    pub fn retain(&self, id: TensorId) -> RtResult<TensorId> {
        let mut l = self.lock();
        let slot = l.slot(id)?;
        if let Some(s) = l.slots.get_mut(&slot) {
            s.1 += 1;
        }
        let new = l.next;
        l.next += 1;
        l.handles.insert(new, slot);
        Ok(TensorId(new))
    }

    /// The slot `id` refers to: handles made by `retain` share their original's.
    pub(crate) fn slot_of(&self, id: TensorId) -> RtResult<u64> {
        self.lock().slot(id)
    }

    /// The value behind `id` as ops compute with it: a kept weight comes as an f32 copy
    /// (values are cheap to clone: the data is shared).
    pub fn get(&self, id: TensorId) -> RtResult<Value<B>> {
        Ok(match self.get_kept(id)? {
            Value::Kept(k) => Value::Float(k.dequantize(self.settings().int_dtype)),
            v => v,
        })
    }

    /// The value behind `id` as it is kept.
    pub(crate) fn get_kept(&self, id: TensorId) -> RtResult<Value<B>> {
        let l = self.lock();
        let slot = l.slot(id)?;
        l.slots
            .get(&slot)
            .map(|(v, _)| v.clone())
            .ok_or_else(|| not_live(id))
    }

    /// Keeps the frozen float tensor `id` in `format` from now on (every handle to it sees
    /// the change); ops still read it as f32. F32 changes nothing.
    pub fn keep(&self, id: TensorId, format: WeightFormat) -> RtResult<()> {
        let t = match self.get_kept(id)? {
            Value::Float(t) if B::float_is_require_grad(&t) => {
                return Err(format!(
                    "tensor {} is trained: only frozen weights are kept below f32",
                    id.0
                ));
            }
            Value::Float(t) => t,
            // Kept already (when it was loaded).
            Value::Kept(k) if k.format() == format => return Ok(()),
            other => return Err(format!("cannot keep a {} as a weight", other.kind())),
        };
        match Kept::new(t, format)? {
            Some(k) => self.replace(id, Value::Kept(k)),
            None => Ok(()),
        }
    }

    /// A model part's plugin loaded weight `ids[0]`: kept at once in the part's format when
    /// the calling scope keeps that part's weights at load ([`crate::Scope::with_keep_at_load`]),
    /// so loading never holds the whole part in f32.
    pub(crate) fn weight_loaded(&self, ids: &[TensorId], part: &str) -> RtResult<Vec<TensorId>> {
        let format = crate::scope::current().and_then(|s| s.keep_at_load.get(part).copied());
        let (Some(format), Some(&id)) = (format, ids.first()) else {
            return Ok(Vec::new());
        };
        if let Value::Float(t) = self.get_kept(id)?
            && !B::float_is_require_grad(&t)
            && let Some(format) = format.for_rank(t.shape().num_dims())
        {
            self.keep(id, format)?;
        }
        Ok(Vec::new())
    }

    /// Refuses to make a kept weight trainable or to overwrite it: either would silently turn
    /// it back into f32.
    pub(crate) fn not_kept(&self, op: &str, id: TensorId) -> RtResult<()> {
        match self.get_kept(id)? {
            Value::Kept(_) => Err(format!(
                "op {op}: tensor {} is a frozen weight kept below f32 (weight_dtype); it cannot \
                 be trained or overwritten",
                id.0
            )),
            _ => Ok(()),
        }
    }

    /// Replaces the value every handle to `id`'s tensor sees.
    pub fn replace(&self, id: TensorId, v: Value<B>) -> RtResult<()> {
        let mut l = self.lock();
        let slot = l.slot(id)?;
        let s = l.slots.get_mut(&slot).ok_or_else(|| not_live(id))?;
        s.0 = v;
        Ok(())
    }

    /// Drops one handle; the tensor goes with its last handle. False when `id` was not live
    /// (released twice, or never created): nothing else is touched.
    pub fn release(&self, id: TensorId) -> bool {
        let dropped = {
            let mut l = self.lock();
            let Some(slot) = l.handles.remove(&id.0) else {
                return false;
            };
            match l.slots.get_mut(&slot) {
                Some(s) if s.1 > 1 => {
                    s.1 -= 1;
                    None
                }
                _ => l.slots.remove(&slot),
            }
        };
        // The last handle's value is freed outside the lock (device memory release).
        drop(dropped);
        true
    }

    pub fn float(&self, id: TensorId) -> RtResult<FloatTensor<B>> {
        match self.get(id)? {
            Value::Float(t) => Ok(t),
            other => Err(format!(
                "expected a float tensor, got {} (handle {})",
                other.kind(),
                id.0
            )),
        }
    }

    /// An integer tensor; float values are truncated (so indices may come as floats).
    pub fn int(&self, id: TensorId) -> RtResult<IntTensor<B>> {
        match self.get(id)? {
            Value::Int(t) => Ok(t),
            Value::Float(t) => Ok(B::float_into_int(t, self.settings().int_dtype)),
            other => Err(format!(
                "expected an integer tensor, got {} (handle {})",
                other.kind(),
                id.0
            )),
        }
    }

    /// A bool tensor; numeric values are `!= 0`.
    pub fn bool(&self, id: TensorId) -> RtResult<BoolTensor<B>> {
        let bd = self.settings().bool_dtype;
        match self.get(id)? {
            Value::Bool(t) => Ok(t),
            Value::Float(t) => Ok(B::float_not_equal_elem(t, 0.0.into(), bd)),
            Value::Int(t) => Ok(B::int_not_equal_elem(t, 0.into(), bd)),
            other => Err(format!(
                "expected a mask, got {} (handle {})",
                other.kind(),
                id.0
            )),
        }
    }

    pub fn settings(&self) -> burn_backend::DeviceSettings {
        get_device_settings::<B>(&self.device)
    }

    pub fn kept_bytes(&self, id: TensorId) -> RtResult<usize> {
        match self.get_kept(id)? {
            Value::Float(t) => Ok(t.shape().num_elements() * t.dtype().size()),
            Value::Kept(k) => Ok(k.bytes()),
            other => Err(format!("a {} is not a weight", other.kind())),
        }
    }

    pub fn dtype(&self, id: TensorId) -> RtResult<DType> {
        Ok(match self.get_kept(id)? {
            Value::Float(t) => from_burn_dtype(t.dtype()),
            Value::Kept(k) => from_burn_dtype(k.dtype()),
            Value::Int(t) => from_burn_dtype(t.dtype()),
            Value::Bool(_) => DType::Bool,
            Value::Grads(_) => return Err("a gradients handle has no dtype".into()),
        })
    }

    /// Reads a tensor back to host memory (a device sync).
    pub fn data(&self, id: TensorId) -> RtResult<TensorData> {
        let r = match self.get_kept(id)? {
            Value::Float(t) => read_sync(B::float_into_data(t)),
            Value::Kept(Kept::Half(t)) => read_sync(B::float_into_data(t)),
            Value::Kept(k) => {
                read_sync(B::float_into_data(k.dequantize(self.settings().int_dtype)))
            }
            Value::Int(t) => read_sync(B::int_into_data(t)),
            Value::Bool(t) => read_sync(B::bool_into_data(t)),
            Value::Grads(_) => return Err("a gradients handle holds no data".into()),
        };
        r.map_err(|e| format!("reading tensor {} from the device: {e}", id.0))
    }

    /// Uploads host data: float data becomes a float tensor, integer data an int tensor.
    pub fn upload(&self, data: TensorData) -> TensorId {
        let v = if data.dtype.is_float() {
            Value::Float(B::float_from_data(data, &self.device))
        } else if data.dtype.is_bool() {
            Value::Bool(B::bool_from_data(data, &self.device))
        } else {
            let int_dtype: BDType = self.settings().int_dtype.into();
            Value::Int(B::int_from_data(
                data.convert_dtype(int_dtype),
                &self.device,
            ))
        };
        self.insert(v)
    }

    pub fn rng_new(&self, seed: u64) -> u64 {
        let mut r = self.lock_rngs();
        let id = r.next;
        r.next += 1;
        r.map.insert(id, ChaCha8Rng::seed_from_u64(seed));
        id
    }

    pub fn rng_release(&self, id: u64) {
        self.lock_rngs().map.remove(&id);
    }

    /// Runs `f` with generator `id`, or None when it does not exist.
    pub fn with_rng<T>(&self, id: u64, f: impl FnOnce(&mut ChaCha8Rng) -> T) -> Option<T> {
        self.lock_rngs().map.get_mut(&id).map(f)
    }
}

impl<B: AutodiffBackend> Live<B> {
    fn slot(&self, id: TensorId) -> RtResult<u64> {
        self.handles.get(&id.0).copied().ok_or_else(|| not_live(id))
    }
}
