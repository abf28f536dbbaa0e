//! What an adapter file holds, read from its keys, shapes and metadata alone (`ferrite lora
//! info`): its key layout, adapter type, ranks, alphas, module count, the model family it was
//! made for, and its training metadata.

use std::collections::BTreeSet;
use std::path::Path;

use ferrite_plugin_api::{DType, Weights};

use super::formats::{Layouts, split_key};
use super::{AdapterError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// kohya, ComfyUI, diffusers/PEFT or LyCORIS.
    pub layout: &'static str,
    /// What the adapter plugin calls it (LoRA, DoRA, LoHa, ...).
    pub kind: String,
    pub modules: usize,
    pub ranks: BTreeSet<usize>,
    /// `.alpha` values, ascending (none: alpha = rank, or diffusers' metadata).
    pub alphas: Vec<f32>,
    /// SD 1.x/2.x, SDXL or Flux, from the metadata or the keys; None when neither tells.
    pub family: Option<String>,
    /// Training metadata worth showing (`ss_*`, `modelspec.*`), sorted.
    pub metadata: Vec<(String, String)>,
    /// Tensors that are not adapters' (kohya's bundled embeddings), a few of their keys.
    pub other_tensors: (usize, Vec<String>),
    /// The dtype its adapters' factors are stored in.
    pub dtype: DType,
}

impl Description {
    /// The report `ferrite lora info` prints and the Tools tab shows, a line per item (after
    /// the file's name; bundled embeddings are the caller's).
    pub fn lines(&self) -> Vec<String> {
        let join = |v: Vec<String>| v.join(", ");
        let mut out = vec![
            format!("layout: {}", self.layout),
            format!("type: {}", self.kind),
            format!("modules: {}", self.modules),
            format!(
                "ranks: {}",
                join(self.ranks.iter().map(|r| r.to_string()).collect())
            ),
            format!(
                "alphas: {}",
                if self.alphas.is_empty() {
                    "none in the file (alpha = rank, or diffusers' metadata)".into()
                } else {
                    join(self.alphas.iter().map(|a| a.to_string()).collect())
                }
            ),
            format!(
                "made for: {}",
                self.family.as_deref().unwrap_or("not told by the file")
            ),
        ];
        if self.other_tensors.0 > 0 {
            out.push(format!(
                "other tensors: {} (e.g. {})",
                self.other_tensors.0,
                self.other_tensors.1.join(", ")
            ));
        }
        for (k, v) in &self.metadata {
            // Dataset listings and tag counts run to kilobytes.
            out.push(match v.char_indices().nth(120) {
                Some((at, _)) => format!("{k}: {}… ({} bytes)", &v[..at], v.len()),
                None => format!("{k}: {v}"),
            });
        }
        out
    }
}

/// The family the keys name: Flux's BFL modules or diffusers transformer, SDXL's SGM block names,
/// second text encoder or deeper transformer stacks, else SD 1.x/2.x's UNet.
fn family_of_keys(modules: &BTreeSet<String>) -> Option<&'static str> {
    let any = |p: &[&str]| modules.iter().any(|m| p.iter().any(|x| m.contains(x)));
    if any(&[
        "double_blocks",
        "single_blocks",
        "single_transformer_blocks",
        "lora_transformer_",
    ]) {
        Some("Flux")
    } else if any(&[
        "lora_te2_",
        "text_encoder_2",
        "clip_g",
        "transformer_blocks_1_",
        "transformer_blocks.1.",
    ]) {
        // SD 1.x/2.x blocks hold one transformer block; SDXL's deeper ones more.
        Some("SDXL")
    } else if any(&[
        "down_blocks",
        "up_blocks",
        "mid_block",
        "input_blocks",
        "output_blocks",
        "middle_block",
    ]) {
        Some("SD 1.x/2.x")
    } else {
        None
    }
}

