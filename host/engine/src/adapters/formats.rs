//! Adapter files: kohya (the layer's kohya key, `.lora_down.weight`, `.lora_up.weight`,
//! `.alpha`, `.dora_scale`, LoHa's `.hada_w*`), diffusers/PEFT (`<part>.<name>.lora_A.weight` /
//! `lora_B.weight`, alpha folded into B, DoRA's `lora_magnitude_vector`) and comfy (the layer's
//! comfy key, kohya's suffixes). The model names each layer's keys; reading takes any of them,
//! the model's other aliases, and PEFT's `base_model.model.` / `.default`; a missing alpha is
//! diffusers' `lora_adapter_metadata`'s (`peft_metadata`), else the rank. Where a layout fuses several layers into one module, `fused` stacks and splits
//! their adapters.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ferrite_plugin_api::{
    AdaptableLayer, DType, ModelInfo, PartKind, Tensor, Weights, family::layouts,
};

use super::peft_metadata::PeftAlphas;
use super::{AdapterError, ModelLayers, Result, err, fused};
use crate::config::OutputFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Kohya,
    Diffusers,
    Comfy,
}

impl From<OutputFormat> for Format {
    fn from(f: OutputFormat) -> Self {
        match f {
            // A `.safetensors` LoRA without more said is kohya's layout: what A1111 and ComfyUI
            // read.
            OutputFormat::Kohya | OutputFormat::Safetensors => Self::Kohya,
            OutputFormat::Diffusers => Self::Diffusers,
            OutputFormat::Comfy => Self::Comfy,
        }
    }
}

/// One layer's adapter as read from a file, under kohya's suffixes.
pub struct LayerState {
    pub kind: String,
    pub layer: AdaptableLayer,
    pub rank: usize,
    pub alpha: f64,
    pub dora: bool,
    pub state: Vec<(String, Tensor)>,
}

pub struct AdapterFile {
    pub layers: Vec<LayerState>,
}

/// One attached adapter's state, to be written.
pub struct AdapterState {
    pub kind: String,
    pub layer: AdaptableLayer,
    pub state: Vec<(String, Tensor)>,
}

