//! The final save (and `save_every`): a LoRA in the chosen file layout with kohya's training
//! metadata, or a fine-tuned model as a diffusers folder or one single-file checkpoint.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{DType, Tensor, family::layouts};

use super::{Result, TrainError, Trainer, err};
use crate::adapters::formats::Format;
use crate::config::{OutputDtype, OutputFormat, TrainConfig, TrainingMethod};

/// The file in every folder output Ferrite writes: a folder without it is not replaced.
const MARKER: &str = ".ferrite-output";

/// `p` made absolute with symlinks and `..` resolved as far as it exists (the rest appended).
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut rest = Vec::new();
    let mut head = abs.as_path();
    loop {
        if let Ok(c) = head.canonicalize() {
            return rest.iter().rev().fold(c, |acc: PathBuf, n| acc.join(n));
        }
        match (head.parent(), head.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                head = parent;
            }
            _ => return abs,
        }
    }
}

/// Why `dest` may not be written as the output (or None): it is or holds one of the run's own
/// folders, or is inside the base model, the cache or the workspace's managed folders; a folder
/// output must not replace a folder Ferrite did not write.
pub(super) fn destination_problem(
    dest: &Path,
    folder_output: bool,
    protected: &[(&str, PathBuf)],
    inside_forbidden: &[(&str, PathBuf)],
) -> Option<String> {
    let d = resolved(dest);
    for (what, p) in protected {
        let p = resolved(p);
        if d == p || p.starts_with(&d) {
            return Some(format!(
                "output_model_destination {} is or holds the {what} ({}): choose another path",
                dest.display(),
                p.display()
            ));
        }
    }
    for (what, p) in inside_forbidden {
        if d.starts_with(resolved(p)) {
            return Some(format!(
                "output_model_destination {} is inside the {what} ({}): choose another path",
                dest.display(),
                p.display()
            ));
        }
    }
    if folder_output && d.exists() && !d.is_dir() {
        return Some(format!(
            "output_model_destination {} is a file, and this output is a folder: choose another \
             path",
            dest.display()
        ));
    }
    if d.is_dir() && !(folder_output && d.join(MARKER).is_file()) {
        return Some(format!(
            "output_model_destination {} is an existing folder that Ferrite did not write: it is \
             left as it is; choose another path or remove it yourself",
            dest.display()
        ));
    }
    None
}

impl Trainer {
    /// Refuses an output the model cannot be written as (checked before training starts).
    pub(super) fn check_output_format(&self) -> Result<()> {
        let c = &self.config;
        if c.training_method == TrainingMethod::FineTune
            && c.output_model_format != OutputFormat::Diffusers
            && self.info.single_file_layout.is_none()
        {
            return Err(TrainError(format!(
                "output_model_format `{}`: this model has no single-file layout; use `diffusers`",
                c.output_model_format
            )));
        }
        if c.training_method == TrainingMethod::FineTune
            && c.output_model_format == OutputFormat::Diffusers
        {
            self.diffusers_base()?;
        }
        // A single file that holds only some parts (Flux's BFL transformer) would drop a
        // trained one.
        let held = &self.info.single_file_parts;
        if c.training_method == TrainingMethod::FineTune
            && c.output_model_format != OutputFormat::Diffusers
            && !held.is_empty()
            && let Some(p) = self
                .info
                .parts
                .iter()
                .find(|p| c.trains(p) && !held.contains(&p.id))
        {
            return Err(TrainError(format!(
                "output_model_format `{}`: this model's single file holds only {}, and the run \
                 trains {}; use `diffusers`, or train only what the file holds",
                c.output_model_format,
                held.join(", "),
                p.id
            )));
        }
        // An adapter file in kohya's or ComfyUI's keys needs the model to name them (checked
        // now, not when the trained file is written).
        if c.training_method != TrainingMethod::Lora {
            return Ok(());
        }
        // What the adapter plugin declares it can be written as.
        let declared = crate::adapters::formats::Layouts::of(self.registry.components());
        let file = declared.get(&c.peft_type);
        let layout = match c.output_model_format {
            OutputFormat::Safetensors | OutputFormat::Kohya => layouts::KOHYA,
            OutputFormat::Comfy => layouts::COMFY,
            OutputFormat::Diffusers => {
                if file.is_some_and(|f| f.peft.is_none()) {
                    return Err(TrainError(format!(
                        "output_model_format `diffusers`: {} has no diffusers/PEFT layout; use \
                         `kohya` or `comfy`",
                        c.peft_type
                    )));
                }
                return Ok(());
            }
        };
        let adapted = self.adapted_layers()?;
        // A layout that fuses layers into one module (Flux's qkv) stacks each adapter tensor
        // by its declared role; an adapter without roles for them cannot be written there.
        let fusable = file.is_some_and(|f| !(f.rank_rows.is_empty() && f.out_rows.is_empty()));
        if !fusable && let Some(l) = adapted.iter().find(|l| l.fused.is_some()) {
            return Err(TrainError(format!(
                "output_model_format `{}`: {layout} fuses layer `{}` with others into one \
                 module, which {} cannot be written as; use `diffusers` (if it has that layout) \
                 or leave the fused layers out",
                c.output_model_format, l.name, c.peft_type
            )));
        }
        if let Some(l) = adapted.iter().find(|l| !l.keys.contains_key(layout)) {
            return Err(TrainError(format!(
                "output_model_format `{}`: this model names no {layout} key for layer `{}`, \
                 which the run adapts; use `diffusers` or leave the layer out",
                c.output_model_format, l.name
            )));
        }
        // DoRA's magnitudes cannot be filled in for the layers of a fused module it leaves out.
        if c.lora_decompose {
            let mut covered: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
            for l in &adapted {
                if let (Some(f), Some(key)) = (l.fused, l.keys.get(layout)) {
                    covered.entry(key).or_insert((0, f.rows)).0 += l.out_features();
                }
            }
            if let Some((key, _)) = covered.iter().find(|(_, (got, all))| got < all) {
                return Err(TrainError(format!(
                    "output_model_format `{}`: DoRA on only some of the layers {layout}'s `{key}` \
                     fuses cannot be saved there; use `diffusers`, or a layer preset that \
                     adapts all of them",
                    c.output_model_format
                )));
            }
        }
        Ok(())
    }

