//! Data-parallel runs between processes (OneTrainer's multi-GPU mode, across machines too):
//! every process holds the whole model and trains on its share of each batch (`batch_size`
//! rows of a batch `batch_size × processes` large, planned and noised as one process would);
//! the gradients are averaged once per optimizer step, before clipping (in buckets of 256 MiB),
//! so the processes take the same steps. Before that, a small exchange carries each process's
//! word (go on, stop, failed), its step time and its loss: a stop asked of any process
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
    /// Whether rank 0 runs the coordinator (else `ferrite coordinator` does).
    pub start_coordinator: bool,
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

/// Gradient elements averaged in one all-reduce (256 MiB of f32).
pub const BUCKET: usize = 1 << 26;

/// What the exchange before a step's all-reduce gives back, by rank.
struct Exchanged {
    words: Vec<u8>,
    times: Vec<f32>,
    losses: Vec<f32>,
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
        if collective::port_taken(dp.data_port) {
            return Err(TrainError(format!(
                "rank {}: its data port {} is in use on this machine: give another with \
                 --data-port",
                dp.rank, dp.data_port
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
            if dp.start_coordinator {
                if collective::port_taken(port) {
                    return Err(TrainError(format!(
                        "--coordinator {}: port {port} is in use on this machine: choose \
                         another, or give rank 0 --external-coordinator when `ferrite \
                         coordinator` runs there",
                        dp.coordinator
                    )));
                }
                collective::start_coordinator(port).map_err(TrainError)?;
            }
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
        let device = self.scope.device.clone();
        let failed = |e: String| {
            device.collective_reset();
            TrainError(e)
        };
        match rx.recv_timeout(dp.join_timeout) {
            Ok(joined) => joined.map_err(failed)?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(failed(format!(
                    "rank {}: joining through {} failed (see the log above)",
                    dp.rank, dp.coordinator
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(failed(format!(
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
        let agreed = self.check_agreement().and_then(|()| self.check_batches());
        if agreed.is_err() {
            self.leave(false);
        }
        agreed
    }

    /// Only whole batches of the run are trained: a run without one is refused, and the images
    /// an epoch leaves out (buckets that do not fill a batch) are counted in [`Self::joined`].
    fn check_batches(&self) -> Result<()> {
        if self.batches_per_epoch == 0 {
            return Err(TrainError(format!(
                "no bucket holds a whole batch of {} images (batch_size {} × {} processes): \
                 lower batch_size or add images",
                self.config.batch_size * self.processes(),
                self.config.batch_size,
                self.processes()
            )));
        }
        Ok(())
    }

    /// What a data-parallel process says when it starts: its rank, the global batch, and the
    /// images each epoch leaves out.
    pub fn joined(&self) -> Option<String> {
        let p = self.parallel.as_ref()?;
        let c = &self.config;
        let (batch, accum) = (
            c.batch_size * p.nodes as usize,
            c.gradient_accumulation_steps,
        );
        let images = |plan: Vec<data::BatchPlan>| plan.iter().map(|b| b.items.len()).sum::<usize>();
        let left_out = images(data::plan_global_epoch(&self.data, c, &self.buckets, 0, 1))
            .saturating_sub(images(self.plan(0)));
        let mut line = format!(
            "data-parallel: rank {} of {}, {} images of each batch of {batch} (× {accum} \
             accumulation steps: {} images per optimizer step)",
            p.rank,
            p.nodes,
            c.batch_size,
            batch * accum
        );
        if left_out > 0 {
            line += &format!(
                "; {left_out} images of the first epoch are left out (only whole batches are \
                 trained: buckets that do not fill one)"
            );
        }
        Some(line)
    }

    /// Every process must plan the same run from the same point: the config, the batches per
    /// epoch, the trained parameters and the progress (a resumed run's, from rank 0's backup)
    /// are compared once, so that a difference stops every process here instead of leaving one
    /// waiting in a step the others never take.
    fn check_agreement(&mut self) -> Result<()> {
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
        let mut mean = |v: &[f32]| -> Result<Vec<f32>> {
            let t = Tensor::from_f32(v, &[v.len()]).map_err(err)?;
            self.reduce(&t)?.to_vec().map_err(err)
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

    /// Leaves the run: the coordinator is told this process is done (so a separate coordinator
    /// can serve the next run), and after a failure this process's side is replaced (it may be
    /// dead or stuck with a process that is gone), so the GUI can start another run.
    pub(super) fn leave(&mut self, ended_well: bool) {
        let device = self.scope.device.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // On a thread, waited for 10 s at most: with the others gone, burn-collective's calls
        // may wait forever or panic.
        std::thread::spawn(move || {
            let _ = tx.send(device.collective_leave().is_ok());
        });
        let left = rx.recv_timeout(std::time::Duration::from_secs(10)) == Ok(true);
        if !left {
            tracing::warn!("leaving the data-parallel run did not finish");
        }
        if !ended_well || !left {
            self.scope.device.collective_reset();
        }
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

    /// The gradients averaged over the processes (in place), the step's loss averaged (read
    /// to the host: the step's one host read), whether any process was asked to stop (then all
    /// stop after this step, together), and each process's step time (from `began` to its
    /// loss on the host, before waiting for the others); alone, as they are.
    pub(super) fn average(
        &mut self,
        grads: &mut [Vec<Option<Tensor>>],
        loss: Tensor,
        began: std::time::Instant,
    ) -> Result<(f32, bool, Vec<f32>)> {
        let asked = self.controls.cancel.is_cancelled();
        // (Reading it waits for the step's work on the device.)
        let loss = loss.item().map_err(err)?;
        let busy = began.elapsed();
        if self.parallel.is_none() {
            return Ok((loss, asked, Vec::new()));
        }
        let word = if asked { Word::Stop } else { Word::GoOn };
        let all = self.exchange(word, busy.as_secs_f32(), loss)?;
        let failed: Vec<u32> = (0..all.words.len() as u32)
            .filter(|&r| all.words[r as usize] == Word::Failed as u8)
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
        let stop = all.words.contains(&(Word::Stop as u8));
        let mut present: Vec<(usize, usize)> = Vec::new();
        for (gi, row) in grads.iter().enumerate() {
            for (pi, g) in row.iter().enumerate() {
                if g.is_some() {
                    present.push((gi, pi));
                }
            }
        }
        let taken: Vec<Tensor> = present
            .iter()
            .filter_map(|&(gi, pi)| grads[gi][pi].take())
            .collect();
        let means = mean_in_buckets(taken, BUCKET, |b| self.reduce(b))?;
        for (&(gi, pi), g) in present.iter().zip(means) {
            grads[gi][pi] = Some(g);
        }
        let mean_loss = all.losses.iter().sum::<f32>() / all.losses.len() as f32;
        Ok((mean_loss, stop, all.times))
    }

    /// Every process's word, step time (seconds) and loss: each fills its own slots of a
    /// vector, and the mean times the count gives them back.
    fn exchange(&mut self, word: Word, secs: f32, loss: f32) -> Result<Exchanged> {
        let Some(p) = &self.parallel else {
            return Ok(Exchanged {
                words: vec![word as u8],
                times: vec![secs],
                losses: vec![loss],
            });
        };
        let (n, rank) = (p.nodes as usize, p.rank as usize);
        let mut mine = vec![0f32; 3 * n];
        (mine[rank], mine[n + rank], mine[2 * n + rank]) = (word as u8 as f32, secs, loss);
        let t = Tensor::from_f32(&mine, &[3 * n]).map_err(err)?;
        let all: Vec<f32> = self
            .reduce(&t)?
            .to_vec()
            .map_err(err)?
            .iter()
            .map(|v| v * n as f32)
            .collect();
        Ok(Exchanged {
            words: all[..n].iter().map(|w| w.round() as u8).collect(),
            times: all[n..2 * n].to_vec(),
            losses: all[2 * n..].to_vec(),
        })
    }

    /// Waits for every process to get here (`peer_timeout` at most once the first has).
    pub(super) fn barrier(&mut self) -> Result<()> {
        if self.parallel.is_none() {
            return Ok(());
        }
        let t = Tensor::zeros(&[1], ferrite_plugin_api::DType::F32).map_err(err)?;
        self.reduce(&t)?.to_vec().map_err(err)?;
        Ok(())
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
                let _ = self.exchange(Word::Failed, 0.0, 0.0);
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

/// The means of `tensors` over the processes, each of its shape and dtype, averaged in f32 by
/// `reduce` a bucket of `bucket` elements at a time (whole tensors; a larger one alone), so a
/// full fine-tune's gradients never need a second whole copy, nor burn-collective's serialised
/// ones of it. Each bucket's sources are dropped once they are in the bucket.
pub fn mean_in_buckets(
    tensors: Vec<Tensor>,
    bucket_size: usize,
    mut reduce: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(tensors.len());
    let mut left = tensors.into_iter().peekable();
    while left.peek().is_some() {
        let (mut bucket, mut n) = (Vec::new(), 0);
        while let Some(t) = left.peek() {
            let shape = t.shape().map_err(err)?;
            let len: usize = shape.iter().product();
            if !bucket.is_empty() && n + len > bucket_size {
                break;
            }
            let t = left.next().expect("peeked");
            let dtype = t.dtype().map_err(err)?;
            n += len;
            bucket.push((t, shape, dtype));
        }
        let flat = bucket
            .iter()
            .map(|(t, ..)| t.cast(DType::F32).and_then(|t| t.reshape(&[-1])))
            .collect::<std::result::Result<Vec<_>, _>>()
            .and_then(|mut parts| match parts.len() {
                // (One tensor needs no copy.)
                1 => Ok(parts.remove(0)),
                _ => Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0),
            })
            .map_err(err)?;
        let kinds: Vec<(Vec<usize>, DType)> = bucket.into_iter().map(|(_, s, d)| (s, d)).collect();
        let mean = reduce(&flat)?;
        drop(flat);
        let mut at = 0;
        for (shape, dtype) in kinds {
            let len: usize = shape.iter().product();
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            out.push(
                mean.narrow(0, at, len)
                    .and_then(|g| g.reshape(&dims))
                    .and_then(|g| g.cast(dtype))
                    .map_err(err)?,
            );
            at += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole tensors fill each bucket up to its size (a larger one alone), and each mean comes
    /// back in its tensor's shape and dtype.
    #[test]
    fn buckets_hold_whole_tensors_and_give_back_each_shape() {
        crate::runtime::init("cpu").unwrap();
        let shapes: [&[usize]; 4] = [&[3], &[5, 1], &[2], &[7]];
        let tensors: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n).map(|k| (i * 10 + k) as f32).collect();
                let t = Tensor::from_f32(&v, s).unwrap();
                if i == 1 {
                    t.cast(DType::BF16).unwrap()
                } else {
                    t
                }
            })
            .collect();
        let inputs: Vec<Vec<f32>> = tensors.iter().map(|t| t.to_vec().unwrap()).collect();
        let mut sizes = Vec::new();
        let means = mean_in_buckets(tensors, 8, |b| {
            sizes.push(b.shape().unwrap()[0]);
            b.mul_scalar(2.0).map_err(err)
        })
        .unwrap();
        assert_eq!(sizes, [8, 2, 7]);
        for ((m, s), x) in means.iter().zip(shapes).zip(inputs) {
            assert_eq!(m.shape().unwrap(), s);
            let doubled: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
            assert_eq!(m.to_vec().unwrap(), doubled);
        }
        assert_eq!(means[1].dtype().unwrap(), DType::BF16);
    }
}
