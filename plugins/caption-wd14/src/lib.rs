//! The WD14 taggers (SmilingWolf's `wd-v1-4-*-tagger-v2` and `wd-*-tagger-v3`) as a captioner, as
//! OneTrainer runs them (its WDModel): the published `model.onnx` through tract (pure Rust, in
//! this plugin), the image resized to the model's input (bicubic), BGR, 0..255, NHWC; the tags of
//! `selected_tags.csv` whose probability is above the general (category 0) or character
//! (category 4) threshold — or the MCut threshold with its floor — characters first, each by
//! probability, underscores as spaces, joined with ", "; the rating tags (category 9) left out
//! unless asked for (OneTrainer's current WDModel puts the likeliest first).

mod tags;

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    Captioner, Component, ComponentKind, Descriptor, Error, Plugin, Result, Tensor, bail,
    export_plugin, parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::{self as tract, Datum, Framework, InferenceModelExt, tvec};
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_core::model::IntoRunnable;
use tract_onnx::tract_hir::infer::Factoid;

pub use tags::{Tags, mcut};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The model's folder (with `model.onnx` and `selected_tags.csv`) or its `.onnx` file (the
    /// CSV beside it).
    pub model_path: Option<PathBuf>,
    /// None: OneTrainer's, 0.35, or 0.5 for an EVA02 tagger (its folder or file named so).
    pub general_threshold: Option<f64>,
    pub character_threshold: f64,
    /// MCut (Largeron et al. 2012) over the general tags' probabilities, at least
    /// `min_general_threshold`.
    pub use_mcut_general: bool,
    pub min_general_threshold: f64,
    /// MCut over the characters', at least 0.15 and `min_character_threshold`.
    pub use_mcut_character: bool,
    pub min_character_threshold: f64,
    /// Put the likeliest rating tag first.
    pub include_rating: bool,
}

impl Default for Options {
    fn default() -> Self {
        // OneTrainer's.
        Self {
            model_path: None,
            general_threshold: None,
            character_threshold: 0.85,
            use_mcut_general: false,
            min_general_threshold: 0.35,
            use_mcut_character: false,
            min_character_threshold: 0.15,
            include_rating: false,
        }
    }
}

type Plan = std::sync::Arc<tract::TypedRunnableModel>;

pub struct Wd14 {
    o: Options,
    plan: Plan,
    /// The model's input height and width.
    size: (usize, usize),
    tags: Tags,
}

fn err<'a>(what: &'a str, path: &'a Path) -> impl Fn(tract::TractError) -> Error + 'a {
    move |e| Error(format!("wd14: {what} {}: {e}", path.display()))
}

impl Wd14 {
    pub fn new(o: Options) -> Result<Self> {
        let Some(given) = o.model_path.clone() else {
            bail!(
                "wd14 needs --model-path: the tagger's folder (model.onnx and selected_tags.csv, \
                 from SmilingWolf/wd-v1-4-vit-tagger-v2 or another WD tagger)"
            );
        };
        let (onnx, csv) = if given.is_dir() {
            (given.join("model.onnx"), given.join("selected_tags.csv"))
        } else {
            let dir = given.parent().unwrap_or(Path::new("."));
            (given.clone(), dir.join("selected_tags.csv"))
        };
        for f in [&onnx, &csv] {
            if !f.is_file() {
                bail!(
                    "wd14: {} is missing (expected beside the model)",
                    f.display()
                );
            }
        }
        let tags = Tags::read(&csv)?;
        let mut o = o;
        if o.general_threshold.is_none() {
            let eva02 = given.to_string_lossy().to_lowercase().contains("eva02");
            o.general_threshold = Some(if eva02 { 0.5 } else { 0.35 });
        }
        let mut model = tract_onnx::onnx()
            .model_for_path(&onnx)
            .map_err(err("cannot read", &onnx))?;
        let fact = model.input_fact(0).map_err(err("no input in", &onnx))?;
        let dims: Vec<Option<usize>> = fact
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
            .collect();
        let (h, w) = match dims[..] {
            [_, Some(h), Some(w), Some(3)] => (h, w),
            _ => bail!(
                "wd14: {} takes {dims:?}, not a WD tagger's [batch, height, width, 3]",
                onnx.display()
            ),
        };
        model
            .set_input_fact(
                0,
                tract::InferenceFact::dt_shape(f32::datum_type(), [1, h, w, 3]),
            )
            .map_err(err("cannot fix the input of", &onnx))?;
        let plan = model
            .into_optimized()
            .map_err(err("cannot prepare", &onnx))?
            .into_runnable()
            .map_err(err("cannot plan", &onnx))?;
        Ok(Self {
            o,
            plan,
            size: (h, w),
            tags,
        })
    }

    /// The model's input for an RGB `[3, H, W]` image in 0..1 ([`model_input`] at its size).
    pub fn input(&self, image: &Tensor) -> Result<Vec<f32>> {
        model_input(image, self.size)
    }
    /// The model's probability for each tag, given its input.
    pub fn probabilities(&self, input: Vec<f32>) -> Result<Vec<f32>> {
        let (h, w) = self.size;
        let x = tract::Tensor::from_shape(&[1, h, w, 3], &input)
            .map_err(|e| Error(format!("wd14: {e}")))?;
        let out = self
            .plan
            .run(tvec!(x.into()))
            .map_err(|e| Error(format!("wd14: the model failed: {e}")))?;
        let probs: Vec<f32> = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| Error(format!("wd14: the model's output: {e}")))?
            .iter()
            .copied()
            .collect();
        if probs.len() != self.tags.len() {
            bail!(
                "wd14: the model gives {} probabilities, selected_tags.csv has {} tags",
                probs.len(),
                self.tags.len()
            );
        }
        Ok(probs)
    }
}

