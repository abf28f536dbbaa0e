//! Adapter-file key names of a layer in the layouts other tools use
//! ([`ferrite_plugin_api::family::layouts`]).

use ferrite_plugin_api::{AdaptableLayer, family::layouts};

/// `down_blocks.0.attentions.0` → `down_blocks_0_attentions_0`.
pub fn flat(module: &str) -> String {
    module.replace('.', "_")
}

/// The module's name after its part (`unet.down_blocks.0...` → `down_blocks.0...`).
pub fn module(layer: &AdaptableLayer) -> &str {
    layer.name.split_once('.').map_or(&layer.name, |(_, m)| m)
}

/// Sets a layer's kohya and comfy keys and the other names readers accept for it.
pub fn set(layer: &mut AdaptableLayer, kohya: String, comfy: String, aliases: Vec<String>) {
    layer.keys.insert(layouts::KOHYA.into(), kohya);
    layer.keys.insert(layouts::COMFY.into(), comfy);
    layer.aliases = aliases;
}

/// A transformers text-encoder layer's name without the `text_model.` level, as diffusers saves
/// LoRAs of transformers 5 `CLIPTextModel`s (`text_encoder.encoder.layers.0...`).
pub fn without_text_model(layer: &AdaptableLayer) -> String {
    layer.name.replacen(".text_model.", ".", 1)
}
