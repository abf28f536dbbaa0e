//! Adapter files: kohya (the layer's kohya key followed by the adapter's suffixes —
//! `.lora_down.weight`, `.alpha`, ...), diffusers/PEFT (`<part>.<name>.lora_A.weight` /
//! `lora_B.weight`, alpha folded into B, DoRA's `lora_magnitude_vector`) and comfy (the layer's
//! comfy key, kohya's suffixes). Which suffixes an adapter has, which mark a layer as its, its
//! rank and its kohya metadata are the adapter plugin's declaration ([`FileLayout`]): this code
//! names PEFT's keys (a file format's) but no adapter's. The model names each layer's keys;
//! reading takes any of them, the model's other aliases, and PEFT's `base_model.model.` /
//! `.default`; a missing alpha is diffusers' `lora_adapter_metadata`'s (`peft_metadata`), else
//! the rank. Where a layout fuses several layers into one module, `fused` stacks and splits
//! their adapters.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ferrite_plugin_api::{
    AdaptableLayer, ComponentKind, DType, ModelInfo, PartKind, Tensor, Weights,
    adapter::FileLayout, family::layouts,
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

/// One layer's adapter as read from a file, under its plugin's suffixes.
pub struct LayerState {
    pub kind: String,
    pub layer: AdaptableLayer,
    pub alpha: f64,
    pub state: Vec<(String, Tensor)>,
}

/// The file layouts the adapter plugins declare, by adapter id.
#[derive(Debug, Clone, Default)]
pub struct Layouts(pub Vec<(String, FileLayout)>);

impl Layouts {
    /// The declared layouts of the enabled adapter components (one that declares a malformed
    /// layout is left out, with a warning).
    pub fn of(components: &[crate::plugins::ComponentInfo]) -> Self {
        let mut out = Vec::new();
        for c in components
            .iter()
            .filter(|c| c.kind == ComponentKind::Adapter && c.enabled)
        {
            let schema: serde_json::Value =
                serde_json::from_str(&c.options_schema).unwrap_or_default();
            match FileLayout::from_schema(&schema) {
                Ok(Some(l)) => out.push((c.id.clone(), l)),
                Ok(None) => {}
                Err(e) => tracing::warn!("adapter `{}` ({}): {e}", c.id, c.path.display()),
            }
        }
        Self(out)
    }

    pub fn get(&self, kind: &str) -> Option<&FileLayout> {
        self.0.iter().find(|(id, _)| id == kind).map(|(_, l)| l)
    }

