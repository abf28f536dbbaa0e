//! Black Forest Labs' names for FluxTransformer2DModel's modules: the layout of `flux1-dev.safetensors`
//! (ComfyUI's checkpoints add `model.diffusion_model.`), of kohya's and ComfyUI's LoRA keys. BFL
//! fuses some diffusers layers by rows: `img_attn.qkv` is `to_q`, `to_k`, `to_v`, a single
//! block's `linear1` is `to_q`, `to_k`, `to_v` and `proj_mlp`; its final modulation holds
//! diffusers' `norm_out.linear` with the halves swapped (shift, scale). The mapping is checked
//! against diffusers' own converter (tests/fixtures/gen/flux_bfl.py).

use ferrite_plugin_api::{Error, Result, Tensor, WeightInfo, Weights, host::Source};

/// A diffusers module's place in BFL's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BflModule {
    pub name: String,
    /// The diffusers modules it fuses, in row order (empty: just this one).
    pub fused: Vec<String>,
    /// Its first dimension's halves swapped against diffusers'.
    pub swapped: bool,
}

/// BFL's module for a diffusers transformer module (`transformer_blocks.0.attn.to_q`, without
/// the part's prefix).
pub fn module(m: &str) -> Option<BflModule> {
    let one = |name: String| {
        Some(BflModule {
            name,
            fused: Vec::new(),
            swapped: false,
        })
    };
    let fused = |name: String, block: &str, members: &[&str]| {
        Some(BflModule {
            name,
            fused: members.iter().map(|x| format!("{block}.{x}")).collect(),
            swapped: false,
        })
    };
    let parts: Vec<&str> = m.splitn(3, '.').collect();
    match parts[..] {
        ["transformer_blocks", i, rest] => {
            let block = format!("transformer_blocks.{i}");
            let d = |x: &str| format!("double_blocks.{i}.{x}");
            match rest {
                "attn.to_q" | "attn.to_k" | "attn.to_v" => fused(
                    d("img_attn.qkv"),
                    &block,
                    &["attn.to_q", "attn.to_k", "attn.to_v"],
                ),
                "attn.add_q_proj" | "attn.add_k_proj" | "attn.add_v_proj" => fused(
                    d("txt_attn.qkv"),
                    &block,
                    &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                ),
                "attn.to_out.0" => one(d("img_attn.proj")),
                "attn.to_add_out" => one(d("txt_attn.proj")),
                "attn.norm_q" => one(d("img_attn.norm.query_norm")),
                "attn.norm_k" => one(d("img_attn.norm.key_norm")),
                "attn.norm_added_q" => one(d("txt_attn.norm.query_norm")),
                "attn.norm_added_k" => one(d("txt_attn.norm.key_norm")),
                "ff.net.0.proj" => one(d("img_mlp.0")),
                "ff.net.2" => one(d("img_mlp.2")),
                "ff_context.net.0.proj" => one(d("txt_mlp.0")),
                "ff_context.net.2" => one(d("txt_mlp.2")),
                "norm1.linear" => one(d("img_mod.lin")),
                "norm1_context.linear" => one(d("txt_mod.lin")),
                _ => None,
            }
        }
        ["single_transformer_blocks", i, rest] => {
            let block = format!("single_transformer_blocks.{i}");
            let s = |x: &str| format!("single_blocks.{i}.{x}");
            match rest {
                "attn.to_q" | "attn.to_k" | "attn.to_v" | "proj_mlp" => fused(
                    s("linear1"),
                    &block,
                    &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                ),
                "proj_out" => one(s("linear2")),
                "norm.linear" => one(s("modulation.lin")),
                "attn.norm_q" => one(s("norm.query_norm")),
                "attn.norm_k" => one(s("norm.key_norm")),
                _ => None,
            }
        }
        _ => match m {
            "x_embedder" => one("img_in".into()),
            "context_embedder" => one("txt_in".into()),
            "proj_out" => one("final_layer.linear".into()),
            "norm_out.linear" => Some(BflModule {
                name: "final_layer.adaLN_modulation.1".into(),
                fused: Vec::new(),
                swapped: true,
            }),
            "time_text_embed.timestep_embedder.linear_1" => one("time_in.in_layer".into()),
            "time_text_embed.timestep_embedder.linear_2" => one("time_in.out_layer".into()),
            "time_text_embed.guidance_embedder.linear_1" => one("guidance_in.in_layer".into()),
            "time_text_embed.guidance_embedder.linear_2" => one("guidance_in.out_layer".into()),
            "time_text_embed.text_embedder.linear_1" => one("vector_in.in_layer".into()),
            "time_text_embed.text_embedder.linear_2" => one("vector_in.out_layer".into()),
            _ => None,
        },
    }
}

