//! Gradient checkpointing of the blocks an architecture marks (`checkpoint_begin` … a block's
//! forward … `checkpoint_end`, see `ferrite_plugin_api::checkpoint`).
//!
//! While a block records, its ops run on untracked copies of their inputs, so nothing inside
//! the block is kept for backward; the ops are written to a tape instead. At the block's end one
//! autodiff node stands for the whole block: its parents are the block's tracked inputs (the
//! input activations and the trained parameters it reads), and its backward replays the tape
//! on fresh leaves with tracking, backpropagates the output's gradient through the replay and
//! hands each input its gradient. Gradients equal the run without checkpointing; the price is a
//! second forward of each block.
//!
//! Blocks record per thread (other runs sharing the runtime record their own). Random draws
//! replay as drawn: host-generator draws (`randn`, `rand`) are kept as constants and dropout
//! masks are drawn again from the seeds recorded.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn_backend::{AutodiffBackend, Backend, tensor::FloatTensor};
use ferrite_plugin_api::{Op, TensorId};

use crate::RtResult;
use crate::autocast::TrainDtype;
use crate::table::{TensorTable, Tracking, Value};

/// Most tracked inputs one checkpoint node takes (burn's autodiff nodes have a fixed number of
/// parents; a transformer block with LoHa on every linear layer has about 40). A block with
/// more runs again tracked at its end instead, keeping its activations.
pub const MAX_INPUTS: usize = 64;

/// Where an op's input comes from.
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// An optional input left out.
    None,
    /// A tensor from outside the block.
    External(usize),
    /// Output `.1` of tape step `.0`.
    Produced(usize, usize),
}

enum Step<B: AutodiffBackend> {
    Op {
        op: Op,
        args: Vec<Arg>,
        /// The dropout seeds the op drew, in order.
        seeds: Vec<u64>,
    },
    /// Draws from a host generator, which must not advance again in replay.
    Constant(Vec<Value<B>>),
}

/// A block being recorded on one thread.
pub(crate) struct Frame<B: AutodiffBackend> {
    /// Blocks nested in it add depth, not frames: the outermost block is the unit.
    depth: usize,
    /// Inputs from outside the block: the value as it was (tracked or not) and the handle of
    /// the untracked copy the block's ops read.
    externals: Vec<(Value<B>, TensorId)>,
    /// Table slot → index in `externals`.
    external_of: HashMap<u64, usize>,
    /// Table slot of a value made inside the block → its tape step and output.
    produced: HashMap<u64, (usize, usize)>,
    tape: Vec<Step<B>>,
    /// Dropout seeds drawn by the op running now.
    seeds: Vec<u64>,
}

/// The blocks recording on each thread of one runtime.
pub(crate) struct Frames<B: AutodiffBackend> {
    open: Mutex<HashMap<ThreadId, Frame<B>>>,
    /// How many threads record now: every op asks, and none need the lock while it is 0.
    recording: AtomicUsize,
    /// Blocks made into checkpoint nodes so far (what `Device::checkpointed_blocks` says).
    pub(crate) made: AtomicU64,
    /// Whether a block with too many trained inputs was reported.
    warned: AtomicBool,
}

impl<B: AutodiffBackend> Default for Frames<B> {
    fn default() -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            recording: AtomicUsize::new(0),
            made: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }
}

impl<B: AutodiffBackend> Frames<B> {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ThreadId, Frame<B>>) -> T) -> T {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut open);
        self.recording.store(open.len(), Ordering::Relaxed);
        out
    }
}

fn untracked<B: AutodiffBackend>(v: &Value<B>) -> Value<B> {
    match v {
        Value::Float(t) => Value::Float(B::from_inner(B::inner(t.clone()))),
        other => other.clone(),
    }
}

/// Gradients of a block's inputs given its output's, by replaying it.
pub trait Replay<I: Backend>: Send + Sync {
    /// One entry per parent handed to [`Tracking::checkpoint`], None where the output does not
    /// depend on it.
    fn gradients(&self, grad: FloatTensor<I>) -> Vec<Option<FloatTensor<I>>>;
}

