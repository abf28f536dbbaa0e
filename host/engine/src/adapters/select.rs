//! Which layers get adapters: OneTrainer's layer presets over the denoiser's layers (the
//! family's, else the SD UNet's: `attn-only`: modules containing `attn`; `attn-mlp`:
//! `attentions`; `blocks`: the family's only; `full`: all), or a custom
//! filter (comma-separated substrings, or a regex); a trained text encoder's layers all join.

use ferrite_plugin_api::{AdaptableLayer, ModelInfo, PartKind};
use regex::Regex;

use super::{AdapterError, Result};
use crate::config::LayerPreset;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerFilter {
    AttnOnly,
    AttnMlp,
    Blocks,
    Full,
    /// Comma-separated substrings of module names.
    Substrings(Vec<String>),
    /// A regular expression matched against module names.
    Regex(String),
}

impl LayerFilter {
    /// `custom` reads `filter` as comma-separated substrings, or as a regex when `regex` is
    /// set.
    pub fn new(preset: LayerPreset, filter: &str, regex: bool) -> Result<Self> {
        Ok(match preset {
            LayerPreset::AttnOnly => Self::AttnOnly,
            LayerPreset::AttnMlp => Self::AttnMlp,
            LayerPreset::Blocks => Self::Blocks,
            LayerPreset::Full => Self::Full,
            LayerPreset::Custom if regex => {
                Regex::new(filter).map_err(|e| {
                    AdapterError(format!(
                        "layer_filter: `{filter}` is not a valid regex: {e}"
                    ))
                })?;
                Self::Regex(filter.to_string())
            }
            LayerPreset::Custom => {
                let parts: Vec<String> = filter
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if parts.is_empty() {
                    return Err(AdapterError(
                        "layer_filter: a custom preset needs comma-separated module name parts"
                            .into(),
                    ));
                }
                Self::Substrings(parts)
            }
        })
    }

    /// Refuses a preset the model does not have: `blocks` is a family's own (a UNet has none).
    pub fn check(&self, model: &ModelInfo) -> Result<()> {
        if *self == Self::Blocks && !model.layer_presets.contains_key("blocks") {
            return Err(AdapterError(
                "lora_layer_preset `blocks`: this model has no blocks preset (OneTrainer's is \
                 for transformers such as Flux); use attn-only, attn-mlp, full or custom"
                    .into(),
            ));
        }
        Ok(())
    }

    fn matches(&self, module: &str, re: Option<&Regex>, model: &ModelInfo) -> bool {
        // The family's own preset, else the SD UNet's.
        let preset = |name: &str, default: &str| match model.layer_presets.get(name) {
            Some(parts) => parts.iter().any(|p| module.contains(p.as_str())),
            None => module.contains(default),
        };
        match self {
            Self::AttnOnly => preset("attn-only", "attn"),
            Self::AttnMlp => preset("attn-mlp", "attentions"),
            Self::Blocks => model
                .layer_presets
                .get("blocks")
                .is_some_and(|parts| parts.iter().any(|p| module.contains(p.as_str()))),
            Self::Full => true,
            Self::Substrings(parts) => parts.iter().any(|p| module.contains(p.as_str())),
            Self::Regex(_) => re.is_some_and(|r| r.is_match(module)),
        }
    }
}

/// The layers to adapt among the model's in the parts `trained` says (by part id): a
/// denoiser's by `filter`, every layer of the others.
pub fn select<'a>(
    model: &'a ModelInfo,
    filter: &LayerFilter,
    trained: impl Fn(&str) -> bool,
) -> Vec<&'a AdaptableLayer> {
    let re = match filter {
        LayerFilter::Regex(r) => Regex::new(r).ok(),
        _ => None,
    };
    model
        .adaptable_layers
        .iter()
        .filter(|l| {
            let (Some(part), Some((_, module))) = (model.part_of(&l.name), l.name.split_once('.'))
            else {
                return false;
            };
            trained(&part.id)
                && (part.kind != PartKind::Denoiser || filter.matches(module, re.as_ref(), model))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_pick_onetrainers_layers() {
        let names = [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "unet.down_blocks.0.attentions.0.proj_in",
            "unet.down_blocks.0.resnets.0.conv1",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        ];
        let part = |id: &str, kind: &str| serde_json::json!({"id": id, "name": id, "config_table": id, "kind": kind});
        let model = ModelInfo::from_json(&serde_json::json!({
            "parts": [part("unet", "denoiser"), part("text_encoder", "text_encoder")],
            "objective": {"type": "ddpm", "scheduler": {}},
            "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 1.0,
            "resolution_step": 8,
            "adaptable_layers": names.map(|n| serde_json::json!({"name": n, "shape": [4, 4]})),
        }))
        .unwrap();
        let names = |f: &LayerFilter, te: bool| -> Vec<usize> {
            select(&model, f, |p| p == "unet" || te)
                .iter()
                .map(|l| names.iter().position(|x| *x == l.name).unwrap())
                .collect()
        };
        let f = |p: LayerPreset, s: &str, r: bool| LayerFilter::new(p, s, r).unwrap();
        use LayerPreset::*;
        assert_eq!(names(&f(AttnOnly, "", false), false), [0]);
        assert_eq!(names(&f(AttnMlp, "", false), false), [0, 1, 2]);
        assert_eq!(names(&f(Full, "", false), true), [0, 1, 2, 3, 4]);
        assert_eq!(names(&f(Custom, "ff.net, conv1", false), false), [1, 3]);
        assert_eq!(
            names(&f(Custom, r"attn\d\.to_q$|proj_in", true), false),
            [0, 2]
        );
        // `blocks` is a family's own preset: a UNet has none.
        let e = f(Blocks, "", false).check(&model).unwrap_err().to_string();
        assert!(e.contains("lora_layer_preset `blocks`"), "{e}");
        assert!(f(AttnMlp, "", false).check(&model).is_ok());
        assert!(LayerFilter::new(Custom, "(", true).is_err());
        assert!(LayerFilter::new(Custom, " , ", false).is_err());
    }
}
