//! What BLIP's and BLIP-2's processors share: the model folder's JSON files and tokenizer, and
//! the image resized to the processor's size (bicubic), rescaled and normalised.

use std::path::Path;

use ferrite_plugin_api::{Error, Result, Tensor, serde_json};

pub(crate) fn tokenizer(name: &str, dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error(format!("{name}: {}: {e}", path.display())))
}

pub(crate) fn decode(name: &str, tokenizer: &tokenizers::Tokenizer, ids: &[i64]) -> Result<String> {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    tokenizer
        .decode(&ids, true)
        .map_err(|e| Error(format!("{name}: decoding: {e}")))
}

/// `preprocessor_config.json`'s square size, mean and deviation (OpenAI CLIP's by default).
pub(crate) struct Processor {
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Processor {
    pub(crate) fn load(dir: &Path, default_size: usize) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let pre = if path.is_file() {
            ferrite_blocks::folder::read_json(&path)?
        } else {
            serde_json::Value::Null
        };
        let size = pre["size"]["height"]
            .as_u64()
            .or_else(|| pre["size"].as_u64())
            .map_or(default_size, |s| s as usize);
        let three = |k: &str, d: [f32; 3]| -> [f32; 3] {
            match pre[k]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect::<Vec<_>>())
            {
                Some(v) if v.len() == 3 => [v[0] as f32, v[1] as f32, v[2] as f32],
                _ => d,
            }
        };
        Ok(Self {
            size,
            mean: three("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73]),
            std: three("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1]),
        })
    }

    /// The pixel values `[1, 3, size, size]` for an RGB `[3, H, W]` image in 0..1.
    pub(crate) fn pixel_values(&self, name: &str, image: &Tensor) -> Result<Tensor> {
        let (w, h, bytes) = image.to_rgb8(name)?;
        let rgb = image::RgbImage::from_raw(w, h, bytes)
            .ok_or_else(|| Error(format!("{name}: image size")))?;
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
}
