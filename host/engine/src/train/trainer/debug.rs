//! OneTrainer's debug mode: at each debug step, per image of the step's last batch,
//! `<debug_dir>/<step>-<item>-input.png` (the image as it entered the VAE, after every
//! augmentation), `-mask.png` (with masked training), and `-target.png` / `-predicted.png` (the
//! target and the prediction turned into clean latents and decoded).

use ferrite_plugin_api::Tensor;

use super::batch::Forward;
use super::encode::Batch;
use super::{Result, Trainer, err};
use crate::config::TrainConfig;
use crate::data::{loader::Loaded, rgb_bytes};
use crate::sample::generate;

/// What the debug images of a batch are made from (kept past the step; no autodiff graph).
pub(super) struct Snapshot {
    bucket: (usize, usize),
    inputs: Vec<Vec<f32>>,
    masks: Vec<f32>,
    target_x0: Tensor,
    pred_x0: Tensor,
}

impl Snapshot {
    pub fn new(t: &Trainer, loaded: &Loaded, batch: &Batch, f: &Forward) -> Result<Self> {
        let x0 = |x: &Tensor| x.detach().and_then(|x| f.x0(&x, &t.noising)).map_err(err);
        Ok(Self {
            bucket: batch.bucket,
            inputs: loaded.inputs.clone(),
            masks: batch.masks.clone(),
            target_x0: x0(&f.target)?,
            pred_x0: x0(&f.pred)?,
        })
    }
}

impl Trainer {
    /// Writes the debug images of the last batch at the current step.
    pub(super) fn write_debug(&self, s: &Snapshot) -> Result<()> {
        let c = &self.config;
        let dir = TrainConfig::path(&self.base, &c.debug_dir);
        let (w, h) = s.bucket;
        let step = self.progress.step;
        let png = |name: String, bytes: Vec<u8>| {
            generate::write_png(&dir.join(name), w, h, bytes).map_err(err)
        };
        for (i, input) in s.inputs.iter().enumerate() {
            png(format!("{step}-{i}-input.png"), rgb_bytes(input, w, h))?;
            if c.masked_training {
                let m = &s.masks[i * w * h..(i + 1) * w * h];
                let grey = m
                    .iter()
                    .flat_map(|&v| [(v * 255.0).round() as u8; 3])
                    .collect();
                png(format!("{step}-{i}-mask.png"), grey)?;
            }
            for (x0, what) in [(&s.target_x0, "target"), (&s.pred_x0, "predicted")] {
                let one = x0.narrow(0, i, 1).map_err(err)?;
                let image = generate::decode(&self.arch, &self.info, &one).map_err(err)?;
                png(format!("{step}-{i}-{what}.png"), image)?;
            }
        }
        tracing::info!("debug images for step {step} in {}", dir.display());
        Ok(())
    }
}