/// The diffusers modules that hold parameters, for a transformer of `double` and `single` blocks.
fn modules(double: usize, single: usize) -> Vec<String> {
    const DOUBLE: [&str; 18] = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "attn.norm_q",
        "attn.norm_k",
        "attn.norm_added_q",
        "attn.norm_added_k",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "norm1.linear",
        "norm1_context.linear",
    ];
    const SINGLE: [&str; 8] = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "proj_mlp",
        "proj_out",
        "norm.linear",
        "attn.norm_q",
        "attn.norm_k",
    ];
    const TOP: [&str; 10] = [
        "x_embedder",
        "context_embedder",
        "proj_out",
        "norm_out.linear",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1",
        "time_text_embed.guidance_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
    ];
    let mut out: Vec<String> = TOP.iter().map(|m| m.to_string()).collect();
    for i in 0..double {
        out.extend(DOUBLE.iter().map(|m| format!("transformer_blocks.{i}.{m}")));
    }
    for i in 0..single {
        out.extend(
            SINGLE
                .iter()
                .map(|m| format!("single_transformer_blocks.{i}.{m}")),
        );
    }
    out
}

/// Where a BFL module's tensors go: each diffusers module with its first row and its rows (None:
/// all from there on), and whether the halves are swapped.
#[derive(Default)]
struct Targets {
    pieces: Vec<(String, u64, Option<u64>)>,
    swapped: bool,
}

/// Prefixes of whole-model checkpoints (ComfyUI's) in front of the transformer's keys.
const PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];
/// The first names of BFL's transformer modules: a key under one that maps to no diffusers
/// tensor is an error; other keys (a whole checkpoint's VAE or text encoders) are left out.
const ROOTS: [&str; 9] = [
    "double_blocks",
    "single_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    "distilled_guidance_layer",
];

