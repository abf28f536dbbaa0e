//! The built-in demo: a tiny pixel-space SD-layout model built from a seed (its configs and
//! tensor shapes ship in `presets/demo-model/`, no weights), and a toy dataset of coloured shapes
//! on plain backgrounds captioned "a red circle" and the like. `ferrite demo` makes both and
//! trains with `presets/demo.toml`.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::data::rng;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemoError(String);

type Result<T> = std::result::Result<T, DemoError>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> DemoError + '_ {
    move |e| DemoError(format!("{}: {e}", path.display()))
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))? {
        let p = e.map_err(io(from))?.path();
        let dest = to.join(p.file_name().unwrap_or_default());
        if p.is_dir() {
            copy_tree(&p, &dest)?;
        } else if p.file_name().is_some_and(|n| n != "shapes.json") {
            std::fs::copy(&p, &dest).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// Values for a fresh tensor, as torch initialises such layers: biases 0, norm scales 1,
/// embeddings N(0, 0.02), other weights U(±1/√fan_in).
fn init(key: &str, shape: &[usize], r: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if key.ends_with(".bias") {
        return vec![0.0; n];
    }
    if shape.len() == 1 {
        return vec![if key.contains("norm") { 1.0 } else { 0.0 }; n];
    }
    if key.contains("embedding") {
        let d = Normal::new(0.0f32, 0.02).expect("valid normal");
        return (0..n).map(|_| d.sample(r)).collect();
    }
    let bound = 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt();
    (0..n).map(|_| r.random_range(-bound..bound)).collect()
}

/// Writes the demo model into `out` (a diffusers folder) with weights drawn from `seed`.
pub fn build_model(description: &Path, out: &Path, seed: u64) -> Result<()> {
    copy_tree(description, out)?;
    let shapes_path = description.join("shapes.json");
    let text = std::fs::read_to_string(&shapes_path).map_err(io(&shapes_path))?;
    let files: BTreeMap<String, BTreeMap<String, Vec<usize>>> = serde_json::from_str(&text)
        .map_err(|e| DemoError(format!("{}: {e}", shapes_path.display())))?;
    for (fi, (file, tensors)) in files.iter().enumerate() {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .enumerate()
            .map(|(ti, (k, shape))| {
                let mut r = rng(seed, 100 + fi as u64, ti as u64);
                let bytes = init(k, shape, &mut r)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                (k.clone(), shape.clone(), bytes)
            })
            .collect();
        let views = data
            .iter()
            .map(|(k, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| DemoError(format!("{file}: {e}")))?;
        let bytes = safetensors::serialize(views, None).map_err(|e| DemoError(e.to_string()))?;
        let path = out.join(file);
        crate::fsutil::write_atomic(&path, &bytes).map_err(io(&path))?;
    }
    Ok(())
}

pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 190, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [230, 210, 40]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const BACKGROUNDS: [[u8; 3]; 3] = [[235, 235, 235], [150, 150, 150], [40, 40, 40]];

/// Writes `per_kind` images of each (colour, shape) pair, `size`×`size`, with `.txt` captions
/// such as "a red circle".
pub fn build_dataset(out: &Path, size: u32, per_kind: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    for (colour, rgb) in COLOURS {
        for shape in SHAPES {
            for i in 0..per_kind {
                let bg = BACKGROUNDS[r.random_range(0..BACKGROUNDS.len())];
                let s = size as f32;
                let radius = s * r.random_range(0.25..0.4);
                let (cx, cy) = (
                    r.random_range(radius..s - radius),
                    r.random_range(radius..s - radius),
                );
                let img = image::RgbImage::from_fn(size, size, |x, y| {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let inside = match shape {
                        "circle" => dx * dx + dy * dy <= radius * radius,
                        "square" => dx.abs() <= radius * 0.85 && dy.abs() <= radius * 0.85,
                        _ => dy <= radius * 0.8 && dy >= -radius && dx.abs() <= (dy + radius) * 0.6,
                    };
                    image::Rgb(if inside { rgb } else { bg })
                });
                let stem = format!("{colour}-{shape}-{i}");
                let png = out.join(format!("{stem}.png"));
                img.save(&png)
                    .map_err(|e| DemoError(format!("{}: {e}", png.display())))?;
                let txt = out.join(format!("{stem}.txt"));
                std::fs::write(&txt, format!("a {colour} {shape}\n")).map_err(io(&txt))?;
            }
        }
    }
    Ok(())
}

/// Mean red minus mean blue of an RGB image, in 0..255 units: how red it looks.
pub fn redness(rgb: &[u8]) -> f64 {
    let n = (rgb.len() / 3).max(1) as f64;
    rgb.chunks(3)
        .map(|p| p[0] as f64 - p[2] as f64)
        .sum::<f64>()
        / n
}
