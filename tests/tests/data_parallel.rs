//! Data-parallel training between processes (`ferrite train --nodes 2 --node-rank R
//! --coordinator HOST:PORT`): two processes with `batch_size` b each take the same steps as one
//! process with 2b, and only rank 0 writes the output.

use std::path::Path;
use std::process::{Command, Stdio};

use ferrite::config::presets_dir;
use ferrite::train::demo;
use ferrite_plugin_api::{DType, Weights};
use ferrite_tests::ferrite_bin;

/// The demo's model, images and preset as `config.toml`, in a new folder.
fn demo_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo::build_model(&presets_dir().join("demo-model"), &d.join("model"), 0).unwrap();
    demo::build_dataset(&d.join("data"), 16, 4, 0).unwrap();
    std::fs::copy(presets_dir().join("demo.toml"), d.join("config.toml")).unwrap();
    dir
}

/// A port free now, below Linux's ephemeral range (so no outgoing connection of another test
/// takes it before its process listens), never the same twice in this test binary, and the
/// start of a block of four (a rank's default data port is the coordinator's + 1 + rank).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // (Below multi_gpu's 29500 too.)
    let base = 10_000 + (std::process::id() % 400) as u16 * 25;
    loop {
        let port = base + 4 * (NEXT.fetch_add(1, Ordering::Relaxed) % 2_000);
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

fn train(dir: &Path, home: &Path, extra: &[String]) -> Command {
    let mut cmd = Command::new(ferrite_bin());
    cmd.args([
        "train",
        "--config",
        dir.join("config.toml").to_str().unwrap(),
    ])
    .args(extra)
    .env("XDG_CONFIG_HOME", home)
    .env_remove("FERRITE_PLUGIN_PATH")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn unet(dir: &Path, out: &str) -> Vec<(String, Vec<f32>)> {
    let w = Weights::open(
        dir.join(out)
            .join("unet/diffusion_pytorch_model.safetensors")
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let mut all: Vec<(String, Vec<f32>)> = w
        .infos()
        .iter()
        .map(|i| {
            let t = w.get(&i.key, DType::F32).unwrap();
            (i.key.clone(), t.to_vec().unwrap())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Worst difference between two models relative to the largest weight of each tensor.
fn worst(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            x.iter()
                .zip(y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs() / scale))
        })
        .fold(0f32, f32::max)
}

/// The demo model (text encoder and UNet trained, warmup, caption dropout) for two epochs of
/// batches of 8 images: one process with `batch_size` 8 against two with 4 each (rank 0
/// writing), with AdamW and clipping without gradient accumulation (12 steps) and with 2 steps
/// of it (6 steps), and with plain SGD and no clipping (which, unlike AdamW, would show
/// gradients summed instead of averaged).
#[test]
fn two_processes_with_half_batches_train_as_one_with_the_whole() {
    ferrite::runtime::init("cpu").unwrap();
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let sets = |batch: usize, accum: usize, sgd: bool, out: &str| -> Vec<String> {
        let mut sets = vec![
            "epochs=2".to_string(),
            format!("batch_size={batch}"),
            format!("gradient_accumulation_steps={accum}"),
            "sample_after_unit=\"never\"".into(),
            "backup_after_unit=\"never\"".into(),
            format!("output_model_destination=\"{out}\""),
        ];
        if sgd {
            sets.extend([
                "optimizer.optimizer=\"sgd\"".into(),
                "clip_grad_norm=0".into(),
            ]);
        }
        sets.into_iter()
            .flat_map(|s| ["--set".to_string(), s])
            .collect()
    };
    let base = unet(d, "model");
    for (accum, sgd) in [(1, false), (2, false), (1, true)] {
        let (one_out, two_out) = (
            format!("one{accum}{sgd}/model"),
            format!("two{accum}{sgd}/model"),
        );
        let one = finish(
            train(d, home.path(), &sets(8, accum, sgd, &one_out))
                .spawn()
                .unwrap(),
        );
        assert!(
            one.status.success(),
            "{}",
            String::from_utf8_lossy(&one.stderr)
        );

        let outputs = run_pair(d, home.path(), &sets(4, accum, sgd, &two_out));
        let said = String::from_utf8_lossy(&outputs[0].stdout);
        assert!(
            said.contains(&format!(
                "rank 0 of 2, 4 images of each batch of 8 (× {accum} accumulation steps: {} \
                 images per optimizer step)",
                8 * accum
            )),
            "{said}"
        );
        assert!(!String::from_utf8_lossy(&outputs[1].stdout).contains("saved:"));
        // Each step line gives every process's step time (a line every 10 steps).
        if accum == 1 {
            assert!(
                said.contains("step 10:") && said.contains("(ranks "),
                "{said}"
            );
        }

        let (single, parallel) = (unet(d, &one_out), unet(d, &two_out));
        let moved = worst(&base, &single);
        let apart = worst(&single, &parallel);
        println!(
            "accumulation {accum}, sgd {sgd}: the run moved the UNet by {moved:.2e}; two \
             processes are {apart:.2e} from one"
        );
        assert!(moved > 1e-3, "{moved}");
        // Measured 8.5e-5 without accumulation (the two sum their gradients in another order,
        // and AdamW divides by square roots of tiny second moments); drawing each process's
        // noise for its own rows instead of cutting it from the whole batch's gives 1.7.
        assert!(apart < 1e-3, "{apart}");
    }
}

/// The process's output once it ends; killed (and the test failed) if it has not within two
/// minutes: a hang fails the test instead of stalling it.
fn finish(mut p: std::process::Child) -> std::process::Output {
    let start = std::time::Instant::now();
    while p.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(120) {
            p.kill().unwrap();
            let o = p.wait_with_output().unwrap();
            panic!(
                "a process hung:\n{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    p.wait_with_output().unwrap()
}

/// A started process whose standard output is read as it comes, so a test can wait for a line.
struct Running {
    /// (Taken by [`Running::finish`]; killed on drop, so a failed test leaves no process.)
    child: Option<std::process::Child>,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn watch(mut child: std::process::Child) -> Self {
        use std::io::BufRead;
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (stdout, into) = (child.stdout.take().unwrap(), out.clone());
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                let mut o = into.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        Running {
            child: Some(child),
            out,
            reader: Some(reader),
        }
    }

    /// Waits (two minutes at most) until the process has printed `text`.
    fn wait_for(&self, text: &str) {
        let start = std::time::Instant::now();
        while !self.out.lock().unwrap().contains(text) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(120),
                "no `{text}` in {}",
                self.out.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
        }
    }

    /// As [`finish`], with the standard output read so far.
    fn finish(mut self) -> std::process::Output {
        let mut o = finish(self.child.take().unwrap());
        self.reader.take().unwrap().join().unwrap();
        o.stdout = std::mem::take(&mut *self.out.lock().unwrap()).into_bytes();
        o
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Ranks 0 and 1 of a two-process run with `sets`, to their end; both must succeed.
fn run_pair(d: &Path, home: &Path, sets: &[String]) -> Vec<std::process::Output> {
    let coordinator = format!("127.0.0.1:{}", free_port());
    run_pair_through(d, home, sets, &coordinator, &[])
}

/// [`run_pair`] through `coordinator`, with `extra` flags on both.
fn run_pair_through(
    d: &Path,
    home: &Path,
    sets: &[String],
    coordinator: &str,
    extra: &[&str],
) -> Vec<std::process::Output> {
    let peers: Vec<_> = (0..2)
        .map(|rank| {
            let mut args = sets.to_vec();
            args.extend(
                [
                    "--nodes",
                    "2",
                    "--node-rank",
                    &rank.to_string(),
                    "--coordinator",
                    coordinator,
                    "--data-port",
                    &free_port().to_string(),
                ]
                .map(String::from),
            );
            args.extend(extra.iter().map(|s| s.to_string()));
            train(d, home, &args).spawn().unwrap()
        })
        .collect();
    let outputs: Vec<_> = peers.into_iter().map(finish).collect();
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {rank}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    outputs
}

/// `ferrite coordinator --port P` coordinates runs whose rank 0 is given
/// `--external-coordinator`, one after the other; without it, rank 0 finds the port taken and
/// says so. (The second run's batch of 10 leaves 8 of the 48 images out, and says so.)
#[test]
fn a_separate_coordinator_serves_runs() {
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let port = free_port();
    let mut coordinator = Command::new(ferrite_bin())
        .args(["coordinator", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let sets = |batch: usize| -> Vec<String> {
        [
            "epochs=1".to_string(),
            format!("batch_size={batch}"),
            "sample_after_unit=\"never\"".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    let at = format!("127.0.0.1:{port}");
    run_pair_through(d, home.path(), &sets(4), &at, &["--external-coordinator"]);
    let second = run_pair_through(d, home.path(), &sets(5), &at, &["--external-coordinator"]);
    let said = String::from_utf8_lossy(&second[0].stdout);
    assert!(
        said.contains("8 images of the first epoch are left out"),
        "{said}"
    );
    let mut args = sets(4);
    args.extend(["--nodes", "2", "--node-rank", "0", "--coordinator", &at].map(String::from));
    let taken = finish(train(d, home.path(), &args).spawn().unwrap());
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(
        !taken.status.success() && err.contains("is in use on this machine"),
        "{err}"
    );
}

/// A two-process run resumed from the backup rank 0 wrote after its first epoch (both
/// processes read it) ends where the uninterrupted run ends, bit for bit.
#[test]
fn a_resumed_two_process_run_repeats_the_uninterrupted_one() {
    ferrite::runtime::init("cpu").unwrap();
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let sets = |out: &str, resume: bool| -> Vec<String> {
        [
            "epochs=2".to_string(),
            "batch_size=4".into(),
            "sample_after_unit=\"never\"".into(),
            "backup_after=1".into(),
            "backup_after_unit=\"epoch\"".into(),
            format!("continue_last_backup={resume}"),
            format!("output_model_destination=\"{out}\""),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    run_pair(d, home.path(), &sets("whole/model", false));
    let backups = d.join("workspace/backup");
    assert!(backups.join("backup-000000006").is_dir());
    std::fs::remove_dir_all(backups.join("backup-000000012")).unwrap();
    let resumed = run_pair(d, home.path(), &sets("resumed/model", true));
    let said = String::from_utf8_lossy(&resumed[1].stdout);
    assert!(
        said.contains("resumed from") && said.contains("at step 6"),
        "{said}"
    );
    let (whole, again) = (unet(d, "whole/model"), unet(d, "resumed/model"));
    assert_eq!(worst(&whole, &again), 0.0);
}

/// A process whose peers never come stops with a line saying what to start, and a rank out of
/// range is refused.
#[test]
fn a_missing_peer_or_a_bad_rank_is_named() {
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let flags = |rank: &str| -> Vec<String> {
        [
            "--nodes",
            "2",
            "--node-rank",
            rank,
            "--coordinator",
            &coordinator,
            "--join-timeout",
            "3",
        ]
        .map(String::from)
        .to_vec()
    };
    let alone = train(d, home.path(), &flags("0")).output().unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success());
    assert!(
        err.contains("not every one of the 2 processes joined") && err.contains(&coordinator),
        "{err}"
    );
    // Two processes with different configs both stop once joined.
    let coordinator = format!("127.0.0.1:{}", free_port());
    let peers: Vec<_> = (0..2)
        .map(|rank| {
            let mut args: Vec<String> = ["--nodes", "2", "--node-rank", &rank.to_string()]
                .map(String::from)
                .to_vec();
            args.extend(["--coordinator".into(), coordinator.clone()]);
            args.extend([
                "--set".into(),
                format!("learning_rate={}", 0.001 * (rank + 1) as f64),
            ]);
            train(d, home.path(), &args).spawn().unwrap()
        })
        .collect();
    for o in peers.into_iter().map(finish) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("do not agree on the run"),
            "{err}"
        );
    }
    let alone = train(d, home.path(), &["--peer-timeout".to_string(), "5".into()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && err.contains("--peer-timeout is for a run of --nodes 2"),
        "{err}"
    );
    // A data port in use, and a part that stops after minutes (each process's own clock).
    let held = std::net::TcpListener::bind(("0.0.0.0", free_port())).unwrap();
    let mut args = flags("0");
    args.extend([
        "--data-port".into(),
        held.local_addr().unwrap().port().to_string(),
    ]);
    let taken = train(d, home.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(
        !taken.status.success() && err.contains("data port"),
        "{err}"
    );
    drop(held);
    let mut args = flags("0");
    args.extend(
        [
            "--set",
            "unet.stop_training_after=1",
            "--set",
            "unet.stop_training_after_unit=\"minute\"",
        ]
        .map(String::from),
    );
    let clocked = train(d, home.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&clocked.stderr);
    assert!(
        !clocked.status.success() && err.contains("stop_training_after is in minutes"),
        "{err}"
    );
    let bad = train(d, home.path(), &flags("2")).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--node-rank 2 of --nodes 2"),
        "{err}"
    );
}

/// Ctrl-C on rank 1 alone, or on rank 0 alone (which also runs the coordinator), stops both
/// processes after the same step: rank 0 writes a backup and the output, and neither is left
/// waiting.
#[test]
fn a_stop_asked_of_one_process_stops_both() {
    for stopped in [1, 0] {
        let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
        let d = dir.path();
        let peers = start_pair(d, home.path(), &[], &[]);
        // Both training (their Ctrl-C handlers in place).
        peers.iter().for_each(|p| p.wait_for("step 10:"));
        let pid = peers[stopped].pid();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        let outputs: Vec<_> = peers.into_iter().map(Running::finish).collect();
        for (rank, o) in outputs.iter().enumerate() {
            assert!(
                o.status.success(),
                "Ctrl-C on rank {stopped}, rank {rank}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let said = String::from_utf8_lossy(&outputs[0].stdout);
        assert!(
            said.contains("backup:") && said.contains("saved:"),
            "{said}"
        );
        assert!(String::from_utf8_lossy(&outputs[stopped].stderr).contains("stopping after"));
        // Stopped early: the run had 600 steps.
        let step: u64 = std::fs::read_dir(d.join("workspace/backup"))
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .strip_prefix("backup-")?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap();
        assert!(step > 0 && step < 600, "{step}");
    }
}

/// Ranks 0 and 1 of a run of `epochs=100` through one coordinator, started with `env` on rank
/// 1 and `extra` flags on both.
fn start_pair(d: &Path, home: &Path, env: &[(&str, &str)], extra: &[&str]) -> Vec<Running> {
    let coordinator = format!("127.0.0.1:{}", free_port());
    (0..2)
        .map(|rank| {
            let mut args: Vec<String> = [
                "epochs=100",
                "batch_size=4",
                "sample_after_unit=\"never\"",
                "backup_after_unit=\"never\"",
            ]
            .into_iter()
            .flat_map(|s| ["--set".to_string(), s.to_string()])
            .collect();
            args.extend(
                [
                    "--nodes",
                    "2",
                    "--node-rank",
                    &rank.to_string(),
                    "--coordinator",
                    &coordinator,
                ]
                .map(String::from),
            );
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut cmd = train(d, home, &args);
            if rank == 1 {
                cmd.envs(env.iter().copied());
            }
            Running::watch(cmd.spawn().unwrap())
        })
        .collect()
}

/// An error in rank 1 (a step failing at its seventh batch) stops rank 0 too: rank 0 names it
/// and writes a backup of the six steps taken, and neither is left waiting.
#[test]
fn a_failing_process_stops_the_others_with_a_backup() {
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let peers = start_pair(
        d,
        home.path(),
        &[(
            "FAILPOINTS",
            "train-step=6*off->return(a deliberate failure)",
        )],
        &[],
    );
    let outputs: Vec<_> = peers.into_iter().map(Running::finish).collect();
    let (out0, err0) = (
        String::from_utf8_lossy(&outputs[0].stdout),
        String::from_utf8_lossy(&outputs[0].stderr),
    );
    let err1 = String::from_utf8_lossy(&outputs[1].stderr);
    assert!(
        !outputs[1].status.success() && err1.contains("a deliberate failure"),
        "{err1}"
    );
    assert!(
        !outputs[0].status.success()
            && err0.contains("rank 1 failed before step 7")
            && err0.contains("continue_last_backup"),
        "{out0}\n{err0}"
    );
    assert!(out0.contains("backup:"), "{out0}");
    assert!(d.join("workspace/backup/backup-000000006").is_dir());
}

/// Rank 1 killed outright, or stopped (SIGSTOP: stuck, its connection open): rank 0 names it
/// (its connection broke, or it was silent for `--peer-timeout`) and writes a backup.
#[test]
fn a_killed_or_stuck_process_stops_the_others() {
    for (signal, why) in [
        ("-KILL", "the connection to it broke"),
        ("-STOP", "no answer from it for 5 s"),
    ] {
        let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
        let d = dir.path();
        let mut peers = start_pair(d, home.path(), &[], &["--peer-timeout", "5"]);
        peers[0].wait_for("step 10:");
        let pid = peers[1].pid();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        let rank0 = peers.remove(0).finish();
        let mut rank1 = peers.remove(0);
        rank1.kill();
        rank1.finish();
        let (out0, err0) = (
            String::from_utf8_lossy(&rank0.stdout),
            String::from_utf8_lossy(&rank0.stderr),
        );
        assert!(
            !rank0.status.success() && err0.contains("rank 1 is gone") && err0.contains(why),
            "{signal}: {out0}\n{err0}"
        );
        assert!(out0.contains("backup:"), "{out0}");
        eprintln!(
            "{signal}: {}",
            err0.lines()
                .find(|l| l.starts_with("Error"))
                .unwrap_or_default()
        );
    }
}

/// `multi_gpu = true` with `device_indexes = "0,1"` (on the CPU: a process per index): one
/// command starts the second process itself and trains exactly as the two started by hand;
/// rank 1's output goes to the workspace's `multi-gpu/rank-1.log`.
#[test]
fn multi_gpu_starts_a_process_per_device() {
    ferrite::runtime::init("cpu").unwrap();
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let sets = |out: &str| -> Vec<String> {
        [
            "epochs=1".to_string(),
            "batch_size=4".into(),
            "sample_after_unit=\"never\"".into(),
            "backup_after_unit=\"never\"".into(),
            "train_device=\"cpu\"".into(),
            format!("output_model_destination=\"{out}\""),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    run_pair(d, home.path(), &sets("pair/model"));
    let mut args = sets("multi/model");
    args.extend(["--set", "multi_gpu=true", "--set", "device_indexes=\"0,1\""].map(String::from));
    let multi = finish(train(d, home.path(), &args).spawn().unwrap());
    let said = String::from_utf8_lossy(&multi.stdout);
    assert!(
        multi.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&multi.stderr)
    );
    assert!(
        said.contains("multi_gpu: 2 processes on devices 0,1")
            && said.contains("rank 0 of 2, 4 images of each batch of 8"),
        "{said}"
    );
    let log = std::fs::read_to_string(d.join("workspace/multi-gpu/rank-1.log")).unwrap();
    assert!(log.contains("rank 1 of 2"), "{log}");
    assert_eq!(worst(&unet(d, "pair/model"), &unet(d, "multi/model")), 0.0);
    // A bad list is refused before anything starts.
    let mut args = sets("bad/model");
    args.extend(["--set", "multi_gpu=true", "--set", "device_indexes=\"0\""].map(String::from));
    let bad = train(d, home.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("device_indexes: `0`: multi_gpu needs two devices"),
        "{err}"
    );
}

/// The cache counts `ferrite train` prints: (latents, text states) encoded.
fn encoded(out: &std::process::Output) -> (usize, usize) {
    let said = String::from_utf8_lossy(&out.stdout);
    let line = said
        .lines()
        .find_map(|l| l.strip_prefix("cache: "))
        .unwrap_or_else(|| panic!("no cache line in {said}"));
    let n: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// With latent and text caching, two processes on one machine share the cache folder: together
/// they encode what one process alone encodes, and each reads what the other wrote.
#[test]
fn processes_on_one_machine_encode_each_cache_entry_once() {
    let (dir, home) = (demo_folder(), tempfile::tempdir().unwrap());
    let d = dir.path();
    let sets = |batch: usize, cache: &str| -> Vec<String> {
        [
            "epochs=2".to_string(),
            format!("batch_size={batch}"),
            "latent_caching=true".into(),
            // (A frozen text encoder: its states are cached too.)
            "text_encoder.train=false".into(),
            "sample_after_unit=\"never\"".into(),
            "backup_after_unit=\"never\"".into(),
            format!("cache_dir=\"{cache}\""),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    let one = finish(
        train(d, home.path(), &sets(8, "cache-one"))
            .spawn()
            .unwrap(),
    );
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let alone = encoded(&one);
    let pair = run_pair(d, home.path(), &sets(4, "cache-pair"));
    let (a, b) = (encoded(&pair[0]), encoded(&pair[1]));
    println!("one process encoded {alone:?}; two encoded {a:?} and {b:?}");
    // Shared: each did part of the work, and together no more than one process (an entry both
    // need in the same step may be found written by the other, so the sum may come out lower).
    for (one, a, b) in [(alone.0, a.0, b.0), (alone.1, a.1, b.1)] {
        assert!(a > 0 && b > 0 && a < one && b < one, "{alone:?} {a} {b}");
        assert!(a + b <= one && 10 * (a + b) >= 9 * one, "{alone:?} {a} {b}");
    }
}
