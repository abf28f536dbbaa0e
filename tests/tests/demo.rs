//! The built-in demo learns: a shortened run of presets/demo.toml (a tiny pixel-space model from
//! a seeded random start, on generated coloured shapes) lowers the loss clearly, and its samples
//! for "red" prompts are redder than for "blue" prompts (same seed otherwise).

use ferrite::config::{TrainConfig, presets_dir};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite::train::demo;
use ferrite::train::trainer::{Event, Trainer};

const EPOCHS: usize = 15;

#[test]
fn the_demo_learns_colours() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::build_model(&presets_dir().join("demo-model"), &dir.join("model"), 0).unwrap();
    demo::build_dataset(&dir.join("data"), 16, 4, 0).unwrap();
    let sets = [
        format!("epochs={EPOCHS}"),
        "sample_after_unit=\"never\"".into(),
        "backup_after_unit=\"never\"".into(),
    ];
    let preset = presets_dir().join("demo.toml");
    let config = TrainConfig::load(None, Some(&preset.to_string_lossy()), &sets).unwrap();
    ferrite::runtime::init("cpu").unwrap();
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let mut trainer = Trainer::new(config, dir, registry).unwrap();
    let mut losses = Vec::new();
    trainer
        .run(|e| {
            if let Event::Step { loss, .. } = e {
                losses.push(loss);
            }
        })
        .unwrap();
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..12]), mean(&losses[losses.len() - 12..]));
    println!(
        "{} steps: mean loss of the first 12 {first:.4}, of the last 12 {last:.4}",
        losses.len()
    );
    assert!(last < 0.6 * first, "{first} -> {last}");

    // The preset's samples: a red circle, a blue circle, a yellow square (seed 1 each).
    let samples = trainer.sample().unwrap();
    let redness: Vec<f64> = samples
        .iter()
        .map(|p| demo::redness(image::open(p).unwrap().to_rgb8().as_raw()))
        .collect();
    println!(
        "redness (mean R - B) of the samples: red {:.1}, blue {:.1}",
        redness[0], redness[1]
    );
    assert!(redness[0] > redness[1] + 40.0, "{redness:?}");
    assert!(
        dir.join("output/model/unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
}
