//! The SDXL model: two CLIP text encoders, the UNet with added time/text embeddings, the VAE.

use std::path::Path;

use ferrite_blocks::{
    clip::{ClipTextConfig, ClipTextTransformer},
    folder::{self, read, read_json},
    tokenizer::ClipTokenizer,
    unet::{AddedCond, UNet2DConditionModel, UNetConfig},
    vae::{AutoencoderKL, VaeConfig},
};
use ferrite_plugin_api::{
    AdaptableLayer, Architecture, DType, Error, ModelInfo, Part, PartKind, Result, Tensor, bail,
    family::{Conditioning, Metadata, Objective},
    serde_json,
};

use crate::names::{UnetLayout, name_layers};

/// Refuses a folder of another family with a message saying what was found.
fn check_folder(dir: &Path) -> Result<serde_json::Value> {
    let index = folder::model_index(dir)?;
    let class = index["_class_name"].as_str().unwrap_or("");
    if class.contains("Flux") || index.get("transformer").is_some() {
        bail!(
            "{} is a Flux/DiT model ({class}); use the flux architecture",
            dir.display()
        );
    }
    if index.get("text_encoder_2").is_none() {
        bail!(
            "{} is not an SDXL model ({class}, one text encoder): use sd15 for SD 1.x and 2.x",
            dir.display()
        );
    }
    folder::require_parts(
        dir,
        &[
            "unet",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "scheduler",
        ],
        "SDXL",
    )?;
    Ok(index)
}

fn config<T>(dir: &Path, file: &str, parse: fn(&str, &str) -> Result<T>) -> Result<T> {
    let p = dir.join(file);
    parse(&read(&p)?, &p.to_string_lossy())
}

pub struct Sdxl {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextTransformer,
    text_encoder_2: ClipTextTransformer,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: serde_json::Value,
    force_zeros_for_empty_prompt: bool,
    /// Every UNet and text-encoder tensor, as `unet.<key>`, `text_encoder.text_model.<key>`
    /// and `text_encoder_2.<key>`.
    parameters: Vec<(String, Tensor)>,
    adaptable_layers: Vec<AdaptableLayer>,
    /// CLIP skip: text states from this many layers before the penultimate one.
    pub layer_skip: usize,
}

impl Sdxl {
    /// Loads a diffusers SDXL folder (fp32 or `.fp16` weights).
    pub fn load(dir: &Path, dtype: DType) -> Result<Self> {
        let index = check_folder(dir)?;
        let unet_config = config(dir, "unet/config.json", UNetConfig::from_json)?;
        if unet_config.addition_embed_type.as_deref() != Some("text_time") {
            bail!(
                "{}: the UNet has no text_time added embeddings: not an SDXL base UNet",
                dir.join("unet/config.json").display()
            );
        }
        let vae_config = config(dir, "vae/config.json", VaeConfig::from_json)?;
        let te_config = config(dir, "text_encoder/config.json", ClipTextConfig::from_json)?;
        let te2_config = config(dir, "text_encoder_2/config.json", ClipTextConfig::from_json)?;

        let te = ClipTextTransformer::with_text_model_level(folder::part_weights(
            dir,
            "text_encoder",
            "model",
        )?)?;
        let te2 = folder::part_weights(dir, "text_encoder_2", "model")?;
        let unet_w = folder::part_weights(dir, "unet", "diffusion_pytorch_model")?;
        let vae_w = folder::part_weights(dir, "vae", "diffusion_pytorch_model")?;
        // Scoped: what loads through these is the model's parameters and adaptable layers.
        let (te, te2, unet_w) = (
            te.scoped("text_encoder"),
            te2.scoped("text_encoder_2"),
            unet_w.scoped("unet"),
        );
        let text_encoder = ClipTextTransformer::load(&te, "text_model", None, &te_config, dtype)?;
        let te2_prefix = ClipTextTransformer::detect_prefix(&te2);
        let text_encoder_2 = ClipTextTransformer::load(
            &te2,
            te2_prefix,
            Some("text_projection"),
            &te2_config,
            dtype,
        )?;
        if text_encoder_2.text_projection.is_none() {
            bail!(
                "{}: text_encoder_2 has no text_projection (SDXL's pooled text embeddings)",
                dir.display()
            );
        }
        // diffusers' force_upcast: the VAE runs in f32 whatever the model's dtype.
        let vae_dtype = if vae_config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae = AutoencoderKL::load(&vae_w, "", &vae_config, vae_dtype)?;
        let unet = UNet2DConditionModel::load(&unet_w, "", &unet_config, dtype)?;
        let layout = UnetLayout {
            layers_per_block: unet_config.layers_per_block,
            cross_up: unet_config
                .up_block_types
                .iter()
                .map(|t| t.starts_with("CrossAttn"))
                .collect(),
        };
        // The text encoders' attention and MLP layers (not the projection), as sd-scripts and
        // peft adapt them.
        let mut adaptable_layers: Vec<AdaptableLayer> =
            [unet_w.layers(), te.layers(), te2.layers()]
                .concat()
                .into_iter()
                .filter(|l| l.name.starts_with("unet.") || l.name.contains(".encoder.layers."))
                .collect();
        name_layers(&mut adaptable_layers, &layout)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
            text_encoder,
            text_encoder_2,
            vae,
            unet,
            scheduler: read_json(&dir.join("scheduler/scheduler_config.json"))?,
            force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true),
            parameters: [unet_w.tensors(), te.tensors(), te2.tensors()].concat(),
            adaptable_layers,
            layer_skip: 0,
        })
    }

    /// One encoder's states for `prompts`: `hidden_states[-(skip + 2)]` (the penultimate layer
    /// without the final norm, or earlier with CLIP skip), and its output.
    fn encode_with(
        &self,
        tokenizer: &ClipTokenizer,
        encoder: &ClipTextTransformer,
        prompts: &[&str],
    ) -> Result<(Tensor, ferrite_blocks::clip::ClipTextOutput)> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(tokenizer.encode(p)?);
        }
        let out = encoder.forward(&ids, prompts.len(), 0)?;
        let n = out.hidden_states.len();
        let states = out
            .hidden_states
            .get(n.checked_sub(self.layer_skip + 2).unwrap_or(usize::MAX))
            .cloned()
            .ok_or_else(|| {
                Error(format!(
                    "clip skip {}: the text encoder has only {} layers",
                    self.layer_skip,
                    n - 1
                ))
            })?;
        Ok((states, out))
    }
}

