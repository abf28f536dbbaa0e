#!/bin/sh
# On the GPU machine (PyTorch, transformers and peft installed; no toolchain, no network), from
# the repository root with .device/ from tools/device/build.sh. Stages, each in its own process
# under a time limit, with the GPU's peak used memory while it runs (nvidia-smi, sampled every
# 0.2 s; the first line of output gives the idle figure):
#   1. `ferrite selftest --device cuda`: every op and its gradients against the CPU backend;
#   2. a LoRA step (rank 16, AdamW, gradient checkpointing) of the real-size SD 1.5 UNet
#      (published config, random weights) at 512² in bfloat16, diffusers + peft against
#      `ferrite bench step`;
#   3. the same for the FLUX.1-dev transformer at 512², diffusers + peft (bfloat16 weights)
#      against Ferrite (bfloat16 compute, nfloat4 weights);
#   4. SD 1.5 in float32, Flux with bfloat16 weights, Flux at 1024², as time is left.
# Stages that would start after BUDGET seconds (default 400) are skipped, so the whole run fits
# the device lease. Prints everything to stdout; writes under ${WORK:-/tmp/ferrite-device}.
#   sh tools/device/run.sh [steps]
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
case "${1:-}" in @*) ;; *)
steps=${1:-3}
work=${WORK:-/tmp/ferrite-device}
budget=${BUDGET:-400}
start=$(date +%s)
mkdir -p "$work"
tar -C "$work" -xzf .device/ferrite.tar.gz || exit 1
bin="$work/ferrite/ferrite"
python3 -m pip install -q --upgrade --no-deps --no-index --target "$work/py" .device/wheels/*.whl || exit 1
export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
# cudarc opens NVRTC (burn's kernel compiler) by name: add the folders that hold it.
# (Not the toolkit's stubs folder: its libcuda stub refuses every call.)
for d in $(find /usr/local /opt /usr/lib -name 'libnvrtc.so*' -not -path '*/stubs/*' 2>/dev/null | xargs -r -n1 dirname | sort -u); do
    LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader)"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# burn's kernel compiler and autotuner log each kernel they compile and each tuning they do to
# one file (cubecl reads cubecl.toml from the working folder up): each stage prints how many
# lines it added and its last ones, so a stage cut short shows where its time went.
cubecl_log="$work/cubecl.log"
: > "$cubecl_log"
cat > "$work/cubecl.toml" <<EOF
[compilation.logger]
level = "basic"
file = "$cubecl_log"
[autotune.logger]
level = "minimal"
file = "$cubecl_log"
EOF
;; esac

# stage NAME SECONDS COMMAND...: runs COMMAND under the time limit (cut to what the budget
# leaves) while sampling the GPU's used memory.
stage() {
    name=$1 limit=$2
    shift 2
    left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped (${left} s of the budget left)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit} s) ==="
    log="$work/vram.log"
    : > "$log"
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$log"; sleep 0.2; done) &
    sampler=$!
    t0=$(date +%s)
    lines=$(wc -l < "$cubecl_log")
    case "$1" in
    *_step) STEPS=$steps WORK=$work BIN=$bin timeout "$limit" sh "$root/tools/device/run.sh" "@$@" ;;
    *) timeout "$limit" "$@" ;;
    esac
    rc=$?
    kill "$sampler"
    echo "--- $name: rc=$rc in $(($(date +%s) - t0)) s; peak GPU memory used (nvidia-smi) $(sort -n "$log" | tail -1) MiB"
    added=$(($(wc -l < "$cubecl_log") - lines))
    if [ "$added" -gt 0 ]; then
        echo "--- cubecl: $added log lines ($(tail -n "$added" "$cubecl_log" | grep -c 'Compiling kernel') kernels compiled); the last:"
        tail -n "$added" "$cubecl_log" | tail -5 | cut -c1-200
    fi
}

selftest_step() {
    cd "$work" && "$bin" selftest --device cuda
}
torch_step() { # FAMILY RES
    BENCH_DEVICE=cuda BENCH_AUTOCAST=bf16 BENCH_RES=$2 PYTHONUNBUFFERED=1 \
        python3 tests/bench/lora_step.py torch "$1" "$work/$1" "$steps" checkpointing
}
torch_f32_step() { # FAMILY RES
    BENCH_DEVICE=cuda BENCH_RES=$2 PYTHONUNBUFFERED=1 \
        python3 tests/bench/lora_step.py torch "$1" "$work/$1" "$steps" checkpointing
}
ferrite_step() { # FAMILY RES TRAIN_DTYPE WEIGHT_DTYPE (run in $work, beside cubecl.toml)
    cd "$work" && FERRITE_LOG=${FERRITE_LOG:-info} "$bin" bench step --model-config "$root/.device/configs/$1" \
        --arch "${1%_dev}" --device cuda --resolution "$2" --train-dtype "$3" --weight-dtype "$4" \
        --checkpointing on --steps "$steps"
}

# `timeout` runs programs, not shell functions: a stage's function runs as `run.sh @NAME ARGS`.
case "${1:-}" in @*)
    fn=${1#@}; shift; steps=$STEPS work=$WORK bin=$BIN; "$fn" "$@"; exit ;;
esac
stage "selftest on cuda" 90 selftest_step
stage "SD 1.5 LoRA 512², diffusers + peft, bf16 autocast" 60 torch_step sd15 512
stage "SD 1.5 LoRA 512², ferrite, bf16" 120 ferrite_step sd15 512 bfloat16 float32
stage "Flux-dev LoRA 512², ferrite, bf16 compute, nfloat4 weights" 200 ferrite_step flux_dev 512 bfloat16 nfloat4
stage "Flux-dev LoRA 512², diffusers + peft, bf16" 90 torch_step flux 512
stage "SD 1.5 LoRA 512², diffusers + peft, f32" 60 torch_f32_step sd15 512
stage "SD 1.5 LoRA 512², ferrite, f32" 120 ferrite_step sd15 512 float32 float32
stage "Flux-dev LoRA 512², ferrite, bf16 compute, bf16 weights" 150 ferrite_step flux_dev 512 bfloat16 bfloat16
stage "Flux-dev LoRA 1024², ferrite, bf16 compute, nfloat4 weights" 200 ferrite_step flux_dev 1024 bfloat16 nfloat4
stage "Flux-dev LoRA 1024², diffusers + peft, bf16" 90 torch_step flux 1024
echo "total $(($(date +%s) - start)) s"
