//! Data-parallel runs between processes (OneTrainer's multi-GPU mode, across machines too):
//! every process holds the whole model and trains on its share of each batch (`batch_size`
//! rows of a batch `batch_size × processes` large, planned and noised as one process would);
//! the gradients and the logged loss are averaged with one all-reduce per optimizer step,
//! before clipping, so the processes take the same steps. Before it, a small exchange carries
//! each process's word (go on, stop, failed) and its step time: a stop asked of any process
//! stops all after the same step, and an error in one stops all, rank 0 writing a backup; a
//! process that goes silent (killed, its machine gone) stops the others after `peer_timeout`.
//! Only the first process (rank 0) writes: samples, validation, backups, TensorBoard and the
//! output.

use crate::runtime::collective::{self, Setup};
use ferrite_plugin_api::{DType, Tensor};

use super::{Event, Result, TrainError, Trainer, err};
use crate::config::TimeUnit;
use crate::data;

/// One process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct DataParallel {
    /// Processes in the run.
    pub nodes: u32,
    /// This process's rank, 0 to `nodes - 1`; rank 0 runs the coordinator.
    pub rank: u32,
    /// The coordinator, `host:port`.
    pub coordinator: String,
    /// This process's host as the others reach it, and its data service's port.
    pub host: String,
    pub data_port: u16,
    /// How long to wait for every process to join.
    pub join_timeout: std::time::Duration,
    /// How long to wait for the others at a step before calling them gone (rank 0 samples and
    /// writes backups between steps while the others wait).
    pub peer_timeout: std::time::Duration,
}

/// What the exchanges have shown of the other processes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) enum Peers {
    #[default]
    Answering,
    /// These ranks failed (each says why in its own output).
    Failed(Vec<u32>),
    /// A process went away: its connection broke, or no answer within `peer_timeout`.
    Gone,
}

/// A process's word in the exchange before each step's all-reduce.
#[derive(Clone, Copy, PartialEq)]
enum Word {
    GoOn = 0,
    Stop = 1,
    Failed = 2,
}

