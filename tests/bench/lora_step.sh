#!/bin/sh
# One LoRA training step of a real-size SD 1.5 or SDXL UNet (the published config, random weights)
# at 512x512 on this machine, with gradient checkpointing and without: diffusers + peft (the UNet
# step: forward, MSE, backward, AdamW), then `ferrite bench step` (a whole trainer step: batch
# from the cache, noise, forward, loss, backward, AdamW), each in its own process. Prints step
# times, peak memory and their ratios; asserts nothing. Ferrite is built in the dev profile
# (dependencies, burn included, at opt-level 3; Ferrite's crates at 1). Further arguments go to
# every `ferrite bench step` (e.g. `--train-dtype bfloat16 --weight-dtype nfloat4`).
#   sh tests/bench/lora_step.sh sd15|sdxl [DIR] [PYTHON] [steps] [ferrite options ...]
set -e
family=${1:?sd15 or sdxl}
dir=${2:-/tmp/${family}_bench}
py=${3:-python3}
steps=${4:-1}
shift $(( $# < 4 ? $# : 4 ))
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$dir"
[ -d "$dir/model" ] || "$py" "$root/tests/bench/lora_step.py" build "$family" "$dir"
("$py" "$root/tests/bench/lora_step.py" torch "$family" "$dir" "$steps" checkpointing \
  && "$py" "$root/tests/bench/lora_step.py" torch "$family" "$dir" "$steps") | tee "$dir/torch.txt"
(cd "$root" && cargo build -q -p ferrite -p ferrite-sd15 -p ferrite-sdxl -p ferrite-lora -p ferrite-optim-adamw)
: > "$dir/ferrite.txt"
for ckpt in on off; do
    echo "gradient_checkpointing=$ckpt $("$target/debug/ferrite" bench step --model "$dir/model" \
        --arch "$family" --steps "$steps" --checkpointing $ckpt "$@")" | tee -a "$dir/ferrite.txt"
done
"$py" - "$dir" <<'PY'
import json, re, sys
t = open(f"{sys.argv[1]}/torch.txt").read()
torch = {label: (float(s), float(m)) for label, s, m in
         re.findall(r"step .*?\) (\S+):\s*([\d.]+) s, peak memory ([\d.]+) GiB", t)}
for line in open(f"{sys.argv[1]}/ferrite.txt"):
    label, figures = line.split(" ", 1)
    f = json.loads(figures)
    ts, tm = torch[label]
    fs, fm = f["step_ms"] / 1e3, f["peak_mem_mib"] / 1024
    print(f"{label}: ferrite {fs:.1f} s, {fm:.1f} GiB; torch {ts:.1f} s, {tm:.1f} GiB; "
          f"ferrite / torch step time {fs / ts:.2f}x, peak memory {fm / tm:.2f}x")
PY
