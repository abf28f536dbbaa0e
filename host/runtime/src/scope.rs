//! Which run a thread's plugin calls serve. Handles name their runtime themselves; what a handle
//! cannot say (where a new tensor is made, whether the run was cancelled, which model's adapters
//! a layer runs, where dropout draws from) comes from the scope the host entered on the calling
//! thread before calling into a plugin.

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferrite_plugin_api::TensorId;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::autocast::TrainDtype;
use crate::{Device, WeightFormat};

/// A run's stop request: shared by the run and whoever may stop it (the GUI's Stop, Ctrl-C).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Asks the run to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs the adapters attached to a model's layer on the layer's output: `(layer name, layer
/// input, base output)` → the adapted output, or None where nothing is attached. The engine's
/// loaded models implement it; the runtime forwards the plugins' `adapt` calls to the model of
/// the scope they come from.
pub trait Adapt: Send + Sync {
    fn adapt(
        &self,
        layer: &str,
        x: TensorId,
        base_out: TensorId,
    ) -> ferrite_plugin_api::Result<Option<TensorId>>;
}

/// What a run's plugin calls on one thread reach.
#[derive(Clone)]
pub struct Scope {
    pub device: Device,
    pub cancel: Cancel,
    /// The model whose adapters layers run (None: layers run as they are).
    pub adapters: Option<Arc<dyn Adapt>>,
    /// Whether the blocks architectures mark are checkpointed (`gradient_checkpointing`):
    /// recomputed in backward instead of keeping their activations.
    pub checkpointing: bool,
    /// What matmul, convolutions and attention compute in (`train_dtype`, [`crate::autocast`]).
    pub train_dtype: TrainDtype,
    /// What a part that overflows in float16 (T5) computes in when `train_dtype` is float16
    /// (OneTrainer's `fallback_train_dtype`), inside the regions its plugin marks.
    pub fallback_dtype: TrainDtype,
    /// Fallback regions open in this scope on its thread (ops `fallback_begin`/`_end`): they
    /// close with it.
    fallback_depth: usize,
    /// Model parts (by the id their plugin loads them under) whose frozen weights are kept in
    /// a format as each is loaded (a part's `weight_dtype`).
    pub keep_at_load: Arc<HashMap<String, WeightFormat>>,
    /// Where the run's dropout masks come from: its own, so that other runs on the same
    /// runtime do not change its draws.
    dropout: Arc<Mutex<ChaCha8Rng>>,
}

thread_local! {
    static SCOPES: RefCell<Vec<Scope>> = const { RefCell::new(Vec::new()) };
}

/// While it lives, the thread's plugin calls use its scope (scopes nest: the innermost wins).
/// Not `Send`: it must be dropped on the thread that entered.
#[must_use = "the scope ends when this is dropped"]
pub struct Entered(PhantomData<*const ()>);

impl Drop for Entered {
    fn drop(&mut self) {
        SCOPES.with(|s| s.borrow_mut().pop());
    }
}

impl Scope {
    pub fn new(device: Device) -> Self {
        Self {
            device,
            cancel: Cancel::default(),
            adapters: None,
            checkpointing: false,
            train_dtype: TrainDtype::Float32,
            fallback_dtype: TrainDtype::BFloat16,
            fallback_depth: 0,
            keep_at_load: Arc::default(),
            dropout: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(0))),
        }
    }

    /// Restarts the run's dropout generator, so its masks repeat.
    pub fn seed_dropout(&self, seed: u64) {
        *self.dropout.lock().unwrap_or_else(|e| e.into_inner()) = ChaCha8Rng::seed_from_u64(seed);
    }

    /// The seed of the run's next backend draw.
    pub(crate) fn next_dropout_seed(&self) -> u64 {
        self.dropout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_u64()
    }

    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    pub fn with_adapters(mut self, model: Arc<dyn Adapt>) -> Self {
        self.adapters = Some(model);
        self
    }

    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpointing = on;
        self
    }

    pub fn with_train_dtype(mut self, dtype: TrainDtype) -> Self {
        self.train_dtype = dtype;
        self
    }

    pub fn with_fallback_dtype(mut self, dtype: TrainDtype) -> Self {
        self.fallback_dtype = dtype;
        self
    }

    pub fn with_keep_at_load(mut self, parts: HashMap<String, WeightFormat>) -> Self {
        self.keep_at_load = Arc::new(parts);
        self
    }

    pub fn enter(&self) -> Entered {
        SCOPES.with(|s| s.borrow_mut().push(self.clone()));
        Entered(PhantomData)
    }
}

/// The innermost scope entered on this thread, if any.
pub fn current() -> Option<Scope> {
    SCOPES.with(|s| s.borrow().last().cloned())
}

/// The train dtype of the innermost scope on this thread (f32 outside any; its fallback dtype
/// for float16 inside a fallback region), read by every matmul without cloning the scope.
pub(crate) fn train_dtype() -> TrainDtype {
    SCOPES.with(|s| {
        s.borrow().last().map_or(TrainDtype::Float32, |s| {
            if s.train_dtype == TrainDtype::Float16 && s.fallback_depth > 0 {
                s.fallback_dtype
            } else {
                s.train_dtype
            }
        })
    })
}

/// Opens (`true`) or closes a fallback region in the innermost scope on this thread: what a
/// plugin computes there does not take float16 (T5, whose activations overflow it). Outside
/// any scope everything is f32 and regions change nothing.
pub(crate) fn fallback(open: bool) -> Result<(), String> {
    SCOPES.with(|s| {
        let mut s = s.borrow_mut();
        let Some(top) = s.last_mut() else {
            return Ok(());
        };
        if open {
            top.fallback_depth += 1;
        } else if top.fallback_depth == 0 {
            return Err("fallback_end without a fallback_begin in this scope".into());
        } else {
            top.fallback_depth -= 1;
        }
        Ok(())
    })
}