    /// Refuses an output destination that would overwrite the base model, the workspace, the
    /// cache or a folder Ferrite did not write (checked before training starts).
    pub(super) fn check_destination(&self) -> Result<()> {
        let c = &self.config;
        let dest = TrainConfig::path(&self.base, &c.output_model_destination);
        let base_model = c.base_model_path(&self.base);
        let cache = TrainConfig::path(&self.base, &c.cache_dir);
        let ws = &self.workspace;
        let folder = c.training_method == TrainingMethod::FineTune
            && c.output_model_format == OutputFormat::Diffusers;
        // Unset, the config folder is the base model's path again.
        let base_config = match c.base_model_config.as_str() {
            "" => base_model.clone(),
            p => TrainConfig::path(&self.base, p),
        };
        let mut protected = vec![
            ("base model", base_model.clone()),
            ("base model's config folder", base_config.clone()),
            ("workspace", ws.clone()),
            ("cache", cache.clone()),
        ];
        // The parts' own files (`<part>.model_name`).
        protected.extend(
            c.part_files(&self.base)
                .into_values()
                .map(|p| ("model file", p)),
        );
        let inside = [
            ("base model", base_model),
            ("base model's config folder", base_config),
            ("cache", cache),
            ("workspace's backups", self.backups_dir()),
            ("workspace's samples", ws.join("samples")),
            ("workspace's TensorBoard files", ws.join("tensorboard")),
        ];
        match destination_problem(&dest, folder, &protected, &inside) {
            Some(p) => Err(TrainError(p)),
            None => Ok(()),
        }
    }

    /// The trained adapter (kohya/diffusers/comfy) or, for a fine-tune, the trained parts'
    /// tensors under their diffusers names.
    pub fn save_output(&self) -> Result<PathBuf> {
        let _scope = self.scope.enter();
        let _eval = super::groups::EvalWeights::new(&self.groups)?;
        self.with_ema_weights(|| self.write_output())
    }

    fn write_output(&self) -> Result<PathBuf> {
        let c = &self.config;
        let path = TrainConfig::path(&self.base, &c.output_model_destination);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        if c.training_method == TrainingMethod::Lora {
            let format = Format::from(c.output_model_format);
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
                ("ss_lr_scheduler", c.learning_rate_scheduler.to_string()),
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
            self.model
                .save_with(
                    &path,
                    format,
                    self.output_dtype(),
                    &meta,
                    &self.bundled_embeddings(),
                )
                .map_err(err)?;
        } else if c.training_method == TrainingMethod::Embedding {
            self.save_embedding_output(&path)?;
        } else if c.output_model_format == OutputFormat::Diffusers {
            self.save_diffusers_folder(&path)?;
        } else {
            self.save_single_file(&path)?;
        }
        self.save_embedding_files(&path)?;
        Ok(path)
    }

