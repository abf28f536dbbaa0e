#!/bin/sh
# One LoRA training step of a real-size SDXL UNet (SDXL base's config, random weights) at 512x512
# on this machine: diffusers + peft (the UNet step: forward, MSE, backward, AdamW), then Ferrite
# (a whole trainer step: batch from the cache, noise, forward, loss, backward, AdamW), each in its
# own process. Prints step times, peak memory and their ratio; asserts nothing. Ferrite is built
# in the dev profile (dependencies, burn included, at opt-level 3; Ferrite's crates at 1).
#   sh tests/bench/sdxl_lora_step.sh [DIR] [PYTHON] [steps]
set -e
dir=${1:-/tmp/sdxl_bench}
py=${2:-python3}
steps=${3:-1}
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$dir"
[ -d "$dir/model" ] || "$py" "$root/tests/bench/sdxl_lora_step.py" build "$dir"
"$py" "$root/tests/bench/sdxl_lora_step.py" torch "$dir" "$steps" | tee "$dir/torch.txt"
(cd "$root" && cargo build -q -p ferrite-sdxl -p ferrite-lora -p ferrite-optim-adamw \
  && cargo run -q -p ferrite-tests --example bench_sdxl_lora -- "$dir" "$steps") | tee "$dir/ferrite.txt"
"$py" - "$dir" <<'PY'
import re, sys
def figures(f):
    t = open(f"{sys.argv[1]}/{f}").read()
    m = re.search(r"step .*?:\s*([\d.]+) s, peak memory ([\d.]+) GiB", t)
    return float(m.group(1)), float(m.group(2))
(ts, tm), (fs, fm) = figures("torch.txt"), figures("ferrite.txt")
print(f"ferrite / torch: step time {fs / ts:.2f}x, peak memory {fm / tm:.2f}x")
PY
