//! The tensor runtime: burn with autodiff, one table of live tensors per runtime (a value:
//! [`Device`]), the scopes that tell plugin calls which run they serve, and the host services
//! table handed to plugins.

mod api;
pub mod attention;
pub mod autocast;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod conv;
pub mod fsutil;
pub mod fused;
pub mod gated;
pub mod group_norm_silu;
pub mod kept;
pub mod kept_ops;
mod malloc;
pub mod normalize;
mod ops;
mod pickle;
mod scope;
pub mod selftest;
mod table;
mod torch_file;
mod weights;

use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

use burn_backend::TensorData;
use ferrite_plugin_api::{DType, Op, TensorId};

pub use api::host_ref;
pub use autocast::TrainDtype;
pub use kept::WeightFormat;
pub use scope::{Adapt, Cancel, Entered, Scope};
pub use table::{TensorTable, Tracking};
pub use weights::WeightFile;

pub type RtResult<T> = Result<T, String>;

/// Object-safe face of a [`TensorTable`] over some backend, so the backend is picked at run time.
pub trait Runtime: Send + Sync {
    fn device_name(&self) -> &str;
    fn call(&self, op: &Op, inputs: &[TensorId]) -> RtResult<Vec<TensorId>>;
    fn retain(&self, id: TensorId) -> RtResult<TensorId>;
    /// False when `id` was not live.
    fn release(&self, id: TensorId) -> bool;
    fn shape(&self, id: TensorId) -> RtResult<Vec<usize>>;
    fn dtype(&self, id: TensorId) -> RtResult<DType>;
    fn data(&self, id: TensorId) -> RtResult<TensorData>;
    fn upload(&self, data: TensorData) -> TensorId;
    /// Keeps a frozen weight in `format` (ops still read it as f32).
    fn keep(&self, id: TensorId, format: WeightFormat) -> RtResult<()>;
    /// Bytes a float tensor's data takes as kept.
    fn kept_bytes(&self, id: TensorId) -> RtResult<usize>;
    /// Blocks made into checkpoint nodes so far.
    fn checkpointed_blocks(&self) -> u64;
    fn rng_new(&self, seed: u64) -> u64;
    fn rng_release(&self, id: u64);
    /// Number of live handles (leak checks in tests).
    fn live(&self) -> usize;
    /// Joins the data-parallel run `setup` describes (blocks until the coordinator answers).
    fn collective_join(&self, setup: &collective::Setup) -> RtResult<()>;
    /// The mean of float tensor `id` over the run's processes.
    fn all_reduce_mean(&self, id: TensorId) -> RtResult<TensorId>;
    fn collective_reset(&self);
    fn collective_leave(&self) -> RtResult<()>;
}

