//! The BLIP captioner (OneTrainer's BlipModel: Salesforce/blip-image-captioning-large) on the
//! host's op table: the model folder as Hugging Face has it (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`, the BERT tokenizer's `tokenizer.json`); the image resized to the
//! processor's size (bicubic), rescaled and normalised; the caption decoded greedily from the
//! initial caption, as `generate` with its defaults (20 tokens at most), special tokens left
//! out of the text.

pub mod model;

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    Captioner, Component, ComponentKind, Descriptor, Error, Plugin, Result, Tensor, Weights, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use model::Blip;

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

pub struct BlipCaptioner {
    model: Blip,
    tokenizer: tokenizers::Tokenizer,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    max_length: usize,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error(format!("blip: {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error(format!("blip: {}: {e}", path.display())))
}

impl BlipCaptioner {
    pub fn new(o: &Options) -> Result<Self> {
        let Some(dir) = o.model_path.as_deref() else {
            bail!(
                "blip needs --model-path: the folder of Salesforce/blip-image-captioning-large \
                 (config.json, model.safetensors, preprocessor_config.json, tokenizer.json)"
            );
        };
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !dir.join(f).is_file() {
                bail!("blip: {} is missing", dir.join(f).display());
            }
        }
        let config: model::Config = serde_json::from_value(read_json(&dir.join("config.json"))?)
            .map_err(|e| Error(format!("blip: {}: {e}", dir.join("config.json").display())))?;
        let pre = read_json(&dir.join("preprocessor_config.json")).unwrap_or(json!({}));
        let size = pre["size"]["height"]
            .as_u64()
            .or_else(|| pre["size"].as_u64())
            .unwrap_or(384) as usize;
        // BLIP's processor: OpenAI CLIP's mean and deviation.
        let three = |k: &str, d: [f32; 3]| -> [f32; 3] {
            match pre[k]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect::<Vec<_>>())
            {
                Some(v) if v.len() == 3 => [v[0] as f32, v[1] as f32, v[2] as f32],
                _ => d,
            }
        };
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
                Error(format!(
                    "blip: {}: {e}",
                    dir.join("tokenizer.json").display()
                ))
            })?;
        let weights = Weights::open(&dir.join("model.safetensors").to_string_lossy())?;
        Ok(Self {
            model: Blip::load(&weights, config, dir)?,
            tokenizer,
            size,
            mean: three("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73]),
            std: three("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1]),
            max_length: o.max_length,
        })
    }

    /// The processor's pixel values for an RGB `[3, H, W]` image in 0..1 (bicubic, rescaled,
    /// normalised), `[1, 3, size, size]`.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        let shape = image.shape()?;
        let [3, h, w] = shape[..] else {
            bail!("blip: the image is {shape:?}, not [3, height, width]");
        };
        let v = image.to_vec()?;
        let plane = h * w;
        let bytes: Vec<u8> = (0..plane)
            .flat_map(|i| (0..3).map(move |c| (i, c)))
            .map(|(i, c)| (v[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        let rgb = image::RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| Error::msg("blip: image size"))?;
        let s = self.size;
        let small = image::imageops::resize(
            &rgb,
            s as u32,
            s as u32,
            image::imageops::FilterType::CatmullRom,
        );
        let mut out = vec![0f32; 3 * s * s];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                out[c * s * s + i] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Tensor::from_f32(&out, &[1, 3, s, s])
    }

    /// The decoder's prompt: the tokenizer's `[CLS] initial [SEP]` with the start token for
    /// `[CLS]` and without `[SEP]`, as BLIP's `generate` makes it.
    pub fn prompt(&self, initial: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(initial, true)
            .map_err(|e| Error(format!("blip: tokenizing `{initial}`: {e}")))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
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
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error(format!("blip: decoding: {e}")))
    }
}

impl Captioner for BlipCaptioner {
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
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Captioner,
            id: "blip".into(),
            version: Self::VERSION.into(),
            description: "BLIP (Salesforce/blip-image-captioning-large): a sentence, continuing \
                          the initial caption"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "model_path": {"type": ["string", "null"], "description": "the model's folder"},
                    "max_length": {"type": "integer", "minimum": 2, "default": d.max_length}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Captioner, "blip") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Captioner(Box::new(BlipCaptioner::new(&o)?)))
    }
}

export_plugin!(BlipPlugin);
