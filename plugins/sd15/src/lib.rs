//! Stable Diffusion 1.x and 2.x from a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`; fp32 or `.fp16` weights) or a single-file original
//! checkpoint (`model.diffusion_model.*`, `first_stage_model.*`, and SD 1's CLIP
//! `cond_stage_model.transformer.*` or SD 2's OpenCLIP `cond_stage_model.model.*` with fused
//! attention `in_proj`). Tensors are loaded lazily, one at a time, into the same diffusers-named
//! modules either way. SD 2.x is told apart by its text encoder (GELU, OpenCLIP ViT-H).

use std::path::Path;

use ferrite_blocks::{
    clip::{ClipTextConfig, ClipTextTransformer},
    folder::{self, read, read_json},
    keys,
    ldm::{self, FileFamily, UnetLayout},
    open_clip,
    options::ArchOptions,
    text_embeddings::{self, Embeddings, Encoder},
    tokenizer::ClipTokenizer,
    unet::{UNet2DConditionModel, UNetConfig},
    vae::{AutoencoderKL, VaeConfig},
};
use ferrite_plugin_api::{
    AdaptableLayer, Architecture, Component, ComponentKind, DType, Descriptor, Error, ModelInfo,
    PartKind, Plugin, Result, Tensor, Weights, bail, export_plugin,
    family::{Conditioning, Metadata, Objective},
    serde_json::{self, json},
};

/// Whether a diffusers folder says it has no VAE (`"vae": [null, null]`): a pixel-space model,
/// such as the built-in demo's, whose "latents" are the image itself.
fn pixel_space(dir: &Path) -> bool {
    read(&dir.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| {
            v["vae"]
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_null()))
        })
}

/// Refuses a folder of another family with a message saying what was found.
fn check_folder(dir: &Path) -> Result<()> {
    let v = folder::model_index(dir)?;
    let class = v["_class_name"].as_str().unwrap_or("");
    if class.contains("XL") || v.get("text_encoder_2").is_some() {
        bail!(
            "{} is an SDXL model ({class}); use the sdxl architecture",
            dir.display()
        );
    }
    if class.contains("Flux") || v.get("transformer").is_some() {
        bail!(
            "{} is a Flux/DiT model ({class}); use the flux architecture",
            dir.display()
        );
    }
    let parts: Vec<&str> = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        .into_iter()
        .filter(|&p| p != "vae" || !pixel_space(dir))
        .collect();
    folder::require_parts(dir, &parts, "Stable Diffusion")
}

/// Refuses a single file of another family with a message saying what was found; the family
/// (SD 1 or SD 2) of one it loads.
fn check_file(w: &Weights) -> Result<FileFamily> {
    let any = |prefix: &str| w.infos().iter().any(|i| i.key.starts_with(prefix));
    let family = FileFamily::of(w);
    let found = match family {
        FileFamily::Sdxl | FileFamily::Flux => family.refusal(),
        _ if !any(ldm::UNET_PREFIX) || !any(ldm::VAE_PREFIX) || family == FileFamily::Unknown => {
            "not a full SD 1.x/2.x checkpoint: it needs model.diffusion_model.*, \
             first_stage_model.* and cond_stage_model.transformer.* (SD 1) or \
             cond_stage_model.model.* (SD 2) tensors"
        }
        _ => return Ok(family),
    };
    bail!("{} is {found}", w.path())
}

/// The configs of a model's parts.
struct Configs {
    unet: UNetConfig,
    /// None for a pixel-space model.
    vae: Option<VaeConfig>,
    text_encoder: ClipTextConfig,
    scheduler: serde_json::Value,
    tokenizer: ClipTokenizer,
}