/// Describes the adapter file at `path`; `layouts` (the adapter plugins') say which tensors
/// belong to which adapter type.
pub fn describe(path: &Path, layouts: &Layouts) -> Result<Description> {
    let shown = path.display();
    let w = Weights::open(&path.to_string_lossy()).map_err(|e| AdapterError(e.to_string()))?;
    let mut dtype = None;
    let mut modules = BTreeSet::new();
    let (mut ranks, mut alphas) = (BTreeSet::new(), Vec::new());
    let mut other = (0, Vec::new());
    let endings = layouts.endings();
    let mut suffixes = BTreeSet::new();
    let mut peft = false;
    // The tensors a rank is read from: any adapter's.
    let rank_from: BTreeSet<&str> = layouts
        .0
        .iter()
        .flat_map(|(_, l)| l.rank_from.iter().map(String::as_str))
        .collect();
    for info in w.infos() {
        let Some((module, suffix)) = split_key(&info.key, &endings) else {
            other.0 += 1;
            if other.1.len() < 3 {
                other.1.push(info.key.clone());
            }
            continue;
        };
        peft |= info.key.contains(".lora_A.");
        match suffix.as_str() {
            s if rank_from.contains(s) => {
                ranks.insert(info.shape.first().copied().unwrap_or(0) as usize);
                dtype.get_or_insert(info.dtype);
            }
            "alpha" => {
                let v = w
                    .get(&info.key, DType::F32)
                    .and_then(|t| t.to_vec())
                    .map_err(|e| AdapterError(format!("{shown}: {e}")))?;
                alphas.extend(v.first().copied());
            }
            _ => {}
        }
        suffixes.insert(suffix);
        modules.insert(module);
    }
    if modules.is_empty() {
        return Err(AdapterError(format!(
            "{shown}: no tensors of a loaded adapter plugin's (LoRA, DoRA, LoHa, ...) in the \
             file (e.g. {}): not an adapter file, or an adapter type no plugin has",
            other.1.join(", ")
        )));
    }
    alphas.sort_by(f32::total_cmp);
    alphas.dedup();
    let first = modules.iter().next().map(String::as_str).unwrap_or("");
    let layout = if first.starts_with("lycoris_") {
        "LyCORIS"
    } else if first.starts_with("lora_") {
        "kohya"
    } else if first.starts_with("diffusion_model.") || first.starts_with("text_encoders.") {
        "ComfyUI"
    } else if peft {
        "diffusers/PEFT"
    } else {
        "kohya suffixes on diffusers names"
    };
    let metadata: Vec<(String, String)> = w
        .metadata()
        .map_err(|e| AdapterError(format!("{shown}: {e}")))?
        .into_iter()
        .filter(|(k, _)| k.starts_with("ss_") || k.starts_with("modelspec."))
        .collect();
    let from_meta = metadata
        .iter()
        .find(|(k, _)| k == "modelspec.architecture" || k == "ss_base_model_version")
        .map(|(_, v)| v.clone());
    Ok(Description {
        layout,
        kind: kind_name(layouts, &suffixes),
        modules: modules.len(),
        ranks,
        alphas,
        family: from_meta.or(family_of_keys(&modules).map(String::from)),
        metadata,
        other_tensors: other,
        dtype: dtype.unwrap_or(DType::F32),
    })
}

/// The name the adapter whose markers the file has gives itself (with a tensor that renames
/// it: DoRA), or "unknown".
fn kind_name(layouts: &Layouts, suffixes: &BTreeSet<String>) -> String {
    let Some((id, l)) = layouts
        .0
        .iter()
        .find(|(_, l)| l.markers.iter().any(|m| suffixes.contains(m)))
    else {
        return "unknown".into();
    };
    l.name_when
        .iter()
        .find(|(t, _)| suffixes.contains(*t))
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| {
            if l.name.is_empty() {
                id.clone()
            } else {
                l.name.clone()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_keys() {
        let set = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            family_of_keys(&set(&["lora_unet_double_blocks_0_img_attn_qkv"])),
            Some("Flux")
        );
        assert_eq!(
            family_of_keys(&set(&[
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
            ])),
            Some("SDXL")
        );
        // ComfyUI's SD 1.x names are the original LDM ones too, with one transformer block.
        assert_eq!(
            family_of_keys(&set(&[
                "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
            ])),
            Some("SD 1.x/2.x")
        );
        assert_eq!(
            family_of_keys(&set(&["unet.down_blocks.0.attentions.0.proj_in"])),
            Some("SD 1.x/2.x")
        );
        assert_eq!(family_of_keys(&set(&["something"])), None);
    }
}
