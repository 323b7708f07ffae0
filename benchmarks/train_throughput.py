"""Images per second of a training step (forward + backward + SGD) and of inference, per backbone and precision.

  python benchmarks/train_throughput.py --backbones cifar_convnet cifar_convnet_small --batch-size 128

Steady state: `--warmup` steps first (oneDNN picks and caches its kernels on the first calls, bf16 ones
especially), then the median of `--repeats` timed steps, for fp32 and bf16 alike. Every row is measured with
glibc's default allocator settings first, then again once `training.loop.keep_freed_memory()` (what a CPU
training run does) has taken effect: it cannot be undone within a process, so that order is fixed.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import common  # noqa: F401
from common import machine, timed
from training.loop import keep_freed_memory
from training.model import create_model


def rates(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool, repeats: int,
          warmup: int) -> tuple[float, float]:
    """Images per second of a training step and of inference."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(images)

    return len(images) / timed(step, repeats, warmup), len(images) / timed(infer, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["cifar_convnet", "cifar_convnet_small"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps; the median counts (default %(default)s)")
    args = parser.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    print("| backbone | params | precision | freed memory | train img/s | inference img/s |\n|---|---|---|---|---|---|")
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))
    for kept in (False, True):
        if kept and not keep_freed_memory():
            print("\n(not glibc: freed memory cannot be kept here)")
            break
        for name in args.backbones:
            model = create_model(name, 48, [str(i) for i in range(10)], args.size).to(memory_format=torch.channels_last)
            params = sum(p.numel() for p in model.parameters())
            for bf16 in (False, True):
                train_rate, infer_rate = rates(model, images, labels, bf16, args.repeats, args.warmup)
                print(f"| {name} | {params / 1e6:.1f} M | {'bf16 autocast' if bf16 else 'fp32'} | "
                      f"{'kept' if kept else 'returned (default)'} | {train_rate:,.0f} | {infer_rate:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