/// A recorded block, ready to replay.
struct Recorded<B: AutodiffBackend> {
    device: B::Device,
    device_name: String,
    /// Untracked inputs, and whether each is a parent (tracked outside the block).
    externals: Vec<(Value<B>, bool)>,
    tape: Vec<Step<B>>,
    output: (usize, usize),
    /// What the block computed in when recorded; replay computes the same.
    train_dtype: TrainDtype,
}

impl<B: Tracking> Recorded<B> {
    /// Runs the tape again on `inputs` (one per external) and gives the block's output.
    fn run(&self, inputs: Vec<Value<B>>) -> RtResult<FloatTensor<B>> {
        let table = TensorTable::<B>::new(self.device.clone(), self.device_name.clone(), 0);
        table.pin_train_dtype(self.train_dtype);
        let inputs: Vec<TensorId> = inputs.into_iter().map(|v| table.insert(v)).collect();
        // Each value made in the block is released after its last use.
        let mut last_use: HashMap<(usize, usize), usize> = HashMap::new();
        for (i, step) in self.tape.iter().enumerate() {
            if let Step::Op { args, .. } = step {
                for a in args {
                    if let Arg::Produced(s, o) = a {
                        last_use.insert((*s, *o), i);
                    }
                }
            }
        }
        let mut made: Vec<Vec<TensorId>> = Vec::with_capacity(self.tape.len());
        let mut output = None;
        for (i, step) in self.tape.iter().enumerate() {
            let values = match step {
                Step::Constant(v) => v.clone(),
                Step::Op { op, args, seeds } => {
                    let ids: Vec<TensorId> = args
                        .iter()
                        .map(|a| match *a {
                            Arg::None => TensorId::NONE,
                            Arg::External(e) => inputs[e],
                            Arg::Produced(s, o) => made[s][o],
                        })
                        .collect();
                    table.queue_seeds(seeds);
                    let out = table.exec(op, &ids)?;
                    for a in args {
                        if let Arg::Produced(s, o) = *a
                            && last_use.get(&(s, o)) == Some(&i)
                            && (s, o) != self.output
                        {
                            table.release(made[s][o]);
                        }
                    }
                    out
                }
            };
            let ids: Vec<TensorId> = values.into_iter().map(|v| table.insert(v)).collect();
            if i == self.output.0 {
                output = Some(table.float(ids[self.output.1])?);
            }
            made.push(ids);
        }
        output.ok_or_else(|| "the block's output was not made in replay".into())
    }

    /// The gradients of the parents given the output's: the tape run on fresh leaves, then
    /// backward from `sum(output · grad)`.
    fn replay(
        &self,
        grad: FloatTensor<B::InnerBackend>,
    ) -> RtResult<Vec<Option<FloatTensor<B::InnerBackend>>>> {
        let mut leaves = Vec::new();
        let inputs = self
            .externals
            .iter()
            .map(|(v, parent)| match (v, parent) {
                (Value::Float(t), true) => {
                    let leaf = B::float_set_require_grad(t.clone(), true);
                    leaves.push(leaf.clone());
                    Value::Float(leaf)
                }
                (v, _) => v.clone(),
            })
            .collect();
        let out = self.run(inputs)?;
        let surrogate = B::float_sum(B::float_mul(out, B::from_inner(grad)));
        let grads = B::backward(surrogate);
        Ok(leaves.iter().map(|l| B::grad(l, &grads)).collect())
    }
}

impl<B: Tracking> Replay<B::InnerBackend> for Mutex<Recorded<B>> {
    fn gradients(
        &self,
        grad: FloatTensor<B::InnerBackend>,
    ) -> Vec<Option<FloatTensor<B::InnerBackend>>> {
        let recorded = self.lock().unwrap_or_else(|e| e.into_inner());
        match recorded.replay(grad) {
            Ok(g) => g,
            // The same ops ran in forward; failing now is a runtime bug, reported as one.
            Err(e) => panic!("replaying a checkpointed block in backward failed: {e}"),
        }
    }
}

impl<B: Tracking> TensorTable<B> {
    /// Whether ops on this thread are being recorded into a block.
    pub(crate) fn recording(&self) -> bool {
        if self.frames.recording.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let me = std::thread::current().id();
        self.frames.with(|f| f.contains_key(&me))
    }

