//! The BLIP captioners on the host's op table, each from its model folder as Hugging Face has it
//! (`config.json`, `model.safetensors` or its shards, `preprocessor_config.json`,
//! `tokenizer.json`); the image resized to the processor's size (bicubic), rescaled and
//! normalised; the caption decoded greedily from the initial caption, special tokens left out of
//! the text:
//! - `blip`: OneTrainer's BlipModel (Salesforce/blip-image-captioning-large), as `generate` with
//!   its defaults (20 tokens at most, the prompt's included);
//! - `blip2`: OneTrainer's Blip2Model (Salesforce/blip2-opt-2.7b), as `generate` with its
//!   defaults (20 new tokens at most).

pub mod blip2;
pub mod model;
mod processor;

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    Captioner, Component, ComponentKind, Descriptor, Error, Plugin, Result, Tensor, Weights, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use blip2::Blip2;
pub use model::Blip;
use processor::Processor;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The model's folder.
    pub model_path: Option<PathBuf>,
    /// At most this many tokens, the prompt's included (`generate`'s default).
    pub max_length: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model_path: None,
            max_length: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blip2Options {
    /// The model's folder.
    pub model_path: Option<PathBuf>,
    /// At most this many generated tokens (`generate`'s default for BLIP-2).
    pub max_new_tokens: usize,
}

impl Default for Blip2Options {
    fn default() -> Self {
        Self {
            model_path: None,
            max_new_tokens: 20,
        }
    }
}

/// The model folder, checked for the files a captioner needs; `hint` says what to download.
fn model_dir<'a>(name: &str, path: Option<&'a Path>, hint: &str) -> Result<&'a Path> {
    let Some(dir) = path else {
        bail!("{name} needs --model-path: the folder of {hint}");
    };
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            bail!(
                "{name}: {} is missing (the folder of {hint})",
                dir.join(f).display()
            );
        }
    }
    Ok(dir)
}

pub struct BlipCaptioner {
    model: Blip,
    tokenizer: tokenizers::Tokenizer,
    processor: Processor,
    max_length: usize,
}

impl BlipCaptioner {
    pub fn new(o: &Options) -> Result<Self> {
        let hint = "Salesforce/blip-image-captioning-large (config.json, model.safetensors, \
                    preprocessor_config.json, tokenizer.json)";
        if o.max_length < 2 {
            bail!(
                "blip: max_length is {}: at least 2 (the start token and one more)",
                o.max_length
            );
        }
        let dir = model_dir("blip", o.model_path.as_deref(), hint)?;
        let config = model::Config::parse(
            ferrite_blocks::folder::read_json(&dir.join("config.json"))?,
            &dir.join("config.json"),
        )?;
        let weights = ferrite_blocks::folder::folder_weights(dir, "model")?;
        Ok(Self {
            model: Blip::load(&weights, config, dir)?,
            tokenizer: processor::tokenizer("blip", dir)?,
            processor: Processor::load(dir, 384)?,
            max_length: o.max_length,
        })
    }

    /// The processor's pixel values `[1, 3, size, size]` for an RGB `[3, H, W]` image in 0..1.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        self.processor.pixel_values("blip", image)
    }

    /// The decoder's prompt: the tokenizer's `[CLS] initial [SEP]` with the start token for
    /// `[CLS]` and without `[SEP]`, as BLIP's `generate` makes it.
    pub fn prompt(&self, initial: &str) -> Result<Vec<i64>> {
        let mut ids = encode("blip", &self.tokenizer, initial)?;
        if ids.len() < 2 {
            bail!("blip: the tokenizer does not add [CLS] and [SEP]");
        }
        ids.pop();
        ids[0] = self.model.config.text_config.bos_token_id;
        Ok(ids)
    }

    /// The generated token ids (the prompt's included).
    pub fn generate(&self, pixel_values: &Tensor, initial: &str) -> Result<Vec<i64>> {
        self.model
            .generate(pixel_values, &self.prompt(initial)?, self.max_length)
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        processor::decode("blip", &self.tokenizer, ids)
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&mut self, image: &Tensor, prompt: &str) -> Result<String> {
        let ids = self.generate(&self.pixel_values(image)?, prompt)?;
        self.decode(&ids)
    }
}

fn encode(name: &str, tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<i64>> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| Error(format!("{name}: tokenizing `{text}`: {e}")))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

