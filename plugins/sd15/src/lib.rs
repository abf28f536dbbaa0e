//! Stable Diffusion 1.x: a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`), fp32 or `.fp16` weights, loaded lazily per tensor.
//! Single-file (ldm) checkpoints are not loaded yet.

use std::path::{Path, PathBuf};

use ferrite_blocks::{
    clip::{ClipTextConfig, ClipTextTransformer},
    tokenizer::ClipTokenizer,
    unet::{UNet2DConditionModel, UNetConfig},
    vae::{AutoencoderKL, VaeConfig},
};
use ferrite_plugin_api::{
    Architecture, Component, ComponentKind, DType, Descriptor, Error, Plugin, Result, Tensor,
    Weights, bail, export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// A diffusers folder.
    model: String,
    /// Compute dtype of the weights: f32, f16 or bf16.
    dtype: String,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error(format!("cannot read {}: {e}", path.display())))
}

/// `name.safetensors`, else its `.fp16` variant.
fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for f in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(f);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Error(format!(
        "{} has no {stem}.safetensors (nor a .fp16 variant)",
        dir.display()
    )))
}

fn open(path: &Path) -> Result<Weights> {
    Weights::open(&path.to_string_lossy())
}

/// Refuses models of another family with a message saying what was found.
fn check_family(dir: &Path) -> Result<()> {
    let index = dir.join("model_index.json");
    if !index.exists() {
        if dir.is_file() {
            bail!(
                "{} is a single file: sd15 loads diffusers folders only for now",
                dir.display()
            );
        }
        bail!(
            "{} is not a diffusers model folder (no model_index.json)",
            dir.display()
        );
    }
    let v: serde_json::Value = serde_json::from_str(&read(&index)?)
        .map_err(|e| Error(format!("{}: {e}", index.display())))?;
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
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        if !dir.join(part).is_dir() {
            bail!(
                "model folder {} has no {part}/ (expected a diffusers Stable Diffusion folder)",
                dir.display()
            );
        }
    }
    Ok(())
}

pub struct Sd15 {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextTransformer,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: serde_json::Value,
    adaptable_layers: Vec<String>,
}

/// Linear and conv layers (rank-2 and rank-4 weights, embeddings aside) by module name, with the
/// component as prefix: what adapters can attach to.
fn adaptable(w: &Weights, component: &str) -> Vec<String> {
    w.infos()
        .iter()
        .filter(|i| matches!(i.shape.len(), 2 | 4) && !i.key.contains("embeddings"))
        .filter_map(|i| {
            i.key
                .as_str()
                .strip_suffix(".weight")
                .map(|m| format!("{component}.{m}"))
        })
        .collect()
}

impl Sd15 {
    pub fn load(dir: &Path, dtype: DType) -> Result<Self> {
        check_family(dir)?;
        let unet_cfg_path = dir.join("unet/config.json");
        let unet_cfg =
            UNetConfig::from_json(&read(&unet_cfg_path)?, &unet_cfg_path.to_string_lossy())
                .map_err(|e| {
                    if e.0.contains("addition_embed_type") {
                        Error(format!("{e}: this looks like SDXL; use sdxl"))
                    } else {
                        e
                    }
                })?;
        let vae_cfg_path = dir.join("vae/config.json");
        let vae_cfg = VaeConfig::from_json(&read(&vae_cfg_path)?, &vae_cfg_path.to_string_lossy())?;
        let te_cfg_path = dir.join("text_encoder/config.json");
        let te_cfg =
            ClipTextConfig::from_json(&read(&te_cfg_path)?, &te_cfg_path.to_string_lossy())?;
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let scheduler: serde_json::Value = serde_json::from_str(&read(&sched_path)?)
            .map_err(|e| Error(format!("{}: {e}", sched_path.display())))?;

        let te_w = open(&weights_file(&dir.join("text_encoder"), "model")?)?;
        let prefix = ClipTextTransformer::detect_prefix(&te_w);
        let unet_w = open(&weights_file(&dir.join("unet"), "diffusion_pytorch_model")?)?;
        let mut adaptable_layers = adaptable(&unet_w, "unet");
        adaptable_layers.extend(adaptable(&te_w, "text_encoder"));
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextTransformer::load(&te_w, prefix, None, &te_cfg, dtype)?,
            vae: AutoencoderKL::load(
                &open(&weights_file(&dir.join("vae"), "diffusion_pytorch_model")?)?,
                "",
                &vae_cfg,
                dtype,
            )?,
            unet: UNet2DConditionModel::load(&unet_w, "", &unet_cfg, dtype)?,
            scheduler,
            adaptable_layers,
        })
    }
}

impl Architecture for Sd15 {
    fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        bail!("sd15 does not list trainable parameters yet")
    }

    fn model_info(&self) -> Result<serde_json::Value> {
        let v = &self.vae.config;
        Ok(json!({
            "latent_channels": v.latent_channels,
            "vae_scale_factor": v.scale_factor(),
            "scaling_factor": v.scaling_factor,
            "shift_factor": v.shift_factor,
            "scheduler": self.scheduler,
            "adaptable_layers": self.adaptable_layers,
        }))
    }

    /// Prompts longer than 75 tokens are truncated, as diffusers' pipeline does.
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?);
        }
        let out = self.text_encoder.forward(&ids, prompts.len())?;
        Ok(vec![out.last_hidden_state])
    }

    fn vae_encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.vae.encode(image)?;
        Ok((d.mean, d.logvar))
    }

    fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(latents)
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

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Architecture,
            id: "sd15".into(),
            version: Self::VERSION.into(),
            description: "Stable Diffusion 1.x (diffusers folder)".into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "description": "diffusers model folder"},
                    "dtype": {"type": "string", "enum": ["f32", "f16", "bf16"], "default": "f32"}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Architecture, "sd15") {
            bail!("this library has no {kind} `{id}`");
        }
        let o = parse_options(
            id,
            Options {
                model: String::new(),
                dtype: "f32".into(),
            },
            options,
        )?;
        if o.model.is_empty() {
            bail!("sd15 needs the `model` option (a diffusers folder)");
        }
        let dtype = match o.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => bail!("sd15 option dtype `{other}`: use f32, f16 or bf16"),
        };
        Ok(Component::Architecture(Box::new(Sd15::load(
            Path::new(&o.model),
            dtype,
        )?)))
    }
}

export_plugin!(Sd15Plugin);