fn count(w: &[(String, &WeightInfo)], root: &str) -> usize {
    w.iter()
        .filter_map(|(k, _)| {
            k.strip_prefix(root)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// A BFL transformer file (`flux1-dev.safetensors`, a ComfyUI checkpoint's
/// `model.diffusion_model.*`) seen under diffusers' names and shapes: fused layers split by
/// rows (q, k, v of the model's width; a single block's MLP input takes the rest), the final
/// modulation's halves swapped, norm `scale`s as `weight`s.
pub fn transformer(w: &Weights, double: usize, single: usize) -> Result<Weights> {
    let keys: Vec<(String, &WeightInfo)> = w
        .infos()
        .iter()
        .map(|i| {
            let k = PREFIXES
                .iter()
                .find_map(|p| i.key.strip_prefix(p))
                .unwrap_or(&i.key);
            (k.to_string(), i)
        })
        .collect();
    let width = keys
        .iter()
        .find(|(k, _)| k == "img_in.weight")
        .and_then(|(_, i)| i.shape.first().copied())
        .ok_or_else(|| {
            Error(format!(
                "{}: no `img_in.weight`: not a Flux transformer in Black Forest Labs' layout",
                w.path()
            ))
        })?;
    let blocks = (
        count(&keys, "double_blocks."),
        count(&keys, "single_blocks."),
    );
    if blocks != (double, single) {
        return Err(Error(format!(
            "{}: {} double and {} single blocks, but the config has {double} and {single}: a \
             transformer of another size than the folder's",
            w.path(),
            blocks.0,
            blocks.1
        )));
    }
    let mut pieces: std::collections::HashMap<String, Targets> = Default::default();
    for m in modules(double, single) {
        let Some(b) = module(&m) else { continue };
        let entry = pieces.entry(b.name.clone()).or_default();
        entry.swapped = b.swapped;
        if b.fused.is_empty() {
            entry.pieces = vec![(m, 0, None)];
        } else if entry.pieces.is_empty() {
            // Each member is `width` rows but a single block's MLP input, the last: the rest.
            entry.pieces = b
                .fused
                .iter()
                .enumerate()
                .map(|(j, x)| {
                    let rows = (!x.ends_with("proj_mlp")).then_some(width);
                    (x.clone(), j as u64 * width, rows)
                })
                .collect();
        }
    }
    let mut unknown = Vec::new();
    let path = w.path().to_string();
    let by_key: std::collections::HashMap<&str, &str> = keys
        .iter()
        .map(|(k, i)| (i.key.as_str(), k.as_str()))
        .collect();
    let view = w.view_pieces(|info| {
        let k = by_key.get(info.key.as_str()).copied().unwrap_or_default();
        let Some((module, suffix)) = k.rsplit_once('.') else {
            return Vec::new();
        };
        let known = ["weight", "bias", "scale"].contains(&suffix);
        let Some(Targets {
            pieces: targets,
            swapped,
        }) = pieces.get(module).filter(|_| known)
        else {
            if ROOTS.iter().any(|r| k.starts_with(r)) {
                unknown.push(k.to_string());
            }
            return Vec::new();
        };
        let suffix = if suffix == "scale" { "weight" } else { suffix };
        targets
            .iter()
            .map(|(target, start, rows)| {
                let total = info.shape.first().copied().unwrap_or(0);
                let len = rows.unwrap_or(total.saturating_sub(*start));
                let mut shape = info.shape.clone();
                let whole = targets.len() == 1;
                if !whole && let Some(d) = shape.first_mut() {
                    *d = len;
                }
                (
                    WeightInfo {
                        key: format!("{target}.{suffix}"),
                        dtype: info.dtype,
                        shape,
                    },
                    Source {
                        rows: (!whole).then_some(*start..start + len),
                        swap_halves: *swapped,
                        ..Source::default()
                    },
                )
            })
            .collect()
    })?;
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(3);
        return Err(Error(format!(
            "{path}: {n} tensor(s) of the Flux transformer have no diffusers name (e.g. {}): a \
             variant Ferrite does not know",
            unknown.join(", ")
        )));
    }
    Ok(view)
}

/// A transformer's tensors (diffusers names without the part's prefix) in BFL's layout, as
/// `flux1-dev.safetensors` holds them: fused layers joined by rows, the final modulation's
/// halves swapped, norm weights as `scale`s. The inverse of [`transformer`].
pub fn export(tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    // Each BFL tensor with its members' tensors in row order.
    let mut out: Vec<(String, bool, Vec<Option<Tensor>>)> = Vec::new();
    for (name, t) in tensors {
        let bad = || {
            Error(format!(
                "flux: `{name}` has no place in Black Forest Labs' layout"
            ))
        };
        let (m, suffix) = name.rsplit_once('.').ok_or_else(bad)?;
        let b = module(m).ok_or_else(bad)?;
        let norm = b.name.ends_with("_norm") && suffix == "weight";
        let key = format!("{}.{}", b.name, if norm { "scale" } else { suffix });
        let slot = b.fused.iter().position(|x| x == m).unwrap_or(0);
        let i = match out.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                out.push((key, b.swapped, vec![None; b.fused.len().max(1)]));
                out.len() - 1
            }
        };
        out[i].2[slot] = Some(t.clone());
    }
    out.into_iter()
        .map(|(key, swapped, members)| {
            let parts = members
                .iter()
                .map(|t| {
                    t.as_ref()
                        .ok_or_else(|| Error(format!("flux: `{key}` misses one of its layers")))
                })
                .collect::<Result<Vec<_>>>()?;
            let t = if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 0)?
            };
            let t = if swapped {
                let halves = t.chunk(2, 0)?;
                Tensor::cat(&[&halves[1], &halves[0]], 0)?
            } else {
                t
            };
            Ok((key, t))
        })
        .collect()
}
