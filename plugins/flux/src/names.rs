//! Flux's layer names in adapter files. kohya (sd-scripts) and ComfyUI name the transformer's
//! layers by Black Forest Labs' modules (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`),
//! which fuse several diffusers layers: `qkv` is `to_q`, `to_k`, `to_v` (or the text stream's
//! `add_*_proj`), `linear1` is `to_q`, `to_k`, `to_v` and `proj_mlp`, stacked by rows. kohya
//! prefixes `lora_unet_` with dots as underscores, ComfyUI `diffusion_model.`; OneTrainer's own
//! files use `lora_transformer_` with diffusers' names. Text encoders: kohya's `lora_te1_` (CLIP-L)
//! and `lora_te3_` (T5), ComfyUI's `text_encoders.clip_l|t5xxl.transformer.`.

use std::collections::HashMap;

use ferrite_blocks::{flux::bfl, keys};
use ferrite_plugin_api::{AdaptableLayer, Error, FusedRows, Result};

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
                // `norm_out.linear` (BFL's `final_layer.adaLN_modulation.1`) has its halves
                // swapped there: no key, so saving it in these layouts is refused.
                let Some(bfl::BflModule {
                    name: bfl,
                    fused: members,
                    swapped: false,
                }) = bfl::module(&m)
                else {
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
                let at = members
                    .iter()
                    .position(|x| *x == m)
                    .ok_or_else(|| Error(format!("flux: `{m}` is not among {bfl}'s layers")))?;
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
        let b = bfl::module("transformer_blocks.3.attn.add_k_proj").unwrap();
        assert_eq!(b.name, "double_blocks.3.txt_attn.qkv");
        assert_eq!(b.fused[1], "transformer_blocks.3.attn.add_k_proj");
        let b = bfl::module("single_transformer_blocks.0.proj_mlp").unwrap();
        assert_eq!(b.name, "single_blocks.0.linear1");
        assert_eq!(b.fused.len(), 4);
        assert_eq!(b.fused[3], "single_transformer_blocks.0.proj_mlp");
        assert_eq!(bfl::module("proj_out").unwrap().name, "final_layer.linear");
        assert!(bfl::module("norm_out.linear").unwrap().swapped);
    }
}
