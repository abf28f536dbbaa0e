//! Backups: the full state of a run (trainable tensors, optimizer states, EMA, progress and
//! config) in a folder built under a temporary name and renamed when complete, so a crash while
//! writing leaves the previous backup as the last one; and resuming from one.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{DType, Tensor, Weights};

use super::{Result, TrainError, Trainer, err};

/// The metadata that marks an optimizer state file keyed by parameter name.
const STATE_BY_NAME: (&str, &str) = ("ferrite_optimizer_state", "by-name");

impl Trainer {
    pub(super) fn backup_name(&self) -> String {
        format!("backup-{:09}", self.progress.step)
    }

    pub(super) fn backups_dir(&self) -> PathBuf {
        self.workspace.join("backup")
    }

    /// The newest complete backup.
    pub fn last_backup(&self) -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.backups_dir())
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
                    && p.join("state.json").exists()
            })
            .collect();
        dirs.sort();
        dirs.pop()
    }

    /// Writes the full state (trainable tensors, optimizer states, progress, config) to a new
    /// backup folder: built under a temporary name, then renamed; older ones beyond
    /// `rolling_backup_count` are removed.
    pub fn backup(&mut self) -> Result<PathBuf> {
        let _scope = self.scope.enter();
        let dir = self.backups_dir();
        let name = self.backup_name();
        let tmp = dir.join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(err)?;
        for g in &self.groups {
            let named: Vec<(&str, &Tensor)> = g
                .names
                .iter()
                .map(String::as_str)
                .zip(g.params.iter())
                .collect();
            let p = tmp.join(format!("{}.safetensors", g.part));
            ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[]).map_err(err)?;
            let state = g.optimizer.state().map_err(err)?;
            // Eval weights are derived from the rest (and never loaded back).
            let eval = format!(".{}", ferrite_plugin_api::optim::EVAL_FIELD);
            let named: Vec<(&str, &Tensor)> = state
                .iter()
                .filter(|(n, _)| !n.ends_with(&eval))
                .map(|(n, t)| (n.as_str(), t))
                .collect();
            let p = tmp.join(format!("{}-optimizer.safetensors", g.part));
            ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[STATE_BY_NAME])
                .map_err(err)?;
            // Tests stop the process here, mid-write (FAILPOINTS, debug builds).
            fail::fail_point!("backup-write");
            if let Some(ema) = &g.ema {
                let ema = ema.tensors().map_err(err)?;
                let named: Vec<(&str, &Tensor)> =
                    g.names.iter().map(String::as_str).zip(ema.iter()).collect();
                let p = tmp.join(format!("{}-ema.safetensors", g.part));
                ferrite_plugin_api::save_safetensors(&p.to_string_lossy(), &named, &[])
                    .map_err(err)?;
            }
        }
        crate::fsutil::write_atomic(&tmp.join("config.toml"), self.config.to_toml().as_bytes())
            .map_err(err)?;
        let state = serde_json::to_vec_pretty(&self.progress).map_err(err)?;
        crate::fsutil::write_atomic(&tmp.join("state.json"), &state).map_err(err)?;
        let path = dir.join(&name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::rename(&tmp, &path).map_err(err)?;
        // Persist the rename itself.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
            })
            .collect();
        all.sort();
        let keep = self.config.rolling_backup_count.max(1);
        // Only complete backups of ours go (a backup folder holds state.json).
        for old in all
            .iter()
            .filter(|p| p.join("state.json").is_file())
            .take(all.len().saturating_sub(keep))
        {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(path)
    }

    /// Loads a backup written by [`Trainer::backup`] into this run.
    pub(super) fn restore(&mut self, dir: &Path) -> Result<()> {
        let shown = dir.display();
        for g in &mut self.groups {
            let w = Weights::open(
                &dir.join(format!("{}.safetensors", g.part))
                    .to_string_lossy(),
            )
            .map_err(err)?;
            for (name, p) in g.names.iter().zip(&g.params) {
                // In the parameter's dtype (lora_weight_dtype), as the backup saved it.
                let t = w.get(name, p.dtype().map_err(err)?).map_err(|e| {
                    TrainError(format!(
                        "backup {shown}: {e} (the config's trained layers changed since the backup?)"
                    ))
                })?;
                let (want, got) = (p.shape().map_err(err)?, t.shape().map_err(err)?);
                if want != got {
                    return Err(TrainError(format!(
                        "backup {shown}: `{name}` has shape {got:?} but this config makes {want:?} \
                         (lora_rank or the model changed since the backup)"
                    )));
                }
                p.assign(&t).map_err(err)?;
            }
            let ow = Weights::open(
                &dir.join(format!("{}-optimizer.safetensors", g.part))
                    .to_string_lossy(),
            )
            .map_err(err)?;
            // Before ABI 2 optimizers kept state by position: it would land on other tensors.
            if !ow
                .metadata()
                .map_err(err)?
                .iter()
                .any(|(k, v)| (k.as_str(), v.as_str()) == STATE_BY_NAME)
            {
                return Err(TrainError(format!(
                    "backup {shown} was written by an older Ferrite, whose optimizer state cannot \
                     be resumed: start a new run from its weights (lora_base_model) instead"
                )));
            }
            let state = ow
                .infos()
                .iter()
                .map(|i| Ok((i.key.to_string(), ow.get(&i.key, i.dtype)?)))
                .collect::<ferrite_plugin_api::Result<Vec<_>>>()
                .map_err(err)?;
            g.optimizer.load_state(&state).map_err(err)?;
            if let Some(ema) = &mut g.ema {
                let ew = Weights::open(
                    &dir.join(format!("{}-ema.safetensors", g.part))
                        .to_string_lossy(),
                )
                .map_err(|e| TrainError(format!("backup {shown}: {e} (EMA was off then?)")))?;
                let values = g
                    .names
                    .iter()
                    .map(|name| {
                        let dtype = ew.info(name).map_or(DType::F32, |i| i.dtype);
                        ew.get(name, dtype)
                    })
                    .collect::<ferrite_plugin_api::Result<Vec<_>>>()
                    .map_err(err)?;
                ema.load(&values).map_err(err)?;
            }
        }
        let text = std::fs::read_to_string(dir.join("state.json")).map_err(err)?;
        self.progress = serde_json::from_str(&text)
            .map_err(|e| TrainError(format!("backup {shown}: state.json: {e}")))?;
        tracing::info!("resumed from {shown} at step {}", self.progress.step);
        Ok(())
    }
}