    /// Starts a block on this thread if the thread's run checkpoints (a block inside a block
    /// is part of the outer one).
    pub(crate) fn checkpoint_begin(&self) -> RtResult<Vec<TensorId>> {
        let me = std::thread::current().id();
        let on = crate::scope::current().is_some_and(|s| s.checkpointing);
        self.frames.with(|f| {
            if let Some(frame) = f.get_mut(&me) {
                frame.depth += 1;
            } else if on {
                f.insert(
                    me,
                    Frame {
                        depth: 1,
                        externals: Vec::new(),
                        external_of: HashMap::new(),
                        produced: HashMap::new(),
                        tape: Vec::new(),
                        seeds: Vec::new(),
                    },
                );
            }
        });
        Ok(Vec::new())
    }

    /// Ends this thread's block: its output (`ids[0]`) becomes the output of one autodiff node
    /// over the block's tracked inputs. No input: the block failed; it is dropped.
    pub(crate) fn checkpoint_end(&self, ids: &[TensorId]) -> RtResult<Vec<TensorId>> {
        let me = std::thread::current().id();
        let frame = self.frames.with(|f| match f.get_mut(&me) {
            Some(frame) if frame.depth > 1 => {
                frame.depth -= 1;
                None
            }
            Some(_) => f.remove(&me),
            None => None,
        });
        if let Some(frame) = &frame {
            for (_, copy) in &frame.externals {
                self.release(*copy);
            }
        }
        if ids.len() > 1 {
            return Err(format!(
                "op checkpoint_end: a block has one output, got {}",
                ids.len()
            ));
        }
        let Some(frame) = frame else {
            // Not checkpointing, or an inner block: the output is the output.
            return ids.iter().map(|&id| self.retain(id)).collect();
        };
        let Some(&out) = ids.first() else {
            return Ok(Vec::new());
        };
        let slot = self.slot_of(out)?;
        let Some(&output) = frame.produced.get(&slot) else {
            // The block returned one of its inputs unchanged.
            return match frame.external_of.get(&slot) {
                Some(&e) => Ok(vec![self.insert(frame.externals[e].0.clone())]),
                None => Ok(vec![self.retain(out)?]),
            };
        };
        let Value::Float(result) = self.get(out)? else {
            return Err("op checkpoint_end: a block's output must be a float tensor".into());
        };
        let mut parents = Vec::new();
        let externals: Vec<(Value<B>, bool)> = frame
            .externals
            .iter()
            .map(|(v, _)| {
                let tracked = matches!(v, Value::Float(t) if B::is_tracked(t));
                if let (Value::Float(t), true) = (v, tracked) {
                    parents.push(t.clone());
                }
                (untracked(v), tracked)
            })
            .collect();
        if parents.is_empty() {
            // Nothing upstream is trained: the untracked result is exact.
            return Ok(vec![self.retain(out)?]);
        }
        let recorded = Recorded {
            device: self.device.clone(),
            device_name: self.device_name.clone(),
            externals,
            tape: frame.tape,
            output,
            train_dtype: self.train_dtype(),
        };
        if parents.len() > MAX_INPUTS {
            // Too many parents for one node: the block runs again, tracked, as if unmarked.
            if !self.frames.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "a checkpointed block reads {} trained tensors (at most {MAX_INPUTS} per \
                     node): such blocks are computed twice and keep their activations",
                    parents.len()
                );
            }
            let originals = frame.externals.into_iter().map(|(v, _)| v).collect();
            return Ok(vec![self.insert(Value::Float(recorded.run(originals)?))]);
        }
        self.frames.made.fetch_add(1, Ordering::Relaxed);
        let node = B::checkpoint(parents, B::inner(result), Arc::new(Mutex::new(recorded)));
        Ok(vec![self.insert(Value::Float(node))])
    }

    /// Runs `op` inside this thread's block: on untracked copies of outside inputs, written to
    /// the tape.
    pub(crate) fn record(&self, op: &Op, ids: &[TensorId]) -> RtResult<Vec<TensorId>> {
        if matches!(
            op,
            Op::Backward(_) | Op::Grad(_) | Op::Assign(_) | Op::SetRequiresGrad(_)
        ) {
            return Err(format!(
                "op {} cannot run inside a checkpointed block (blocks are pure forward code)",
                op.code().name()
            ));
        }
        let me = std::thread::current().id();
        let mut args = Vec::with_capacity(ids.len());
        let mut run = Vec::with_capacity(ids.len());
        for &id in ids {
            if id == TensorId::NONE {
                args.push(Arg::None);
                run.push(id);
                continue;
            }
            let slot = self.slot_of(id)?;
            let known = self.frames.with(|f| {
                let frame = f.get(&me)?;
                frame
                    .produced
                    .get(&slot)
                    .map(|&(s, o)| (Arg::Produced(s, o), id))
                    .or_else(|| {
                        frame
                            .external_of
                            .get(&slot)
                            .map(|&e| (Arg::External(e), frame.externals[e].1))
                    })
            });
            let (arg, use_id) = match known {
                Some(k) => k,
                None => {
                    // As kept: a kept weight is dequantised again for each op in replay.
                    let value = self.get_kept(id)?;
                    let copy = self.insert(untracked(&value));
                    let e = self.frames.with(|f| {
                        let frame = f.get_mut(&me).ok_or("the checkpointed block ended")?;
                        frame.externals.push((value, copy));
                        frame.external_of.insert(slot, frame.externals.len() - 1);
                        Ok::<_, String>(frame.externals.len() - 1)
                    })?;
                    (Arg::External(e), copy)
                }
            };
            args.push(arg);
            run.push(use_id);
        }
        let out = self.exec(op, &run)?;
        let step = match op {
            Op::Randn(_) | Op::Rand(_) => Step::Constant(out.clone()),
            _ => Step::Op {
                op: op.clone(),
                args,
                seeds: Vec::new(),
            },
        };
        let ids: Vec<TensorId> = out.into_iter().map(|v| self.insert(v)).collect();
        self.frames.with(|f| {
            let frame = f.get_mut(&me).ok_or("the checkpointed block ended")?;
            let seeds = std::mem::take(&mut frame.seeds);
            let index = frame.tape.len();
            frame.tape.push(match step {
                Step::Op { op, args, .. } => Step::Op { op, args, seeds },
                constant => constant,
            });
            for (o, id) in ids.iter().enumerate() {
                frame.produced.insert(id.0, (index, o));
            }
            Ok::<_, String>(())
        })?;
        Ok(ids)
    }

    /// Notes a dropout seed drawn on this thread, if it records a block.
    pub(crate) fn note_seed(&self, seed: u64) {
        let me = std::thread::current().id();
        self.frames.with(|f| {
            if let Some(frame) = f.get_mut(&me) {
                frame.seeds.push(seed);
            }
        });
    }
}

