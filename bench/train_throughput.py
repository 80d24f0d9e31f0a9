"""Training throughput (images/s) with fp32 vs mixed precision, measured in one run.

CPU: fp32 vs bf16 autocast. CUDA (when present): fp32 vs fp16 autocast + GradScaler vs bf16, channels_last.
Synthetic inputs and targets of the training shape; forward + masked BCE + backward + AdamW step.

    python bench/train_throughput.py [--arch tf_efficientnet_lite0] [--batch 16] [--size 224] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from bayesnet import ModelSpec, build_model, tune_allocator
from train.fit import masked_bce


def images_per_s(
    arch: str, batch: int, size: int, steps: int, device: torch.device, dtype: torch.dtype | None
) -> float:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, image_size=size)).to(device).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 14, device=device) > 0.7).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = masked_bce(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tune_allocator()  # as the service, the archive scorer and train fit do at start-up (bayesnet/runtime.py)
    device = torch.device(args.device)
    modes: dict[str, torch.dtype | None] = {"fp32": None, "bf16 autocast": torch.bfloat16}
    if device.type == "cuda":
        modes["fp16 autocast + GradScaler"] = torch.float16
    print(f"{args.arch}, batch {args.batch}, {args.size} px, device {device}, torch threads {torch.get_num_threads()}")
    base = None
    for name, dtype in modes.items():
        rate = images_per_s(args.arch, args.batch, args.size, args.steps, device, dtype)
        base = base or rate
        print(f"{name:<28}{rate:>10.1f} images/s{rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
