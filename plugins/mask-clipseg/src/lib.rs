//! The ClipSeg masker (OneTrainer's ClipSegModel, CIDAS/clipseg-rd64-refined) on the host's op
//! table: the model folder as Hugging Face has it (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`, the CLIP tokenizer's files); each comma-separated prompt is
//! segmented in the image resized to the processor's size (bilinear, ImageNet-normalised), and
//! the map is the sigmoid of each prompt's logits, which the host averages, smooths, resizes,
//! thresholds and grows.

pub mod model;

use std::path::{Path, PathBuf};

use ferrite_blocks::tokenizer::ClipTokenizer;
use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Error, Masker, Plugin, Result, Tensor, Weights, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

pub use model::ClipSeg;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The model's folder (CIDAS/clipseg-rd64-refined as downloaded).
    pub model_path: Option<PathBuf>,
}

pub struct ClipSegMasker {
    model: ClipSeg,
    tokenizer: ClipTokenizer,
    mean: [f32; 3],
    std: [f32; 3],
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error(format!("clipseg: {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error(format!("clipseg: {}: {e}", path.display())))
}

impl ClipSegMasker {
    pub fn new(dir: Option<&Path>) -> Result<Self> {
        let Some(dir) = dir else {
            bail!(
                "clipseg needs --model-path: the folder of CIDAS/clipseg-rd64-refined (config.json, \
                 model.safetensors, preprocessor_config.json and its tokenizer)"
            );
        };
        for f in ["config.json", "model.safetensors"] {
            if !dir.join(f).is_file() {
                bail!("clipseg: {} is missing", dir.join(f).display());
            }
        }
        let config: model::Config = serde_json::from_value(read_json(&dir.join("config.json"))?)
            .map_err(|e| {
                Error(format!(
                    "clipseg: {}: {e}",
                    dir.join("config.json").display()
                ))
            })?;
        // CIDAS's processor: 352², ImageNet's mean and deviation.
        let pre = read_json(&dir.join("preprocessor_config.json")).unwrap_or(json!({}));
        let size = pre["size"]["height"]
            .as_u64()
            .or_else(|| pre["size"].as_u64())
            .unwrap_or(352) as usize;
        let three = |k: &str, d: [f32; 3]| -> [f32; 3] {
            match pre[k]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect::<Vec<_>>())
            {
                Some(v) if v.len() == 3 => [v[0] as f32, v[1] as f32, v[2] as f32],
                _ => d,
            }
        };
        let weights = Weights::open(&dir.join("model.safetensors").to_string_lossy())?;
        Ok(Self {
            model: ClipSeg::load(&weights, config, size, dir)?,
            tokenizer: ClipTokenizer::from_dir(dir)?,
            mean: three("image_mean", [0.485, 0.456, 0.406]),
            std: three("image_std", [0.229, 0.224, 0.225]),
        })
    }

    /// The processor's pixel values for an RGB `[3, H, W]` image in 0..1: resized (bilinear,
    /// as PIL's), rescaled and normalised, `[1, 3, size, size]`.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        let (w, h, bytes) = image.to_rgb8("clipseg")?;
        let rgb = image::RgbImage::from_raw(w, h, bytes)
            .ok_or_else(|| Error::msg("clipseg: image size"))?;
        let s = self.model.size;
        let small = image::imageops::resize(
            &rgb,
            s as u32,
            s as u32,
            image::imageops::FilterType::Triangle,
        );
        let mut out = vec![0f32; 3 * s * s];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                out[c * s * s + i] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Tensor::from_f32(&out, &[1, 3, s, s])
    }

    /// The logits `[P, h, w]` for prepared pixel values and prompts.
    pub fn logits(&self, pixel_values: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?);
        }
        self.model.logits(pixel_values, &ids, prompts.len())
    }
}

impl Masker for ClipSegMasker {
    fn mask(&mut self, image: &Tensor, prompt: &str) -> Result<Tensor> {
        let prompts: Vec<&str> = prompt
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if prompts.is_empty() {
            bail!("clipseg needs a prompt: what to mask (several separated by commas)");
        }
        self.logits(&self.pixel_values(image)?, &prompts)?.sigmoid()
    }
}

pub struct ClipSegPlugin;

impl Plugin for ClipSegPlugin {
    const NAME: &'static str = "mask-clipseg";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Masker,
            id: "clipseg".into(),
            version: Self::VERSION.into(),
            description: "ClipSeg (CIDAS/clipseg-rd64-refined): masks what the prompt names; \
                          several prompts separated by commas"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "model_path": {"type": ["string", "null"], "description": "the model's folder"}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Masker, "clipseg") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Masker(Box::new(ClipSegMasker::new(
            o.model_path.as_deref(),
        )?)))
    }
}

export_plugin!(ClipSegPlugin);
