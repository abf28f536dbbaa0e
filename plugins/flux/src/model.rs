//! The Flux model: its parts loaded from a diffusers folder, and the architecture contract.

use std::path::Path;

use ferrite_blocks::{
    clip::{ClipTextConfig, ClipTextTransformer},
    flux::{FluxConfig, FluxTransformer2DModel, bfl},
    folder::{self, config, read_json},
    ldm, part,
    t5::{T5Config, T5EncoderModel},
    t5_tokenizer::T5Tokenizer,
    text_embeddings::{self, EmbeddingOption, Embeddings, Encoder},
    tokenizer::ClipTokenizer,
    vae::{AutoencoderKL, VaeConfig},
};
use ferrite_plugin_api::{
    AdaptableLayer, Architecture, DType, Error, ModelInfo, PartKind, Result, Tensor, Weights, bail,
    family::{Conditioning, Metadata, Objective},
    serde_json,
};

use serde::{Deserialize, Serialize};

use crate::packing::{image_ids, pack, unpack};

pub struct Flux {
    clip_tokenizer: ClipTokenizer,
    clip: ClipTextTransformer,
    t5_tokenizer: T5Tokenizer,
    t5: T5EncoderModel,
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    /// The VAE's weights as loaded (diffusers' keys), for the `diffusers` export.
    vae_weights: Weights,
    scheduler: serde_json::Value,
    /// Every transformer and text-encoder tensor, under its part's prefix.
    parameters: Vec<(String, Tensor)>,
    adaptable_layers: Vec<AdaptableLayer>,
    /// Textual-inversion embeddings, on CLIP-L (their vectors are parameters too).
    embeddings: Embeddings,
}

/// Files holding parts' weights in place of a folder's (by part id), as ComfyUI users keep
/// them: the transformer (`flux1-dev.safetensors`), CLIP-L (`clip_l`), T5 (`t5xxl`) and the VAE
/// (`ae`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartFiles {
    pub transformer: Option<String>,
    pub text_encoder: Option<String>,
    pub text_encoder_2: Option<String>,
    pub vae: Option<String>,
}

/// A part's weights file in diffusers' layout or its original one (`original` renames that,
/// told by the file's keys); `diffusers_key` is a key only diffusers' layout has.
fn part_file(
    file: &str,
    diffusers_key: &str,
    original: impl FnOnce(&Weights) -> Result<Weights>,
) -> Result<Weights> {
    let w = Weights::open(file)?;
    if w.info(diffusers_key).is_some() {
        Ok(w)
    } else {
        original(&w)
    }
}