impl Architecture for Sdxl {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.parameters.clone())
    }

    fn model_info(&self) -> Result<serde_json::Value> {
        let vae = &self.vae.config;
        let factor = vae.scale_factor();
        let downsamples = self.unet.config.block_out_channels.len() - 1;
        let part = |id: &str, name: &str, kind, file: &str| Part {
            id: id.into(),
            name: name.into(),
            config_table: id.into(),
            kind,
            trainable: true,
            default_learning_rate: None,
            diffusers_file: Some(file.into()),
        };
        Ok(ModelInfo {
            parts: vec![
                part(
                    "unet",
                    "UNet",
                    PartKind::Denoiser,
                    "unet/diffusion_pytorch_model.safetensors",
                ),
                part(
                    "text_encoder",
                    "Text encoder 1 (CLIP ViT-L)",
                    PartKind::TextEncoder,
                    "text_encoder/model.safetensors",
                ),
                part(
                    "text_encoder_2",
                    "Text encoder 2 (OpenCLIP ViT-bigG)",
                    PartKind::TextEncoder,
                    "text_encoder_2/model.safetensors",
                ),
            ],
            conditioning: Conditioning {
                text: vec!["states".into(), "pooled".into()],
                image_geometry: true,
                zeros_for_empty_negative: self.force_zeros_for_empty_prompt,
            },
            objective: Objective::Ddpm {
                scheduler: self.scheduler.clone(),
            },
            latent_channels: vae.latent_channels,
            vae_scale_factor: factor,
            scaling_factor: vae.scaling_factor,
            shift_factor: vae.shift_factor,
            // The UNet's downsamplings need `factor << downsamples`; OneTrainer buckets SDXL in
            // steps of 64 pixels (8 latents).
            resolution_step: (factor << downsamples).max(factor * 8),
            adaptable_layers: self.adaptable_layers.clone(),
            metadata: Metadata {
                base_model_version: "sdxl_base_v1-0".into(),
                modelspec_architecture: "stable-diffusion-xl-v1-base".into(),
            },
            single_file_layout: None,
        }
        .to_json())
    }

    /// `[states, pooled]`: both encoders' penultimate states side by side `[B, 77, 768 + 1280]`
    /// and the second's projected pooled output `[B, 1280]`, as diffusers' `encode_prompt`.
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let (s1, _) = self.encode_with(&self.tokenizer, &self.text_encoder, prompts)?;
        let (s2, out2) = self.encode_with(&self.tokenizer_2, &self.text_encoder_2, prompts)?;
        let pooled = out2
            .text_embeds
            .ok_or_else(|| Error::msg("text_encoder_2 has no projection"))?;
        Ok(vec![Tensor::cat(&[&s1, &s2], 2)?, pooled])
    }

    fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.vae.encode(image)?;
        Ok((d.mean, d.logvar))
    }

    fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(latents)
    }

    /// `text` is `[states, pooled, geometry]`: the text tensors, then `[B, 6]` original size,
    /// crop top-left and target size (the `time_ids`).
    fn denoise(&self, latents: &Tensor, timesteps: &Tensor, text: &[&Tensor]) -> Result<Tensor> {
        let [states, pooled, geometry] = text else {
            bail!(
                "sdxl denoise takes text states, pooled embeddings and image geometry, got {} \
                 tensors",
                text.len()
            )
        };
        let added = AddedCond {
            text_embeds: pooled,
            time_ids: geometry,
        };
        self.unet
            .forward_with(latents, timesteps, states, Some(&added))
    }
}
