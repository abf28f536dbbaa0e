#!/bin/sh
# One LoRA training step of a real-size SD 1.5 or SDXL UNet (the published config, random weights)
# at 512x512 on this machine, with gradient checkpointing and without: diffusers + peft (the UNet
# step: forward, MSE, backward, AdamW), then Ferrite (a whole trainer step: batch from the cache,
# noise, forward, loss, backward, AdamW), each in its own process. Prints step times, peak memory
# and their ratios; asserts nothing. Ferrite is built in the dev profile (dependencies, burn
# included, at opt-level 3; Ferrite's crates at 1).
#   sh tests/bench/lora_step.sh sd15|sdxl [DIR] [PYTHON] [steps]
set -e
family=${1:?sd15 or sdxl}
dir=${2:-/tmp/${family}_bench}
py=${3:-python3}
steps=${4:-1}
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$dir"
[ -d "$dir/model" ] || "$py" "$root/tests/bench/lora_step.py" build "$family" "$dir"
("$py" "$root/tests/bench/lora_step.py" torch "$family" "$dir" "$steps" checkpointing \
  && "$py" "$root/tests/bench/lora_step.py" torch "$family" "$dir" "$steps") | tee "$dir/torch.txt"
(cd "$root" && cargo build -q -p ferrite-sd15 -p ferrite-sdxl -p ferrite-lora -p ferrite-optim-adamw \
  && cargo run -q -p ferrite-tests --example bench_lora_step -- "$family" "$dir" "$steps" cpu \
  && cargo run -q -p ferrite-tests --example bench_lora_step -- "$family" "$dir" "$steps" cpu \
       gradient_checkpointing=off) | tee "$dir/ferrite.txt"
"$py" - "$dir" <<'PY'
import re, sys
def all_figures(f):
    t = open(f"{sys.argv[1]}/{f}").read()
    return re.findall(r"step (.*?):\s*([\d.]+) s, peak memory ([\d.]+) GiB", t)
def label(what):
    return what.split(")", 1)[-1].strip() or "gradient_checkpointing=on"
torch = {label(w): (float(t), float(m)) for w, t, m in all_figures("torch.txt")}
for what, fs, fm in all_figures("ferrite.txt"):
    ts, tm = torch[label(what)]
    print(f"{label(what)}: ferrite / torch step time {float(fs) / ts:.2f}x, "
          f"peak memory {float(fm) / tm:.2f}x")
PY
