//! The `HostApi` table: `extern "C"` entry points over the runtimes. A call on handles goes to
//! the runtime the handles belong to; one that makes a tensor from nothing goes to the calling
//! thread's scope (else the default runtime). Nothing here unwinds into a plugin: panics from
//! the backend become error strings.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, ROk, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
};
use ferrite_plugin_api::{
    LogLevel, Op, OpCode, TensorId,
    abi::{
        Attr_NE, DType_NE, HostApi, HostRef, HostTensor, LogLevel_NE, NamedTensor, WeightEntry,
        known,
    },
};

use super::table::to_burn_dtype;
use super::weights::{self, WeightFile};
use super::{Device, RtResult, Runtime, scope, table::runtime_of};

static WEIGHTS: Mutex<Option<HashMap<u64, Arc<WeightFile>>>> = Mutex::new(None);
static NEXT_FILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn guarded<T>(f: impl FnOnce() -> RtResult<T>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(e.into()),
        Err(p) => RErr(
            format!(
                "tensor backend failed: {}",
                ferrite_plugin_api::plugin::panic_message(&*p)
            )
            .into(),
        ),
    }
}

/// Tensors made from nothing go to the calling thread's run (else the default runtime).
const NO_DEVICE: &str = "no compute device selected on this thread (runtime::init, or a run's \
                         scope; a thread of a plugin's own has none)";

/// Runs `f` on the runtime new tensors go to on this thread.
fn with_current<T>(f: impl FnOnce(&dyn Runtime) -> RtResult<T>) -> RtResult<T> {
    let d = Device::current().ok_or(NO_DEVICE)?;
    f(d.rt())
}

/// The runtime holding handle `id`.
fn owner(id: TensorId) -> RtResult<Device> {
    Device::of(id.0).ok_or_else(|| {
        format!(
            "tensor handle {} is not live (released, never created, or its runtime was closed)",
            id.0
        )
    })
}

/// Runs `f` on the runtime holding `id`.
fn with_owner<T>(id: TensorId, f: impl FnOnce(&dyn Runtime) -> RtResult<T>) -> RtResult<T> {
    f(owner(id)?.rt())
}

/// The runtime an op runs on: its inputs' (which must share one), else the thread's.
fn op_runtime(inputs: &[TensorId]) -> RtResult<Device> {
    let mut given = inputs.iter().filter(|&&id| id != TensorId::NONE);
    let Some(&first) = given.next() else {
        return Device::current().ok_or_else(|| NO_DEVICE.into());
    };
    if let Some(&other) = given.find(|id| runtime_of(id.0) != runtime_of(first.0)) {
        let name = |id: TensorId| {
            Device::of(id.0).map_or("a closed runtime".into(), |d| d.name().to_string())
        };
        return Err(format!(
            "tensor handles {} and {} belong to different runtimes ({} and {}): one run's \
             tensors cannot take part in another's ops",
            first.0,
            other.0,
            name(first),
            name(other)
        ));
    }
    owner(first)
}

fn weight_file(id: u64) -> RtResult<Arc<WeightFile>> {
    let g = WEIGHTS.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()
        .and_then(|m| m.get(&id))
        .cloned()
        .ok_or_else(|| format!("weights handle {id} is not open"))
}

extern "C" fn call(
    code: OpCode,
    inputs: RSlice<'_, TensorId>,
    attrs: RSlice<'_, Attr_NE>,
) -> RResult<RVec<TensorId>, RString> {
    guarded(|| {
        // Decoding needs no runtime: do it before taking the lock.
        let op = Op::decode(code, inputs.len(), attrs.as_slice())?;
        let rt = op_runtime(inputs.as_slice())?;
        rt.rt().call(&op, inputs.as_slice()).map(RVec::from)
    })
}

extern "C" fn retain(id: TensorId) -> RResult<TensorId, RString> {
    guarded(|| with_owner(id, |rt| rt.retain(id)))
}

extern "C" fn release(id: TensorId) {
    let _ = guarded(|| {
        // Its runtime was closed: the tensor went with it.
        let Some(rt) = Device::of(id.0) else {
            return Ok(());
        };
        if !rt.rt().release(id) {
            // A plugin (or the host) released a handle it did not hold: each holder has its own
            // handle, so nothing else was dropped; say so, as it is a bug in the caller.
            tracing::warn!(
                "tensor handle {} released but not live (released twice?)",
                id.0
            );
        }
        Ok(())
    });
}

extern "C" fn shape(id: TensorId) -> RResult<RVec<u64>, RString> {
    guarded(|| {
        with_owner(id, |rt| {
            Ok(rt.shape(id)?.into_iter().map(|d| d as u64).collect())
        })
    })
}

extern "C" fn dtype(id: TensorId) -> RResult<DType_NE, RString> {
    guarded(|| with_owner(id, |rt| rt.dtype(id).map(|d| d.to_ne())))
}

extern "C" fn to_host(id: TensorId) -> RResult<HostTensor, RString> {
    guarded(|| {
        with_owner(id, |rt| {
            let dtype = rt.dtype(id)?;
            let data = rt.data(id)?;
            let shape = data.shape.iter().map(|&d| d as u64).collect();
            let data = data
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            Ok(HostTensor {
                shape,
                dtype: dtype.to_ne(),
                data: data.into(),
            })
        })
    })
}