    /// The adapter a layer's suffixes belong to: the one with a marker among them (an error
    /// names them when several have).
    fn kind_of(
        &self,
        suffixes: &[&str],
    ) -> std::result::Result<Option<&(String, FileLayout)>, String> {
        let found: Vec<&(String, FileLayout)> = self
            .0
            .iter()
            .filter(|(_, l)| l.markers.iter().any(|m| suffixes.contains(&m.as_str())))
            .collect();
        match found[..] {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(format!(
                "the adapter plugins {} all claim its tensors; disable all but one",
                found
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Known key endings and the suffix each stands for: every declared tensor, `alpha`, and
    /// PEFT's names for the adapters that have that layout.
    pub(super) fn endings(&self) -> Vec<(String, String)> {
        let mut e = vec![(".alpha".to_string(), "alpha".to_string())];
        for (_, l) in &self.0 {
            e.extend(l.tensors.iter().map(|t| (format!(".{t}"), t.clone())));
            if let Some(p) = &l.peft {
                e.push((".lora_A.weight".into(), p.down.clone()));
                e.push((".lora_B.weight".into(), p.up.clone()));
                if let Some(m) = &p.magnitude {
                    e.push((".lora_magnitude_vector.weight".into(), m.clone()));
                    e.push((".lora_magnitude_vector".into(), m.clone()));
                }
            }
        }
        e
    }
}

/// The rank of a state: the first dimension of the first of the layout's `rank_from` tensors.
pub(super) fn rank_of(layout: &FileLayout, state: &[(String, Tensor)]) -> Option<usize> {
    layout.rank_from.iter().find_map(|r| {
        let (_, t) = state.iter().find(|(k, _)| k == r)?;
        t.shape().ok()?.first().copied()
    })
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

/// The layers a file module stands for (several where the layout fuses them) and the (suffix,
/// file key) pairs the file has for it.
type Group<'a> = (Vec<&'a AdaptableLayer>, Vec<(String, String)>);

/// Every name a file may use for a layer, in any format.
fn aliases(layer: &AdaptableLayer) -> Vec<String> {
    let mut a = vec![layer.name.clone()];
    a.extend(layer.keys.values().cloned());
    a.extend(layer.aliases.iter().cloned());
    a
}

/// (module part, suffix) of a file key, with PEFT's wrappers removed; the longest known ending
/// wins.
pub(super) fn split_key(key: &str, endings: &[(String, String)]) -> Option<(String, String)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let key = key.replace(".default", "");
    endings
        .iter()
        .filter(|(end, _)| key.ends_with(end.as_str()))
        .max_by_key(|(end, _)| end.len())
        .map(|(end, suffix)| (key[..key.len() - end.len()].to_string(), suffix.clone()))
}

/// Reads an adapter file for `model`: every tensor must belong to one of its layers (bundled
/// embeddings aside) and each layer's to one of `layouts`' adapters.
pub fn read(model: &ModelLayers, layouts: &Layouts, path: &Path) -> Result<AdapterFile> {
    let shown = path.display();
    let w = Weights::open(&path.to_string_lossy()).map_err(err)?;
    let meta = w.metadata().map_err(err)?;
    let peft_alphas = PeftAlphas::read(&meta, &shown.to_string())?;
    let endings = layouts.endings();
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
        match split_key(key, &endings).and_then(|(m, s)| Some((m.clone(), by_alias.get(&m)?, s))) {
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
             another architecture, an adapter type no loaded plugin has, or not an adapter file",
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
        let suffixes: Vec<&str> = keys.iter().map(|(s, _)| s.as_str()).collect();
        let (kind, layout) = layouts
            .kind_of(&suffixes)
            .map_err(|e| AdapterError(format!("{shown}: layer `{name}`: {e}")))?
            .ok_or_else(|| {
                AdapterError(format!(
                    "{shown}: layer `{name}` has {} — no loaded adapter plugin's tensors",
                    suffixes.join(", ")
                ))
            })?;
        let mut state = Vec::new();
        let mut alpha = None;
        for (suffix, key) in &keys {
            let t = w
                .get(key, DType::F32)
                .map_err(|e| AdapterError(format!("{shown}: {e}")))?;
            if suffix == "alpha" {
                alpha = Some(ferrite_plugin_api::adapter::scalar(&name, key, &t).map_err(err)?);
            }
            state.push((suffix.clone(), t));
        }
        let rank = rank_of(layout, &state);
        // No `.alpha`: the file's peft metadata (PEFT keys name one layer), else the rank (1
        // for an adapter without one), which makes the scale 1.
        let alpha = match (alpha, &members[..], rank) {
            (Some(a), _, _) => a,
            (None, [layer], Some(r)) => peft_alphas.alpha(&layer.name, r).unwrap_or(r as f64),
            (None, _, r) => r.unwrap_or(1) as f64,
        };
        if !suffixes.contains(&"alpha") {
            state.push((
                "alpha".into(),
                Tensor::from_f32(&[alpha as f32], &[]).map_err(err)?,
            ));
        }
        if let [layer] = members[..] {
            layers.push(LayerState {
                kind: kind.clone(),
                layer: layer.clone(),
                alpha,
                state,
            });
            continue;
        }
        let rank = rank.ok_or_else(|| {
            AdapterError(format!(
                "{shown}: {name}: no rank for the layers fused there"
            ))
        })?;
        let shares = fused::split(
            &format!("{shown}: {name}"),
            layout,
            &members,
            &state,
            rank,
            alpha,
        )?;
        layers.extend(shares.into_iter().map(|s| LayerState {
            kind: kind.clone(),
            layer: s.layer,
            alpha: s.alpha,
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
    layout: Option<&FileLayout>,
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
    let Some(peft) = layout.and_then(|l| l.peft.as_ref()) else {
        return Err(AdapterError(format!(
            "{kind} has no diffusers/PEFT format: save as kohya or comfy"
        )));
    };
    // PEFT has no alpha: fold alpha/rank into lora_B.
    let get = |k: &str| {
        state
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| AdapterError(format!("layer `{}`: no {k} in its state", layer.name)))
    };
    let down = get(&peft.down)?;
    let rank = down.shape().map_err(err)?[0];
    let alpha =
        ferrite_plugin_api::adapter::scalar(&layer.name, "alpha", &get("alpha")?).map_err(err)?;
    let up = get(&peft.up)?
        .mul_scalar(alpha / rank as f64)
        .map_err(err)?;
    let mut out = vec![
        (format!("{prefix}.lora_A.weight"), down),
        (format!("{prefix}.lora_B.weight"), up),
    ];
    if let Some(m) = peft.magnitude.as_deref().and_then(|m| get(m).ok()) {
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

/// kohya's `ss_network_module` and `ss_network_args` for a state, from its plugin's layout
/// (none declared: kohya's networks.lora).
fn network_module(layout: Option<&FileLayout>, state: &[(String, Tensor)]) -> (String, String) {
    let Some(l) = layout.filter(|l| !l.network_module.is_empty()) else {
        return ("networks.lora".into(), "{}".into());
    };
    let mut args = l.network_args.clone();
    for (tensor, more) in &l.args_when {
        if state.iter().any(|(k, _)| k == tensor) {
            args.extend(more.clone());
        }
    }
    let args: Vec<String> = args
        .iter()
        .map(|(k, v)| format!("{}: {}", serde_json::json!(k), serde_json::json!(v)))
        .collect();
    (l.network_module.clone(), format!("{{{}}}", args.join(", ")))
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

/// Writes adapter states (kind, layer, state under its plugin's suffixes) of a model to `path`.
/// An adapter whose plugin declares no layout is written as its state's names under each
/// layer's key, as kohya's networks.lora.
pub fn write(
    path: &Path,
    format: Format,
    layouts: &Layouts,
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
        let layout = layouts.get(&a.kind);
        entries.extend(layer_entries(
            format, &a.kind, layout, &a.layer, part, &a.state,
        )?);
    }
    for (key, adapted) in fused_modules {
        let layers: Vec<&AdaptableLayer> = model
            .adaptable_layers
            .iter()
            .filter(|l| l.fused.is_some() && module_key(format, l).ok().as_ref() == Some(&key))
            .collect();
        let layout = layouts.get(kind).ok_or_else(|| {
            AdapterError(format!(
                "{key}: {kind} declares no file layout, so it cannot be written where layers \
                 are fused: save as diffusers"
            ))
        })?;
        let state = fused::fuse(&key, layout, &layers, &adapted)?;
        entries.extend(state.into_iter().map(|(k, t)| (format!("{key}.{k}"), t)));
    }
    let layout = layouts.get(kind);
    let dim = layout.and_then(|l| rank_of(l, first)).unwrap_or(0);
    let alpha = first
        .iter()
        .find(|(k, _)| k == "alpha")
        .map(|(_, t)| ferrite_plugin_api::adapter::scalar("", "alpha", t))
        .transpose()
        .map_err(err)?
        .unwrap_or(dim as f64);
    let (module, args) = network_module(layout, first);
    let mut meta: Vec<(String, String)> = vec![
        ("ss_network_module".into(), module),
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
        let layouts = Layouts(vec![
            ("lora".into(), lora_like()),
            (
                "loha".into(),
                FileLayout {
                    tensors: vec!["hada_w2_b".into()],
                    ..FileLayout::default()
                },
            ),
        ]);
        let endings = layouts.endings();
        for (key, module, suffix) in cases {
            assert_eq!(
                split_key(key, &endings),
                Some((module.to_string(), suffix.to_string())),
                "{key}"
            );
        }
        assert_eq!(
            split_key("model.diffusion_model.out.0.weight", &endings),
            None
        );
    }

    fn lora_like() -> FileLayout {
        FileLayout {
            tensors: vec![
                "lora_down.weight".into(),
                "lora_up.weight".into(),
                "dora_scale".into(),
            ],
            markers: vec!["lora_down.weight".into()],
            network_module: "networks.lora".into(),
            args_when: [(
                "dora_scale".to_string(),
                [("dora_wd".to_string(), "True".to_string())].into(),
            )]
            .into(),
            peft: Some(ferrite_plugin_api::adapter::PeftTensors {
                down: "lora_down.weight".into(),
                up: "lora_up.weight".into(),
                magnitude: Some("dora_scale".into()),
            }),
            ..FileLayout::default()
        }
    }

    #[test]
    fn network_args_follow_the_declared_layout() {
        let one = |k: &str| vec![(k.to_string(), Tensor::from_f32(&[1.0], &[1]).unwrap())];
        crate::runtime::init("cpu").unwrap();
        let l = lora_like();
        assert_eq!(
            network_module(Some(&l), &one("dora_scale")),
            ("networks.lora".into(), r#"{"dora_wd": "True"}"#.into())
        );
        assert_eq!(network_module(Some(&l), &one("lora_up.weight")).1, "{}");
        assert_eq!(network_module(None, &[]).0, "networks.lora");
    }
}
