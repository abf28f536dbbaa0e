//! Access to the host services from plugin (or host) code.
//!
//! Calls on tensors go to wherever those tensors live. What a call cannot tell from its tensors
//! — where a tensor made from nothing goes (`zeros`, uploads, loaded weights, generators),
//! whether the run was cancelled, which adapters a layer runs — comes from the run the host is
//! serving on the calling thread: call these from the thread the host called into the plugin
//! on (work handed to a thread of the plugin's own gets the default device, no adapters and no
//! stop request).

use std::sync::{Arc, Mutex, OnceLock};

use abi_stable::nonexhaustive_enum::NonExhaustive;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, Tuple2};

use crate::abi::{HostRef, LogLevel, NamedTensor, TensorId, WeightInfo, known};
use crate::error::{Error, Result};
use crate::nn::AdaptableLayer;
use crate::op::{self, Op};
use crate::tensor::Tensor;

static HOST: OnceLock<HostRef> = OnceLock::new();

/// Installs the host services for this copy of `plugin-api` (each library has its own copy).
pub fn set_host(host: HostRef) {
    let _ = HOST.set(host);
}

pub fn host() -> Result<HostRef> {
    HOST.get()
        .copied()
        .ok_or_else(|| Error::msg("ferrite host services are not initialised in this library"))
}

pub(crate) fn res<T>(r: RResult<T, RString>) -> Result<T> {
    r.into_result().map_err(Error::from)
}

/// Runs an op on its required inputs and wraps its outputs.
pub fn call(op: Op, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    call_opt(op, inputs, &[])
}

/// Runs an op with its required inputs and its optional ones (absent: None).
pub fn call_opt(op: Op, inputs: &[&Tensor], optional: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let ids: Vec<TensorId> = inputs
        .iter()
        .map(|t| t.id())
        .chain(
            optional
                .iter()
                .map(|t| t.map_or(TensorId::NONE, Tensor::id)),
        )
        .collect();
    let out = res((host()?.call())(
        op.code(),
        RSlice::from_slice(&ids),
        RSlice::from_slice(&op.encode()),
    ))?;
    Ok(out.into_iter().map(Tensor::from_raw).collect())
}

/// Runs an op that has exactly one output.
pub fn call1(op: Op, inputs: &[&Tensor]) -> Result<Tensor> {
    one(op.code().name(), call(op, inputs)?)
}

/// [`call1`] with optional inputs.
pub fn call1_opt(op: Op, inputs: &[&Tensor], optional: &[Option<&Tensor>]) -> Result<Tensor> {
    one(op.code().name(), call_opt(op, inputs, optional)?)
}

fn one(op: &str, mut out: Vec<Tensor>) -> Result<Tensor> {
    match out.len() {
        1 => Ok(out.remove(0)),
        n => Err(Error(format!("op {op} returned {n} tensors, expected 1"))),
    }
}

/// Runs `block` as one unit of gradient checkpointing (ABI 1.2): when the host checkpoints
/// this run, it keeps only the block's inputs and recomputes the block in backward, so the
/// activations inside it are not held between forward and backward. The result is the same
/// either way. Architectures mark their repeated blocks (resnets, transformer layers) with it;
/// tensors made inside other than the returned one carry no gradient out of the block.
pub fn checkpoint(block: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    if call(Op::CheckpointBegin(op::NoArgs {}), &[]).is_err() {
        // A host before ABI 1.2 has no checkpointing: the block runs unmarked.
        return block();
    }
    // Ends the block without output if `block` fails or panics, so later ops are not
    // recorded into it.
    struct Open(bool);
    impl Drop for Open {
        fn drop(&mut self) {
            if self.0 {
                let _ = call(Op::CheckpointEnd(op::NoArgs {}), &[]);
            }
        }
    }
    let mut open = Open(true);
    let out = block()?;
    open.0 = false;
    call1(Op::CheckpointEnd(op::NoArgs {}), &[&out])
}

