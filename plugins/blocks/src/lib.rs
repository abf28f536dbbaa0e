//! Model building blocks for architecture plugins. Module and field names mirror diffusers and
//! transformers so that checkpoint keys map one to one. Everything here is plugin-api code: no
//! tensor data lives in the plugin.

pub mod added_tokens;
pub mod clip;
pub mod embeddings;
pub mod flux;
pub mod folder;
pub mod keys;
pub mod layers;
pub mod ldm;
pub mod manifest;
pub mod open_clip;
pub mod options;
pub mod resnet;
pub mod t5;
pub mod t5_tokenizer;
pub mod text_embeddings;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod vae;

use ferrite_plugin_api::{Error, Part, PartKind, Result, Weights};

/// Joins a key prefix and a name with a dot (an empty prefix adds nothing).
pub fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Checks that `key` exists in `w` with `shape`, so that a wrong checkpoint fails with a message
/// naming the key instead of deep inside an op.
pub fn expect_shape(w: &Weights, key: &str, shape: &[usize]) -> Result<()> {
    let info = w
        .info(key)
        .ok_or_else(|| Error(format!("{}: missing tensor `{key}`", w.path())))?;
    let got: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
    if got != shape {
        return Err(Error(format!(
            "{}: tensor `{key}` has shape {got:?}, expected {shape:?} for this config",
            w.path()
        )));
    }
    Ok(())
}

/// A trainable model part configured by OneTrainer's table of the same name, whose tensors a
/// diffusers folder keeps in `file`.
pub fn part(id: &str, name: &str, kind: PartKind, file: &str) -> Part {
    Part {
        id: id.into(),
        name: name.into(),
        config_table: id.into(),
        kind,
        trainable: true,
        default_learning_rate: None,
        embedding_key: None,
        diffusers_file: Some(file.into()),
    }
}
