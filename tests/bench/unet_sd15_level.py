"""The PyTorch side of the UNet benchmark (SD 1.5 level: 64×64 latent, 320 channels, one down
block with attention, 77×768 text states). Saves the UNet as a diffusers folder for the Rust side,
then prints on this machine's CPU: forward; forward+backward with frozen weights (the gradient of
the input only: what a LoRA's base costs); forward+backward with every weight's gradient (a full
fine-tune). `tests/bench/unet.sh` runs both sides and prints the ratios.

    python3 tests/bench/unet_sd15_level.py /tmp/unet_bench [iters]
"""
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def timed(iters, f):
    f()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        f()
    return (time.perf_counter() - start) / iters


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

    def forward():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    def train_step():
        unet.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_(True)
        unet(xg, t, encoder_hidden_states=ctx).sample.square().mean().backward()

    print(f"pytorch forward          {timed(iters, forward) * 1000:9.1f} ms")
    unet.requires_grad_(False)
    print(f"pytorch frozen           {timed(iters, train_step) * 1000:9.1f} ms")
    unet.requires_grad_(True)
    print(f"pytorch every-weight     {timed(iters, train_step) * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