impl Configs {
    fn from_folder(dir: &Path) -> Result<Self> {
        let path = |p: &str| dir.join(p);
        let source = |p: &str| path(p).to_string_lossy().into_owned();
        let unet = UNetConfig::from_json(
            &read(&path("unet/config.json"))?,
            &source("unet/config.json"),
        )?;
        if let Some(t) = &unet.addition_embed_type {
            return Err(Error(format!(
                "{}: addition_embed_type `{t}`: this looks like SDXL; use sdxl",
                source("unet/config.json")
            )));
        }
        Ok(Self {
            unet,
            vae: if pixel_space(dir) {
                None
            } else {
                Some(VaeConfig::from_json(
                    &read(&path("vae/config.json"))?,
                    &source("vae/config.json"),
                )?)
            },
            text_encoder: ClipTextConfig::from_json(
                &read(&path("text_encoder/config.json"))?,
                &source("text_encoder/config.json"),
            )?,
            scheduler: read_json(&path("scheduler/scheduler_config.json"))?,
            tokenizer: ClipTokenizer::from_dir(&path("tokenizer"))?,
        })
    }

    /// A single file's configs: read off its shapes, the rest as SD 1.x's original config has it
    /// (8 heads, 32 norm groups, VAE scaling 0.18215, the scaled-linear schedule, OpenAI CLIP's
    /// tokenizer); for SD 2.x (`sd2`) as SD 2.1's: 64 channels per head, the OpenCLIP tower's
    /// blocks but the last, which SD 2 does not use, the tokenizer padding with `!`, and
    /// v-prediction (SD 2.1 768-v; diffusers' default for SD 2 files too; force_epsilon_prediction
    /// for the 512 base models).
    fn from_checkpoint(w: &Weights, text_encoder: &Weights, sd2: bool) -> Result<Self> {
        let source = w.path();
        let mut te = if sd2 {
            open_clip::config(text_encoder)?
        } else {
            ldm::clip_config(text_encoder)?
        };
        // An original SD 2 file has the whole OpenCLIP tower (its projection included); SD 2 does
        // not use its last block. Ferrite's own export has neither.
        if sd2 && text_encoder.info("text_projection.weight").is_some() {
            let blocks = te["num_hidden_layers"].as_u64().unwrap_or(0);
            te["num_hidden_layers"] = blocks.saturating_sub(1).max(1).into();
        }
        Ok(Self {
            unet: UNetConfig::from_json(&ldm::unet_config(w)?.to_string(), source)?,
            vae: Some(VaeConfig::from_json(
                &ldm::vae_config(w)?.to_string(),
                source,
            )?),
            text_encoder: ClipTextConfig::from_json(&te.to_string(), source)?,
            scheduler: json!({
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "prediction_type": if sd2 { "v_prediction" } else { "epsilon" },
                "steps_offset": 1,
                "set_alpha_to_one": false,
                "clip_sample": false,
                "timestep_spacing": "leading",
            }),
            tokenizer: if sd2 {
                ClipTokenizer::openai_clip_padded("!")?
            } else {
                ClipTokenizer::openai_clip()?
            },
        })
    }
}

pub struct Sd15 {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextTransformer,
    /// None for a pixel-space model.
    vae: Option<AutoencoderKL>,
    unet: UNet2DConditionModel,
    scheduler: serde_json::Value,
    /// Every UNet and text-encoder tensor, as `unet.<key>` and `text_encoder.text_model.<key>`.
    parameters: Vec<(String, Tensor)>,
    adaptable_layers: Vec<AdaptableLayer>,
    unet_downsamples: usize,
    /// The VAE's tensors under diffusers names and its level count, for [`Architecture::export`].
    vae_weights: Option<(Weights, usize)>,
    /// The UNet's block layout (for original names).
    unet_layout: UnetLayout,
    /// SD 2.x: an OpenCLIP ViT-H text encoder (GELU).
    sd2: bool,
    /// CLIP skip.
    layer_skip: usize,
    /// Textual-inversion embeddings (their vectors are parameters too).
    embeddings: Embeddings,
}

