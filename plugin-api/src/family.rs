//! The family contract: what an architecture plugin tells the host about its model, as the JSON
//! that [`Architecture::model_info`](crate::Architecture::model_info) returns. The host trains,
//! caches, samples, validates and saves any family through it alone.
//!
//! A model from a plugin built before the contract (ABI 1.0) still reads: its top-level
//! `scheduler` is a DDPM objective, each layer-name prefix is a part of its own, and it names no
//! adapter-file keys (only the diffusers/PEFT layout can then be written).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::nn::AdaptableLayer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model's parts; every parameter is named `<part id>.<...>`.
    #[serde(default)]
    pub parts: Vec<Part>,
    #[serde(default)]
    pub conditioning: Conditioning,
    pub objective: Objective,
    /// Channels of the latents the denoiser works on (3 for a pixel-space model).
    pub latent_channels: usize,
    /// Pixels per latent along each side.
    pub vae_scale_factor: usize,
    /// Latents are `(vae mean - shift) * scaling` for the denoiser.
    pub scaling_factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_factor: Option<f64>,
    /// Image sides must divide by this (the bucket step).
    pub resolution_step: usize,
    /// The layers adapters can attach to, with their key names in each adapter file layout.
    #[serde(default)]
    pub adaptable_layers: Vec<AdaptableLayer>,
    /// OneTrainer's layer presets for this family's denoiser (`attn-only`, `attn-mlp`): the
    /// module-name substrings each adapts. Absent: the Stable Diffusion UNet's (`attn`;
    /// `attentions`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layer_presets: BTreeMap<String, Vec<String>>,
    /// What saved files say about the model.
    #[serde(default)]
    pub metadata: Metadata,
    /// The single-file layout [`Architecture::export`](crate::Architecture::export) writes, if
    /// any (`ldm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub single_file_layout: Option<String>,
    /// The parts (ids) that layout holds; empty: every part.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub single_file_parts: Vec<String>,
    /// The textual-inversion embeddings the model was given (its `embeddings` option), in order;
    /// their vectors are its parameters `embeddings.<index>.<part id>` (ABI 1.6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<EmbeddingInfo>,
}

/// An embedding as the model took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingInfo {
    pub placeholder: String,
    /// How many tokens of the vocabulary the placeholder is as plain text (1: it is a word the
    /// model knows, which the embedding now replaces).
    pub plain_tokens: usize,
}

/// One part of a model: a denoiser, a text encoder, a VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// The prefix of its parameters' names (`unet`, `text_encoder_2`).
    pub id: String,
    /// For people (`UNet`, `Text encoder 2 (OpenCLIP ViT-bigG)`).
    pub name: String,
    /// OneTrainer's config table for it (`unet`, `text_encoder`, `text_encoder_2`,
    /// `transformer`).
    pub config_table: String,
    pub kind: PartKind,
    /// Whether it can be trained at all.
    #[serde(default = "yes")]
    pub trainable: bool,
    /// Its learning rate when the config gives none for it (else the global one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_learning_rate: Option<f64>,
    /// A text encoder's key in textual-inversion embedding files (A1111's and ComfyUI's:
    /// `emb_params` for a model's only one, `clip_l`, `clip_g`), when it takes embeddings (ABI
    /// 1.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_key: Option<String>,
    /// The file of a diffusers folder its tensors are saved in (`unet/diffusion_pytorch_model.
    /// safetensors`), its parameters' names without the `<id>.` prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusers_file: Option<String>,
}

impl Part {
    /// This text encoder takes embeddings, under `key` in embedding files.
    pub fn with_embedding_key(mut self, key: &str) -> Self {
        self.embedding_key = Some(key.into());
        self
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    Denoiser,
    /// A transformers model in diffusers' pipelines (adapter files name its DoRA magnitude
    /// `.weight`, as peft does on transformers modules).
    TextEncoder,
    Vae,
    Other,
}

/// What the denoiser is conditioned on, besides the noisy latents and the timestep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conditioning {
    /// The names of the tensors `encode_text` returns, in order (`states`, `pooled`); each has
    /// the batch first. The text cache stores each under its name.
    #[serde(default = "states")]
    pub text: Vec<String>,
    /// The denoiser takes each image's geometry after the text tensors: `[B, 6]` of original
    /// height and width, crop top and left (in the scaled image) and target height and width
    /// (SDXL's micro-conditioning).
    #[serde(default)]
    pub image_geometry: bool,
    /// An empty negative prompt is all-zero text tensors rather than the encoded empty string
    /// (diffusers' `force_zeros_for_empty_prompt`).
    #[serde(default)]
    pub zeros_for_empty_negative: bool,
    /// The denoiser takes a guidance value `[B]` after the text tensors (Flux.1-dev's distilled
    /// guidance): the sampler's `cfg`, in place of classifier-free guidance.
    #[serde(default)]
    pub guidance: bool,
}

