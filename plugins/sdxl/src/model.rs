//! The SDXL model: two CLIP text encoders, the UNet with added time/text embeddings, the VAE.

use std::path::Path;

use ferrite_blocks::{
    clip::{ClipTextConfig, ClipTextTransformer},
    folder::{self, config, read_json},
    ldm::{self, FileFamily, UnetLayout},
    open_clip,
    text_embeddings::{self, EmbeddingOption, Embeddings, Encoder},
    tokenizer::ClipTokenizer,
    unet::{AddedCond, UNet2DConditionModel, UNetConfig},
    vae::{AutoencoderKL, VaeConfig},
};
use ferrite_plugin_api::{
    AdaptableLayer, Architecture, DType, Error, ModelInfo, PartKind, Result, Tensor, Weights, bail,
    family::{Conditioning, Metadata, Objective},
    serde_json::{self, json},
};

use crate::names::name_layers;

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

/// Where a single-file checkpoint keeps SDXL's text encoders.
const TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
const TE2_PREFIX: &str = "conditioner.embedders.1.model.";

/// Refuses a single file of another family with a message saying what was found.
fn check_file(w: &Weights) -> Result<()> {
    let any = |prefix: &str| w.infos().iter().any(|i| i.key.starts_with(prefix));
    let family = FileFamily::of(w);
    let found = match family {
        FileFamily::Sdxl
            if any(TE1_PREFIX)
                && any(TE2_PREFIX)
                && any(ldm::UNET_PREFIX)
                && any(ldm::VAE_PREFIX) =>
        {
            return Ok(());
        }
        FileFamily::Sdxl | FileFamily::Unknown => {
            "not a full SDXL checkpoint: it needs model.diffusion_model.*, first_stage_model.*, \
             conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.* tensors"
        }
        other => other.refusal(),
    };
    bail!("{} is {found}", w.path())
}

/// The configs of a model's parts.
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text_encoder: ClipTextConfig,
    text_encoder_2: ClipTextConfig,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    scheduler: serde_json::Value,
    force_zeros_for_empty_prompt: bool,
}

impl Configs {
    fn from_folder(dir: &Path) -> Result<Self> {
        let index = check_folder(dir)?;
        Ok(Self {
            unet: config(dir, "unet/config.json", UNetConfig::from_json)?,
            vae: config(dir, "vae/config.json", VaeConfig::from_json)?,
            text_encoder: config(dir, "text_encoder/config.json", ClipTextConfig::from_json)?,
            text_encoder_2: config(dir, "text_encoder_2/config.json", ClipTextConfig::from_json)?,
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
            scheduler: read_json(&dir.join("scheduler/scheduler_config.json"))?,
            force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true),
        })
    }

    /// A single file's configs: read off its shapes, the rest as SDXL base 1.0's published
    /// configs have it (VAE scaling 0.13025, force_upcast, 64 channels per head, OpenAI CLIP's
    /// tokenizer for both encoders, the second padding with `!`, its Euler schedule).
    fn from_checkpoint(w: &Weights, te: &Weights, te2: &Weights) -> Result<Self> {
        let source = w.path();
        let te2_config = ClipTextConfig::from_json(&open_clip::config(te2)?.to_string(), source)?;
        let pooled = te2_config.projection_dim.unwrap_or(te2_config.hidden_size);
        let unet = ldm::sdxl_unet_config(w, pooled)?;
        let mut vae = ldm::vae_config(w)?;
        vae["scaling_factor"] = 0.13025.into();
        vae["force_upcast"] = true.into();
        Ok(Self {
            unet: UNetConfig::from_json(&unet.to_string(), source)?,
            vae: VaeConfig::from_json(&vae.to_string(), source)?,
            text_encoder: ClipTextConfig::from_json(&ldm::clip_config(te)?.to_string(), source)?,
            text_encoder_2: te2_config,
            tokenizer: ClipTokenizer::openai_clip()?,
            tokenizer_2: ClipTokenizer::openai_clip_padded("!")?,
            scheduler: json!({
                "_class_name": "EulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon",
                "steps_offset": 1,
                "set_alpha_to_one": false,
                "clip_sample": false,
                "timestep_spacing": "leading",
                "interpolation_type": "linear",
                "use_karras_sigmas": false,
            }),
            force_zeros_for_empty_prompt: true,
        })
    }
}