/// The layers a file module stands for (several where the layout fuses them) and the (kohya
/// suffix, file key) pairs the file has for it.
type Group<'a> = (Vec<&'a AdaptableLayer>, Vec<(&'static str, String)>);

/// Every name a file may use for a layer, in any format.
fn aliases(layer: &AdaptableLayer) -> Vec<String> {
    let mut a = vec![layer.name.clone()];
    a.extend(layer.keys.values().cloned());
    a.extend(layer.aliases.iter().cloned());
    a
}

/// Known key endings, and the kohya suffix each stands for.
const SUFFIXES: [(&str, &str); 12] = [
    (".lora_down.weight", "lora_down.weight"),
    (".lora_up.weight", "lora_up.weight"),
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
];

/// (module part, kohya suffix) of a file key, with PEFT's wrappers removed.
pub(super) fn split_key(key: &str) -> Option<(String, &'static str)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let key = key.replace(".default", "");
    SUFFIXES
        .iter()
        .find_map(|(end, suffix)| key.strip_suffix(end).map(|m| (m.to_string(), *suffix)))
}

fn shape_of(w: &Weights, key: &str) -> Vec<usize> {
    w.info(key)
        .map(|i| i.shape.iter().map(|&d| d as usize).collect())
        .unwrap_or_default()
}

/// Reads an adapter file for `model`: every tensor must belong to one of its layers (bundled
/// embeddings aside).
pub fn read(model: &ModelLayers, path: &Path) -> Result<AdapterFile> {
    let shown = path.display();
    let w = Weights::open(&path.to_string_lossy()).map_err(err)?;
    let meta = w.metadata().map_err(err)?;
    let peft_alphas = PeftAlphas::read(&meta, &shown.to_string())?;
    let mut by_alias: HashMap<String, Vec<&AdaptableLayer>> = HashMap::new();
    for l in &model.layers {
        for a in aliases(l) {
            by_alias.entry(a).or_default().push(l);
        }
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for info in w.infos() {
        let key = info.key.as_str();
        // Bundled embeddings (A1111's `bundle_emb.`) are read by the embedding loader.
        if key.starts_with("bundle_emb.") {
            continue;
        }
        match split_key(key).and_then(|(m, s)| Some((m.clone(), by_alias.get(&m)?, s))) {
            Some((module, layers, suffix)) => groups
                .entry(module)
                .or_insert_with(|| (layers.clone(), Vec::new()))
                .1
                .push((suffix, key.to_string())),
            None => unmatched.push(key.to_string()),
        }
    }
    if !unmatched.is_empty() {
        let n = unmatched.len();
        unmatched.truncate(3);
        return Err(AdapterError(format!(
            "{shown}: {n} tensor(s) match no layer of this model (e.g. {}): an adapter for \
             another architecture, or not an adapter file",
            unmatched.join(", ")
        )));
    }
    if groups.is_empty() {
        return Err(AdapterError(format!(
            "{shown}: no adapter tensors in the file"
        )));
    }
    let mut layers = Vec::new();
    for (name, (members, keys)) in groups {
        let find = |s: &str| {
            keys.iter()
                .find(|(k, _)| *k == s)
                .map(|(_, key)| key.as_str())
        };
        let (kind, rank_key) = if find("hada_w1_b").is_some() {
            ("loha", "hada_w1_b")
        } else {
            ("lora", "lora_down.weight")
        };
        let rank = find(rank_key)
            .map(|k| shape_of(&w, k))
            .and_then(|s| s.first().copied())
            .ok_or_else(|| AdapterError(format!("{shown}: layer `{name}` has no {rank_key}")))?;
        let mut state = Vec::new();
        // No `.alpha`: the file's peft metadata (PEFT keys name one layer), else the rank.
        let mut alpha = match &members[..] {
            [layer] => peft_alphas.alpha(&layer.name, rank),
            _ => None,
        }
        .unwrap_or(rank as f64);
        for (suffix, key) in &keys {
            let t = w
                .get(key, DType::F32)
                .map_err(|e| AdapterError(format!("{shown}: {e}")))?;
            if *suffix == "alpha" {
                alpha = ferrite_plugin_api::adapter::scalar(&name, key, &t).map_err(err)?;
            }
            state.push((suffix.to_string(), t));
        }
        if !keys.iter().any(|(s, _)| *s == "alpha") {
            state.push((
                "alpha".into(),
                Tensor::from_f32(&[alpha as f32], &[]).map_err(err)?,
            ));
        }
        let dora = find("dora_scale").is_some();
        if let [layer] = members[..] {
            layers.push(LayerState {
                kind: kind.into(),
                layer: layer.clone(),
                rank,
                alpha,
                dora,
                state,
            });
            continue;
        }
        let shares = fused::split(&format!("{shown}: {name}"), &members, &state, rank, alpha)?;
        layers.extend(shares.into_iter().map(|s| LayerState {
            kind: kind.into(),
            layer: s.layer,
            rank: s.rank,
            alpha: s.alpha,
            dora,
            state: s.state,
        }));
    }
    Ok(AdapterFile { layers })
}

/// A layer's module key in `format`.
fn module_key(format: Format, layer: &AdaptableLayer) -> Result<String> {
    let layout = match format {
        Format::Kohya => layouts::KOHYA,
        Format::Comfy => layouts::COMFY,
        Format::Diffusers => return Ok(layer.name.clone()),
    };
    layer.keys.get(layout).cloned().ok_or_else(|| {
        AdapterError(format!(
            "the model names no {layout} key for layer `{}`: save in another \
             output_model_format",
            layer.name
        ))
    })
}

/// The file keys and tensors of one layer's state in `format`.
fn layer_entries(
    format: Format,
    kind: &str,
    layer: &AdaptableLayer,
    part: Option<PartKind>,
    state: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>> {
    let prefix = module_key(format, layer)?;
    if format != Format::Diffusers {
        return Ok(state
            .iter()
            .map(|(k, t)| (format!("{prefix}.{k}"), t.clone()))
            .collect());
    }
    if kind != "lora" {
        return Err(AdapterError(format!(
            "{kind} has no diffusers/PEFT format: save as kohya or comfy"
        )));
    }
    // PEFT has no alpha: fold alpha/rank into lora_B.
    let get = |k: &str| {
        state
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| AdapterError(format!("layer `{}`: no {k} in its state", layer.name)))
    };
    let down = get("lora_down.weight")?;
    let rank = down.shape().map_err(err)?[0];
    let alpha =
        ferrite_plugin_api::adapter::scalar(&layer.name, "alpha", &get("alpha")?).map_err(err)?;
    let up = get("lora_up.weight")?
        .mul_scalar(alpha / rank as f64)
        .map_err(err)?;
    let mut out = vec![
        (format!("{prefix}.lora_A.weight"), down),
        (format!("{prefix}.lora_B.weight"), up),
    ];
    if let Ok(m) = get("dora_scale") {
        // peft's layout: [out] for a linear layer, [1, out, 1, 1] for a conv. diffusers reads
        // the UNet's magnitude bare and the text encoder's (through transformers) as `.weight`.
        let key = match part {
            Some(PartKind::TextEncoder) => format!("{prefix}.lora_magnitude_vector.weight"),
            _ => format!("{prefix}.lora_magnitude_vector"),
        };
        out.push((key, m.reshape(&layer.per_output_shape()).map_err(err)?));
    }
    Ok(out)
}

/// The metadata keys [`write`] sets from the adapters and the model.
fn meta_keys_written(key: &str) -> bool {
    matches!(
        key,
        "ss_network_module"
            | "ss_network_dim"
            | "ss_network_alpha"
            | "ss_network_args"
            | "ss_base_model_version"
            | "ss_output_format"
            | "modelspec.architecture"
    )
}

/// Writes adapter states (kind, layer, state under kohya suffixes) of a model to `path`.
pub fn write(
    path: &Path,
    format: Format,
    states: &[AdapterState],
    model: &ModelInfo,
    extra: &[(String, String)],
    bundled: &[(String, Tensor)],
) -> Result<()> {
    let Some(AdapterState {
        kind, state: first, ..
    }) = states.first()
    else {
        return Err(AdapterError("there are no adapters to save".into()));
    };
    let mut entries = Vec::new();
    let mut fused_modules: BTreeMap<String, Vec<fused::Member>> = BTreeMap::new();
    for a in states {
        if format != Format::Diffusers && a.layer.fused.is_some() {
            fused_modules
                .entry(module_key(format, &a.layer)?)
                .or_default()
                .push((&a.layer, &a.state));
            continue;
        }
        let part = model.part_of(&a.layer.name).map(|p| p.kind);
        entries.extend(layer_entries(format, &a.kind, &a.layer, part, &a.state)?);
    }
    for (key, adapted) in fused_modules {
        let layers: Vec<&AdaptableLayer> = model
            .adaptable_layers
            .iter()
            .filter(|l| l.fused.is_some() && module_key(format, l).ok().as_ref() == Some(&key))
            .collect();
        let state = fused::fuse(&key, &layers, &adapted)?;
        entries.extend(state.into_iter().map(|(k, t)| (format!("{key}.{k}"), t)));
    }
    let dim = first
        .iter()
        .find(|(k, _)| k == "lora_down.weight" || k == "hada_w1_b")
        .map(|(_, t)| t.shape().map(|s| s[0]))
        .transpose()
        .map_err(err)?
        .unwrap_or(0);
    let alpha = first
        .iter()
        .find(|(k, _)| k == "alpha")
        .map(|(_, t)| ferrite_plugin_api::adapter::scalar("", "alpha", t))
        .transpose()
        .map_err(err)?
        .unwrap_or(dim as f64);
    let dora = first.iter().any(|(k, _)| k == "dora_scale");
    let (module, args) = match (kind.as_str(), dora) {
        ("loha", _) => ("lycoris.kohya", r#"{"algo": "loha"}"#.to_string()),
        (_, true) => ("networks.lora", r#"{"dora_wd": "True"}"#.to_string()),
        _ => ("networks.lora", "{}".to_string()),
    };
    let mut meta: Vec<(String, String)> = vec![
        ("ss_network_module".into(), module.into()),
        ("ss_network_dim".into(), dim.to_string()),
        ("ss_network_alpha".into(), alpha.to_string()),
        ("ss_network_args".into(), args),
        (
            "ss_base_model_version".into(),
            model.metadata.base_model_version.clone(),
        ),
        (
            "ss_output_format".into(),
            format!("{format:?}").to_lowercase(),
        ),
    ];
    if !model.metadata.modelspec_architecture.is_empty() {
        meta.push((
            "modelspec.architecture".into(),
            format!("{}/lora", model.metadata.modelspec_architecture),
        ));
    }
    meta.extend(model.metadata.extra.clone());
    // What the caller adds (a run's training metadata, a converted file's) but not what this
    // file's own layout and adapters say, nor a hash of other tensors.
    meta.extend(
        extra
            .iter()
            .filter(|(k, _)| !k.starts_with("modelspec.hash") && !meta_keys_written(k))
            .cloned(),
    );
    let tensors: Vec<(&str, &Tensor)> = entries
        .iter()
        .chain(bundled)
        .map(|(k, t)| (k.as_str(), t))
        .collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ferrite_plugin_api::save_safetensors(&path.to_string_lossy(), &tensors, &meta)
        .map_err(|e| AdapterError(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_kohya_suffix() {
        let cases = [
            (
                "lora_unet_a_b.lora_down.weight",
                "lora_unet_a_b",
                "lora_down.weight",
            ),
            (
                "base_model.model.a.b.lora_A.default.weight",
                "a.b",
                "lora_down.weight",
            ),
            ("unet.a.lora_B.weight", "unet.a", "lora_up.weight"),
            ("a.lora_magnitude_vector.default.weight", "a", "dora_scale"),
            ("unet.a.lora_magnitude_vector", "unet.a", "dora_scale"),
            ("lycoris_a_b.hada_w2_b", "lycoris_a_b", "hada_w2_b"),
            ("diffusion_model.x.alpha", "diffusion_model.x", "alpha"),
        ];
        for (key, module, suffix) in cases {
            assert_eq!(split_key(key), Some((module.to_string(), suffix)), "{key}");
        }
        assert_eq!(split_key("model.diffusion_model.out.0.weight"), None);
    }
}
