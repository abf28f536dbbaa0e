//! OneTrainer's multi-GPU mode (`multi_gpu`, `device_indexes`): one command trains on several
//! devices of this machine, one process per device as OneTrainer's torch spawn does. This
//! process is rank 0 on the first device; it starts `ferrite train` for each other one, all
//! meeting through a coordinator on a free local port, as a data-parallel run between processes
//! (see the trainer's `parallel` module). The processes share the workspace and its cache
//! folder: each cache entry is encoded by the process whose rows need it first, the others read
//! it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::TrainConfig;
use crate::runtime::collective;
use crate::train::trainer::{DataParallel, TrainError};

type Result<T> = std::result::Result<T, TrainError>;

/// How long a data-parallel process waits for every process to join, and for the others at a
/// step (rank 0 samples and writes backups between steps while the others wait).
pub const TIMEOUTS: (Duration, Duration) = (Duration::from_secs(300), Duration::from_secs(1800));

/// `device_indexes` as a list: two distinct indexes at least.
pub fn device_indexes(s: &str) -> std::result::Result<Vec<u32>, String> {
    let indexes = s
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.parse::<u32>()
                .map_err(|_| format!("`{i}` is not a device index"))
        })
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    if indexes.len() < 2 {
        return Err(format!(
            "`{s}`: multi_gpu needs two devices at least, e.g. \"0,1\""
        ));
    }
    if let Some(i) = indexes
        .iter()
        .find(|&&i| indexes.iter().filter(|&&j| j == i).count() > 1)
    {
        return Err(format!("`{s}`: device {i} is listed twice"));
    }
    Ok(indexes)
}

/// The device of index `i`: the CPU stays the CPU (one process per index), anything else is
/// CUDA device `i`.
fn device(train_device: &str, i: u32) -> String {
    if train_device.trim() == "cpu" {
        "cpu".into()
    } else {
        format!("cuda:{i}")
    }
}

/// `count` consecutive ports free now, from torch.distributed's 29500 up: below Linux's
/// ephemeral range, so no outgoing connection takes one before its process listens.
fn free_ports(count: u16) -> Result<Vec<u16>> {
    (29_500..32_000u16)
        .step_by(usize::from(count))
        .map(|p| (p..p + count).collect::<Vec<u16>>())
        .find(|block| block.iter().all(|&p| !collective::port_taken(p)))
        .ok_or_else(|| TrainError("multi_gpu: no free local ports from 29500 to 32000".into()))
}

/// The processes this one started, with their logs.
pub struct Peers {
    children: Vec<(u32, Child, PathBuf)>,
}

/// What [`launch`] gives rank 0: its config (on the first device), its place in the run, and the
/// other processes.
pub struct Launched {
    pub config: TrainConfig,
    pub parallel: DataParallel,
    pub peers: Peers,
}

/// Starts the processes of ranks 1 and up of `config`'s multi-GPU run (paths relative to
/// `base`) from the `ferrite` binary `exe`, each logging to `workspace/multi-gpu/rank-R.log`;
/// `timeouts`: joining, and waiting for the others at a step.
pub fn launch(
    config: &TrainConfig,
    base: &Path,
    exe: &Path,
    timeouts: (Duration, Duration),
) -> Result<Launched> {
    let indexes = device_indexes(&config.device_indexes)
        .map_err(|e| TrainError(format!("device_indexes: {e}")))?;
    let nodes = indexes.len() as u32;
    // The coordinator's port, then each rank's data port.
    let ports = free_ports(nodes as u16 + 1)?;
    let coordinator = format!("127.0.0.1:{}", ports[0]);
    // (An empty base, a config in the current folder, would not pass as an argument.)
    let base = &std::path::absolute(base.join("."))
        .map_err(|e| TrainError(format!("multi_gpu: {}: {e}", base.display())))?;
    let folder = base.join(&config.workspace_dir).join("multi-gpu");
    let each = |rank: usize| {
        let mut c = config.clone();
        (c.multi_gpu, c.train_device) = (false, device(&config.train_device, indexes[rank]));
        c
    };
    let config_file = folder.join("config.toml");
    crate::fsutil::write_atomic(&config_file, each(1).to_toml().as_bytes())
        .map_err(|e| TrainError(format!("multi_gpu: {e}")))?;
    let mut peers = Peers {
        children: Vec::new(),
    };
    for rank in 1..nodes {
        let log = folder.join(format!("rank-{rank}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| TrainError(format!("multi_gpu: {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| TrainError(format!("multi_gpu: {}: {e}", log.display())))?;
        let child = Command::new(exe)
            .arg("train")
            .arg("--config")
            .arg(&config_file)
            .arg("--base")
            .arg(base)
            .args([
                "--set",
                &format!("train_device=\"{}\"", each(rank as usize).train_device),
            ])
            .args(["--nodes", &nodes.to_string()])
            .args(["--node-rank", &rank.to_string()])
            .args(["--coordinator", &coordinator])
            .args(["--data-port", &ports[rank as usize + 1].to_string()])
            .args(["--join-timeout", &timeouts.0.as_secs().to_string()])
            .args(["--peer-timeout", &timeouts.1.as_secs().to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| TrainError(format!("multi_gpu: starting {}: {e}", exe.display())))?;
        tracing::info!(
            "rank {rank} on {}: output in {}",
            each(rank as usize).train_device,
            log.display()
        );
        peers.children.push((rank, child, log));
    }
    Ok(Launched {
        config: each(0),
        parallel: DataParallel {
            nodes,
            rank: 0,
            coordinator,
            host: "127.0.0.1".into(),
            data_port: ports[1],
            start_coordinator: true,
            join_timeout: timeouts.0,
            peer_timeout: timeouts.1,
        },
        peers,
    })
}

impl Peers {
    /// Waits for the other processes to end (after rank 0 ended `ok`, they end with it; after
    /// an error, they are given a minute to hear of it, then stopped); an error names a process
    /// that failed and its log.
    pub fn finish(mut self, ok: bool) -> std::result::Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(if ok { 600 } else { 60 });
        let mut failed = Vec::new();
        for (rank, child, log) in &mut self.children {
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => {
                        let _ = child.kill();
                        break child.wait().ok();
                    }
                }
            };
            if !status.is_some_and(|s| s.success()) {
                failed.push(format!("rank {rank} (its output: {})", log.display()));
            }
        }
        self.children.clear();
        match failed.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "multi_gpu: {} ended with an error",
                failed.join(", ")
            )),
        }
    }
}

impl Drop for Peers {
    /// Never leaves a started process behind.
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_indexes_are_read_and_checked() {
        assert_eq!(device_indexes("0,1, 3").unwrap(), [0, 1, 3]);
        assert!(device_indexes("0").unwrap_err().contains("two devices"));
        assert!(device_indexes("").unwrap_err().contains("two devices"));
        assert!(device_indexes("0,x").unwrap_err().contains("`x`"));
        assert!(device_indexes("1,1").unwrap_err().contains("twice"));
        assert_eq!(device("cpu", 3), "cpu");
        assert_eq!(device("auto", 3), "cuda:3");
    }
}
