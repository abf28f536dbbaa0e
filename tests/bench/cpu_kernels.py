"""PyTorch's side of `cargo run -p ferrite-cpu-kernels --example bench_kernels`: one SD 1.5
self-attention at 512² ([1, 8, 4096, 40], scaled_dot_product_attention) forward and
forward+backward, and one 3×3 convolution of 320 channels at 64×64, on this machine's CPU.
(Not kernels.py: bitsandbytes imports a package of that name, and Python puts this folder first
on the path of the scripts beside it.)"""
import time

import torch


def timed(f, iters=3):
    f()
    start = time.perf_counter()
    for _ in range(iters):
        f()
    return (time.perf_counter() - start) / iters * 1000


torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, 4096, 40) for _ in range(3))
with torch.no_grad():
    fwd = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
g = torch.randn(1, 8, 4096, 40)
both = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg).backward(g))
print(f"attention [8, 4096, 40] forward {fwd:.1f} ms, forward+backward {both:.1f} ms "
      f"({torch.get_num_threads()} threads)")
conv = torch.nn.Conv2d(320, 320, 3, padding=1)
x = torch.randn(1, 320, 64, 64)
with torch.no_grad():
    print(f"conv2d 3x3 320->320 at 64x64 forward {timed(lambda: conv(x)):.1f} ms")
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
mm = timed(lambda: a @ b)
print(f"gemm 2048^3 {mm:.1f} ms, {2 * 2048 ** 3 / mm / 1e6:.0f} GFLOPS")
