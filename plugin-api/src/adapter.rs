//! Helpers shared by adapter plugins.

use crate::error::{Error, Result};
use crate::nn::AdaptableLayer;
use crate::tensor::Tensor;

/// Checks that the weight an adapter is bound to is the one it was made for.
pub fn check_weight(layer: &AdaptableLayer, weight: &Tensor) -> Result<()> {
    let got = weight.shape()?;
    if got != layer.shape {
        return Err(Error(format!(
            "layer `{}`: weight has shape {got:?}, the adapter was made for {:?}",
            layer.name, layer.shape
        )));
    }
    Ok(())
}

/// FNV-1a of the layer name mixed into the seed: every layer gets its own initialisation.
pub fn layer_seed(seed: u64, layer: &str) -> u64 {
    layer.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Copies a tensor read from a file into the adapter's own in place (handles held elsewhere, an
/// optimizer's, stay valid), after checking its shape.
pub fn load_into(layer: &str, key: &str, target: &Tensor, src: &Tensor) -> Result<()> {
    let (want, got) = (target.shape()?, src.shape()?);
    if want != got {
        return Err(Error(format!(
            "layer `{layer}`: `{key}` has shape {got:?}, this adapter expects {want:?} \
             (a different rank or layer)"
        )));
    }
    target.assign(&src.cast(target.dtype()?)?.detach()?)
}

/// For an adapter whose whole effect is a weight change ΔW (LoHa, LoKr): the layer's output with
/// `multiplier`·ΔW added.
pub fn forward_with_delta(
    layer: &AdaptableLayer,
    x: &Tensor,
    base_out: &Tensor,
    delta: &Tensor,
    multiplier: f64,
) -> Result<Tensor> {
    base_out.add(&layer.apply(x, delta)?.mul_scalar(multiplier)?)
}

/// The bound weight `base` with `multiplier`·ΔW merged in (a ΔW adapter's `merged_weight`).
pub fn merge_delta(
    layer: &AdaptableLayer,
    base: Option<&Tensor>,
    delta: &Tensor,
    multiplier: f64,
) -> Result<Tensor> {
    let w = base.ok_or_else(|| Error(format!("layer `{}`: adapter not bound", layer.name)))?;
    w.add(&delta.mul_scalar(multiplier)?)
}

/// A scalar such as kohya's `alpha` (0-d, or one element).
pub fn scalar(layer: &str, key: &str, t: &Tensor) -> Result<f64> {
    match t.to_vec()?[..] {
        [v] => Ok(v as f64),
        _ => Err(Error(format!(
            "layer `{layer}`: `{key}` should hold one value"
        ))),
    }
}

/// How an adapter's state goes into adapter files, declared by its plugin (under
/// [`FILE_LAYOUT_KEY`] in the options schema, see [`with_file_layout`]), so that the host's file
/// code names no adapter's tensors. A layer's tensors are written under the layer's kohya,
/// ComfyUI or diffusers key followed by these suffixes (LyCORIS' layout); `alpha` is every
/// adapter's and is not listed.
// Unknown fields are ignored: a plugin built against a later plugin-api may declare more.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FileLayout {
    /// The suffixes of the state's tensors (`lora_down.weight`, `hada_w1_a`, ...).
    pub tensors: Vec<String>,
    /// Any of these in a file marks a layer as this adapter's.
    pub markers: Vec<String>,
    /// The rank is the first dimension of the first of these in the state.
    pub rank_from: Vec<String>,
    /// For layouts that fuse several layers into one module (Flux's qkv): the `[rank, in]`
    /// factors, the `[out, rank]` factors and the per-output tensors. An adapter with another
    /// tensor cannot be written fused.
    pub rank_rows: Vec<String>,
    pub out_rows: Vec<String>,
    pub per_output: Vec<String>,
    /// kohya's `ss_network_module` and `ss_network_args`, and the arguments added when a tensor
    /// is in the state (LoRA's `dora_wd` when it has `dora_scale`).
    pub network_module: String,
    pub network_args: std::collections::BTreeMap<String, String>,
    pub args_when: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// What `lora info` calls it, and what when a tensor is in the file (DoRA).
    pub name: String,
    pub name_when: std::collections::BTreeMap<String, String>,
    /// Which tensors are PEFT's down and up factors and magnitude, when the adapter has
    /// diffusers' (PEFT's) layout.
    pub peft: Option<PeftTensors>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftTensors {
    pub down: String,
    pub up: String,
    pub magnitude: Option<String>,
}

/// Where a [`FileLayout`] sits in an adapter's options schema.
pub const FILE_LAYOUT_KEY: &str = "x-ferrite-file";

/// The adapter's options schema with its file layout in it.
pub fn with_file_layout(mut schema: serde_json::Value, layout: &FileLayout) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.insert(
            FILE_LAYOUT_KEY.into(),
            serde_json::to_value(layout).unwrap_or_default(),
        );
    }
    schema
}

impl FileLayout {
    /// The layout an options schema declares, if any (an error says what is wrong with it).
    pub fn from_schema(schema: &serde_json::Value) -> std::result::Result<Option<Self>, String> {
        match schema.get(FILE_LAYOUT_KEY) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| format!("{FILE_LAYOUT_KEY}: {e}")),
        }
    }
}

/// The shapes of the tensors a file holds for one layer, by suffix: given to an adapter made
/// from a file (option `file_shapes`) so that it takes the file's structure (rank, factors,
/// DoRA) whatever its defaults.
pub type FileShapes = std::collections::BTreeMap<String, Vec<usize>>;