/// The weights of each part under diffusers / transformers names.
struct PartWeights {
    unet: Weights,
    vae: Weights,
    text_encoder: Weights,
    text_encoder_2: Weights,
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
    layout: UnetLayout,
    /// The VAE's tensors under diffusers names, for [`Architecture::export`].
    vae_weights: Weights,
    /// CLIP skip: text states from this many layers before the penultimate one.
    pub layer_skip: usize,
    /// Textual-inversion embeddings (their vectors are parameters too).
    pub embeddings: Embeddings,
}

impl Sdxl {
    /// Loads a diffusers SDXL folder (fp32 or `.fp16` weights; with `random` weights, its
    /// config files only), or a single-file checkpoint (`sd_xl_base_1.0.safetensors` layout)
    /// with the configs of the `config` folder (SDXL base's without one).
    pub fn load(model: &Path, config: Option<&Path>, random: bool) -> Result<Self> {
        // Weights load as f32: the host computes in the run's train_dtype and keeps frozen
        // parts in their weight_dtype.
        let dtype = DType::F32;
        if model.is_dir() {
            let configs = Configs::from_folder(model)?;
            let part = |p: &str, stem: &str| folder::part_weights(model, p, stem, random);
            let weights = PartWeights {
                unet: part("unet", "diffusion_pytorch_model")?,
                vae: part("vae", "diffusion_pytorch_model")?,
                text_encoder: ClipTextTransformer::with_text_model_level(part(
                    "text_encoder",
                    "model",
                )?)?,
                text_encoder_2: part("text_encoder_2", "model")?,
            };
            return Self::build(configs, weights, dtype);
        }
        if !model.is_file() {
            bail!(
                "{} does not exist (give a diffusers SDXL folder or a .safetensors checkpoint)",
                model.display()
            );
        }
        if random {
            bail!(
                "random weights are built from a diffusers folder's configs; {} is a file",
                model.display()
            );
        }
        let w = folder::open(model)?;
        check_file(&w)?;
        let te = ldm::clip_at(&w, TE1_PREFIX)?;
        let te2 = open_clip::text_model(&w, TE2_PREFIX)?;
        let configs = match config {
            Some(dir) => Configs::from_folder(dir)?,
            None => Configs::from_checkpoint(&w, &te, &te2).map_err(|e| {
                Error(format!(
                    "{e} (read as SDXL base; for other settings give a diffusers folder as \
                     `config`, --model-config on the command line)"
                ))
            })?,
        };
        let weights = PartWeights {
            unet: ldm::unet(&w, configs.unet.layers_per_block)?,
            vae: ldm::vae(&w, configs.vae.block_out_channels.len())?,
            text_encoder: te,
            text_encoder_2: te2,
        };
        Self::build(configs, weights, dtype)
    }

