"""The baseline for bench_allreduce: torch.distributed's all_reduce (gloo, two processes on this
machine) of one f32 tensor of each size (an SD 1.5 LoRA's gradients, an eighth of the UNet's,
the whole UNet's), averaged as a data-parallel step does (sum, then / 2).
Prints one JSON line per size.

    python3 tests/bench/allreduce.py [reps]
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [3_188_736, 859_520_964 // 8, 859_520_964]


def peer(rank, reps, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for n in SIZES:
        t = torch.full((n,), float(rank))
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            x = t.clone()
            dist.all_reduce(x)
            x /= 2
            times.append((time.perf_counter() - start) * 1e3)
        if rank == 0:
            print(json.dumps({"params": n, "mib": round(n * 4 / 2**20, 1), "ms": round(sum(times[1:]) / reps, 1)}),
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    mp.spawn(peer, args=(reps, 29400 + os.getpid() % 1000), nprocs=2)
