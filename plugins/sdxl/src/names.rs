//! SDXL's layer names in adapter files. kohya (sd-scripts, OneTrainer) names UNet layers by the
//! original checkpoint's blocks (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
//! and the text encoders by transformers' modules under `lora_te1_` / `lora_te2_`; ComfyUI uses
//! `diffusion_model.<original>` and `text_encoders.clip_l|clip_g.transformer.<module>`.

use ferrite_blocks::{keys, ldm, ldm::UnetLayout};
use ferrite_plugin_api::{AdaptableLayer, Error, Result};

/// Sets the file keys of every layer: `unet.*`, `text_encoder.*` (CLIP-L) and
/// `text_encoder_2.*` (OpenCLIP bigG).
pub fn name_layers(layers: &mut [AdaptableLayer], unet: &UnetLayout) -> Result<()> {
    for l in layers {
        let m = keys::module(l).to_string();
        let part = l.name.split_once('.').map_or("", |(p, _)| p).to_string();
        match part.as_str() {
            "unet" => {
                let o = unet.original(&m)?;
                keys::set(
                    l,
                    unet.kohya(&m)?,
                    format!("diffusion_model.{o}"),
                    // kohya files with diffusers names, LyCORIS's prefix, PEFT's bare names.
                    vec![
                        format!("lora_unet_{}", keys::flat(&m)),
                        format!("lycoris_{}", keys::flat(&o)),
                        m.clone(),
                    ],
                );
                l.original = Some(format!("{}{o}", ldm::UNET_PREFIX));
            }
            // No bare module names: both encoders have the same ones.
            "text_encoder" => {
                let aliases = vec![keys::without_text_model(l)];
                keys::set(
                    l,
                    format!("lora_te1_{}", keys::flat(&m)),
                    format!("text_encoders.clip_l.transformer.{m}"),
                    aliases,
                )
            }
            "text_encoder_2" => {
                let aliases = vec![keys::without_text_model(l)];
                keys::set(
                    l,
                    format!("lora_te2_{}", keys::flat(&m)),
                    format!("text_encoders.clip_g.transformer.{m}"),
                    aliases,
                )
            }
            _ => return Err(Error(format!("unexpected layer `{}`", l.name))),
        }
    }
    Ok(())
}
