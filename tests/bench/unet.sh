#!/bin/sh
# The SD 1.5-level UNet block (tests/bench/unet_sd15_level.py) on this machine's CPU: PyTorch, then
# Ferrite's bench_unet on the same saved weights, each in its own process, back to back. Prints
# forward, forward+backward with frozen weights and with every weight's gradient, and Ferrite's
# time over PyTorch's for each; asserts nothing. Ferrite builds in the dev profile (dependencies
# and ferrite-cpu-kernels at opt-level 3) unless PROFILE=release.
#   sh tests/bench/unet.sh [DIR] [PYTHON] [iters]
set -e
dir=${1:-/tmp/unet_bench}
py=${2:-python3}
iters=${3:-3}
profile=${PROFILE:-dev}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$dir"
"$py" "$root/tests/bench/unet_sd15_level.py" "$dir" "$iters" | tee "$dir/torch.txt"
(cd "$root" && cargo build -q --profile "$profile" -p ferrite-tests --example bench_unet)
out=$([ "$profile" = dev ] && echo debug || echo "$profile")
"$target/$out/examples/bench_unet" "$dir" "$iters" | tee "$dir/ferrite.txt"
"$py" - "$dir" <<'PY'
import re, sys
def figures(name):
    text = open(f"{sys.argv[1]}/{name}.txt").read()
    return {k: float(v) for k, v in re.findall(r"^\w+ (\S+)\s+([\d.]+) ms", text, re.M)}
torch, ferrite = figures("torch"), figures("ferrite")
for k, t in torch.items():
    print(f"{k:<14} ferrite {ferrite[k]:9.1f} ms, pytorch {t:9.1f} ms: {ferrite[k] / t:.2f}x")
PY