/// The autodiff node of a block (burn's `Backward` over the inner backend).
pub(crate) struct BlockStep<I: Backend> {
    pub replay: Arc<dyn Replay<I>>,
}

impl<I: Backend> std::fmt::Debug for BlockStep<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointedBlock")
    }
}

impl<I: Backend> Backward<I, MAX_INPUTS> for BlockStep<I> {
    type State = ();

    fn backward(self, ops: Ops<(), MAX_INPUTS>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<I>(&ops.node);
        let g = self.replay.gradients(grad);
        for (parent, g) in ops.parents.into_iter().zip(g) {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<I>(node.id, g);
            }
        }
    }
}

/// One autodiff node with `output` (computed untracked) over `parents`, whose backward is
/// `replay`'s.
pub(crate) fn block_node<I: Backend, C: CheckpointStrategy>(
    parents: Vec<FloatTensor<Autodiff<I, C>>>,
    output: FloatTensor<I>,
    replay: Arc<dyn Replay<I>>,
) -> FloatTensor<Autodiff<I, C>> {
    // Unused parent places hold an untracked node, which takes no part in backward.
    let none = Autodiff::<I, C>::from_inner(output.clone()).node;
    let nodes: [_; MAX_INPUTS] = std::array::from_fn(|i| {
        parents
            .get(i)
            .map_or_else(|| none.clone(), |p| p.node.clone())
    });
    BlockStep { replay }
        .prepare::<C>(nodes)
        .compute_bound()
        .stateless(output)
}

/// Dropout seeds a replay draws from, in order (empty outside replay).
pub(crate) type SeedQueue = Mutex<VecDeque<u64>>;