impl Flux {
    /// Loads a diffusers folder (with `random` weights: its config files only), each part's
    /// weights from its file in `files` where given (the folder then needs only that part's
    /// config); prompts take `max_sequence_length` T5 tokens (None: diffusers' defaults, 512
    /// for dev and 256 for schnell, which has no guidance embedding).
    pub fn load(
        dir: &Path,
        files: &PartFiles,
        max_sequence_length: Option<usize>,
        random: bool,
    ) -> Result<Self> {
        let index = folder::model_index(dir)?;
        let class = index["_class_name"].as_str().unwrap_or("");
        if !class.contains("Flux") {
            bail!(
                "{} is not a Flux model ({class}); use the architecture of its family",
                dir.display()
            );
        }
        let parts = [
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "scheduler",
        ];
        folder::require_parts(dir, &parts, "Flux")?;
        // Configs, their agreement and the tokenizers first: a bad folder fails before any
        // weight loads.
        let clip_config = config(dir, "text_encoder/config.json", ClipTextConfig::from_json)?;
        let t5_config = config(dir, "text_encoder_2/config.json", T5Config::from_json)?;
        let flux_config = config(dir, "transformer/config.json", FluxConfig::from_json)?;
        let vae_config = config(dir, "vae/config.json", VaeConfig::from_json)?;
        let mismatch = |what: String| Error(format!("{}: {what}", dir.display()));
        if flux_config.pooled_projection_dim != clip_config.hidden_size {
            return Err(mismatch(format!(
                "the transformer's pooled_projection_dim {} is not the CLIP text encoder's \
                 width {}",
                flux_config.pooled_projection_dim, clip_config.hidden_size
            )));
        }
        if vae_config.latent_channels * 4 != flux_config.in_channels {
            return Err(mismatch(format!(
                "the VAE's {} latent channels do not pack into the transformer's {} input \
                 channels (2×2 patches)",
                vae_config.latent_channels, flux_config.in_channels
            )));
        }
        let clip_tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let default_length = if flux_config.guidance_embeds {
            512
        } else {
            256
        };
        let t5_tokenizer = T5Tokenizer::from_dir(
            &dir.join("tokenizer_2"),
            max_sequence_length.unwrap_or(default_length),
        )?;
        let scheduler = read_json(&dir.join("scheduler/scheduler_config.json"))?;

        // Weights load as f32: the host computes in the run's train_dtype and keeps frozen
        // parts in their weight_dtype.
        let dtype = DType::F32;
        let weights = |p: &str, stem: &str, file: &Option<String>| match file {
            Some(f) => Weights::open(f),
            None => folder::part_weights(dir, p, stem, random),
        };
        let te = ClipTextTransformer::with_text_model_level(weights(
            "text_encoder",
            "model",
            &files.text_encoder,
        )?)?
        .scoped("text_encoder");
        let t5 =
            weights("text_encoder_2", "model", &files.text_encoder_2)?.scoped("text_encoder_2");
        let tr = match &files.transformer {
            Some(f) => part_file(f, "x_embedder.weight", |w| {
                bfl::transformer(w, flux_config.num_layers, flux_config.num_single_layers)
            })?,
            None => weights("transformer", "diffusion_pytorch_model", &None)?,
        }
        .scoped("transformer");
        let vae = match &files.vae {
            Some(f) => part_file(f, "encoder.down_blocks.0.resnets.0.conv1.weight", |w| {
                ldm::vae_at(w, "", vae_config.block_out_channels.len())
            })?,
            None => weights("vae", "diffusion_pytorch_model", &None)?,
        };
        let clip = ClipTextTransformer::load(&te, "text_model", None, &clip_config, dtype)?;
        let t5_model = T5EncoderModel::load(&t5, &t5_config, dtype)?;
        let transformer = FluxTransformer2DModel::load(&tr, &flux_config, dtype)?;
        // The scoped weights list the layers the loads above made.
        let mut adaptable_layers = [tr.layers(), te.layers(), t5.layers()].concat();
        crate::names::name_layers(&mut adaptable_layers)?;
        Ok(Self {
            clip_tokenizer,
            clip,
            t5_tokenizer,
            t5: t5_model,
            transformer,
            vae: AutoencoderKL::load(&vae, "", &vae_config, dtype)?,
            vae_weights: vae,
            scheduler,
            parameters: [tr.tensors(), te.tensors(), t5.tensors()].concat(),
            adaptable_layers,
            embeddings: Embeddings::default(),
        })
    }
}

impl Flux {
    /// Gives `options`' embeddings to CLIP-L (`clip_l`), as OneTrainer trains them; T5 reads
    /// a placeholder as text.
    pub fn attach_embeddings(&mut self, options: &[EmbeddingOption]) -> Result<()> {
        self.embeddings = text_embeddings::attach(
            options,
            &mut [Encoder {
                part: "text_encoder",
                key: "clip_l",
                tokenizer: &self.clip_tokenizer,
                model: &mut self.clip,
            }],
        )?;
        Ok(())
    }
}

