//! Which layers get adapters: OneTrainer's layer presets over the UNet's layers (`attn-only`:
//! modules containing `attn`; `attn-mlp`: `attentions`; `full`: all), or a custom filter (comma-
//! separated substrings, or a regex); the text encoder's linear layers join when it is trained.

use ferrite_plugin_api::AdaptableLayer;
use regex::Regex;

use super::{AdapterError, Result};
use crate::config::LayerPreset;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerFilter {
    AttnOnly,
    AttnMlp,
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

    fn matches(&self, module: &str, re: Option<&Regex>) -> bool {
        match self {
            Self::AttnOnly => module.contains("attn"),
            Self::AttnMlp => module.contains("attentions"),
            Self::Full => true,
            Self::Substrings(parts) => parts.iter().any(|p| module.contains(p.as_str())),
            Self::Regex(_) => re.is_some_and(|r| r.is_match(module)),
        }
    }
}

/// The layers to adapt: the UNet's by `filter`, and with `text_encoder` every text-encoder layer.
pub fn select<'a>(
    layers: &'a [AdaptableLayer],
    filter: &LayerFilter,
    text_encoder: bool,
) -> Vec<&'a AdaptableLayer> {
    let re = match filter {
        LayerFilter::Regex(r) => Regex::new(r).ok(),
        _ => None,
    };
    layers
        .iter()
        .filter(|l| match l.name.split_once('.') {
            Some(("unet", module)) => filter.matches(module, re.as_ref()),
            Some(("text_encoder", _)) => text_encoder,
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str) -> AdaptableLayer {
        AdaptableLayer {
            name: name.into(),
            shape: vec![4, 4],
            conv: None,
            original: None,
        }
    }

    #[test]
    fn presets_pick_onetrainers_layers() {
        let layers: Vec<AdaptableLayer> = [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "unet.down_blocks.0.attentions.0.proj_in",
            "unet.down_blocks.0.resnets.0.conv1",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        ]
        .map(layer)
        .to_vec();
        let names = |f: &LayerFilter, te: bool| -> Vec<usize> {
            select(&layers, f, te)
                .iter()
                .map(|l| layers.iter().position(|x| x == *l).unwrap())
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
        assert!(LayerFilter::new(Custom, "(", true).is_err());
        assert!(LayerFilter::new(Custom, " , ", false).is_err());
    }
}