extern "C" fn open_weights(path: RStr<'_>) -> RResult<u64, RString> {
    guarded(|| {
        let f = WeightFile::open(path.as_str())?;
        let id = NEXT_FILE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        WEIGHTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_default()
            .insert(id, Arc::new(f));
        Ok(id)
    })
}

extern "C" fn weight_infos(file: u64) -> RResult<RVec<WeightEntry>, RString> {
    guarded(|| {
        Ok(weight_file(file)?
            .infos()?
            .into_iter()
            .map(|i| WeightEntry {
                key: i.key.into(),
                dtype: i.dtype.to_ne(),
                shape: i.shape.into(),
            })
            .collect())
    })
}

extern "C" fn weight_metadata(file: u64) -> RResult<RVec<Tuple2<RString, RString>>, RString> {
    guarded(|| {
        let m = weight_file(file)?.metadata()?;
        Ok(m.into_iter()
            .map(|(k, v)| Tuple2(k.into(), v.into()))
            .collect())
    })
}

extern "C" fn load_weight(file: u64, key: RStr<'_>, dtype: DType_NE) -> RResult<TensorId, RString> {
    guarded(|| {
        let dtype = known("dtype", &dtype)?;
        let f = weight_file(file)?;
        // Read outside the runtime lock: disk time should not block other tensor work.
        let data = f.read(key.as_str(), to_burn_dtype(dtype)?)?;
        with_current(|rt| Ok(rt.upload(data)))
    })
}

extern "C" fn close_weights(file: u64) {
    let _ = guarded(|| {
        if let Some(m) = WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            m.remove(&file);
        }
        Ok(())
    });
}

extern "C" fn save_safetensors(
    path: RStr<'_>,
    tensors: RSlice<'_, NamedTensor>,
    metadata: RSlice<'_, Tuple2<RString, RString>>,
) -> RResult<(), RString> {
    guarded(|| {
        let data = tensors
            .iter()
            .map(|n| {
                Ok((
                    n.name.to_string(),
                    with_owner(n.tensor, |rt| rt.data(n.tensor))?,
                ))
            })
            .collect::<RtResult<Vec<_>>>()?;
        let meta = metadata
            .iter()
            .map(|Tuple2(k, v)| (k.to_string(), v.to_string()))
            .collect();
        weights::save(Path::new(path.as_str()), data, meta)
    })
}

extern "C" fn rng_new(seed: u64) -> RResult<u64, RString> {
    guarded(|| with_current(|rt| Ok(rt.rng_new(seed))))
}

extern "C" fn rng_release(id: u64) {
    let _ = guarded(|| {
        if let Some(rt) = Device::of(id) {
            rt.rt().rng_release(id);
        }
        Ok(())
    });
}

extern "C" fn log(level: LogLevel_NE, target: RStr<'_>, msg: RStr<'_>) {
    let (t, m) = (target.as_str(), msg.as_str());
    // A subscriber that panics must not unwind into the plugin.
    let _ = guarded(|| {
        // A level from a newer plugin-api is logged as a warning rather than lost.
        match level.as_enum() {
            Ok(LogLevel::Error) => tracing::error!(plugin = t, "{m}"),
            Ok(LogLevel::Info) => tracing::info!(plugin = t, "{m}"),
            Ok(LogLevel::Debug) => tracing::debug!(plugin = t, "{m}"),
            Ok(LogLevel::Trace) => tracing::trace!(plugin = t, "{m}"),
            _ => tracing::warn!(plugin = t, "{m}"),
        }
        Ok(())
    });
}

extern "C" fn device() -> RString {
    guarded(|| Ok(Device::current().map_or_else(|| "none".into(), |d| d.name().into())))
        .unwrap_or_else(|e| e)
}

extern "C" fn cancelled() -> bool {
    guarded(|| Ok(scope::current().is_some_and(|s| s.cancel.is_cancelled()))).unwrap_or(false)
}

extern "C" fn adapt(
    name: RStr<'_>,
    x: TensorId,
    base_out: TensorId,
) -> RResult<ROption<TensorId>, RString> {
    match catch_unwind(AssertUnwindSafe(|| {
        // No model in scope: no adapters, every layer runs as it is.
        match scope::current().and_then(|s| s.adapters) {
            Some(model) => model.adapt(name.as_str(), x, base_out),
            None => Ok(None),
        }
    })) {
        Ok(Ok(out)) => ROk(out.into()),
        Ok(Err(e)) => RErr(format!("adapter on `{name}`: {e}").into()),
        Err(p) => RErr(
            format!(
                "adapter on `{name}` panicked: {}",
                ferrite_plugin_api::plugin::panic_message(&*p)
            )
            .into(),
        ),
    }
}

/// The host services table (built once, lives for the process).
pub fn host_ref() -> HostRef {
    static HOST: OnceLock<HostRef> = OnceLock::new();
    *HOST.get_or_init(|| {
        HostApi {
            call,
            retain,
            release,
            shape,
            dtype,
            to_host,
            open_weights,
            weight_infos,
            weight_metadata,
            load_weight,
            close_weights,
            save_safetensors,
            rng_new,
            rng_release,
            log,
            device,
            is_cancelled: cancelled,
            adapt,
        }
        .leak_into_prefix()
    })
}
