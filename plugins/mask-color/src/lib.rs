//! The colour masker (OneTrainer's MaskByColor): the map is each pixel's Euclidean distance in
//! RGB (0..1 per channel) from the prompt's colour, so with the host's threshold the pixels
//! that are not the colour are masked — a subject in front of a plain background, given the
//! background's colour.

use ferrite_plugin_api::{
    Component, ComponentKind, Descriptor, Masker, Plugin, Result, Tensor, bail, export_plugin,
    parse_options,
    serde_json::{self, json},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

/// `#rrggbb`, `rrggbb` or `0xrrggbb` as RGB in 0..1.
pub fn parse_color(s: &str) -> Option<[f32; 3]> {
    let s = s.trim().trim_start_matches('#');
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if s.len() != 6 || !s.is_ascii() {
        return None;
    }
    let mut rgb = [0.0; 3];
    for (i, c) in rgb.iter_mut().enumerate() {
        *c = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()? as f32 / 255.0;
    }
    Some(rgb)
}

pub struct ColorMasker;

impl Masker for ColorMasker {
    fn mask(&mut self, image: &Tensor, prompt: &str) -> Result<Tensor> {
        // The first of the prompts, as OneTrainer takes it.
        let prompt = prompt.split(',').next().unwrap_or_default();
        let Some(rgb) = parse_color(prompt) else {
            bail!("color masker: the prompt `{prompt}` is not a hex colour like #00ff00");
        };
        let shape = image.shape()?;
        if shape.len() != 3 || shape[0] != 3 {
            bail!("color masker: the image is {shape:?}, not [3, height, width]");
        }
        let color = Tensor::from_f32(&rgb, &[3, 1, 1])?;
        image.sub(&color)?.powf(2.0)?.sum(&[0], true)?.sqrt()
    }
}

pub struct ColorPlugin;

impl Plugin for ColorPlugin {
    const NAME: &'static str = "mask-color";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn components() -> Vec<Descriptor> {
        vec![Descriptor {
            kind: ComponentKind::Masker,
            id: "color".into(),
            version: Self::VERSION.into(),
            description: "Masks the pixels that are not the prompt's colour (a hex colour like \
                          #00ff00); the threshold is the RGB distance (0..1.73)"
                .into(),
            options_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {}
            }),
        }]
    }

    fn instantiate(kind: ComponentKind, id: &str, options: serde_json::Value) -> Result<Component> {
        if (kind, id) != (ComponentKind::Masker, "color") {
            bail!("this library has no {kind} `{id}`");
        }
        let _: Options = parse_options(id, Options::default(), options)?;
        Ok(Component::Masker(Box::new(ColorMasker)))
    }
}

export_plugin!(ColorPlugin);

#[cfg(test)]
mod tests {
    use super::parse_color;

    #[test]
    fn colours_parse_as_onetrainer_writes_them() {
        assert_eq!(parse_color("#ff0000"), Some([1.0, 0.0, 0.0]));
        assert_eq!(parse_color("0x00FF00"), Some([0.0, 1.0, 0.0]));
        assert_eq!(parse_color(" 0000ff "), Some([0.0, 0.0, 1.0]));
        for bad in ["", "#fff", "#gg0000", "#ff00000", "ëëëë"] {
            assert_eq!(parse_color(bad), None, "{bad}");
        }
    }
}
