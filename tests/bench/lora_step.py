"""The PyTorch side of the real-size LoRA step benchmark, and the model both sides use.

    python3 tests/bench/lora_step.py build sd15|sdxl DIR   # DIR/model: a pipeline folder
    python3 tests/bench/lora_step.py torch sd15|sdxl|flux DIR [steps] [checkpointing]

`build` writes a diffusers folder whose UNet is the published config (SD 1.5's, or SDXL base
1.0's) with random weights (saved in float16 to halve the file; both sides compute in float32),
with one-layer text encoders of the family's widths (SD 1.5: 768; SDXL: 768 and 1280, pooled
1280) and a small VAE of factor 8, so that a 512×512 image is a 64×64 latent and the text states
are as wide as the real ones.

`torch` runs diffusers + peft: a LoRA of rank 16 (alpha 1) on the UNet's attention-block layers
(what Ferrite's `attn-mlp` preset adapts), AdamW, one MSE step per batch of one 64×64 latent (with
SDXL's added conditioning); prints the mean step time after a warm-up step and the process's peak
resident memory. tests/bench/lora_step.sh runs both sides one after the other. Without DIR/model
(the device harness, tools/device/run.sh), the UNet is built from the published config with
random weights in memory. `flux` (no `build`: always in memory) is FLUX.1-dev's transformer
(published config, random weights, bfloat16 as users load it) with a LoRA on Ferrite's Flux
`attn-mlp` layers, at the packed sequence of a RES² image and 512 text tokens.
"""
import os
import resource
import sys
import time

import torch

def published_configs():
    import importlib.util
    gen = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gen", "published_configs.py")
    spec = importlib.util.spec_from_file_location("published_configs", gen)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


_PUBLISHED = published_configs()
SD15_UNET, SDXL_UNET = _PUBLISHED.SD15_UNET, _PUBLISHED.SDXL_UNET
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def build(family, out):
    import importlib.util
    import shutil

    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    gen = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gen", "pipeline.py")
    spec = importlib.util.spec_from_file_location("pipeline", gen)
    sd15 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd15)
    tok = os.path.join(out, "tok_src")
    vocab_size = sd15.byte_vocab(tok)
    vocab, merges = os.path.join(tok, "vocab.json"), os.path.join(tok, "merges.txt")
    torch.manual_seed(0)
    ids = dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, max_position_embeddings=77,
               num_hidden_layers=1, vocab_size=vocab_size)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      hidden_act="quick_gelu", pad_token_id=vocab_size - 1, **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                     num_attention_heads=20, hidden_act="gelu",
                                                     projection_dim=1280, pad_token_id=0, **ids))
    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        scaling_factor=0.13025)
    if family == "sdxl":
        unet = UNet2DConditionModel(**SDXL_UNET).half()
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=CLIPTokenizer(vocab, merges),
            tokenizer_2=CLIPTokenizer(vocab, merges, pad_token="!"), unet=unet, scheduler=scheduler,
        )
    else:
        vae.register_to_config(scaling_factor=0.18215)
        unet = UNet2DConditionModel(**SD15_UNET).half()
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, clip_sample=False, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=CLIPTokenizer(vocab, merges), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    shutil.rmtree(tok)
    params = sum(p.numel() for p in unet.parameters())
    print(f"wrote {out}/model: {family} UNet config, {params / 1e9:.2f} B parameters")


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def torch_step(family, out, steps, checkpointing):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    # The device harness (tools/device/run.sh) sets these: a CUDA device, bf16 autocast (as
    # Ferrite's train_dtype), the image size.
    device = os.environ.get("BENCH_DEVICE", "cpu")
    autocast = os.environ.get("BENCH_AUTOCAST", "") == "bf16"
    res = int(os.environ.get("BENCH_RES", "512"))
    folder = os.path.join(out, "model", "unet")
    if os.path.isdir(folder):
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
    unet.to(device)
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=16, lora_alpha=1, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    lat = res // 8
    x = torch.randn(1, 4, lat, lat, generator=g).to(device)
    ctx = torch.randn(1, 77, 2048 if family == "sdxl" else 768, generator=g).to(device)
    added = {"text_embeds": torch.randn(1, 1280, generator=g).to(device),
             "time_ids": torch.tensor([[res, res, 0.0, 0.0, res, res]], device=device)} if family == "sdxl" else None
    target = torch.randn(1, 4, lat, lat, generator=g).to(device)
    t = torch.tensor([500.0], device=device)

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            pred = unet(x, t, ctx, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M LoRA parameters")
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per = (time.perf_counter() - start) / steps
    label = "gradient_checkpointing=on" if checkpointing else "gradient_checkpointing=off"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        per = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = peak_rss_gib()
    print(f"torch   LoRA step {res}x{res} ({lat}x{lat} latent) {label}: {per:8.3f} s, "
          f"peak memory {peak:.1f} GiB")


# Ferrite's Flux `attn-mlp` preset: every linear layer under `attn`, the double blocks' `ff.net`
# and the single blocks' `proj_mlp`.
FLUX_TARGETS = (r".*\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                r"|ff\.net\.(0\.proj|2)|proj_mlp)")


def torch_flux_step(steps, checkpointing):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    device = os.environ.get("BENCH_DEVICE", "cpu")
    res = int(os.environ.get("BENCH_RES", "512"))
    # Built on the meta device and given bfloat16 storage on the device (no float32 copy there),
    # then random weights: what is measured is the bfloat16 model's memory.
    with torch.device("meta"):
        model = FluxTransformer2DModel(**_PUBLISHED.FLUX_DEV).to(torch.bfloat16)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=16, lora_alpha=1, init_lora_weights="gaussian", target_modules=FLUX_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    side = res // 16
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, side * side, 64, generator=g).to(**bf)
    target = torch.randn(1, side * side, 64, generator=g).to(device)
    ctx = torch.randn(1, 512, 4096, generator=g).to(**bf)
    pooled = torch.randn(1, 768, generator=g).to(**bf)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(**bf)
    txt_ids = torch.zeros(512, 3, **bf)
    t, guidance = torch.tensor([0.5], **bf), torch.tensor([3.5], **bf)

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            pred = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    print(f"torch {torch.__version__}, {sum(p.numel() for p in params) / 1e6:.1f} M LoRA parameters")
    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else peak_rss_gib()
    label = "gradient_checkpointing=on" if checkpointing else "gradient_checkpointing=off"
    print(f"torch   Flux LoRA step {res}x{res} ({side * side} image tokens) {label}: {per:8.3f} s, "
          f"peak memory {peak:.1f} GiB")


if __name__ == "__main__":
    what, family, out = sys.argv[1], sys.argv[2], sys.argv[3]
    assert family in ("sd15", "sdxl", "flux"), family
    if family == "flux":
        assert what == "torch", "flux is built in memory: no build step"
        torch_flux_step(int(sys.argv[4]) if len(sys.argv) > 4 else 1, len(sys.argv) > 5 and sys.argv[5] == "checkpointing")
        sys.exit(0)
    if what == "build":
        build(family, out)
    else:
        steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        torch_step(family, out, steps, len(sys.argv) > 5 and sys.argv[5] == "checkpointing")