/// Runs `f` not in float16 (ABI 1.5): where the host computes in float16, ops in `f` compute in
/// the run's fallback dtype (`fallback_train_dtype`, bfloat16 by default) instead, as
/// OneTrainer runs T5, whose activations overflow float16. Other train dtypes are kept. Wrap
/// whole checkpointed blocks, not parts of one (a block recomputes in its dtype at its end).
pub fn without_float16<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    if call(Op::FallbackBegin(op::NoArgs {}), &[]).is_err() {
        // A host before ABI 1.5 has no fallback: `f` runs as it is.
        return f();
    }
    struct Open;
    impl Drop for Open {
        fn drop(&mut self) {
            let _ = call(Op::FallbackEnd(op::NoArgs {}), &[]);
        }
    }
    let _open = Open;
    f()
}

/// The output of layer `name` with whatever adapters the host has attached to it (`base_out`
/// unchanged when none).
pub fn adapt(name: &str, x: &Tensor, base_out: Tensor) -> Result<Tensor> {
    match res((host()?.adapt())(
        RStr::from_str(name),
        x.id(),
        base_out.id(),
    ))? {
        ROption::RSome(id) => Ok(Tensor::from_raw(id)),
        ROption::RNone => Ok(base_out),
    }
}

/// The device new tensors go to on this thread (`cpu`, `cuda:0`).
pub fn device() -> Result<String> {
    Ok((host()?.device())().into_string())
}

pub fn is_cancelled() -> bool {
    host().map(|h| (h.is_cancelled())()).unwrap_or(false)
}

pub fn log(level: LogLevel, target: &str, msg: &str) {
    if let Ok(h) = host() {
        (h.log())(
            NonExhaustive::new(level),
            RStr::from_str(target),
            RStr::from_str(msg),
        );
    }
}

