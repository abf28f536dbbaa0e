//! diffusers' `lora_adapter_metadata`: the peft `LoraConfig` of each model part a diffusers/PEFT
//! LoRA file was saved with (`transformer.lora_alpha`, `transformer.alpha_pattern`,
//! `transformer.use_rslora`), the only place such a file tells alphas other than its ranks.

use std::collections::{BTreeMap, HashMap};

use regex::Regex;
use serde::Deserialize;

use super::{AdapterError, Result};

const KEY: &str = "lora_adapter_metadata";

#[derive(Deserialize, Default)]
struct PartConfig {
    lora_alpha: Option<f64>,
    /// Sorted, as diffusers writes the metadata (`sort_keys`) and peft tries the patterns in
    /// that order.
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    use_rslora: bool,
}

/// One part's alphas: its pattern's (module name patterns, as peft matches them) before its
/// default.
struct Part {
    default: Option<f64>,
    patterns: Vec<(Regex, f64)>,
    rslora: bool,
}

/// The alphas a file's metadata gives, by part.
#[derive(Default)]
pub struct PeftAlphas(HashMap<String, Part>);

impl PeftAlphas {
    /// Reads `metadata` (a safetensors file's, shown as `shown`); empty when it has none.
    pub fn read(metadata: &[(String, String)], shown: &str) -> Result<Self> {
        let Some((_, text)) = metadata.iter().find(|(k, _)| k == KEY) else {
            return Ok(Self::default());
        };
        let bad = |e: String| AdapterError(format!("{shown}: its {KEY} is not peft's: {e}"));
        let flat: HashMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        // `<part>.<field>` → each part's config.
        let mut parts: HashMap<String, serde_json::Map<String, serde_json::Value>> = HashMap::new();
        for (k, v) in flat {
            if let Some((part, field)) = k.split_once('.') {
                parts
                    .entry(part.into())
                    .or_default()
                    .insert(field.into(), v);
            }
        }
        let mut out = HashMap::new();
        for (part, fields) in parts {
            // Only the fields read here; peft's others (target modules, dropout) do not matter.
            let keep = ["lora_alpha", "alpha_pattern", "use_rslora"];
            let fields: serde_json::Map<_, _> = fields
                .into_iter()
                .filter(|(k, v)| keep.contains(&k.as_str()) && !v.is_null())
                .collect();
            let c: PartConfig =
                serde_json::from_value(fields.into()).map_err(|e| bad(format!("{part}: {e}")))?;
            let patterns = c
                .alpha_pattern
                .into_iter()
                .map(|(p, a)| {
                    // peft's match: the pattern ends the module's name at a dot boundary.
                    let re = Regex::new(&format!(r"^(.*\.)?(?:{p})$"))
                        .map_err(|e| bad(format!("{part}.alpha_pattern `{p}`: {e}")))?;
                    Ok((re, a))
                })
                .collect::<Result<Vec<_>>>()?;
            out.insert(
                part,
                Part {
                    default: c.lora_alpha,
                    patterns,
                    rslora: c.use_rslora,
                },
            );
        }
        Ok(Self(out))
    }

    /// The alpha of layer `name` (`transformer.transformer_blocks.0.attn.to_q`) of rank `rank`
    /// as Ferrite scales it (alpha / rank), if the metadata gives one: rsLoRA's alpha / √rank
    /// as the equivalent alpha.
    pub fn alpha(&self, name: &str, rank: usize) -> Option<f64> {
        let (part, module) = name.split_once('.')?;
        let p = self.0.get(part)?;
        let alpha = p
            .patterns
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, a)| *a)
            .or(p.default)?;
        Some(if p.rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_before_the_default_and_rslora_as_an_alpha() {
        let meta = serde_json::json!({
            "transformer.lora_alpha": 8,
            // Both match `attn.to_q`: the first in key order wins, as in peft.
            "transformer.alpha_pattern": {"to_q": 5, "proj_mlp": 2, "attn.to_q": 3},
            "transformer.r": 4,
            "text_encoder.lora_alpha": 4,
            "text_encoder.use_rslora": true,
            "text_encoder.target_modules": ["q_proj"],
        });
        let m = [(KEY.to_string(), meta.to_string())];
        let a = PeftAlphas::read(&m, "f").unwrap();
        let t = "transformer.single_transformer_blocks.0";
        assert_eq!(a.alpha(&format!("{t}.proj_mlp"), 4), Some(2.0));
        assert_eq!(a.alpha(&format!("{t}.attn.to_q"), 4), Some(3.0));
        assert_eq!(a.alpha(&format!("{t}.attn.to_k"), 4), Some(8.0));
        assert_eq!(a.alpha("transformer.x.to_q", 4), Some(5.0));
        // Not a match inside a name: `xproj_mlp`.
        assert_eq!(a.alpha("transformer.xproj_mlp", 4), Some(8.0));
        assert_eq!(a.alpha("text_encoder.q_proj", 16), Some(16.0));
        assert_eq!(a.alpha("unet.x", 4), None);
        assert!(
            PeftAlphas::read(&[], "f")
                .unwrap()
                .alpha("transformer.x", 4)
                .is_none()
        );
        let bad = [(KEY.to_string(), "{".to_string())];
        assert!(PeftAlphas::read(&bad, "f").is_err());
    }
}