impl Trainer {
    /// Joins the data-parallel run `dp` describes (rank 0 starts its coordinator first); the
    /// epoch is replanned in shares.
    pub fn join(&mut self, dp: DataParallel) -> Result<()> {
        if dp.nodes < 2 || dp.rank >= dp.nodes {
            return Err(TrainError(format!(
                "--node-rank {} of --nodes {}: ranks go from 0 to nodes − 1, and a run needs 2 \
                 nodes at least",
                dp.rank, dp.nodes
            )));
        }
        if let Some(g) = self
            .groups
            .iter()
            .find(|g| g.stop.0 > 0.0 && !matches!(g.stop.1, TimeUnit::Step | TimeUnit::Epoch))
        {
            return Err(TrainError(format!(
                "{}'s stop_training_after is in {}s: each process keeps its own clock, so a \
                 data-parallel run needs steps or epochs there",
                g.part,
                format!("{:?}", g.stop.1).to_lowercase()
            )));
        }
        if dp.rank == 0 {
            let port = dp
                .coordinator
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    TrainError(format!("--coordinator {}: not HOST:PORT", dp.coordinator))
                })?;
            collective::start_coordinator(port).map_err(TrainError)?;
        }
        // Joining waits for every process: on a thread, so a missing one gives an error in time.
        let (device, setup) = (
            self.scope.device.clone(),
            Setup {
                nodes: dp.nodes,
                coordinator: dp.coordinator.clone(),
                host: dp.host.clone(),
                data_port: dp.data_port,
            },
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(device.collective_join(&setup)));
        match rx.recv_timeout(dp.join_timeout) {
            Ok(joined) => joined.map_err(TrainError)?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(TrainError(format!(
                    "rank {}: joining through {} failed (see the log above)",
                    dp.rank, dp.coordinator
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(TrainError(format!(
                    "rank {}: not every one of the {} processes joined through {} within {} s: \
                     start each with --nodes {} --coordinator {} and its own --node-rank",
                    dp.rank,
                    dp.nodes,
                    dp.coordinator,
                    dp.join_timeout.as_secs(),
                    dp.nodes,
                    dp.coordinator
                )));
            }
        }
        if dp.rank != 0 {
            self.tensorboard = None;
        }
        self.parallel = Some(dp);
        self.batches_per_epoch = self.plan(0).len();
        self.check_agreement()
    }

    /// Every process must plan the same run from the same point: the config, the batches per
    /// epoch, the trained parameters and the progress (a resumed run's, from rank 0's backup)
    /// are compared once, so that a difference stops every process here instead of leaving one
    /// waiting in a step the others never take.
    fn check_agreement(&self) -> Result<()> {
        use std::hash::{Hash, Hasher};
        let _scope = self.scope.enter();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // (Without what only rank 0 does.)
        let mut c = self.config.clone();
        (c.tensorboard, c.debug_mode) = (false, false);
        // (Nor where each computes.)
        c.train_device.clear();
        serde_json::to_string(&c).unwrap_or_default().hash(&mut h);
        let params: usize = self.groups.iter().map(|g| g.params.len()).sum();
        let p = &self.progress;
        // Each below 2^24, so f32 holds it exactly.
        let mine = [
            (h.finish() % (1 << 20)) as f32,
            self.batches_per_epoch as f32,
            params as f32,
            p.step as f32,
            p.epoch as f32,
            p.batch_in_epoch as f32,
        ];
        let device = &self.scope.device;
        let mean = |v: &[f32]| -> Result<Vec<f32>> {
            let t = Tensor::from_f32(v, &[v.len()]).map_err(err)?;
            Tensor::from_raw(device.all_reduce_mean(t.id()).map_err(TrainError)?)
                .to_vec()
                .map_err(err)
        };
        let all = mean(&mine)?;
        // A second round so that every process sees any one's mismatch.
        let differs = mine.iter().zip(&all).any(|(a, b)| a != b);
        if mean(&[differs as u8 as f32])?[0] > 0.0 {
            return Err(TrainError(
                "the processes do not agree on the run (the config, the data's batches per \
                 epoch, the trained parameters or the step resumed from): start each with the \
                 same config and data, and give them rank 0's backups when resuming"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The processes in the run (1 alone).
    pub(super) fn processes(&self) -> usize {
        self.parallel.as_ref().map_or(1, |p| p.nodes as usize)
    }

    /// Whether this process writes (samples, backups, TensorBoard, the output).
    pub(super) fn leader(&self) -> bool {
        self.parallel.as_ref().is_none_or(|p| p.rank == 0)
    }

    /// The epoch's batches: of this process alone, or of the whole data-parallel run.
    pub(super) fn plan(&self, epoch: u64) -> Vec<data::BatchPlan> {
        data::plan_global_epoch(
            &self.data,
            &self.config,
            &self.buckets,
            epoch,
            self.processes(),
        )
    }

    /// This process's share of a loaded batch.
    pub(super) fn share(&self, loaded: data::loader::Loaded) -> data::loader::Loaded {
        match &self.parallel {
            Some(p) => loaded.share(p.rank as usize, p.nodes as usize),
            None => loaded,
        }
    }

    /// The gradients and the step's loss averaged over the processes (in f32, as one tensor),
    /// whether any process was asked to stop (then all stop after this step, together), and
    /// each process's step time (`busy`, before waiting for the others); alone, as they are.
    pub(super) fn average(
        &mut self,
        grads: &mut [Vec<Option<Tensor>>],
        loss: Tensor,
        busy: std::time::Duration,
    ) -> Result<(Tensor, bool, Vec<f32>)> {
        let asked = self.controls.cancel.is_cancelled();
        if self.parallel.is_none() {
            return Ok((loss, asked, Vec::new()));
        }
        let mut parts = Vec::new();
        let mut layout = Vec::new();
        for (gi, row) in grads.iter().enumerate() {
            for (pi, g) in row.iter().enumerate() {
                if let Some(g) = g {
                    layout.push((gi, pi, g.shape().map_err(err)?, g.dtype().map_err(err)?));
                    parts.push(
                        g.cast(DType::F32)
                            .and_then(|g| g.reshape(&[-1]))
                            .map_err(err)?,
                    );
                }
            }
        }
        parts.push(
            loss.cast(DType::F32)
                .and_then(|l| l.reshape(&[1]))
                .map_err(err)?,
        );
        // Built before the exchange: past it, nothing but the all-reduce may fail.
        let all = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0).map_err(err)?;
        drop(parts);
        let word = if asked { Word::Stop } else { Word::GoOn };
        let (words, times) = self.exchange(word, busy.as_secs_f32())?;
        let failed: Vec<u32> = (0..words.len() as u32)
            .filter(|&r| words[r as usize] == Word::Failed as u8)
            .collect();
        if !failed.is_empty() {
            let said = failed
                .iter()
                .map(|r| format!("rank {r}"))
                .collect::<Vec<_>>()
                .join(", ");
            self.peers = Peers::Failed(failed);
            return Err(TrainError(format!(
                "{said} failed before step {} (its own output says why): every process stops",
                self.progress.step + 1
            )));
        }
        let stop = words.contains(&(Word::Stop as u8));
        let mean = self.reduce(&all)?;
        let mut at = 0;
        for (gi, pi, shape, dtype) in layout {
            let n: usize = shape.iter().product();
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            grads[gi][pi] = Some(
                mean.narrow(0, at, n)
                    .and_then(|g| g.reshape(&dims))
                    .and_then(|g| g.cast(dtype))
                    .map_err(err)?,
            );
            at += n;
        }
        Ok((mean.narrow(0, at, 1).map_err(err)?, stop, times))
    }

    /// Every process's word and step time (seconds): each fills its own slots of a vector and
    /// the mean times the count gives them back. (The one host read a data-parallel step adds.)
    fn exchange(&mut self, word: Word, secs: f32) -> Result<(Vec<u8>, Vec<f32>)> {
        let Some(p) = &self.parallel else {
            return Ok((vec![word as u8], vec![secs]));
        };
        let (n, rank) = (p.nodes as usize, p.rank as usize);
        let mut mine = vec![0f32; 2 * n];
        (mine[rank], mine[n + rank]) = (word as u8 as f32, secs);
        let t = Tensor::from_f32(&mine, &[2 * n]).map_err(err)?;
        let all: Vec<f32> = self
            .reduce(&t)?
            .to_vec()
            .map_err(err)?
            .iter()
            .map(|v| v * n as f32)
            .collect();
        let words = all[..n].iter().map(|w| w.round() as u8).collect();
        Ok((words, all[n..].to_vec()))
    }

    /// The mean of `t` over the processes, waiting `peer_timeout` at most.
    fn reduce(&mut self, t: &Tensor) -> Result<Tensor> {
        let Some(p) = &self.parallel else {
            return Ok(t.clone());
        };
        let (device, id, timeout) = (self.scope.device.clone(), t.id(), p.peer_timeout);
        let (tx, rx) = std::sync::mpsc::channel();
        // On a thread so that a silent peer gives an error in time (the thread stays blocked
        // until the process ends).
        std::thread::spawn(move || tx.send(device.all_reduce_mean(id)));
        let why = match rx.recv_timeout(timeout) {
            Ok(Ok(id)) => return Ok(Tensor::from_raw(id)),
            Ok(Err(e)) => format!("the connection to it broke ({e})"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                "the connection to it broke".into()
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                format!("no answer from it for {} s", timeout.as_secs())
            }
        };
        let others = if p.nodes == 2 {
            format!("rank {}", 1 - p.rank)
        } else {
            format!("one of the other {} processes", p.nodes - 1)
        };
        let rank = p.rank;
        self.peers = Peers::Gone;
        Err(TrainError(format!(
            "rank {rank}: {others} is gone at step {}: {why}. It stopped without a word \
             (killed, or its machine went away) or is stuck; its own output says more",
            self.progress.step + 1
        )))
    }

    /// After an error in a data-parallel run: one this process met itself is told to the
    /// others (they stop at their next step); one from the others has rank 0 write a backup of
    /// the step before it (the step's gradients were not applied) before the run ends.
    pub(super) fn after_failure(
        &mut self,
        e: TrainError,
        on_event: &mut impl FnMut(Event),
    ) -> TrainError {
        match self.peers.clone() {
            Peers::Answering => {
                let _ = self.exchange(Word::Failed, 0.0);
                e
            }
            Peers::Failed(_) | Peers::Gone if self.leader() => {
                self.progress = self.step_start;
                match self.backup() {
                    Ok(b) => {
                        on_event(Event::Backup(b.clone()));
                        TrainError(format!(
                            "{e}; rank 0 wrote {} at step {}: resume from it with \
                             continue_last_backup = true",
                            b.display(),
                            self.progress.step
                        ))
                    }
                    Err(b) => TrainError(format!("{e}; the backup failed too: {b}")),
                }
            }
            _ => e,
        }
    }

    /// The dropout seed of this process's rows: its own per rank (the same seed would give
    /// every process the same masks).
    pub(super) fn dropout_seed(&self, seed: u64) -> u64 {
        match &self.parallel {
            Some(p) if p.rank > 0 => seed ^ (u64::from(p.rank)).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            _ => seed,
        }
    }
}
