//! Data-parallel collectives between processes, on burn-collective's global level: each process
//! is one peer (one device), the peers meet through a coordinator (burn-collective's
//! orchestrator, which the first node runs), and tensors are averaged between them over
//! burn-communication's WebSocket data service. Autodiff's inner tensors are what travel.

use std::str::FromStr;

use burn_backend::AutodiffBackend;
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn_communication::Address;

use crate::table::{TensorTable, Tracking, Value};
use crate::{RtResult, TensorId};

/// Where this process meets the others.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Processes in the run.
    pub nodes: u32,
    /// The coordinator, `host:port`.
    pub coordinator: String,
    /// This process's address as the others reach it (`host`), and the port its data service
    /// listens on.
    pub host: String,
    pub data_port: u16,
}

/// This process's one peer.
const PEER: PeerId = PeerId(0);

fn address(s: &str) -> RtResult<Address> {
    Address::from_str(&format!("ws://{s}")).map_err(|e| format!("address `{s}`: {e}"))
}

fn coordinator_runtime() -> RtResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("the coordinator's runtime: {e}"))
}

/// Runs the coordinator on `port` until the process ends (or it fails).
pub fn run_coordinator(port: u16) -> RtResult<()> {
    coordinator_runtime()?.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// Whether something (another process's coordinator) already listens on this machine's `port`.
pub fn port_taken(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_err()
}

/// Runs the coordinator on `port` on a thread of its own until the process ends.
pub fn start_coordinator(port: u16) -> RtResult<()> {
    let rt = coordinator_runtime()?;
    std::thread::Builder::new()
        .name("ferrite-coordinator".into())
        // (Not stopped by Ctrl-C: the run stops after its step, which needs the coordinator.)
        .spawn(move || {
            rt.block_on(burn_collective::start_global_orchestrator_until(
                port,
                std::future::pending(),
            ))
        })
        .map_err(|e| format!("the coordinator's thread: {e}"))?;
    Ok(())
}

impl<B: Tracking> TensorTable<B> {
    pub(crate) fn collective_join(&self, s: &Setup) -> RtResult<()> {
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(s.nodes)
            .with_global_address(address(&s.coordinator)?)
            .with_node_address(address(&format!("{}:{}", s.host, s.data_port))?)
            .with_data_service_port(s.data_port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Centralized);
        burn_collective::register::<B::InnerBackend>(PEER, B::inner_device(&self.device), config)
            .map_err(|e| format!("joining the run through {}: {e:?}", s.coordinator))
    }

    /// The mean of float tensor `id` over the peers (each passes its own, of one shape).
    pub(crate) fn all_reduce_mean(&self, id: TensorId) -> RtResult<TensorId> {
        let t = <B as AutodiffBackend>::inner(self.float(id)?);
        let out = burn_collective::all_reduce::<B::InnerBackend>(PEER, t, ReduceOperation::Mean)
            .map_err(|e| format!("averaging between the processes: {e:?}"))?;
        Ok(self.insert(Value::Float(B::from_inner(out))))
    }

    pub(crate) fn collective_leave(&self) -> RtResult<()> {
        burn_collective::finish_collective::<B::InnerBackend>(PEER)
            .map_err(|e| format!("leaving the run: {e:?}"))
    }

    pub(crate) fn collective_reset(&self) {
        burn_collective::replace_collective::<B::InnerBackend>();
    }
}
