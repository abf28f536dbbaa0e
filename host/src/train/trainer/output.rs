//! The final save (and `save_every`): a LoRA in the chosen file layout with kohya's training
//! metadata, or a fine-tuned model as a diffusers folder or one single-file checkpoint.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::Tensor;

use super::{Result, TrainError, Trainer, err};
use crate::adapters::{self, formats::Format};
use crate::train::config::TrainConfig;

/// Copies a model folder without its UNet and text-encoder weights (the VAE's stay).
fn copy_except_weights(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(err)?;
    for e in std::fs::read_dir(from).map_err(err)? {
        let p = e.map_err(err)?.path();
        let dest = to.join(p.file_name().unwrap_or_default());
        let part = from.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            copy_except_weights(&p, &dest)?;
        } else if !(matches!(part, "unet" | "text_encoder")
            && p.extension().is_some_and(|x| x == "safetensors"))
        {
            std::fs::copy(&p, &dest).map_err(err)?;
        }
    }
    Ok(())
}

impl Trainer {
    /// The trained adapter (kohya/diffusers/comfy) or, for a fine-tune, the trained parts'
    /// tensors under their diffusers names.
    pub fn save_output(&self) -> Result<PathBuf> {
        self.with_ema_weights(|| self.write_output())
    }

    fn write_output(&self) -> Result<PathBuf> {
        let c = &self.config;
        let path = TrainConfig::path(&self.base, &c.output_model_destination);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        if c.training_method == "lora" {
            let format: Format = c.output_model_format.parse().map_err(err)?;
            let meta = [
                ("ss_learning_rate", c.learning_rate.to_string()),
                (
                    "ss_unet_lr",
                    c.unet.learning_rate.unwrap_or(c.learning_rate).to_string(),
                ),
                (
                    "ss_text_encoder_lr",
                    c.text_encoder
                        .learning_rate
                        .unwrap_or(c.learning_rate)
                        .to_string(),
                ),
                ("ss_epoch", self.progress.epoch.to_string()),
                ("ss_steps", self.progress.step.to_string()),
                ("ss_max_train_steps", self.total_steps().to_string()),
                ("ss_num_train_images", self.data.items.len().to_string()),
                ("ss_batch_size_per_device", c.batch_size.to_string()),
                (
                    "ss_gradient_accumulation_steps",
                    c.gradient_accumulation_steps.to_string(),
                ),
                ("ss_lr_scheduler", c.learning_rate_scheduler.clone()),
                (
                    "ss_lr_warmup_steps",
                    c.learning_rate_warmup_steps.to_string(),
                ),
                ("ss_optimizer", c.optimizer_options().0),
                ("ss_seed", c.seed.to_string()),
                ("ss_resolution", c.resolution.clone()),
                ("ss_noise_offset", c.offset_noise_weight.to_string()),
                ("ss_max_grad_norm", c.clip_grad_norm.to_string()),
                (
                    "ss_caption_dropout_rate",
                    c.text_encoder.dropout_probability.to_string(),
                ),
                ("ss_training_comment", "trained with Ferrite".into()),
            ]
            .map(|(k, v)| (k.to_string(), v));
            adapters::save(&path, format, "sd_v1", &meta).map_err(err)?;
        } else if c.output_model_format == "diffusers" {
            self.save_diffusers_folder(&path)?;
        } else {
            self.save_single_file(&path)?;
        }
        Ok(path)
    }

    /// A fine-tune as one safetensors file in the original (ldm) checkpoint layout, as the
    /// architecture plugin names it: UNet, text encoder and VAE.
    fn save_single_file(&self, out: &Path) -> Result<()> {
        let all = self.arch.export("ldm").map_err(err)?;
        let named: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let meta = [("ferrite_base_model", self.config.base_model_name.as_str())];
        ferrite_plugin_api::save_safetensors(&out.to_string_lossy(), &named, &meta)
            .map_err(|e| TrainError(format!("{}: {e}", out.display())))
    }

    /// A fine-tune as a diffusers folder: the base folder's configs, tokenizer, scheduler and
    /// VAE, with the model's UNet and text-encoder tensors as they are now. Built beside `out`
    /// under a temporary name, then put in its place.
    fn save_diffusers_folder(&self, out: &Path) -> Result<()> {
        let base = TrainConfig::path(&self.base, &self.config.base_model_name);
        if !base.is_dir() {
            return Err(TrainError(format!(
                "output_model_format `diffusers` copies the base model's folder, but {} is a                  file: use output_model_format = \"safetensors\"",
                base.display()
            )));
        }
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        let tmp = out.with_file_name(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        copy_except_weights(&base, &tmp)?;
        let all = self.arch.parameters().map_err(err)?;
        for (prefix, file) in [
            ("unet.", "unet/diffusion_pytorch_model.safetensors"),
            ("text_encoder.", "text_encoder/model.safetensors"),
        ] {
            let named: Vec<(&str, &Tensor)> = all
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k, t)))
                .collect();
            ferrite_plugin_api::save_safetensors(&tmp.join(file).to_string_lossy(), &named, &[])
                .map_err(err)?;
        }
        // A forced prediction type is what the model now predicts: say so for the samplers.
        let scheduler = tmp.join("scheduler/scheduler_config.json");
        if let (Some(p), Ok(text)) = (
            self.config.forced_prediction(),
            std::fs::read_to_string(&scheduler),
        ) {
            let mut v: serde_json::Value = serde_json::from_str(&text).map_err(err)?;
            v["prediction_type"] = p.into();
            let text = serde_json::to_string_pretty(&v).map_err(err)?;
            crate::fsutil::write_atomic(&scheduler, text.as_bytes()).map_err(err)?;
        }
        let _ = std::fs::remove_dir_all(out);
        std::fs::rename(&tmp, out).map_err(err)?;
        Ok(())
    }
}
