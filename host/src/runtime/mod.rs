//! The tensor runtime: one burn backend with autodiff, a table of live tensors, and the host
//! services table handed to plugins.

mod api;
mod ops;
mod table;
mod weights;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use burn_backend::TensorData;
use ferrite_plugin_api::{DType, Op, TensorId};

pub use api::host_ref;
pub use table::{TensorTable, Tracking};
pub use weights::WeightFile;

pub type RtResult<T> = Result<T, String>;

/// Object-safe face of a [`TensorTable`] over some backend, so the backend is picked at run time.
pub trait Runtime: Send {
    fn device_name(&self) -> &str;
    fn call(&mut self, op: &Op, inputs: &[TensorId]) -> RtResult<Vec<TensorId>>;
    fn retain(&mut self, id: TensorId) -> RtResult<TensorId>;
    /// False when `id` was not live.
    fn release(&mut self, id: TensorId) -> bool;
    fn shape(&self, id: TensorId) -> RtResult<Vec<usize>>;
    fn dtype(&self, id: TensorId) -> RtResult<DType>;
    fn data(&self, id: TensorId) -> RtResult<TensorData>;
    fn upload(&mut self, data: TensorData) -> TensorId;
    fn rng_new(&mut self, seed: u64) -> u64;
    fn rng_release(&mut self, id: u64);
    /// Seeds the backend's own generator (dropout masks), so a run's draws repeat.
    fn seed(&mut self, seed: u64);
    /// Number of live handles (leak checks in tests).
    fn live(&self) -> usize;
}

impl<B: Tracking> Runtime for TensorTable<B> {
    fn device_name(&self) -> &str {
        &self.device_name
    }
    fn call(&mut self, op: &Op, inputs: &[TensorId]) -> RtResult<Vec<TensorId>> {
        let out = self.exec(op, inputs)?;
        Ok(out.into_iter().map(|v| self.insert(v)).collect())
    }
    fn retain(&mut self, id: TensorId) -> RtResult<TensorId> {
        TensorTable::retain(self, id)
    }
    fn release(&mut self, id: TensorId) -> bool {
        TensorTable::release(self, id)
    }
    fn shape(&self, id: TensorId) -> RtResult<Vec<usize>> {
        Ok(self.get(id)?.shape())
    }
    fn dtype(&self, id: TensorId) -> RtResult<DType> {
        TensorTable::dtype(self, id)
    }
    fn data(&self, id: TensorId) -> RtResult<TensorData> {
        TensorTable::data(self, id)
    }
    fn upload(&mut self, data: TensorData) -> TensorId {
        TensorTable::upload(self, data)
    }
    fn rng_new(&mut self, seed: u64) -> u64 {
        TensorTable::rng_new(self, seed)
    }
    fn rng_release(&mut self, id: u64) {
        self.rngs.remove(&id);
    }
    fn seed(&mut self, seed: u64) {
        <B as burn_backend::Backend>::seed(&self.device, seed);
    }
    fn live(&self) -> usize {
        TensorTable::live(self)
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
    #[error(
        "the runtime already computes on `{current}` with live tensors; cannot switch to `{requested}`"
    )]
    Busy { current: String, requested: String },
}

static RUNTIME: Mutex<Option<Box<dyn Runtime>>> = Mutex::new(None);
static CANCELLED: AtomicBool = AtomicBool::new(false);

pub(crate) fn lock() -> std::sync::MutexGuard<'static, Option<Box<dyn Runtime>>> {
    // A panic inside an op is caught and reported; the table itself stays consistent.
    RUNTIME.lock().unwrap_or_else(|e| e.into_inner())
}

pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

fn cpu_runtime() -> Box<dyn Runtime> {
    Box::new(TensorTable::<CpuBackend>::new(
        Default::default(),
        "cpu".into(),
    ))
}

/// `auto`: the first CUDA device when this build has CUDA and a driver answers, else the CPU;
/// the runtime, and why.
fn auto_runtime() -> (Box<dyn Runtime>, String) {
    #[cfg(feature = "cuda")]
    {
        match new_runtime("cuda:0") {
            Ok(rt) => (rt, "this build has CUDA and a driver answered".into()),
            Err(e) => (cpu_runtime(), e.to_string()),
        }
    }
    #[cfg(not(feature = "cuda"))]
    (cpu_runtime(), "this ferrite was built without CUDA".into())
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

fn new_runtime(device: &str) -> Result<Box<dyn Runtime>, DeviceError> {
    match parse_device(device)? {
        None => Ok(cpu_runtime()),
        #[cfg(feature = "cuda")]
        Some(index) => {
            use burn_backend::Backend;
            let dev = burn::backend::cuda::CudaDevice::new(index);
            // burn panics on first use when there is no driver: probe once, here.
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
                Ok(Ok(())) => Ok(Box::new(TensorTable::<CudaBackend>::new(
                    dev,
                    format!("cuda:{index}"),
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

/// Selects the compute device (`auto`, `cpu`, `cuda`, `cuda:N`) and installs the host services
/// for the host's own use of `plugin-api`; says where it computes (and why, for `auto`). Calling
/// it again with the same device is a no-op.
pub fn init(device: &str) -> Result<String, DeviceError> {
    let mut g = lock();
    if device.trim() == "auto" {
        // Already computing somewhere: that is where `auto` stays.
        let said = match g.as_ref() {
            Some(rt) => format!(
                "computing on {} (train_device auto: already in use)",
                rt.device_name()
            ),
            None => {
                let (rt, why) = auto_runtime();
                let said = format!(
                    "computing on {} (train_device auto: {why})",
                    rt.device_name()
                );
                *g = Some(rt);
                ferrite_plugin_api::host::set_host(host_ref());
                said
            }
        };
        tracing::info!("{said}");
        return Ok(said);
    }
    let wanted = match parse_device(device)? {
        None => "cpu".to_string(),
        Some(i) => format!("cuda:{i}"),
    };
    let said = format!("computing on {wanted}");
    tracing::info!("{said}");
    if let Some(rt) = g.as_ref() {
        if rt.device_name() == wanted {
            return Ok(said);
        }
        if rt.live() > 0 {
            return Err(DeviceError::Busy {
                current: rt.device_name().into(),
                requested: wanted,
            });
        }
    }
    *g = Some(new_runtime(device)?);
    ferrite_plugin_api::host::set_host(host_ref());
    Ok(said)
}

/// Seeds the backend's generator (what dropout draws from).
pub fn seed_random(seed: u64) {
    if let Some(rt) = lock().as_mut() {
        rt.seed(seed);
    }
}

/// Asks running work (training, sampling) to stop at its next check.
pub fn cancel() {
    CANCELLED.store(true, Ordering::SeqCst);
}

pub fn reset_cancel() {
    CANCELLED.store(false, Ordering::SeqCst);
}

pub(crate) fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// The device the runtime computes on (`none` before [`init`]).
pub fn device_name() -> String {
    lock()
        .as_ref()
        .map_or_else(|| "none".into(), |rt| rt.device_name().to_string())
}

/// Live tensor handles, for leak checks.
pub fn live_tensors() -> usize {
    lock().as_ref().map_or(0, |rt| rt.live())
}