/// A seeded random generator owned by the host; sequences are reproducible per seed.
#[derive(Debug)]
pub struct Generator {
    id: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Result<Self> {
        Ok(Self {
            id: res((host()?.rng_new())(seed))?,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if let Ok(h) = host() {
            (h.rng_release())(self.id);
        }
    }
}

/// Where a [`Weights`]' tensors come from.
#[derive(Debug)]
enum Origin {
    File(OpenFile),
    /// Several files, and which holds each key.
    Shards {
        label: String,
        files: Vec<OpenFile>,
        of_key: std::collections::HashMap<String, usize>,
    },
    Random(RandomSource),
}

/// Reads `key` of an open file onto the device as `dtype`.
fn load(f: &OpenFile, key: &str, dtype: crate::DType) -> Result<Tensor> {
    let id = res((host()?.load_weight())(
        f.id,
        RStr::from_str(key),
        dtype.to_ne(),
    ))?;
    Ok(Tensor::from_raw(id))
}

/// An open safetensors file; closed when the last view of it is dropped.
#[derive(Debug)]
struct OpenFile {
    id: u64,
    path: String,
}

/// See [`Weights::random`].
#[derive(Debug)]
struct RandomSource {
    label: String,
    seed: u64,
    /// Each tensor's shape and the range its values are drawn from (equal ends: a constant).
    tensors: std::collections::HashMap<String, (Vec<usize>, (f64, f64))>,
}

impl RandomSource {
    fn draw(&self, key: &str, dtype: crate::DType) -> Result<Tensor> {
        let (shape, (low, high)) = self
            .tensors
            .get(key)
            .ok_or_else(|| Error(format!("{}: no tensor `{key}`", self.label)))?;
        let t = if low == high {
            Tensor::full(shape, *low, crate::DType::F32)?
        } else {
            // FNV-1a of the key: a tensor's values do not depend on the order of reads.
            let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            Tensor::rand(shape, &Generator::new(self.seed ^ hash)?)?
                .mul_scalar(high - low)?
                .add_scalar(*low)?
        };
        if dtype == crate::DType::F32 {
            Ok(t)
        } else {
            t.cast(dtype)
        }
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if let Ok(h) = host() {
            (h.close_weights())(self.id);
        }
    }
}

/// What was loaded through a [`Weights::scoped`] view: every tensor (a model's parameters) and
/// the adaptable layers, named `<scope>.<key>`.
#[derive(Debug, Default)]
struct Scope {
    name: String,
    layers: Mutex<Vec<AdaptableLayer>>,
    tensors: Mutex<Vec<(String, Tensor)>>,
}

impl Scope {
    fn name(&self, key: &str) -> String {
        if key.is_empty() {
            self.name.clone()
        } else {
            format!("{}.{key}", self.name)
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a tensor of a [`Weights::view_pieces`] view comes from in its file (build it with
/// `..Default::default()`: fields may be added).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Source {
    pub key: String,
    /// Only these rows (first dimension) of it: one of q, k, v from a fused `in_proj`.
    pub rows: Option<std::ops::Range<u64>>,
    /// Transposed (a 2-D `x @ W` matrix read as a linear layer's `[out, in]` weight).
    pub transpose: bool,
    /// The two halves of its first dimension swapped (after `rows`): BFL's final modulation is
    /// (shift, scale), diffusers' (scale, shift).
    pub swap_halves: bool,
}

/// The tensors of a safetensors file, read one at a time on request. A [`Weights::view`] shows
/// them under other names and shapes (an original checkpoint's keys as diffusers names).
#[derive(Debug, Clone)]
pub struct Weights {
    file: Arc<Origin>,
    /// Tensors as this view names them.
    infos: Vec<WeightInfo>,
    /// Where in the file each entry of `infos` comes from (None: the same key, whole).
    sources: Option<Vec<Source>>,
    scope: Option<Arc<Scope>>,
}

/// Opens one safetensors file and lists its tensors.
fn open_file(path: &str) -> Result<(OpenFile, Vec<WeightInfo>)> {
    let h = host()?;
    let file = OpenFile {
        id: res((h.open_weights())(RStr::from_str(path)))?,
        path: path.to_string(),
    };
    let infos = res((h.weight_infos())(file.id))?
        .into_iter()
        .map(|e| {
            Ok(WeightInfo {
                dtype: known("dtype", &e.dtype).map_err(|m| Error(format!("{path}: {m}")))?,
                key: e.key.into_string(),
                shape: e.shape.into_vec(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((file, infos))
}

impl Weights {
    pub fn open(path: &str) -> Result<Self> {
        let (file, infos) = open_file(path)?;
        Ok(Self::of(Origin::File(file), infos))
    }

    /// One model split over several files (a diffusers `*.safetensors.index.json`'s shards),
    /// read as one; `label` (the index) names it in errors.
    pub fn open_shards(label: &str, paths: &[String]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut of_key = std::collections::HashMap::new();
        let mut infos = Vec::new();
        for path in paths {
            let (file, listed) = open_file(path)?;
            for info in listed {
                if of_key.insert(info.key.clone(), files.len()).is_some() {
                    return Err(Error(format!(
                        "{label}: tensor `{}` is in two shards (the second: {path})",
                        info.key
                    )));
                }
                infos.push(info);
            }
            files.push(file);
        }
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        let origin = Origin::Shards {
            label: label.to_string(),
            files,
            of_key,
        };
        Ok(Self::of(origin, infos))
    }

    fn of(origin: Origin, infos: Vec<WeightInfo>) -> Self {
        Self {
            file: Arc::new(origin),
            infos,
            sources: None,
            scope: None,
        }
    }

    /// Random f32 tensors of the given names and shapes, read like a file's (a model built from
    /// its config alone, for benchmarks): matrices and kernels uniform in ±1/√fan-in (torch's
    /// default scale), 1-d `weight`s (norms) ones, everything else (biases) zeros. Each tensor is
    /// drawn on the device when it is read, from `seed` and its key alone. `label` names the
    /// source in errors and [`Weights::path`].
    pub fn random(label: &str, tensors: &[(String, Vec<usize>)], seed: u64) -> Result<Self> {
        let mut drawn = std::collections::HashMap::new();
        let mut infos = Vec::with_capacity(tensors.len());
        for (key, shape) in tensors {
            let fan_in: usize = shape.iter().skip(1).product();
            let range = match shape.len() {
                0 | 1 if key.ends_with("weight") => (1.0, 1.0),
                0 | 1 => (0.0, 0.0),
                _ => {
                    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
                    (-b, b)
                }
            };
            if drawn.insert(key.clone(), (shape.clone(), range)).is_some() {
                return Err(Error(format!("{label}: tensor `{key}` is listed twice")));
            }
            infos.push(WeightInfo {
                key: key.clone(),
                dtype: crate::DType::F32,
                shape: shape.iter().map(|&d| d as u64).collect(),
            });
        }
        infos.sort_by(|a, b| a.key.cmp(&b.key));
        let origin = Origin::Random(RandomSource {
            label: label.to_string(),
            seed,
            tensors: drawn,
        });
        Ok(Self::of(origin, infos))
    }

    /// The same tensors, remembered as they are loaded under `<name>.<key>` (see
    /// [`Weights::tensors`]); the linear and conv layers loaded through it become adaptable
    /// (see [`Weights::layers`]) and offer their output to the host's adapters.
    pub fn scoped(&self, name: &str) -> Weights {
        Weights {
            scope: Some(Arc::new(Scope {
                name: name.to_string(),
                ..Scope::default()
            })),
            ..self.clone()
        }
    }

    /// Records an adaptable layer loaded from `prefix` and returns its name (None when this
    /// view is not scoped).
    pub(crate) fn register(
        &self,
        prefix: &str,
        layer: impl FnOnce(String) -> AdaptableLayer,
    ) -> Option<String> {
        let scope = self.scope.as_ref()?;
        let name = scope.name(prefix);
        locked(&scope.layers).push(layer(name.clone()));
        Some(name)
    }

    /// The adaptable layers loaded through this scoped view so far, in load order.
    pub fn layers(&self) -> Vec<AdaptableLayer> {
        self.scope
            .as_ref()
            .map_or_else(Vec::new, |s| locked(&s.layers).clone())
    }

    /// The tensors loaded through this scoped view so far (the same handles the model holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.scope
            .as_ref()
            .map_or_else(Vec::new, |s| locked(&s.tensors).clone())
    }

    /// The same file seen through `f`, which gives each tensor's name and shape in the view, or
    /// None to leave it out. A new shape must hold as many elements; loading reshapes to it.
    pub fn view(&self, mut f: impl FnMut(&WeightInfo) -> Option<WeightInfo>) -> Result<Weights> {
        self.view_pieces(|info| {
            f(info)
                .map(|new| vec![(new, Source::default())])
                .unwrap_or_default()
        })
    }

    /// Like [`Weights::view`], but a tensor may become several (its row ranges) or a transposed
    /// one: `f` gives each new tensor with its [`Source`] (whose `key` is filled in here).
    pub fn view_pieces(
        &self,
        mut f: impl FnMut(&WeightInfo) -> Vec<(WeightInfo, Source)>,
    ) -> Result<Weights> {
        let mut infos = Vec::new();
        let mut sources = Vec::new();
        for (i, info) in self.infos.iter().enumerate() {
            let from = self.source(i);
            for (new, piece) in f(info) {
                let refuse = |why: &str| {
                    Err(Error(format!(
                        "{}: tensor `{}` {:?} cannot be seen as `{}` {:?}: {why}",
                        self.path(),
                        info.key,
                        info.shape,
                        new.key,
                        new.shape
                    )))
                };
                // Rows, transposes and swaps apply to the file's tensor: only a view of the file
                // itself may ask for them.
                if (piece.rows.is_some() || piece.transpose || piece.swap_halves)
                    && self.sources.is_some()
                {
                    return refuse("rows, a transpose or a swap of a view");
                }
                let mut shape = info.shape.clone();
                if let Some(r) = &piece.rows {
                    match shape.first_mut() {
                        Some(d) if r.start <= r.end && r.end <= *d => *d = r.end - r.start,
                        _ => return refuse(&format!("rows {r:?} out of range")),
                    }
                }
                if piece.swap_halves && shape.first().is_none_or(|d| d % 2 != 0) {
                    return refuse("no even first dimension to swap the halves of");
                }
                let numel = |s: &[u64]| s.iter().product::<u64>();
                if numel(&new.shape) != numel(&shape) {
                    return refuse("another number of elements");
                }
                if piece.transpose && shape.len() != 2 {
                    return refuse("only a 2-d tensor transposes");
                }
                infos.push(new);
                sources.push(Source {
                    key: from.key.clone(),
                    rows: piece.rows.or(from.rows.clone()),
                    transpose: piece.transpose || from.transpose,
                    swap_halves: piece.swap_halves || from.swap_halves,
                });
            }
        }
        Ok(Weights {
            file: self.file.clone(),
            infos,
            sources: Some(sources),
            scope: self.scope.clone(),
        })
    }

    fn source(&self, i: usize) -> Source {
        match &self.sources {
            Some(s) => s[i].clone(),
            None => Source {
                key: self.infos[i].key.clone(),
                ..Source::default()
            },
        }
    }

    pub fn path(&self) -> &str {
        match &*self.file {
            Origin::File(f) => &f.path,
            Origin::Shards { label, .. } => label,
            Origin::Random(r) => &r.label,
        }
    }

    /// Every tensor in the view: key, dtype, shape.
    pub fn infos(&self) -> &[WeightInfo] {
        &self.infos
    }

    pub fn info(&self, key: &str) -> Option<&WeightInfo> {
        self.infos.iter().find(|i| i.key == key)
    }

    pub fn metadata(&self) -> Result<Vec<(String, String)>> {
        let file = match &*self.file {
            Origin::File(f) => f,
            // A sharded model's metadata is its first shard's.
            Origin::Shards { files, .. } if !files.is_empty() => &files[0],
            _ => return Ok(Vec::new()),
        };
        let m = res((host()?.weight_metadata())(file.id))?;
        Ok(m.into_iter()
            .map(|Tuple2(k, v)| (k.into_string(), v.into_string()))
            .collect())
    }

    /// Loads `key` to the device as `dtype`.
    pub fn get(&self, key: &str, dtype: crate::DType) -> Result<Tensor> {
        let Some(i) = self.infos.iter().position(|i| i.key == key) else {
            return Err(Error(format!("{}: no tensor `{key}`", self.path())));
        };
        let source = self.source(i);
        let mut t = match &*self.file {
            Origin::File(f) => load(f, &source.key, dtype)?,
            Origin::Shards { files, of_key, .. } => {
                let f = of_key
                    .get(&source.key)
                    .map(|&i| &files[i])
                    .ok_or_else(|| Error(format!("{}: no tensor `{}`", self.path(), source.key)))?;
                load(f, &source.key, dtype)?
            }
            Origin::Random(r) => r.draw(&source.key, dtype)?,
        };
        if self.sources.is_some() {
            if let Some(r) = &source.rows {
                t = t.narrow(0, r.start as usize, (r.end - r.start) as usize)?;
            }
            if source.swap_halves {
                let half = t.shape()?[0] / 2;
                t = Tensor::cat(&[&t.narrow(0, half, half)?, &t.narrow(0, 0, half)?], 0)?;
            }
            if source.transpose {
                t = t.transpose(0, 1)?;
            }
            let shape: Vec<i64> = self.infos[i].shape.iter().map(|&d| d as i64).collect();
            t = t.reshape(&shape)?;
        }
        if let Some(scope) = &self.scope {
            // Tells the host (ABI 1.3) which part loaded it, so a frozen part's weight can be
            // kept in its weight dtype at once, one tensor at a time. Older hosts do not know
            // the op; they keep weights after loading, if at all.
            let part = scope.name.clone();
            match call(Op::WeightLoaded(op::Part { part }), &[&t]) {
                Err(e) if !e.is_unknown_op() => return Err(e),
                _ => {}
            }
            locked(&scope.tensors).push((scope.name(key), t.clone()));
        }
        Ok(t)
    }
}

/// Writes tensors (and string metadata) to `path` atomically.
pub fn save_safetensors(
    path: &str,
    tensors: &[(&str, &Tensor)],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, t)| NamedTensor {
            name: (*n).into(),
            tensor: t.id(),
        })
        .collect();
    let meta: Vec<Tuple2<RString, RString>> = metadata
        .iter()
        .map(|(k, v)| Tuple2((*k).into(), (*v).into()))
        .collect();
    res((host()?.save_safetensors())(
        RStr::from_str(path),
        RSlice::from_slice(&named),
        RSlice::from_slice(&meta),
    ))
}