fn states() -> Vec<String> {
    vec!["states".into()]
}

impl Default for Conditioning {
    fn default() -> Self {
        Self {
            text: states(),
            image_geometry: false,
            zeros_for_empty_negative: false,
            guidance: false,
        }
    }
}

/// How a clean latent is noised and what the denoiser predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Objective {
    /// Discrete DDPM noising `sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε` from a diffusers scheduler config
    /// (betas, `num_train_timesteps`, `prediction_type` epsilon or v_prediction); SNR loss
    /// weights; the DDPM sampler family.
    Ddpm { scheduler: serde_json::Value },
    /// Rectified flow (Flux): `x_σ = (1 − σ) x + σ ε`, the denoiser predicts `ε − x` and is
    /// given `σ · num_train_timesteps`; sampled by Euler steps over the sigmas of diffusers'
    /// `FlowMatchEulerDiscreteScheduler` config (a fixed `shift`, or with
    /// `use_dynamic_shifting` one from the image's token count, `(H / resolution_step) ·
    /// (W / resolution_step)`, as diffusers' `calculate_shift`).
    FlowMatch { scheduler: serde_json::Value },
}

/// What saved files (adapters and models) say about their base model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// kohya's `ss_base_model_version` (`sd_v1`, `sdxl_base_v1-0`).
    #[serde(default)]
    pub base_model_version: String,
    /// `modelspec.architecture` without the `/lora` suffix (`stable-diffusion-v1`,
    /// `stable-diffusion-xl-v1-base`).
    #[serde(default)]
    pub modelspec_architecture: String,
    /// More metadata for adapter files (`ss_v2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// Adapter file layouts a layer can have a key in (besides diffusers/PEFT, which is its name).
pub mod layouts {
    /// kohya's (sd-scripts, A1111, Forge): `lora_unet_...`, `lora_te1_...`.
    pub const KOHYA: &str = "kohya";
    /// ComfyUI's own: `diffusion_model.<original>`, `text_encoders.clip_l.transformer.<...>`.
    pub const COMFY: &str = "comfy";
}

impl ModelInfo {
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut()
            && !o.contains_key("objective")
            && let Some(scheduler) = o.get("scheduler").cloned()
        {
            o.insert(
                "objective".into(),
                serde_json::json!({"type": "ddpm", "scheduler": scheduler}),
            );
        }
        let mut info: Self =
            serde_path_to_error::deserialize(v).map_err(|e| format!("the model's info: {e}"))?;
        if info.parts.is_empty() {
            info.parts = implied_parts(&info.adaptable_layers);
        }
        Ok(info)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn part(&self, id: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.id == id)
    }

    /// The part a parameter or layer name belongs to.
    pub fn part_of(&self, name: &str) -> Option<&Part> {
        let id = name.split_once('.').map_or(name, |(p, _)| p);
        self.part(id)
    }
}

/// Parts for a model that declared none: one per layer-name prefix, configured by the table of
/// the same name.
fn implied_parts(layers: &[AdaptableLayer]) -> Vec<Part> {
    let ids: std::collections::BTreeSet<&str> = layers
        .iter()
        .filter_map(|l| l.name.split_once('.').map(|(p, _)| p))
        .collect();
    ids.into_iter()
        .map(|id| Part {
            id: id.into(),
            name: id.into(),
            config_table: id.into(),
            kind: PartKind::Other,
            trainable: true,
            default_learning_rate: None,
            embedding_key: None,
            diffusers_file: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the sd15 plugin of ABI 1.0 returned.
    #[test]
    fn a_model_from_before_the_contract_reads() {
        let v = serde_json::json!({
            "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215,
            "shift_factor": null, "resolution_step": 64,
            "scheduler": {"prediction_type": "epsilon"},
            "adaptable_layers": [
                {"name": "unet.conv_in", "shape": [4, 4, 3, 3]},
                {"name": "text_encoder.text_model.encoder.layers.0.mlp.fc1", "shape": [4, 4]},
            ],
        });
        let info = ModelInfo::from_json(&v).unwrap();
        let Objective::Ddpm { scheduler } = &info.objective else {
            panic!("a pre-contract model is DDPM: {:?}", info.objective)
        };
        assert_eq!(scheduler["prediction_type"], "epsilon");
        let ids: Vec<&str> = info.parts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["text_encoder", "unet"]);
        assert_eq!(info.conditioning.text, ["states"]);
        assert!(ModelInfo::from_json(&serde_json::json!({"latent_channels": 4})).is_err());
    }
}