impl Architecture for Flux {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.embeddings.after(&self.parameters))
    }

    fn model_info(&self) -> Result<serde_json::Value> {
        let c = &self.vae.config;
        let vae_scale_factor = c.scale_factor();
        Ok(ModelInfo {
            parts: vec![
                part(
                    "transformer",
                    "Transformer",
                    PartKind::Denoiser,
                    "transformer/diffusion_pytorch_model.safetensors",
                ),
                part(
                    "text_encoder",
                    "Text encoder (CLIP ViT-L)",
                    PartKind::TextEncoder,
                    "text_encoder/model.safetensors",
                )
                .with_embedding_key("clip_l"),
                part(
                    "text_encoder_2",
                    "Text encoder 2 (T5 XXL)",
                    PartKind::TextEncoder,
                    "text_encoder_2/model.safetensors",
                ),
            ],
            conditioning: Conditioning {
                text: vec!["states".into(), "pooled".into()],
                image_geometry: false,
                zeros_for_empty_negative: false,
                guidance: self.transformer.config.guidance_embeds,
            },
            objective: Objective::FlowMatch {
                scheduler: self.scheduler.clone(),
            },
            latent_channels: c.latent_channels,
            vae_scale_factor,
            scaling_factor: c.scaling_factor,
            shift_factor: c.shift_factor,
            // The VAE's factor times the 2×2 packing.
            resolution_step: vae_scale_factor * 2,
            adaptable_layers: self.adaptable_layers.clone(),
            // OneTrainer's Flux presets (BaseFluxSetup): attention; attention, the image stream's
            // feed-forward (`ff.net`, not `ff_context.net`) and the single blocks' MLP input;
            // every layer of the double and single blocks.
            layer_presets: [
                ("attn-only", &["attn"][..]),
                ("attn-mlp", &["attn", "ff.net", "proj_mlp"][..]),
                ("blocks", &["transformer_block"][..]),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect(),
            metadata: Metadata {
                base_model_version: "flux1".into(),
                modelspec_architecture: if self.transformer.config.guidance_embeds {
                    "flux-1-dev"
                } else {
                    "flux-1-schnell"
                }
                .into(),
                extra: Default::default(),
            },
            single_file_layout: Some("bfl".into()),
            single_file_parts: vec!["transformer".into()],
            embeddings: self.embeddings.info.clone(),
        }
        .to_json())
    }

    /// `bfl`: the transformer alone in Black Forest Labs' layout (`flux1-dev.safetensors`, what
    /// ComfyUI and Forge load beside their own text encoder and VAE files; OneTrainer's
    /// single-file Flux output).
    fn export(&self, layout: &str) -> Result<Vec<(String, Tensor)>> {
        if layout == "diffusers" {
            // The parameters are named so already.
            let mut out = self.parameters.clone();
            out.extend(ldm::vae_diffusers(&self.vae_weights)?);
            return Ok(out);
        }
        if layout != "bfl" {
            bail!("flux writes the `bfl` and `diffusers` layouts only, not `{layout}`");
        }
        let transformer: Vec<(String, Tensor)> = self
            .parameters
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix("transformer.")?.to_string(), t.clone())))
            .collect();
        bfl::export(&transformer)
    }

    /// T5's states `[B, max_sequence_length, D]` and CLIP's pooled output `[B, D']`, as
    /// diffusers' Flux pipeline encodes a prompt.
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let (mut clip_ids, mut t5_ids) = (Vec::new(), Vec::new());
        for p in prompts {
            clip_ids.extend(self.clip_tokenizer.encode_added(p, &self.clip.added)?);
            t5_ids.extend(self.t5_tokenizer.encode(p)?);
        }
        let n = prompts.len();
        let pooled = self.clip.forward(&clip_ids, n, 0)?.pooled;
        let ids = Tensor::from_i64(&t5_ids, &[n, self.t5_tokenizer.max_length])?;
        Ok(vec![self.t5.forward(&ids)?, pooled])
    }

    fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.vae.encode(image)?;
        Ok((d.mean, d.logvar))
    }

    fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(latents)
    }

    /// `latents` `[B, C, h, w]`, `timesteps` `[B]` as σ·1000, text `[states, pooled]` and, for a
    /// model with the guidance embedding, the guidance `[B]`: the predicted velocity `ε − x`.
    fn denoise(&self, latents: &Tensor, timesteps: &Tensor, text: &[&Tensor]) -> Result<Tensor> {
        let guided = self.transformer.config.guidance_embeds;
        let (states, pooled, guidance) = match (text, guided) {
            ([s, p], false) => (*s, *p, None),
            ([s, p, g], true) => (*s, *p, Some(*g)),
            _ => {
                return Err(Error(format!(
                    "flux denoise takes text states, the pooled text{} ({} tensors given)",
                    if guided { " and the guidance" } else { "" },
                    text.len()
                )));
            }
        };
        let [_, _, h, w] = latents.shape()?[..] else {
            bail!("flux denoise: latents must be [B, C, H, W]");
        };
        let l = states.shape()?.get(1).copied().unwrap_or(0);
        let out = self.transformer.forward(
            &pack(latents)?,
            states,
            pooled,
            &timesteps.div_scalar(1000.0)?,
            guidance,
            &vec![[0.0; 3]; l],
            &image_ids(h, w),
        )?;
        unpack(&out, h, w)
    }
}
