//! Sample images during training.

use std::path::PathBuf;

use super::groups::{EvalWeights, Untracked};
use super::{Result, Trainer, err};
use crate::sample::generate;

impl Trainer {
    /// Writes a PNG per configured sample under `workspace/samples/<n>-<prompt>/<step>.png`.
    pub fn sample(&mut self) -> Result<Vec<PathBuf>> {
        let _scope = self.scope.enter();
        let _untracked = Untracked::new(&self.groups)?;
        let _eval = EvalWeights::new(&self.groups)?;
        self.model.set_training(false).map_err(err)?;
        let mut out = Vec::new();
        for (i, s) in self.config.samples.iter().enumerate() {
            let req = generate::SampleRequest {
                prompt: s.prompt.clone(),
                negative_prompt: s.negative_prompt.clone(),
                steps: s.diffusion_steps,
                cfg: Some(s.cfg_scale),
                seed: s.seed,
                width: s.width,
                height: s.height,
                sampler: s.sampler,
                init_noise: None,
                prediction_type: self.config.forced_prediction().map(str::to_string),
            };
            let rgb = generate::generate(&self.arch, &req, || {}).map_err(err)?;
            let slug: String = s
                .prompt
                .chars()
                .map(|ch| {
                    if ch.is_alphanumeric() {
                        ch.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .take(40)
                .collect();
            let path = self
                .workspace
                .join("samples")
                .join(format!("{i}-{slug}"))
                .join(format!("{:06}.png", self.progress.step));
            std::fs::create_dir_all(path.parent().expect("sample folder")).map_err(err)?;
            generate::write_png(&path, s.width, s.height, rgb).map_err(err)?;
            if let Some(tb) = &mut self.tensorboard {
                let tag = format!("samples/{i}-{slug}");
                let written = std::fs::read(&path).and_then(|png| {
                    tb.image(
                        &tag,
                        self.progress.step,
                        s.width as u32,
                        s.height as u32,
                        &png,
                    )
                });
                if let Err(e) = written {
                    tracing::warn!("tensorboard {}: {e}", tb.path().display());
                }
            }
            out.push(path);
        }
        self.model.set_training(true).map_err(err)?;
        Ok(out)
    }
}