impl Sd15 {
    /// Loads a diffusers folder (with `random` weights: its config files only), or a
    /// single-file checkpoint with the configs of the `config` folder (SD 1.x's originals
    /// without one).
    pub fn load(model: &Path, config: Option<&Path>, random: bool) -> Result<Self> {
        // Weights load as f32: the host computes in the run's train_dtype and keeps frozen
        // parts in their weight_dtype.
        let dtype = DType::F32;
        if model.is_dir() {
            check_folder(model)?;
            let te = folder::part_weights(model, "text_encoder", "model", random)?;
            let te = ClipTextTransformer::with_text_model_level(te)?;
            let unet = folder::part_weights(model, "unet", "diffusion_pytorch_model", random)?;
            let vae = if pixel_space(model) {
                None
            } else {
                Some(folder::part_weights(
                    model,
                    "vae",
                    "diffusion_pytorch_model",
                    random,
                )?)
            };
            return Self::build(
                Configs::from_folder(model)?,
                &te,
                &unet,
                vae.as_ref(),
                dtype,
            );
        }
        if !model.is_file() {
            bail!(
                "{} does not exist (give a diffusers folder or a .safetensors checkpoint)",
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
        let sd2 = check_file(&w)? == FileFamily::Sd2;
        let te = if sd2 {
            open_clip::text_model(&w, ldm::OPEN_CLIP_PREFIX)?
        } else {
            ldm::clip(&w)?
        };
        let configs = match config {
            Some(dir) => {
                check_folder(dir)?;
                Configs::from_folder(dir)?
            }
            None => Configs::from_checkpoint(&w, &te, sd2).map_err(|e| {
                Error(format!(
                    "{e} (read as SD {}; for other settings give a diffusers folder as `config`, \
                     --model-config on the command line)",
                    if sd2 { "2.1" } else { "1.x" }
                ))
            })?,
        };
        let unet = ldm::unet(&w, configs.unet.layers_per_block)?;
        let levels = configs
            .vae
            .as_ref()
            .map_or(1, |v| v.block_out_channels.len());
        let vae = ldm::vae(&w, levels)?;
        Self::build(configs, &te, &unet, Some(&vae), dtype)
    }

    fn build(
        c: Configs,
        te: &Weights,
        unet: &Weights,
        vae: Option<&Weights>,
        dtype: DType,
    ) -> Result<Self> {
        let vae_weights = vae
            .zip(c.vae.as_ref())
            .map(|(w, cfg)| (w.clone(), cfg.block_out_channels.len()));
        // Scoped: what loads through these is the model's parameters and adaptable layers.
        let (te, unet) = (te.scoped("text_encoder"), unet.scoped("unet"));
        let text_encoder =
            ClipTextTransformer::load(&te, "text_model", None, &c.text_encoder, dtype)?;
        let vae = match (vae, &c.vae) {
            (Some(w), Some(cfg)) => Some(AutoencoderKL::load(w, "", cfg, dtype)?),
            (None, None) => None,
            _ => bail!("the model's VAE config and weights do not go together"),
        };
        let unet_model = UNet2DConditionModel::load(&unet, "", &c.unet, dtype)?;
        let unet_layout = UnetLayout::of(&c.unet);
        let sd2 = c.text_encoder.hidden_act == "gelu";
        // ComfyUI's name for the text encoder: SD 2's OpenCLIP ViT-H is its `clip_h`.
        let comfy_te = if sd2 { "clip_h" } else { "clip_l" };
        let mut adaptable_layers = [unet.layers(), te.layers()].concat();
        for l in &mut adaptable_layers {
            let m = keys::module(l).to_string();
            if l.name.starts_with("unet.") {
                let o = unet_layout.original(&m)?;
                // kohya names SD 1.x and 2.x layers by their diffusers names.
                let comfy = format!("diffusion_model.{o}");
                keys::set(
                    l,
                    format!("lora_unet_{}", keys::flat(&m)),
                    comfy,
                    vec![format!("lycoris_{}", keys::flat(&m)), m.clone()],
                );
                l.original = Some(format!("{}{o}", ldm::UNET_PREFIX));
            } else {
                let aliases = vec![
                    format!("lora_te1_{}", keys::flat(&m)),
                    m.clone(),
                    keys::without_text_model(l),
                ];
                keys::set(
                    l,
                    format!("lora_te_{}", keys::flat(&m)),
                    format!("text_encoders.{comfy_te}.transformer.{m}"),
                    aliases,
                );
                if !sd2 {
                    l.original = Some(format!("{}{m}", ldm::CLIP_PREFIX));
                }
            }
        }
        Ok(Self {
            tokenizer: c.tokenizer,
            text_encoder,
            vae,
            unet: unet_model,
            scheduler: c.scheduler,
            parameters: [unet.tensors(), te.tensors()].concat(),
            adaptable_layers,
            unet_downsamples: c.unet.block_out_channels.len() - 1,
            vae_weights,
            unet_layout,
            sd2,
            layer_skip: 0,
            embeddings: Embeddings::default(),
        })
    }
}

impl Sd15 {
    /// kohya's and modelspec's names for the model (sd-scripts marks SD 2 LoRAs `ss_v2`, and
    /// v-prediction ones `ss_v_parameterization`).
    fn metadata(&self) -> Metadata {
        if !self.sd2 {
            return Metadata {
                base_model_version: "sd_v1".into(),
                modelspec_architecture: "stable-diffusion-v1".into(),
                extra: Default::default(),
            };
        }
        let v = self.scheduler["prediction_type"] == "v_prediction";
        let mut extra = std::collections::BTreeMap::from([("ss_v2".into(), "True".into())]);
        if v {
            extra.insert("ss_v_parameterization".into(), "True".into());
        }
        Metadata {
            base_model_version: "sd_v2".into(),
            modelspec_architecture: if v {
                "stable-diffusion-v2-768-v"
            } else {
                "stable-diffusion-v2-512"
            }
            .into(),
            extra,
        }
    }
}

impl Architecture for Sd15 {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.embeddings.after(&self.parameters))
    }