impl<B: Tracking> Runtime for TensorTable<B> {
    fn device_name(&self) -> &str {
        &self.device_name
    }
    fn call(&self, op: &Op, inputs: &[TensorId]) -> RtResult<Vec<TensorId>> {
        match op {
            Op::CheckpointBegin(_) => return self.checkpoint_begin(),
            Op::CheckpointEnd(_) => return self.checkpoint_end(inputs),
            Op::WeightLoaded(a) => return self.weight_loaded(inputs, &a.part),
            Op::FallbackBegin(_) | Op::FallbackEnd(_) => {
                crate::scope::fallback(matches!(op, Op::FallbackBegin(_)))?;
                return Ok(Vec::new());
            }
            _ if self.recording() => return self.record(op, inputs),
            _ => {}
        }
        let out = self.exec(op, inputs)?;
        Ok(out.into_iter().map(|v| self.insert(v)).collect())
    }
    fn retain(&self, id: TensorId) -> RtResult<TensorId> {
        TensorTable::retain(self, id)
    }
    fn release(&self, id: TensorId) -> bool {
        TensorTable::release(self, id)
    }
    fn shape(&self, id: TensorId) -> RtResult<Vec<usize>> {
        Ok(self.get_kept(id)?.shape())
    }
    fn dtype(&self, id: TensorId) -> RtResult<DType> {
        TensorTable::dtype(self, id)
    }
    fn data(&self, id: TensorId) -> RtResult<TensorData> {
        TensorTable::data(self, id)
    }
    fn upload(&self, data: TensorData) -> TensorId {
        TensorTable::upload(self, data)
    }
    fn keep(&self, id: TensorId, format: WeightFormat) -> RtResult<()> {
        TensorTable::keep(self, id, format)
    }
    fn kept_bytes(&self, id: TensorId) -> RtResult<usize> {
        TensorTable::kept_bytes(self, id)
    }
    fn checkpointed_blocks(&self) -> u64 {
        self.frames.made.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn rng_new(&self, seed: u64) -> u64 {
        TensorTable::rng_new(self, seed)
    }
    fn rng_release(&self, id: u64) {
        TensorTable::rng_release(self, id)
    }
    fn live(&self) -> usize {
        TensorTable::live(self)
    }
    fn collective_join(&self, setup: &collective::Setup) -> RtResult<()> {
        TensorTable::collective_join(self, setup)
    }
    fn all_reduce_mean(&self, id: TensorId) -> RtResult<TensorId> {
        TensorTable::all_reduce_mean(self, id)
    }
    fn collective_reset(&self) {
        TensorTable::collective_reset(self)
    }
    fn collective_leave(&self) -> RtResult<()> {
        TensorTable::collective_leave(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("train_device `{0}` is not understood: use auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error(
        "train_device `{0}` needs CUDA, but this ferrite was built without it: rebuild with `--features cuda`"
    )]
    NotBuilt(String),
    #[error("CUDA requested but no NVIDIA driver found ({0})")]
    NoDriver(String),
    #[error("too many runtimes opened in this process")]
    TooMany,
}

/// A runtime: one device's tensor table, shared by the runs and tools computing there. Cheap to
/// clone; the table goes when the last clone does (handles still held then are dead).
#[derive(Clone)]
pub struct Device {
    rt: Arc<dyn Runtime>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Device")
            .field(&self.rt.device_name())
            .finish()
    }
}

/// Every runtime opened in this process, by number (a handle's top bits): how a plugin's handle
/// finds its table. Weak: the runs own their runtimes.
static RUNTIMES: RwLock<Vec<Weak<dyn Runtime>>> = RwLock::new(Vec::new());
/// The runtime of code that entered none ([`init`]: the CLI and tests that use one device).
static DEFAULT: Mutex<Option<Device>> = Mutex::new(None);
/// One runtime per device, for whoever asks by device ([`for_device`]).
static SHARED: Mutex<Vec<Device>> = Mutex::new(Vec::new());

fn shared_devices() -> MutexGuard<'static, Vec<Device>> {
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read on every call on handles (concurrent runs share the lock); written when one opens.
fn runtimes() -> RwLockReadGuard<'static, Vec<Weak<dyn Runtime>>> {
    RUNTIMES.read().unwrap_or_else(|e| e.into_inner())
}

fn runtimes_mut() -> RwLockWriteGuard<'static, Vec<Weak<dyn Runtime>>> {
    RUNTIMES.write().unwrap_or_else(|e| e.into_inner())
}

fn default_device() -> MutexGuard<'static, Option<Device>> {
    DEFAULT.lock().unwrap_or_else(|e| e.into_inner())
}

impl Device {
    /// A new runtime on `device` (`auto`, `cpu`, `cuda`, `cuda:N`) with its own tensor table,
    /// and where it computes (and why, for `auto`).
    pub fn open(device: &str) -> Result<(Self, String), DeviceError> {
        let index = {
            let mut all = runtimes_mut();
            if all.len() >= usize::from(u16::MAX) {
                return Err(DeviceError::TooMany);
            }
            all.push(Weak::<TensorTable<CpuBackend>>::new() as Weak<dyn Runtime>);
            all.len() as u16
        };
        let (rt, said) = if device.trim() == "auto" {
            let (rt, why) = auto_runtime(index);
            let said = format!(
                "computing on {} (train_device auto: {why})",
                rt.device_name()
            );
            (rt, said)
        } else {
            let rt = new_runtime(device, index)?;
            let said = format!("computing on {}", rt.device_name());
            (rt, said)
        };
        runtimes_mut()[usize::from(index) - 1] = Arc::downgrade(&rt);
        ferrite_plugin_api::host::set_host(host_ref());
        Ok((Self { rt }, said))
    }

