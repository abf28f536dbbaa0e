#!/bin/sh
# On the GPU machine (PyTorch, transformers and peft installed; no toolchain, no network), from
# the repository root with .device/ from tools/device/build.sh:
#   1. `ferrite selftest --device cuda`: every op and its gradients against the CPU backend;
#   2. a real-size SD 1.5 UNet (published config, random weights, built by diffusers) LoRA step
#      at RES (512) in f32 and in bf16, diffusers + peft against `ferrite bench step`, each in its
#      own process, with the GPU's peak used memory while it runs (nvidia-smi, sampled every
#      0.2 s; torch's own max_memory_allocated is printed too).
# Prints the figures side by side. Writes under ${WORK:-/tmp/ferrite-device}.
#   sh tools/device/run.sh [steps]
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
steps=${1:-5}
work=${WORK:-/tmp/ferrite-device}
res=${RES:-512}
mkdir -p "$work"
tar -C "$work" -xzf .device/ferrite.tar.gz
bin="$work/ferrite/ferrite"
python3 -m pip install -q --no-deps --no-index --target "$work/py" .device/wheels/*.whl
export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"

echo "=== selftest on cuda ==="
"$bin" selftest --device cuda || echo "SELFTEST FAILED"

# Runs a command while sampling the GPU's used memory; prints its peak (MiB) last.
peak_vram() {
    log="$work/vram.$$"
    : > "$log"
    ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$log"; sleep 0.2; done ) &
    sampler=$!
    status=0
    "$@" || status=$?
    kill "$sampler"
    echo "peak GPU memory used (nvidia-smi): $(sort -n "$log" | tail -1) MiB"
    return $status
}

[ -d "$work/sd15/model" ] || python3 tests/bench/lora_step.py build sd15 "$work/sd15"
for dtype in float32 bfloat16; do
    autocast=""; [ "$dtype" = bfloat16 ] && autocast=bf16
    echo "=== SD 1.5 LoRA step ${res}x${res}, train dtype $dtype, gradient checkpointing on ==="
    BENCH_DEVICE=cuda BENCH_AUTOCAST=$autocast BENCH_RES=$res \
        peak_vram python3 tests/bench/lora_step.py torch sd15 "$work/sd15" "$steps" checkpointing
    peak_vram "$bin" bench step --model "$work/sd15/model" --arch sd15 --device cuda \
        --resolution "$res" --train-dtype "$dtype" --steps "$steps"
done
