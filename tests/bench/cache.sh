#!/bin/sh
# The caching pass's throughput against the bare VAE encode (`ferrite bench cache`), with SD 1.5's
# real-size VAE (diffusers' default AutoencoderKL config: SD's, random weights) in the LoRA
# bench's model folder (tests/bench/lora_step.py build). Prints one JSON line; asserts nothing.
#   sh tests/bench/cache.sh [DIR] [PYTHON] [resolution] [batch] [images]
set -e
dir=${1:-/tmp/sd15_bench}
py=${2:-python3}
res=${3:-256}
batch=${4:-2}
images=${5:-8}
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
[ -d "$dir/model" ] || "$py" "$root/tests/bench/lora_step.py" build sd15 "$dir"
if [ ! -d "$dir/model-sd-vae" ]; then
    mkdir -p "$dir/model-sd-vae"
    for part in "$dir"/model/*; do
        [ "$(basename "$part")" = vae ] || ln -s "$part" "$dir/model-sd-vae/"
    done
    "$py" - "$dir/model-sd-vae/vae" <<'PY'
import sys, torch
from diffusers import AutoencoderKL
torch.manual_seed(0)
AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
              scaling_factor=0.18215).save_pretrained(sys.argv[1])
PY
fi
(cd "$root" && cargo build -q -p ferrite -p ferrite-sd15 -p ferrite-lora -p ferrite-optim-adamw)
"$target/debug/ferrite" bench cache --model "$dir/model-sd-vae" --arch sd15 --resolution "$res" \
    --batch "$batch" --images "$images"