    /// The runtime holding `id` (None: never opened, or closed since).
    pub(crate) fn of(id: u64) -> Option<Self> {
        let index = usize::from(table::runtime_of(id));
        let rt = runtimes().get(index.checked_sub(1)?)?.upgrade()?;
        Some(Self { rt })
    }

    /// The runtime new tensors go to on this thread: its entered scope's, else the default.
    pub fn current() -> Option<Self> {
        scope::current()
            .map(|s| s.device)
            .or_else(|| default_device().clone())
    }

    pub fn name(&self) -> &str {
        self.rt.device_name()
    }

    /// Live tensor handles, for leak checks.
    pub fn live(&self) -> usize {
        self.rt.live()
    }

    /// Keeps the frozen weight `id` in `format` from now on (a part's `weight_dtype`); ops
    /// read it as f32. Trained tensors are refused.
    pub fn keep_weight(&self, id: TensorId, format: WeightFormat) -> RtResult<()> {
        self.rt.keep(id, format)
    }

    /// Bytes the float tensor `id`'s data takes as kept (quantised or not).
    pub fn kept_bytes(&self, id: TensorId) -> RtResult<usize> {
        self.rt.kept_bytes(id)
    }

    /// How many blocks this runtime has checkpointed (made into one node that recomputes them
    /// in backward) so far.
    pub fn checkpointed_blocks(&self) -> u64 {
        self.rt.checkpointed_blocks()
    }

    /// Joins the data-parallel run `setup` describes: from then on [`Device::all_reduce_mean`]
    /// averages with the other processes.
    pub fn collective_join(&self, setup: &collective::Setup) -> RtResult<()> {
        self.rt.collective_join(setup)
    }

    /// The mean of float tensor `id` over the run's processes (each calls it, in one order).
    pub fn all_reduce_mean(&self, id: TensorId) -> RtResult<TensorId> {
        self.rt.all_reduce_mean(id)
    }

    /// Leaves the data-parallel run.
    pub fn collective_leave(&self) -> RtResult<()> {
        self.rt.collective_leave()
    }

    /// Forgets this process's part in a data-parallel run that failed, so a later one can join
    /// (never blocks).
    pub fn collective_reset(&self) {
        self.rt.collective_reset()
    }

    /// The same runtime.
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.rt, &other.rt)
    }

    pub(crate) fn rt(&self) -> &dyn Runtime {
        self.rt.as_ref()
    }
}

pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

fn cpu_runtime(index: u16) -> Arc<dyn Runtime> {
    Arc::new(TensorTable::<CpuBackend>::new(
        Default::default(),
        "cpu".into(),
        index,
    ))
}

/// `auto`: the first CUDA device when this build has CUDA and a driver answers, else the CPU;
/// the runtime, and why.
fn auto_runtime(index: u16) -> (Arc<dyn Runtime>, String) {
    #[cfg(feature = "cuda")]
    {
        match new_runtime("cuda:0", index) {
            Ok(rt) => (rt, "this build has CUDA and a driver answered".into()),
            Err(e) => (cpu_runtime(index), e.to_string()),
        }
    }
    #[cfg(not(feature = "cuda"))]
    (
        cpu_runtime(index),
        "this ferrite was built without CUDA".into(),
    )
}

fn parse_device(device: &str) -> Result<Option<usize>, DeviceError> {
    match device.trim() {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| DeviceError::Unknown(device.to_string())),
    }
}

/// Whether the CUDA driver library opens (as cudarc looks for it).
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    // SAFETY: the driver library's initialisers are what burn would run on first use anyway.
    names
        .iter()
        .any(|n| unsafe { libloading::Library::new(n) }.is_ok())
}

