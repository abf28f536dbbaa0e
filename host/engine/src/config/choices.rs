//! The options whose values Ferrite fixes, as enums: a config names them in OneTrainer's
//! spelling; anything else is refused when the config is read, naming the key and the values
//! allowed. (Plugin ids — model_type, peft_type, the optimizer — stay strings: plugins extend
//! those sets, and they are checked against the registry.)

use serde::{Deserialize, Serialize};
use strum::{AsRefStr, Display, VariantArray};

/// A closed set of values the GUI offers in a drop-down.
pub trait Choice: Copy + PartialEq + AsRef<str> + VariantArray + 'static {}
impl<T: Copy + PartialEq + AsRef<str> + VariantArray + 'static> Choice for T {}

macro_rules! choices {
    ($(
        $(#[$meta:meta])*
        $name:ident ($case:literal) { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }
    )+) => {$(
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
            VariantArray, AsRefStr, Display,
        )]
        #[serde(rename_all = $case)]
        #[strum(serialize_all = $case)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }
    )+};
}

choices! {
    /// What a run trains.
    TrainingMethod ("snake_case") {
        /// LoRA-family adapters (the adapter plugin of `peft_type`).
        Lora,
        /// The model's own weights.
        FineTune,
        /// A textual-inversion embedding (`[embedding]`): new token vectors only.
        Embedding,
    }

    /// The output file's layout.
    OutputFormat ("snake_case") {
        /// One safetensors file (kohya's keys for adapters).
        Safetensors,
        /// kohya's adapter keys (what AUTOMATIC1111 and Forge read).
        Kohya,
        /// diffusers' layout (peft keys for adapters).
        Diffusers,
        /// ComfyUI's adapter keys.
        Comfy,
    }

    /// OneTrainer's `learning_rate_scaler` and `loss_scaler`: the number the learning rate (by
    /// its square root) or the loss is multiplied by. The batch is `batch_size`, each process's;
    /// the global batch is that times the processes of a data-parallel run.
    BatchScaler ("snake_case") {
        None,
        Batch,
        GlobalBatch,
        GradientAccumulation,
        /// The batch times the accumulation steps.
        Both,
        /// The global batch times the accumulation steps.
        GlobalBoth,
    }

    /// How the learning rate falls after warmup.
    LrScheduler ("snake_case") {
        Constant,
        Linear,
        /// Half a cosine from the full rate to the floor.
        Cosine,
        /// `learning_rate_cycles` whole cosine periods: the rate falls and rises again.
        CosineWithRestarts,
        /// `learning_rate_cycles` half-cosines, each jumping back to the full rate.
        CosineWithHardRestarts,
        /// REX (arXiv 2107.04197): stays high longer than linear, then drops.
        Rex,
        /// Adafactor's own rate (OneTrainer's ADAFACTOR, transformers' AdafactorSchedule): with
        /// the adafactor optimizer's `relative_step` it steps at min(1e-2, 1/√step)
        /// (`warmup_init`: min(1e-6·step, 1/√step)), reported as the learning rate; without, at
        /// the learning rate. No warmup. Only with `optimizer = "adafactor"`.
        Adafactor,
    }

    /// How training timesteps are drawn.
    TimestepDistribution ("snake_case") {
        Uniform,
        LogitNormal,
        HeavyTail,
        Sigmoid,
        CosMap,
        InvertedParabola,
    }

    /// Per-timestep loss weighting.
    LossWeightFn ("snake_case") {
        Constant,
        MinSnrGamma,
        DebiasedEstimation,
        P2,
    }

    /// The dtype a part's frozen weights are kept in.
    WeightDtype ("lowercase") {
        Float32,
        Float16,
        Bfloat16,
        /// float8 e4m3 with one scale per matrix (linear weights and embeddings; kernels are
        /// kept in bfloat16).
        Float8,
        /// 4-bit NormalFloat with an absmax per 64 values, as bitsandbytes stores it (linear
        /// weights and embeddings; kernels are kept in bfloat16).
        #[serde(alias = "nf4")]
        Nfloat4,
    }

    /// The dtype the output model or LoRA is saved in.
    OutputDtype ("lowercase") {
        Float32,
        Float16,
        Bfloat16,
    }

    /// OneTrainer's `lora_weight_dtype`: the dtype adapter parameters are kept and trained
    /// in (the optimizer's state follows them, as in torch).
    LoraWeightDtype ("lowercase") {
        Float32,
        /// Half the adapter's memory (parameters, gradients, optimizer state); updates
        /// smaller than a bfloat16 step of the weight are lost.
        Bfloat16,
    }

    /// OneTrainer's `train_dtype`: what matmul, linear, convolutions and attention compute in
    /// (norms, softmax statistics, the loss and the optimizer stay f32; trained parameters
    /// are f32 masters).
    TrainDtype ("lowercase") {
        Float32,
        /// With dynamic loss scaling (a step whose gradients overflow is skipped).
        Float16,
        Bfloat16,
    }

    /// OneTrainer's `fallback_train_dtype`: what parts that overflow in float16 (Flux's T5)
    /// compute in when `train_dtype` is float16.
    FallbackTrainDtype ("lowercase") {
        Float32,
        Bfloat16,
    }

    /// OneTrainer's `gradient_checkpointing`: whether the blocks the architecture marks
    /// (resnets, transformer blocks, text encoder layers) keep only their inputs and are
    /// recomputed in backward.
    GradientCheckpointing ("snake_case") {
        /// Less memory, about a third more compute per step.
        On,
        /// Every activation kept for backward.
        Off,
    }

    /// Where the exponential moving average of the weights is kept.
    EmaMode ("snake_case") {
        Off,
        /// On the training device.
        Gpu,
        /// In host memory.
        Cpu,
    }

    /// OneTrainer's layer presets for adapters.
    LayerPreset ("kebab-case") {
        AttnOnly,
        AttnMlp,
        /// Every layer of the denoiser's transformer blocks (a family's own preset: Flux's).
        Blocks,
        Full,
        /// The layers matched by `lora_layers`.
        Custom,
    }

    /// What a concept's images are for.
    ConceptType ("snake_case") {
        Standard,
        /// Prior preservation: the target is the model's own prediction without adapters.
        Prior,
        /// Validation only (never trained on).
        Validation,
    }

    /// Where a concept's captions come from.
    PromptSource ("snake_case") {
        /// A `.txt` beside each image.
        Sample,
        /// One text file for the whole concept.
        Concept,
        /// The image's file name.
        Filename,
    }

    /// How a concept's weight in an epoch is given.
    BalancingStrategy ("snake_case") {
        /// Each image so many times.
        Repeats,
        /// So many images.
        Samples,
    }

    /// The unit of an interval (sample_after, backup_after, ...) or of stop_training_after.
    TimeUnit ("snake_case") {
        Step,
        Epoch,
        Second,
        Minute,
        Hour,
        Always,
        Never,
    }
}

