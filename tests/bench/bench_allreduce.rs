//! The all-reduce a data-parallel step makes (the trainer's `mean_in_buckets` over
//! `host/runtime/src/collective.rs`), between two processes on this machine through
//! burn-collective's global level: milliseconds per average of f32 gradients the size of an SD
//! 1.5 LoRA's (rank 16 on the UNet's attention projections, 3,188,736, as peft counts them), of
//! an eighth of the UNet's and of the whole UNet's (859,520,964: a full fine-tune), as tensors
//! of 8.6 M elements at most, averaged in the trainer's 256 MiB buckets.
//! Prints one JSON line per size from rank 0; `tests/bench/allreduce.sh` compares it with
//! torch.distributed's gloo.
//!   cargo run -p ferrite-tests --example bench_allreduce [reps]

use std::process::Command;
use std::time::Instant;

use ferrite::runtime::Device;
use ferrite::runtime::collective::{Setup, start_coordinator};
use ferrite::train::trainer::{BUCKET, TrainError, mean_in_buckets};
use ferrite_plugin_api::Tensor;

const SIZES: [usize; 3] = [3_188_736, 859_520_964 / 8, 859_520_964];
/// The largest gradient tensor of the bench (the UNet's largest is 13 M).
const PIECE: usize = 8_595_210;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    if let Ok(rank) = std::env::var("FERRITE_BENCH_RANK") {
        peer(rank.parse().expect("rank"), reps);
        return;
    }
    let port = free_port();
    start_coordinator(port).expect("the coordinator");
    let peers: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().expect("this program"))
                .arg(reps.to_string())
                .env("FERRITE_BENCH_RANK", rank.to_string())
                .env("FERRITE_BENCH_COORDINATOR", format!("127.0.0.1:{port}"))
                .env("FERRITE_BENCH_PORT", free_port().to_string())
                .spawn()
                .expect("a peer")
        })
        .collect();
    for mut p in peers {
        assert!(p.wait().expect("the peer").success());
    }
}

fn peer(rank: u32, reps: usize) {
    let env = |k: &str| std::env::var(k).expect(k);
    ferrite::runtime::init("cpu").expect("the CPU runtime");
    let device = Device::current().expect("the runtime");
    device
        .collective_join(&Setup {
            nodes: 2,
            coordinator: env("FERRITE_BENCH_COORDINATOR"),
            host: "127.0.0.1".into(),
            data_port: env("FERRITE_BENCH_PORT").parse().expect("port"),
        })
        .expect("joining");
    for n in SIZES {
        let pieces: Vec<Tensor> = (0..n.div_ceil(PIECE))
            .map(|i| {
                let len = PIECE.min(n - i * PIECE);
                Tensor::from_f32(&vec![rank as f32; len], &[len]).expect("a tensor")
            })
            .collect();
        // One to open the connections, then the timed ones.
        let mut times = Vec::new();
        for _ in 0..=reps {
            let start = Instant::now();
            let means = mean_in_buckets(pieces.clone(), BUCKET, |b| {
                Ok(Tensor::from_raw(
                    device.all_reduce_mean(b.id()).map_err(TrainError)?,
                ))
            })
            .expect("all-reduce");
            times.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(means[0].to_vec().expect("the mean")[0], 0.5);
        }
        let ms = times[1..].iter().sum::<f64>() / reps as f64;
        if rank == 0 {
            println!(
                "{{\"params\": {n}, \"mib\": {:.1}, \"ms\": {ms:.1}}}",
                n as f64 * 4.0 / (1 << 20) as f64
            );
        }
    }
    device.collective_leave().expect("leaving");
}