fn new_runtime(device: &str, index: u16) -> Result<Arc<dyn Runtime>, DeviceError> {
    match parse_device(device)? {
        None => Ok(cpu_runtime(index)),
        #[cfg(feature = "cuda")]
        Some(cuda) => {
            use burn_backend::Backend;
            if !cuda_driver_present() {
                return Err(DeviceError::NoDriver(
                    "the CUDA driver library (libcuda) was not found".into(),
                ));
            }
            let dev = burn::backend::cuda::CudaDevice::new(cuda);
            // burn panics on first use when the driver does not work: probe once, here.
            let probe = std::panic::catch_unwind(|| {
                let t =
                    <CudaBackend as burn_backend::ops::FloatTensorOps<CudaBackend>>::float_zeros(
                        burn_backend::Shape::from(vec![1]),
                        &dev,
                        burn_backend::FloatDType::F32,
                    );
                let _ =
                    burn_backend::read_sync(<CudaBackend as burn_backend::ops::FloatTensorOps<
                        CudaBackend,
                    >>::float_into_data(t));
                CudaBackend::sync(&dev)
            });
            match probe {
                Ok(Ok(())) => Ok(Arc::new(TensorTable::<CudaBackend>::new(
                    dev,
                    format!("cuda:{cuda}"),
                    index,
                ))),
                Ok(Err(e)) => Err(DeviceError::NoDriver(e.to_string())),
                // The cause is logged by the worker thread that panicked; what reaches here is
                // often only a closed channel.
                Err(_) => Err(DeviceError::NoDriver(
                    "the CUDA driver library (libcuda) could not be loaded or initialised".into(),
                )),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Some(_) => Err(DeviceError::NotBuilt(device.to_string())),
    }
}

/// The runtime shared by everything computing on `device` (`auto`, `cpu`, `cuda`, `cuda:N`),
/// opened on first use and kept for the process; and where it computes (and why, for `auto`,
/// which is resolved once per process).
pub fn for_device(device: &str) -> Result<(Device, String), DeviceError> {
    // What `auto` resolved to the first time (the CUDA probe runs once), and what was said.
    static AUTO: OnceLock<(String, String)> = OnceLock::new();
    let mut shared = shared_devices();
    let auto = device.trim() == "auto";
    let (wanted, said) = if auto {
        match AUTO.get() {
            Some((name, said)) => (Some(name.clone()), said.clone()),
            None => (None, String::new()),
        }
    } else {
        let name = match parse_device(device)? {
            None => "cpu".to_string(),
            Some(i) => format!("cuda:{i}"),
        };
        let said = format!("computing on {name}");
        (Some(name), said)
    };
    if let Some(d) = wanted.and_then(|w| shared.iter().find(|d| d.name() == w)) {
        return Ok((d.clone(), said));
    }
    let (d, said) = Device::open(device)?;
    if d.name() == "cpu" {
        malloc::tune();
    }
    if auto {
        let _ = AUTO.set((d.name().to_string(), said.clone()));
    }
    // `auto` may resolve to a device already open: keep one runtime per device.
    if let Some(existing) = shared.iter().find(|s| s.name() == d.name()) {
        return Ok((existing.clone(), said));
    }
    shared.push(d.clone());
    Ok((d, said))
}

/// Selects the default runtime: where code that entered no [`Scope`] computes (the CLI,
/// single-run tools and tests). Says where it computes (and why, for `auto`).
pub fn init(device: &str) -> Result<String, DeviceError> {
    let (d, said) = for_device(device)?;
    tracing::info!("{said}");
    *default_device() = Some(d);
    Ok(said)
}

/// The device the current runtime computes on (`none` before [`init`]).
pub fn device_name() -> String {
    Device::current().map_or_else(|| "none".into(), |d| d.name().to_string())
}

/// Live tensor handles of the current runtime, for leak checks.
pub fn live_tensors() -> usize {
    Device::current().map_or(0, |d| d.live())
}
