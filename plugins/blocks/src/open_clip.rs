//! OpenCLIP text towers in original single-file checkpoints (SD 2.x's `cond_stage_model.model.*`,
//! SDXL's `conditioner.embedders.1.model.*`): their tensors seen under transformers' CLIP names
//! (the fused attention `in_proj` split into q, k, v; `text_projection` transposed into a linear
//! weight), the config read off the shapes, and the way back for export.

use crate::ldm::dim;
use ferrite_plugin_api::{
    Error, Result, Tensor, WeightInfo, Weights,
    host::Source,
    serde_json::{Value, json},
};

/// transformers' name of an OpenCLIP tensor (after the prefix) that maps one to one.
fn renamed(k: &str) -> Option<String> {
    let fixed = [
        (
            "token_embedding.weight",
            "embeddings.token_embedding.weight",
        ),
        (
            "positional_embedding",
            "embeddings.position_embedding.weight",
        ),
        ("ln_final.weight", "final_layer_norm.weight"),
        ("ln_final.bias", "final_layer_norm.bias"),
    ];
    if let Some((_, new)) = fixed.iter().find(|(old, _)| *old == k) {
        return Some(format!("text_model.{new}"));
    }
    let rest = k.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let new = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ]
    .iter()
    .find_map(|(old, new)| rest.strip_prefix(old).map(|t| format!("{new}{t}")))?;
    Some(format!("text_model.encoder.layers.{i}.{new}"))
}

/// The text tower under `prefix` seen as a transformers `CLIPTextModelWithProjection`.
pub fn text_model(w: &Weights, prefix: &str) -> Result<Weights> {
    w.view_pieces(|info| {
        let Some(k) = info.key.strip_prefix(prefix) else {
            return Vec::new();
        };
        let piece = |key: String, shape: Vec<u64>, rows, transpose| {
            let info = WeightInfo {
                key,
                dtype: info.dtype,
                shape,
            };
            let source = Source {
                rows,
                transpose,
                ..Source::default()
            };
            (info, source)
        };
        if k == "text_projection" && info.shape.len() == 2 {
            let shape = vec![info.shape[1], info.shape[0]];
            return vec![piece("text_projection.weight".into(), shape, None, true)];
        }
        // A fused tensor that does not split in three is left out: loading then names the q,
        // k or v tensor it lacks.
        if let Some(rest) = k.strip_prefix("transformer.resblocks.")
            && let Some((i, what)) = rest.split_once(".attn.in_proj_")
        {
            let Some(d) = info.shape.first().filter(|&&n| n % 3 == 0).map(|n| n / 3) else {
                return Vec::new();
            };
            let mut shape = info.shape.clone();
            shape[0] = d;
            return ["q", "k", "v"]
                .iter()
                .enumerate()
                .map(|(n, q)| {
                    let key = format!("text_model.encoder.layers.{i}.self_attn.{q}_proj.{what}");
                    let rows = Some(n as u64 * d..(n as u64 + 1) * d);
                    piece(key, shape.clone(), rows, false)
                })
                .collect();
        }
        renamed(k)
            .map(|key| vec![piece(key, info.shape.clone(), None, false)])
            .unwrap_or_default()
    })
}

/// The transformers config of a tower seen through [`text_model`]: 64 channels per head, GELU,
/// OpenAI's vocabulary and end token rule (eos id 2: the highest id ends the text).
pub fn config(w: &Weights) -> Result<Value> {
    let token = "text_model.embeddings.token_embedding.weight";
    let (vocab, hidden) = (dim(w, token, 0)?, dim(w, token, 1)?);
    let layers = (0..)
        .take_while(|i| {
            w.info(&format!("text_model.encoder.layers.{i}.mlp.fc1.weight"))
                .is_some()
        })
        .count();
    Ok(json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dim(w, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(w, "text_model.embeddings.position_embedding.weight", 0)?,
        "hidden_act": "gelu",
        "projection_dim": dim(w, "text_projection.weight", 0).ok(),
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }))
}

/// transformers-named tower tensors (`text_model.*`, `text_projection.weight`) under OpenCLIP's
/// names after `prefix`, q, k and v fused into `in_proj` again.
pub fn export(tensors: &[(String, Tensor)], prefix: &str) -> Result<Vec<(String, Tensor)>> {
    let get = |k: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t)
            .ok_or_else(|| Error(format!("text encoder tensor `{k}` missing")))
    };
    let mut out = Vec::new();
    for (name, t) in tensors {
        if name == "text_projection.weight" {
            out.push((format!("{prefix}text_projection"), t.transpose(0, 1)?));
            continue;
        }
        let Some(m) = name.strip_prefix("text_model.") else {
            return Err(Error(format!("unexpected text encoder tensor `{name}`")));
        };
        if let Some(rest) = m.strip_prefix("encoder.layers.")
            && let Some((i, what)) = rest.split_once(".self_attn.q_proj.")
        {
            let l = |q: &str| {
                get(&format!(
                    "text_model.encoder.layers.{i}.self_attn.{q}_proj.{what}"
                ))
            };
            let fused = Tensor::cat(&[l("q")?, l("k")?, l("v")?], 0)?;
            out.push((
                format!("{prefix}transformer.resblocks.{i}.attn.in_proj_{what}"),
                fused,
            ));
            continue;
        }
        if m.contains(".self_attn.k_proj.") || m.contains(".self_attn.v_proj.") {
            continue;
        }
        let original = back(m).ok_or_else(|| Error(format!("no OpenCLIP name for `{name}`")))?;
        out.push((format!("{prefix}{original}"), t.clone()));
    }
    Ok(out)
}

/// The inverse of [`renamed`] (without the `text_model.` level).
fn back(m: &str) -> Option<String> {
    let fixed = [
        (
            "embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        (
            "embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        ("final_layer_norm.weight", "ln_final.weight"),
        ("final_layer_norm.bias", "ln_final.bias"),
    ];
    if let Some((_, old)) = fixed.iter().find(|(new, _)| *new == m) {
        return Some(old.to_string());
    }
    let rest = m.strip_prefix("encoder.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let old = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("self_attn.out_proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    .iter()
    .find_map(|(new, old)| rest.strip_prefix(new).map(|t| format!("{old}{t}")))?;
    Some(format!("transformer.resblocks.{i}.{old}"))
}