impl TimeUnit {
    /// The units a part can stop training after (`always` is no time to stop at).
    pub const STOPS: &[Self] = &[
        Self::Step,
        Self::Epoch,
        Self::Second,
        Self::Minute,
        Self::Hour,
        Self::Never,
    ];
}

impl OutputFormat {
    /// The formats a run of `method` can write.
    pub fn allowed(method: TrainingMethod) -> &'static [Self] {
        match method {
            TrainingMethod::Lora => Self::VARIANTS,
            TrainingMethod::FineTune => &[Self::Safetensors, Self::Diffusers],
            TrainingMethod::Embedding => &[Self::Safetensors],
        }
    }
}

/// Checks every choice in a config table against the values its enum allows (read from the
/// config's JSON schema, so every enum field anywhere is covered), so that all bad values are
/// reported at once with their keys rather than the first one alone. Each bad value is replaced
/// by an allowed one, so the rest of the config can still be read and checked.
pub(super) fn check_choices(table: &mut toml::Table) -> Vec<String> {
    let schema = serde_json::to_value(schemars::schema_for!(super::TrainConfig))
        .expect("the config's schema is JSON");
    let mut problems = Vec::new();
    let mut value = toml::Value::Table(std::mem::take(table));
    walk(&schema, &schema, &mut value, "", &mut problems);
    if let toml::Value::Table(t) = value {
        *table = t;
    }
    problems
}

/// The node a `$ref` points at (`#/$defs/Name`), or the node itself.
fn resolve<'a>(root: &'a serde_json::Value, node: &'a serde_json::Value) -> &'a serde_json::Value {
    match node.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => r
            .strip_prefix("#/")
            .and_then(|p| root.pointer(&format!("/{p}")))
            .unwrap_or(node),
        None => node,
    }
}

/// The strings an enum schema allows: its `enum`, its `const`, or those of its `oneOf` (how
/// schemars writes variants, some with doc comments).
fn allowed(node: &serde_json::Value) -> Vec<&str> {
    if let Some(c) = node.get("const").and_then(|c| c.as_str()) {
        return vec![c];
    }
    if let Some(e) = node.get("enum").and_then(|e| e.as_array()) {
        return e.iter().filter_map(|v| v.as_str()).collect();
    }
    node.get("oneOf")
        .and_then(|o| o.as_array())
        .map(|o| o.iter().flat_map(allowed).collect())
        .unwrap_or_default()
}

fn walk(
    root: &serde_json::Value,
    node: &serde_json::Value,
    value: &mut toml::Value,
    key: &str,
    problems: &mut Vec<String>,
) {
    let node = resolve(root, node);
    match value {
        toml::Value::Table(t) => {
            let Some(props) = node.get("properties") else {
                return;
            };
            for (k, v) in t.iter_mut() {
                if let Some(p) = props.get(k) {
                    let key = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    walk(root, p, v, &key, problems);
                }
            }
        }
        toml::Value::Array(items) => {
            if let Some(item) = node.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    walk(root, item, v, &format!("{key}[{i}]"), problems);
                }
            }
        }
        toml::Value::String(s) => {
            let allowed = allowed(node);
            if !allowed.is_empty() && !allowed.contains(&s.as_str()) {
                problems.push(format!("{key}: `{s}` is not one of {}", allowed.join(", ")));
                *s = allowed[0].to_string();
            }
        }
        _ => {}
    }
}

impl BatchScaler {
    /// The number it stands for, with `processes` in the run (OneTrainer's `get_scale`).
    pub fn scale(self, batch_size: usize, accumulation: usize, processes: usize) -> f64 {
        let (b, a, p) = (batch_size as f64, accumulation as f64, processes as f64);
        match self {
            Self::None => 1.0,
            Self::Batch => b,
            Self::GlobalBatch => b * p,
            Self::GradientAccumulation => a,
            Self::Both => b * a,
            Self::GlobalBoth => b * a * p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BatchScaler;

    /// OneTrainer's get_scale for a batch of 3, 5 accumulation steps and 2 processes.
    #[test]
    fn batch_scalers_multiply_as_onetrainers() {
        let got: Vec<f64> = [
            BatchScaler::None,
            BatchScaler::Batch,
            BatchScaler::GlobalBatch,
            BatchScaler::GradientAccumulation,
            BatchScaler::Both,
            BatchScaler::GlobalBoth,
        ]
        .iter()
        .map(|s| s.scale(3, 5, 2))
        .collect();
        assert_eq!(got, [1.0, 3.0, 6.0, 5.0, 15.0, 30.0]);
    }
}
