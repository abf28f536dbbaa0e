//! The run's textual-inversion embeddings: the one an embedding run trains and the additional
//! ones beside a LoRA or fine-tune — made or loaded, handed to the model, trained as groups of
//! their own, checked against the captions, and saved (a file each, or bundled in the LoRA).

use std::path::Path;

use ferrite_plugin_api::{ModelInfo, Tensor, plugin::ArchitectureHandle};

use super::groups::Group;
use super::{Result, TrainError, Trainer, err};
use crate::config::{EmbeddingConfig, OutputFormat, TrainConfig, TrainingMethod};
use crate::data::Dataset;
use crate::embeddings::{self, Given, Source, Vectors, files};

/// An embedding of the run.
pub(super) struct RunEmbedding {
    /// Its config key (`embedding`, `additional_embeddings[0]`).
    pub key: String,
    pub config: EmbeddingConfig,
    /// f32 `[tokens, width]` per text encoder: the tensors the model reads and the optimizer
    /// updates.
    pub vectors: Vectors,
}

/// The config's embeddings as the model is given them (files read now; their tensors must
/// live until the model is made).
pub(super) fn given(c: &TrainConfig, base: &Path) -> Result<Vec<Given>> {
    c.embeddings()
        .into_iter()
        .map(|(key, e)| {
            let source = if e.model_name.is_empty() {
                Source::New {
                    text: e.initial_embedding_text.clone(),
                    count: e.token_count,
                }
            } else {
                let path = TrainConfig::path(base, &e.model_name);
                Source::Tensors(
                    files::read(&path).map_err(|x| TrainError(format!("{key}.model_name: {x}")))?,
                )
            };
            Ok(Given {
                name: key,
                placeholder: e.placeholder.clone(),
                source,
            })
        })
        .collect()
}

/// The run's embeddings with the vectors the model made of them.
pub(super) fn of_model(
    c: &TrainConfig,
    arch: &ArchitectureHandle,
    info: &ModelInfo,
) -> Result<Vec<RunEmbedding>> {
    let list = c.embeddings();
    if info.embeddings.len() != list.len() {
        return Err(TrainError(format!(
            "the model took {} of the run's {} embeddings: update its plugin",
            info.embeddings.len(),
            list.len()
        )));
    }
    let vectors = embeddings::of_model(&arch.parameters().map_err(err)?, list.len());
    Ok(list
        .into_iter()
        .zip(vectors)
        .map(|((key, e), vectors)| RunEmbedding {
            key,
            config: e.clone(),
            vectors,
        })
        .collect())
}

/// What may be wrong with the embeddings, reported when the run starts: a placeholder no
/// caption uses (it would not train), or one that is a word of the vocabulary already (it
/// takes that word's place in every prompt).
pub(super) fn problems(list: &[RunEmbedding], data: &Dataset, info: &ModelInfo) -> Vec<String> {
    let mut out = Vec::new();
    for (e, taken) in list.iter().zip(&info.embeddings) {
        let p = &e.config.placeholder;
        // In any case: the loader writes placeholders as configured.
        let lower = p.to_ascii_lowercase();
        if e.config.train
            && !data.items.iter().any(|i| {
                i.captions
                    .iter()
                    .any(|c| c.to_ascii_lowercase().contains(&lower))
            })
        {
            out.push(format!(
                "{}.placeholder: no caption contains `{p}`, so the embedding will not train",
                e.key
            ));
        }
        if taken.plain_tokens == 1 {
            out.push(format!(
                "{}.placeholder: `{p}` is a word of the model's vocabulary; the embedding \
                 replaces it in every prompt (a made-up token such as `<{}>` avoids that)",
                e.key,
                p.trim_matches(['<', '>'])
            ));
        }
    }
    out
}

impl Trainer {
    /// One group per trained embedding, at `embedding_learning_rate`.
    pub(super) fn embedding_groups(&self) -> Result<Vec<Group>> {
        let c = &self.config;
        let mut groups = Vec::new();
        for (i, e) in self.embeddings.iter().enumerate() {
            if !e.config.train {
                continue;
            }
            let (names, params): (Vec<String>, Vec<Tensor>) = e
                .vectors
                .iter()
                .map(|(part, t)| (format!("{}/{part}", e.config.placeholder), t.clone()))
                .unzip();
            let lr = c.embedding_learning_rate.unwrap_or(c.learning_rate);
            tracing::info!(
                "training embedding {} at learning rate {lr}",
                e.config.placeholder
            );
            let stop = (
                e.config.stop_training_after,
                e.config.stop_training_after_unit,
            );
            groups.push(self.group(format!("embedding-{i}"), names, params, lr, stop)?);
        }
        Ok(groups)
    }

    /// The embedding run's output, in A1111's layout.
    pub(super) fn save_embedding_output(&self, output: &Path) -> Result<()> {
        let e = self
            .embeddings
            .first()
            .ok_or_else(|| TrainError("an embedding run without its embedding".into()))?;
        embeddings::write(output, &e.vectors, &self.info, self.output_dtype()).map_err(err)
    }

    /// The additional embeddings' tensors to bundle into the LoRA file (none when they go to
    /// files of their own).
    pub(super) fn bundled_embeddings(&self) -> Vec<(String, Tensor)> {
        if !self.bundles() {
            return Vec::new();
        }
        self.additional()
            .flat_map(|e| files::bundle_tensors(&e.config.placeholder, &e.vectors, &self.info))
            .collect()
    }

    /// The additional embeddings as files beside the output (when not bundled).
    pub(super) fn save_embedding_files(&self, output: &Path) -> Result<()> {
        if self.bundles() {
            return Ok(());
        }
        for e in self.additional() {
            let path = files::beside(output, &e.config.placeholder);
            embeddings::write(&path, &e.vectors, &self.info, self.output_dtype()).map_err(err)?;
        }
        Ok(())
    }

    /// The additional embeddings go inside the LoRA file: in kohya's layout only, which A1111
    /// and Forge read with its bundles (diffusers refuses a file with keys that are not LoRA
    /// keys, and ComfyUI warns of each).
    fn bundles(&self) -> bool {
        let c = &self.config;
        c.bundle_additional_embeddings
            && c.training_method == TrainingMethod::Lora
            && matches!(
                c.output_model_format,
                OutputFormat::Safetensors | OutputFormat::Kohya
            )
    }

    /// Additional embeddings written beside the output need file names of their own (checked
    /// before training).
    pub(super) fn check_embedding_files(&self) -> Result<()> {
        if self.bundles() {
            return Ok(());
        }
        let mut seen: Vec<(String, &str)> = Vec::new();
        for e in self.additional() {
            let stem = files::file_stem(&e.config.placeholder);
            if let Some((_, other)) = seen.iter().find(|(s, _)| *s == stem) {
                return Err(TrainError(format!(
                    "{}.placeholder: `{}` and `{other}` would both be saved as \
                     <output>_{stem}.safetensors; give them placeholders that differ in letters \
                     or digits (or bundle them: bundle_additional_embeddings)",
                    e.key, e.config.placeholder
                )));
            }
            seen.push((stem, &e.config.placeholder));
        }
        Ok(())
    }

    fn additional(&self) -> impl Iterator<Item = &RunEmbedding> {
        let skip = usize::from(self.config.training_method == TrainingMethod::Embedding);
        self.embeddings.iter().skip(skip)
    }
}