/// A WD tagger's input for an RGB `[3, H, W]` image in 0..1: resized to `(h, w)` (bicubic, as
/// PIL's default), BGR, 0..255, `[1, h, w, 3]` (OneTrainer's WDModel).
pub fn model_input(image: &Tensor, (h, w): (usize, usize)) -> Result<Vec<f32>> {
    let (iw, ih, bytes) = image.to_rgb8("wd14")?;
    let rgb =
        image::RgbImage::from_raw(iw, ih, bytes).ok_or_else(|| Error::msg("wd14: image size"))?;
    let resized = image::imageops::resize(
        &rgb,
        w as u32,
        h as u32,
        image::imageops::FilterType::CatmullRom,
    );
    Ok(resized
        .pixels()
        .flat_map(|p| [p[2] as f32, p[1] as f32, p[0] as f32])
        .collect())
}

impl Captioner for Wd14 {
    fn caption(&mut self, image: &Tensor, prompt: &str) -> Result<String> {
        let probs = self.probabilities(self.input(image)?)?;
        let tags = self.tags.caption(&probs, &self.o);
        Ok(match prompt.trim() {
            "" => tags,
            initial => format!("{initial} {tags}"),
        })
    }
}

pub struct Wd14Plugin;

impl Plugin for Wd14Plugin {
    const NAME: &'static str = "caption-wd14";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        let d = Options::default();
        vec![Descriptor {
            kind: ComponentKind::Captioner,
            id: "wd14".into(),
            version: Self::VERSION.into(),
            description: "WD14 tagger (SmilingWolf's wd-v1-4 / wd-*-tagger-v3 model.onnx with \
                          selected_tags.csv): booru tags above the thresholds"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "model_path": {"type": ["string", "null"], "description": "the tagger's folder or model.onnx"},
                    "general_threshold": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": d.general_threshold,
                                          "description": "empty: 0.35, or 0.5 for an EVA02 tagger"},
                    "character_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": d.character_threshold},
                    "use_mcut_general": {"type": "boolean", "default": d.use_mcut_general},
                    "min_general_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": d.min_general_threshold},
                    "use_mcut_character": {"type": "boolean", "default": d.use_mcut_character},
                    "min_character_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": d.min_character_threshold},
                    "include_rating": {"type": "boolean", "default": d.include_rating}
                }
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Captioner, "wd14") {
            bail!("this library has no {kind} `{id}`");
        }
        let o: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Captioner(Box::new(Wd14::new(o)?)))
    }
}

export_plugin!(Wd14Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/wd14")
    }

    fn expected() -> serde_json::Map<String, serde_json::Value> {
        let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    fn tagger(o: serde_json::Value) -> Wd14 {
        let mut o: Options = parse_options("wd14", Options::default(), o).unwrap();
        o.model_path = Some(fixture().join("model"));
        Wd14::new(o).unwrap()
    }

    /// tract runs the tagger as onnxruntime does, on the input OneTrainer feeds it, and the tags
    /// make WDModel's caption (tests/fixtures/gen/wd14.py), with the rating tag when asked.
    #[test]
    fn the_tagger_matches_onnxruntime_and_onetrainers_caption() {
        let t = tagger(json!({}));
        let with_rating = tagger(json!({"include_rating": true}));
        for (name, e) in expected() {
            let probs = t.probabilities(floats(&e["input"])).unwrap();
            let want = floats(&e["probabilities"]);
            let d = probs
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("{name}: largest difference from onnxruntime {d:.2e}");
            assert!(d < 1e-5, "{name}: {d}");
            assert_eq!(t.tags.caption(&probs, &t.o), e["caption"], "{name}");
            assert_eq!(
                with_rating.tags.caption(&probs, &with_rating.o),
                e["caption_with_rating"],
                "{name}"
            );
        }
    }

    /// The thresholds choose the tags: none pass 1, MCut keeps the tags above the largest
    /// gap.
    #[test]
    fn the_thresholds_choose_the_tags() {
        let (_, e) = expected().into_iter().next().unwrap();
        let probs = floats(&e["probabilities"]);
        let strict = tagger(json!({"general_threshold": 1.0, "character_threshold": 1.0}));
        assert_eq!(strict.tags.caption(&probs, &strict.o), "");
        let loose = tagger(json!({"general_threshold": 0.0}));
        let all = loose.tags.caption(&probs, &loose.o);
        assert!(all.matches(", ").count() > e["caption"].as_str().unwrap().matches(", ").count());
        let mcut = tagger(json!({"use_mcut_general": true, "min_general_threshold": 0.0}));
        assert_ne!(mcut.tags.caption(&probs, &mcut.o), all);
    }

    #[test]
    fn a_missing_model_says_what_it_expected() {
        let o = Options {
            model_path: Some(fixture().join("images")),
            ..Options::default()
        };
        let e = Wd14::new(o).err().unwrap().to_string();
        assert!(e.contains("model.onnx is missing"), "{e}");
        let e = Wd14::new(Options::default()).err().unwrap().to_string();
        assert!(e.contains("--model-path"), "{e}");
    }
}