    /// `ldm`: the layout of SD 1.x's and 2.x's original single-file checkpoints (what A1111 and
    /// ComfyUI load), UNet and text encoder as they are now, the VAE as loaded. SD 2's text
    /// encoder is written in OpenCLIP's layout with the blocks SD 2 uses (not the unused 24th
    /// block nor the text projection, which diffusers' folders do not have either).
    fn export(&self, layout: &str) -> Result<Vec<(String, Tensor)>> {
        if layout == "diffusers" {
            // The parameters are named so already.
            let mut out = self.parameters.clone();
            if let Some((w, _)) = &self.vae_weights {
                out.extend(ldm::vae_diffusers(w)?);
            }
            return Ok(out);
        }
        if layout != "ldm" {
            bail!("sd15 writes the `ldm` and `diffusers` layouts only, not `{layout}`");
        }
        let mut out = Vec::new();
        let mut te = Vec::new();
        for (name, t) in &self.parameters {
            if let Some(k) = name.strip_prefix("unet.") {
                out.push((self.unet_layout.export_key(k)?, t.clone()));
            } else if let Some(k) = name.strip_prefix("text_encoder.") {
                te.push((k.to_string(), t.clone()));
            } else {
                bail!("unexpected parameter `{name}`");
            }
        }
        if self.sd2 {
            out.extend(open_clip::export(&te, ldm::OPEN_CLIP_PREFIX)?);
        } else {
            out.extend(
                te.into_iter()
                    .map(|(k, t)| (format!("{}{k}", ldm::CLIP_PREFIX), t)),
            );
        }
        if let Some((w, levels)) = &self.vae_weights {
            out.extend(ldm::vae_export(w, *levels)?);
        }
        Ok(out)
    }

