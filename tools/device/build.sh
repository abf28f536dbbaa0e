#!/bin/sh
# Builds what the GPU machine needs, here (it has no Rust toolchain and no network), into
# .device/ (git-ignored), under 60 MiB:
#   .device/ferrite.tar.gz  the headless CUDA `ferrite` (release, stripped) with the plugins the
#                           bench uses in plugins/ beside it;
#   .device/wheels/         the diffusers wheel (the machine has torch, transformers and peft);
#   .device/configs/        config-only model folders (the published SD 1.5 and Flux.1-dev configs
#                           with the test pipelines' tokenizers) that `bench step --model-config`
#                           builds with random weights on the GPU.
# Then, on the GPU machine, from the repository root: sh tools/device/run.sh
#   sh tools/device/build.sh
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
python=${PYTHON:-python3}
cargo build --release --no-default-features --features cuda -p ferrite
cargo build --release -p ferrite-sd15 -p ferrite-sdxl -p ferrite-flux -p ferrite-lora -p ferrite-optim-adamw
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/ferrite/plugins"
cp "$target/release/ferrite" "$stage/ferrite/"
for p in sd15 sdxl flux lora optim_adamw; do
    cp "$target/release/libferrite_$p.so" "$stage/ferrite/plugins/"
done
strip "$stage/ferrite/ferrite" "$stage"/ferrite/plugins/*.so
mkdir -p .device/wheels
tar -C "$stage" -czf .device/ferrite.tar.gz.part ferrite
mv .device/ferrite.tar.gz.part .device/ferrite.tar.gz
# diffusers as installed here (pure Python: one wheel, no dependencies beyond the machine's).
version=$("$python" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)
"$python" -m pip download -q --no-deps -d .device/wheels "diffusers==$version"
# Config-only folders: a test pipeline's folder without its weights, each part's config
# replaced by the published one (tests/fixtures/configs, written by published_configs.py).
configs() {
    dst=.device/configs/$1; rm -rf "$dst"; mkdir -p "$dst"
    cp -r "$2/." "$dst/"
    find "$dst" -name "*.safetensors" -delete
    for part in "tests/fixtures/configs/$3"/*/; do
        cp "$part/config.json" "$dst/$(basename "$part")/config.json"
    done
}
configs sd15 tests/fixtures/pipeline/model sd15
configs flux_dev tests/fixtures/flux/pipeline/model flux_dev
du -sh .device/ferrite.tar.gz .device/wheels
echo "ready: on the GPU machine run  sh tools/device/run.sh  (carry .device)"
