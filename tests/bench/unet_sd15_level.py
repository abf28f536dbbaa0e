"""The PyTorch side of the UNet benchmark (SD 1.5 level: 64×64 latent, 320 channels, one down
block with attention, 77×768 text states). Saves the UNet as a diffusers folder for the Rust side,
then prints forward and forward+backward times on this machine's CPU.

    python3 tests/bench/unet_sd15_level.py /tmp/unet_bench [iters]
    cargo run --release -p ferrite-tests --example bench_unet -- /tmp/unet_bench [iters]
"""
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def main():
    out = sys.argv[1]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[320],
        down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
    )
    unet.save_pretrained(out, safe_serialization=True)
    x = torch.randn(1, 4, 64, 64)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 768)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)  # warm-up
        start = time.perf_counter()
        for _ in range(iters):
            unet(x, t, encoder_hidden_states=ctx)
        fwd = (time.perf_counter() - start) / iters
    unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        unet.zero_grad()
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
    both = (time.perf_counter() - start) / iters
    print(f"pytorch forward          {fwd * 1000:9.1f} ms")
    print(f"pytorch forward+backward {both * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