pub struct Blip2Captioner {
    model: Blip2,
    tokenizer: tokenizers::Tokenizer,
    processor: Processor,
    max_new_tokens: usize,
}

impl Blip2Captioner {
    pub fn new(o: &Blip2Options) -> Result<Self> {
        let hint = "Salesforce/blip2-opt-2.7b (config.json, model.safetensors or its shards with \
                    model.safetensors.index.json, preprocessor_config.json, tokenizer.json)";
        if o.max_new_tokens == 0 {
            bail!("blip2: max_new_tokens is 0: nothing would be generated");
        }
        let dir = model_dir("blip2", o.model_path.as_deref(), hint)?;
        let config = blip2::Config::parse(
            ferrite_blocks::folder::read_json(&dir.join("config.json"))?,
            &dir.join("config.json"),
        )?;
        let weights: Weights = ferrite_blocks::folder::folder_weights(dir, "model")?;
        Ok(Self {
            model: Blip2::load(&weights, config)?,
            tokenizer: processor::tokenizer("blip2", dir)?,
            processor: Processor::load(dir, 224)?,
            max_new_tokens: o.max_new_tokens,
        })
    }

    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        self.processor.pixel_values("blip2", image)
    }

    /// The prompt as `Blip2Processor` makes it: one image token per query, then the tokenized
    /// initial caption (OPT's tokenizer starts it with `</s>`).
    pub fn prompt(&self, initial: &str) -> Result<Vec<i64>> {
        let c = &self.model.config;
        let mut ids = vec![c.image_token_index; c.num_query_tokens];
        let text = encode("blip2", &self.tokenizer, initial)?;
        // OPT's tokenizer starts with `</s>` (`add_bos_token`), whether or not tokenizer.json's
        // template says so.
        if text.first() != Some(&c.text_config.bos_token_id) {
            ids.push(c.text_config.bos_token_id);
        }
        ids.extend(text);
        Ok(ids)
    }

    /// The generated token ids (the prompt's included).
    pub fn generate(&self, pixel_values: &Tensor, initial: &str) -> Result<Vec<i64>> {
        self.model
            .generate(pixel_values, &self.prompt(initial)?, self.max_new_tokens)
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let text = processor::decode("blip2", &self.tokenizer, ids)?;
        Ok(text.trim().to_owned())
    }
}

impl Captioner for Blip2Captioner {
    fn caption(&mut self, image: &Tensor, prompt: &str) -> Result<String> {
        let ids = self.generate(&self.pixel_values(image)?, prompt)?;
        self.decode(&ids)
    }
}

pub struct BlipPlugin;

impl Plugin for BlipPlugin {
    const NAME: &'static str = "caption-blip";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let path = json!({"type": ["string", "null"], "description": "the model's folder"});
        vec![
            Descriptor {
                kind: ComponentKind::Captioner,
                id: "blip".into(),
                version: Self::VERSION.into(),
                description: "BLIP (Salesforce/blip-image-captioning-large): a sentence, \
                              continuing the initial caption"
                    .into(),
                options_schema: json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "model_path": path,
                        "max_length": {"type": "integer", "minimum": 2,
                                       "default": Options::default().max_length}
                    }
                }),
            },
            Descriptor {
                kind: ComponentKind::Captioner,
                id: "blip2".into(),
                version: Self::VERSION.into(),
                description: "BLIP-2 (Salesforce/blip2-opt-2.7b): a sentence, continuing the \
                              initial caption"
                    .into(),
                options_schema: json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "model_path": path,
                        "max_new_tokens": {"type": "integer", "minimum": 1,
                                           "default": Blip2Options::default().max_new_tokens}
                    }
                }),
            },
        ]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        match (kind, id) {
            (ComponentKind::Captioner, "blip") => {
                let o: Options = parse_options(id, Options::default(), options)?;
                Ok(Component::Captioner(Box::new(BlipCaptioner::new(&o)?)))
            }
            (ComponentKind::Captioner, "blip2") => {
                let o: Blip2Options = parse_options(id, Blip2Options::default(), options)?;
                Ok(Component::Captioner(Box::new(Blip2Captioner::new(&o)?)))
            }
            _ => bail!("this library has no {kind} `{id}`"),
        }
    }
}

export_plugin!(BlipPlugin);