    fn model_info(&self) -> Result<serde_json::Value> {
        let (latent_channels, vae_scale_factor, scaling_factor, shift_factor) = match &self.vae {
            Some(v) => {
                let c = &v.config;
                (
                    c.latent_channels,
                    c.scale_factor(),
                    c.scaling_factor,
                    c.shift_factor,
                )
            }
            None => (3, 1, 1.0, None),
        };
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
                    if self.sd2 {
                        "Text encoder (OpenCLIP ViT-H)"
                    } else {
                        "Text encoder (CLIP ViT-L)"
                    },
                    PartKind::TextEncoder,
                    "text_encoder/model.safetensors",
                )
                .with_embedding_key("emb_params"),
            ],
            conditioning: Conditioning::default(),
            objective: Objective::Ddpm {
                scheduler: self.scheduler.clone(),
            },
            latent_channels,
            vae_scale_factor,
            scaling_factor,
            shift_factor,
            // Image sides must divide by this: the VAE's factor times the UNet's downsamplings.
            resolution_step: vae_scale_factor << self.unet_downsamples,
            adaptable_layers: self.adaptable_layers.clone(),
            layer_presets: Default::default(),
            metadata: self.metadata(),
            single_file_layout: Some("ldm".into()),
            single_file_parts: Vec::new(),
            embeddings: self.embeddings.info.clone(),
        }
        .to_json())
    }

    /// Prompts longer than 75 tokens are truncated, as diffusers' pipeline and OneTrainer do;
    /// with CLIP skip the states come from an earlier layer (through the final norm).
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode_added(p, &self.text_encoder.added)?);
        }
        let out = self
            .text_encoder
            .forward(&ids, prompts.len(), self.layer_skip)?;
        Ok(vec![out.skipped_hidden_state])
    }

    /// Pixel space: the image itself, with a variance too small to matter.
    fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.vae {
            Some(vae) => {
                let d = vae.encode(image)?;
                Ok((d.mean, d.logvar))
            }
            None => Ok((
                image.clone(),
                Tensor::full(&image.shape()?, -60.0, DType::F32)?,
            )),
        }
    }

    fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(vae) => vae.decode(latents),
            None => Ok(latents.clone()),
        }
    }

    fn denoise(&self, latents: &Tensor, timesteps: &Tensor, text: &[&Tensor]) -> Result<Tensor> {
        let [ctx] = text else {
            bail!(
                "sd15 denoise takes one text state tensor, got {}",
                text.len()
            )
        };
        self.unet.forward(latents, timesteps, ctx)
    }
}

pub struct Sd15Plugin;

impl Plugin for Sd15Plugin {
    const NAME: &'static str = "sd15";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    /// `sd15` and `sd2` are the same model code (SD 2.x is told apart by its text encoder); two
    /// ids so that configs say which family they train.
    fn components() -> Vec<Descriptor> {
        let describe = |id: &str, family: &str, defaults: &str| Descriptor {
            kind: ComponentKind::Architecture,
            id: id.into(),
            version: Self::VERSION.into(),
            description: format!(
                "Stable Diffusion {family} (diffusers folder or single-file checkpoint)"
            ),
            options_schema: ArchOptions::schema(defaults),
        };
        vec![
            describe("sd15", "1.x", "SD 1.x's"),
            describe("sd2", "2.x", "SD 2.1's"),
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if kind != ComponentKind::Architecture || !matches!(id, "sd15" | "sd2") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = ArchOptions::parse(id, options)?;
        let mut model = Sd15::load(&o.model, o.config.as_deref(), o.random_weights)?;
        model.layer_skip = o.layer_skip;
        model.embeddings = text_embeddings::attach(
            &o.embeddings,
            &mut [Encoder {
                part: "text_encoder",
                key: "emb_params",
                tokenizer: &model.tokenizer,
                model: &mut model.text_encoder,
            }],
        )?;
        if model.sd2 != (id == "sd2") {
            let (is, use_id) = if model.sd2 {
                ("an SD 2.x model (OpenCLIP text encoder)", "sd2")
            } else {
                ("an SD 1.x model (CLIP ViT-L text encoder)", "sd15")
            };
            bail!(
                "{} is {is}: use the `{use_id}` architecture (model_type, --arch)",
                o.model.display()
            );
        }
        Ok(Component::Architecture(Box::new(model)))
    }
}

export_plugin!(Sd15Plugin);
