//! Flux's layer names in adapter files. kohya (sd-scripts) and ComfyUI name the transformer's
//! layers by Black Forest Labs' modules (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`),
//! which fuse several diffusers layers: `qkv` is `to_q`, `to_k`, `to_v` (or the text stream's
//! `add_*_proj`), `linear1` is `to_q`, `to_k`, `to_v` and `proj_mlp`, stacked by rows. kohya
//! prefixes `lora_unet_` with dots as underscores, ComfyUI `diffusion_model.`; OneTrainer's own
//! files use `lora_transformer_` with diffusers' names. Text encoders: kohya's `lora_te1_` (CLIP-L)
//! and `lora_te3_` (T5), ComfyUI's `text_encoders.clip_l|t5xxl.transformer.`.

use std::collections::HashMap;

use ferrite_blocks::keys;
use ferrite_plugin_api::{AdaptableLayer, Error, FusedRows, Result};

/// BFL's module for a transformer module (after `transformer.`), and the diffusers modules
/// fused with it in order (empty where the module is not fused).
fn bfl(module: &str) -> Option<(String, Vec<String>)> {
    let parts: Vec<&str> = module.splitn(3, '.').collect();
    let plain = |m: &str| Some((m.to_string(), Vec::new()));
    match parts[..] {
        ["transformer_blocks", i, rest] => {
            let block = format!("transformer_blocks.{i}");
            let fused = |bfl: &str, members: [&str; 3]| {
                Some((
                    format!("double_blocks.{i}.{bfl}"),
                    members
                        .iter()
                        .map(|m| format!("{block}.attn.{m}"))
                        .collect(),
                ))
            };
            let m = |bfl: &str| plain(&format!("double_blocks.{i}.{bfl}"));
            match rest {
                "attn.to_q" | "attn.to_k" | "attn.to_v" => {
                    fused("img_attn.qkv", ["to_q", "to_k", "to_v"])
                }
                "attn.add_q_proj" | "attn.add_k_proj" | "attn.add_v_proj" => {
                    fused("txt_attn.qkv", ["add_q_proj", "add_k_proj", "add_v_proj"])
                }
                "attn.to_out.0" => m("img_attn.proj"),
                "attn.to_add_out" => m("txt_attn.proj"),
                "ff.net.0.proj" => m("img_mlp.0"),
                "ff.net.2" => m("img_mlp.2"),
                "ff_context.net.0.proj" => m("txt_mlp.0"),
                "ff_context.net.2" => m("txt_mlp.2"),
                "norm1.linear" => m("img_mod.lin"),
                "norm1_context.linear" => m("txt_mod.lin"),
                _ => None,
            }
        }
        ["single_transformer_blocks", i, rest] => {
            let block = format!("single_transformer_blocks.{i}");
            match rest {
                "attn.to_q" | "attn.to_k" | "attn.to_v" | "proj_mlp" => Some((
                    format!("single_blocks.{i}.linear1"),
                    ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                        .iter()
                        .map(|m| format!("{block}.{m}"))
                        .collect(),
                )),
                "proj_out" => plain(&format!("single_blocks.{i}.linear2")),
                "norm.linear" => plain(&format!("single_blocks.{i}.modulation.lin")),
                _ => None,
            }
        }
        _ => match module {
            "x_embedder" => plain("img_in"),
            "context_embedder" => plain("txt_in"),
            "proj_out" => plain("final_layer.linear"),
            "time_text_embed.timestep_embedder.linear_1" => plain("time_in.in_layer"),
            "time_text_embed.timestep_embedder.linear_2" => plain("time_in.out_layer"),
            "time_text_embed.guidance_embedder.linear_1" => plain("guidance_in.in_layer"),
            "time_text_embed.guidance_embedder.linear_2" => plain("guidance_in.out_layer"),
            "time_text_embed.text_embedder.linear_1" => plain("vector_in.in_layer"),
            "time_text_embed.text_embedder.linear_2" => plain("vector_in.out_layer"),
            // `norm_out.linear` (BFL's `final_layer.adaLN_modulation.1`) has its two halves
            // swapped there: no key, so saving it in these layouts is refused.
            _ => None,
        },
    }
}

/// Sets the file keys of every layer: `transformer.*`, `text_encoder.*` (CLIP-L) and
/// `text_encoder_2.*` (T5).
pub fn name_layers(layers: &mut [AdaptableLayer]) -> Result<()> {
    let out: HashMap<String, usize> = layers
        .iter()
        .map(|l| (l.name.clone(), l.out_features()))
        .collect();
    for l in layers {
        let m = keys::module(l).to_string();
        let part = l.name.split_once('.').map_or("", |(p, _)| p).to_string();
        match part.as_str() {
            "transformer" => {
                let Some((bfl, members)) = bfl(&m) else {
                    continue;
                };
                keys::set(
                    l,
                    format!("lora_unet_{}", keys::flat(&bfl)),
                    format!("diffusion_model.{bfl}"),
                    vec![format!("lora_transformer_{}", keys::flat(&m))],
                );
                if members.is_empty() {
                    continue;
                }
                let rows = |m: &String| {
                    out.get(&format!("transformer.{m}"))
                        .copied()
                        .ok_or_else(|| Error(format!("flux: no layer `{m}` to fuse into {bfl}")))
                };
                let at = members.iter().position(|x| *x == m).unwrap_or(0);
                let start = members[..at].iter().map(rows).sum::<Result<usize>>()?;
                l.fused = Some(FusedRows {
                    start,
                    rows: members.iter().map(rows).sum::<Result<usize>>()?,
                });
            }
            "text_encoder" => keys::set(
                l,
                format!("lora_te1_{}", keys::flat(&m)),
                format!("text_encoders.clip_l.transformer.{m}"),
                vec![keys::without_text_model(l)],
            ),
            "text_encoder_2" => keys::set(
                l,
                format!("lora_te3_{}", keys::flat(&m)),
                format!("text_encoders.t5xxl.transformer.{m}"),
                Vec::new(),
            ),
            _ => return Err(Error(format!("flux: unexpected layer `{}`", l.name))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_modules_list_their_members_in_bfl_order() {
        let (m, members) = bfl("transformer_blocks.3.attn.add_k_proj").unwrap();
        assert_eq!(m, "double_blocks.3.txt_attn.qkv");
        assert_eq!(members[1], "transformer_blocks.3.attn.add_k_proj");
        let (m, members) = bfl("single_transformer_blocks.0.proj_mlp").unwrap();
        assert_eq!(m, "single_blocks.0.linear1");
        assert_eq!(members.len(), 4);
        assert_eq!(members[3], "single_transformer_blocks.0.proj_mlp");
        assert_eq!(bfl("proj_out").unwrap().0, "final_layer.linear");
        assert!(bfl("norm_out.linear").is_none());
    }
}