    pub(super) fn output_dtype(&self) -> DType {
        match self.config.output_dtype {
            OutputDtype::Float32 => DType::F32,
            OutputDtype::Float16 => DType::F16,
            OutputDtype::Bfloat16 => DType::BF16,
        }
    }

    /// `tensors` cast to the output dtype.
    fn in_output_dtype(&self, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let dtype = self.output_dtype();
        tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.cast(dtype).map_err(err)?)))
            .collect()
    }

    /// A fine-tune as one safetensors file in the model's original single-file layout, as the
    /// architecture plugin names it.
    fn save_single_file(&self, out: &Path) -> Result<()> {
        crate::model_file::write_single_file(
            &self.arch,
            &self.info,
            out,
            self.output_dtype(),
            &self.config.base_model_name,
        )
        .map_err(TrainError)
    }

    /// The folder a diffusers fine-tune output copies what it does not write (configs,
    /// tokenizers, the VAE): the base model's, or for a base file that holds only some parts
    /// (a Flux transformer) its `base_model_config` folder, which gave the rest.
    fn diffusers_base(&self) -> Result<PathBuf> {
        let c = &self.config;
        if !c.vae.model_name.is_empty() {
            return Err(TrainError(format!(
                "output_model_format `diffusers` copies the VAE from the base model's folder, but \
                 vae.model_name ({}) gives it: use output_model_format = \"safetensors\"",
                c.vae.model_name
            )));
        }
        let base = c.base_model_path(&self.base);
        if base.is_dir() {
            return Ok(base);
        }
        let folder = TrainConfig::path(&self.base, &c.base_model_config);
        if !self.info.single_file_parts.is_empty()
            && !c.base_model_config.is_empty()
            && folder.is_dir()
        {
            return Ok(folder);
        }
        Err(TrainError(format!(
            "output_model_format `diffusers` copies the base model's folder, but {} is a file: \
             use output_model_format = \"safetensors\"",
            base.display()
        )))
    }

    /// A fine-tune as a diffusers folder: the base folder's configs, tokenizer, scheduler and
    /// whatever has no tensors in the model, with each part's tensors as they are now. Built beside `out`
    /// under a temporary name, then put in its place.
    fn save_diffusers_folder(&self, out: &Path) -> Result<()> {
        let base = self.diffusers_base()?;
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        let tmp = out.with_file_name(format!(".tmp-{name}"));
        let old = out.with_file_name(format!(".old-{name}"));
        // Leftovers of an interrupted save are ours only when they carry the marker.
        for leftover in [&tmp, &old] {
            if leftover.exists() {
                if !leftover.join(MARKER).is_file() {
                    return Err(TrainError(format!(
                        "{} is in the way of saving {} and Ferrite did not write it: move it away",
                        leftover.display(),
                        out.display()
                    )));
                }
                if leftover == &old && !out.exists() {
                    // A save stopped between its renames: the old output is the complete one.
                    std::fs::rename(&old, out).map_err(err)?;
                } else {
                    std::fs::remove_dir_all(leftover).map_err(err)?;
                }
            }
        }
        if let Some(p) = destination_problem(out, true, &[], &[]) {
            return Err(TrainError(p));
        }
        std::fs::create_dir_all(&tmp).map_err(err)?;
        crate::fsutil::write_atomic(&tmp.join(MARKER), b"written by Ferrite\n").map_err(err)?;
        let files: Vec<(String, &str)> = self
            .info
            .parts
            .iter()
            .filter_map(|p| Some((format!("{}.", p.id), p.diffusers_file.as_deref()?)))
            .collect();
        let replaced: Vec<PathBuf> = files
            .iter()
            .filter_map(|(_, f)| Some(base.join(f).parent()?.to_path_buf()))
            .collect();
        crate::model_file::copy_except_weights(&base, &tmp, &replaced).map_err(err)?;
        let all = self.arch.parameters().map_err(err)?;
        for (prefix, file) in &files {
            // One part at a time in the output dtype, so only its copies exist at once.
            let part = self.in_output_dtype(
                all.iter()
                    .filter_map(|(n, t)| Some((n.strip_prefix(prefix.as_str())?.into(), t.clone())))
                    .collect(),
            )?;
            let named: Vec<(&str, &Tensor)> = part.iter().map(|(n, t)| (n.as_str(), t)).collect();
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
        // Replace: the old output aside, the new one in, then the old one gone; a crash at any
        // point leaves one complete output (at `out`, or aside with the marker).
        let had_old = out.exists();
        if had_old {
            std::fs::rename(out, &old).map_err(err)?;
        }
        std::fs::rename(&tmp, out).map_err(err)?;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(err)?;
        }
        Ok(())
    }
}