    fn build(c: Configs, w: PartWeights, dtype: DType) -> Result<Self> {
        if c.unet.addition_embed_type.as_deref() != Some("text_time") {
            bail!("the UNet has no text_time added embeddings: not an SDXL base UNet");
        }
        // Scoped: what loads through these is the model's parameters and adaptable layers.
        let te = w.text_encoder.scoped("text_encoder");
        let te2 = w.text_encoder_2.scoped("text_encoder_2");
        let unet_w = w.unet.scoped("unet");
        let text_encoder =
            ClipTextTransformer::load(&te, "text_model", None, &c.text_encoder, dtype)?;
        let text_encoder_2 = ClipTextTransformer::load(
            &te2,
            ClipTextTransformer::detect_prefix(&te2),
            Some("text_projection"),
            &c.text_encoder_2,
            dtype,
        )?;
        if text_encoder_2.text_projection.is_none() {
            bail!("text_encoder_2 has no text_projection (SDXL's pooled text embeddings)");
        }
        // The VAE computes in f32 (what diffusers' force_upcast asks): the trainer applies the
        // train dtype to the denoiser and trained text encoders only.
        let vae = AutoencoderKL::load(&w.vae, "", &c.vae, dtype)?;
        let unet = UNet2DConditionModel::load(&unet_w, "", &c.unet, dtype)?;
        let layout = UnetLayout::of(&c.unet);
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
            tokenizer: c.tokenizer,
            tokenizer_2: c.tokenizer_2,
            text_encoder,
            text_encoder_2,
            vae,
            unet,
            scheduler: c.scheduler,
            force_zeros_for_empty_prompt: c.force_zeros_for_empty_prompt,
            parameters: [unet_w.tensors(), te.tensors(), te2.tensors()].concat(),
            adaptable_layers,
            layout,
            vae_weights: w.vae,
            layer_skip: 0,
            embeddings: Embeddings::default(),
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
            ids.extend(tokenizer.encode_added(p, &encoder.added)?);
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

impl Sdxl {
    /// Gives `options`' embeddings to both text encoders (CLIP-L `clip_l`, OpenCLIP-G
    /// `clip_g`).
    pub fn attach_embeddings(&mut self, options: &[EmbeddingOption]) -> Result<()> {
        self.embeddings = text_embeddings::attach(
            options,
            &mut [
                Encoder {
                    part: "text_encoder",
                    key: "clip_l",
                    tokenizer: &self.tokenizer,
                    model: &mut self.text_encoder,
                },
                Encoder {
                    part: "text_encoder_2",
                    key: "clip_g",
                    tokenizer: &self.tokenizer_2,
                    model: &mut self.text_encoder_2,
                },
            ],
        )?;
        Ok(())
    }
}

impl Architecture for Sdxl {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.embeddings.after(&self.parameters))
    }

    fn model_info(&self) -> Result<serde_json::Value> {
        let vae = &self.vae.config;
        let factor = vae.scale_factor();
        let downsamples = self.unet.config.block_out_channels.len() - 1;
        let part = ferrite_blocks::part;
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
                )
                .with_embedding_key("clip_l"),
                part(
                    "text_encoder_2",
                    "Text encoder 2 (OpenCLIP ViT-bigG)",
                    PartKind::TextEncoder,
                    "text_encoder_2/model.safetensors",
                )
                .with_embedding_key("clip_g"),
            ],
            conditioning: Conditioning {
                text: vec!["states".into(), "pooled".into()],
                image_geometry: true,
                zeros_for_empty_negative: self.force_zeros_for_empty_prompt,
                guidance: false,
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
            layer_presets: Default::default(),
            metadata: Metadata {
                base_model_version: "sdxl_base_v1-0".into(),
                modelspec_architecture: "stable-diffusion-xl-v1-base".into(),
                extra: Default::default(),
            },
            single_file_layout: Some("ldm".into()),
            single_file_parts: Vec::new(),
            embeddings: self.embeddings.info.clone(),
        }
        .to_json())
    }

    /// `ldm`: the layout of SDXL's original single-file checkpoints (`sd_xl_base_1.0`), what
    /// A1111/Forge and ComfyUI load: the UNet and text encoders as they are now, the VAE as
    /// loaded.
    fn export(&self, layout: &str) -> Result<Vec<(String, Tensor)>> {
        if layout == "diffusers" {
            // The parameters are named so already.
            let mut out = self.parameters.clone();
            out.extend(ldm::vae_diffusers(&self.vae_weights)?);
            return Ok(out);
        }
        if layout != "ldm" {
            bail!("sdxl writes the `ldm` and `diffusers` layouts only, not `{layout}`");
        }
        let mut out = Vec::new();
        let mut te2 = Vec::new();
        for (name, t) in &self.parameters {
            if let Some(k) = name.strip_prefix("unet.") {
                out.push((self.layout.export_key(k)?, t.clone()));
            } else if let Some(k) = name.strip_prefix("text_encoder.") {
                out.push((format!("{TE1_PREFIX}{k}"), t.clone()));
            } else if let Some(k) = name.strip_prefix("text_encoder_2.") {
                te2.push((k.to_string(), t.clone()));
            } else {
                bail!("unexpected parameter `{name}`");
            }
        }
        out.extend(open_clip::export(&te2, TE2_PREFIX)?);
        let levels = self.vae.config.block_out_channels.len();
        out.extend(ldm::vae_export(&self.vae_weights, levels)?);
        Ok(out)
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
