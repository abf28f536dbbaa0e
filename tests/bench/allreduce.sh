#!/bin/sh
# The all-reduce of a data-parallel step between two processes on this machine: Ferrite
# (burn-collective's global level, WebSocket) against torch.distributed (gloo), at an SD 1.5
# LoRA's gradient size, an eighth of the UNet's and the whole UNet's (a full fine-tune). Prints
# milliseconds and the ratio; asserts nothing.
#   sh tests/bench/allreduce.sh [PYTHON] [reps]
set -e
py=${1:-python3}
reps=${2:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
"$py" "$root/tests/bench/allreduce.py" "$reps" > /tmp/allreduce_torch.txt
(cd "$root" && cargo build -q -p ferrite-tests --example bench_allreduce)
"$target/debug/examples/bench_allreduce" "$reps" 2>/dev/null | grep '^{' > /tmp/allreduce_ferrite.txt
"$py" - <<'PY'
import json
torch = [json.loads(l) for l in open("/tmp/allreduce_torch.txt")]
ours = [json.loads(l) for l in open("/tmp/allreduce_ferrite.txt")]
for t, f in zip(torch, ours):
    print(f"{f['params']:>11,} params ({f['mib']} MiB): ferrite {f['ms']:.1f} ms, torch gloo {t['ms']:.1f} ms, "
          f"ferrite / torch {f['ms'] / t['ms']:.2f}x")
PY
