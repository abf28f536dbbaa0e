//! Rembg's U²-Net background removal as maskers, as OneTrainer runs them (its BaseRembgModel):
//! `rembg` takes `u2net.onnx`, `rembg-human` takes `u2net_human_seg.onnx`, run by tract (pure
//! Rust, in this plugin). The image is resized to 320×320 (Lanczos), divided by its largest
//! value, normalised with ImageNet's mean and deviation (NCHW); the model's first output's first
//! channel, scaled to 0..1 by its minimum and maximum, is the map (the subject high), which the
//! host smooths, resizes, thresholds and grows.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Error, Masker, Plugin, Result, Tensor, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::{self as tract, Datum, Framework, InferenceModelExt, tvec};
use tract_onnx::tract_core::model::IntoRunnable;

/// The model's input side.
pub const SIZE: usize = 320;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The `.onnx` file, or the folder holding it under rembg's name.
    pub model_path: Option<PathBuf>,
}

pub struct Rembg {
    plan: std::sync::Arc<tract::TypedRunnableModel>,
}

impl Rembg {
    /// The model at `given` (a file, or a folder with `file_name` in it).
    pub fn new(given: Option<&Path>, file_name: &str, id: &str) -> Result<Self> {
        let Some(given) = given else {
            bail!(
                "{id} needs --model-path: rembg's {file_name} (from rembg's releases), or the \
                 folder holding it"
            );
        };
        let onnx = if given.is_dir() {
            given.join(file_name)
        } else {
            given.to_path_buf()
        };
        if !onnx.is_file() {
            bail!("{id}: {} is missing", onnx.display());
        }
        let fail = |what: &str| {
            let shown = onnx.display().to_string();
            let what = what.to_string();
            move |e: tract::TractError| Error(format!("{id}: {what} {shown}: {e}"))
        };
        let plan = tract_onnx::onnx()
            .model_for_path(&onnx)
            .map_err(fail("cannot read"))?
            .with_input_fact(
                0,
                tract::InferenceFact::dt_shape(f32::datum_type(), [1, 3, SIZE, SIZE]),
            )
            .map_err(fail("cannot fix the input of"))?
            .into_optimized()
            .map_err(fail("cannot prepare"))?
            .into_runnable()
            .map_err(fail("cannot plan"))?;
        Ok(Self { plan })
    }

    /// The model's input for an RGB `[3, H, W]` image in 0..1 (OneTrainer's `__normalize`).
    pub fn input(image: &Tensor) -> Result<Vec<f32>> {
        let (w, h, bytes) = image.to_rgb8("rembg")?;
        let rgb = image::RgbImage::from_raw(w, h, bytes)
            .ok_or_else(|| Error::msg("rembg: image size"))?;
        let small = image::imageops::resize(
            &rgb,
            SIZE as u32,
            SIZE as u32,
            image::imageops::FilterType::Lanczos3,
        );
        let max = small.as_raw().iter().copied().max().unwrap_or(0).max(1) as f32;
        let mut out = vec![0f32; 3 * SIZE * SIZE];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                out[c * SIZE * SIZE + i] = (p[c] as f32 / max - MEAN[c]) / STD[c];
            }
        }
        Ok(out)
    }

    /// The first output's first channel, scaled to 0..1 (`[320 × 320]`).
    pub fn map(&self, input: Vec<f32>) -> Result<Vec<f32>> {
        let x = tract::Tensor::from_shape(&[1, 3, SIZE, SIZE], &input)
            .map_err(|e| Error(format!("rembg: {e}")))?;
        let out = self
            .plan
            .run(tvec!(x.into()))
            .map_err(|e| Error(format!("rembg: the model failed: {e}")))?;
        let first = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| Error(format!("rembg: the model's output: {e}")))?;
        if !matches!(first.shape(), [1, c, h, w] if *c >= 1 && *h == SIZE && *w == SIZE) {
            bail!(
                "rembg: the model's first output is {:?}, not [1, channels, 320, 320]",
                first.shape()
            );
        }
        // Its first channel.
        let values: Vec<f32> = first.iter().copied().take(SIZE * SIZE).collect();
        let (lo, hi) = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let span = hi - lo;
        Ok(values
            .iter()
            .map(|v| if span > 0.0 { (v - lo) / span } else { 0.0 })
            .collect())
    }
}

impl Masker for Rembg {
    fn mask(&mut self, image: &Tensor, _prompt: &str) -> Result<Tensor> {
        let map = self.map(Self::input(image)?)?;
        Tensor::from_f32(&map, &[1, SIZE, SIZE])
    }
}

pub struct RembgPlugin;

/// (id, rembg's file name, what it masks)
const MODELS: [(&str, &str, &str); 2] = [
    ("rembg", "u2net.onnx", "the foreground"),
    ("rembg-human", "u2net_human_seg.onnx", "people"),
];

impl Plugin for RembgPlugin {
    const NAME: &'static str = "mask-rembg";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        MODELS
            .iter()
            .map(|(id, file, what)| Descriptor {
                kind: ComponentKind::Masker,
                id: id.to_string(),
                version: Self::VERSION.into(),
                description: format!("Rembg's U²-Net ({file}): masks {what}; no prompt"),
                options_schema: json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "model_path": {"type": ["string", "null"], "description": format!("{file} or its folder")}
                    }
                }),
            })
            .collect()
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        let Some((id, file, _)) = MODELS.iter().find(|(i, _, _)| *i == id) else {
            bail!("this library has no {kind} `{id}`");
        };
        if kind != ComponentKind::Masker {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Masker(Box::new(Rembg::new(
            o.model_path.as_deref(),
            file,
            id,
        )?)))
    }
}

export_plugin!(RembgPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/rembg")
    }

    /// tract runs the U²-Net-shaped model as onnxruntime does, and the map is its min-max
    /// scaled first channel (tests/fixtures/gen/rembg.py: input[i] = sin(i / 1000), every 101st
    /// value of the map).
    #[test]
    fn the_map_matches_onnxruntime() {
        let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want: Vec<f32> = e["map_every_101st"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let m = Rembg::new(Some(&fixture()), "u2net.onnx", "rembg").unwrap();
        let input = (0..3 * SIZE * SIZE)
            .map(|i| (i as f64 / 1000.0).sin() as f32)
            .collect();
        let got: Vec<f32> = m.map(input).unwrap().into_iter().step_by(101).collect();
        assert_eq!(got.len(), want.len());
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        println!("largest difference from onnxruntime's map {d:.2e}");
        assert!(d < 1e-5, "{d}");
        let e = Rembg::new(Some(&fixture()), "u2net_human_seg.onnx", "rembg-human")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("u2net_human_seg.onnx is missing"), "{e}");
    }
}
