"""Is an epoch's test accuracy low because of the weights, or because of BatchNorm's running statistics?

  python benchmarks/bn_stats.py --run RUN_DIR --checkpoints E1/checkpoint.safetensors E2/checkpoint.safetensors ...

For each checkpoint of a training run (copied after each epoch: the run keeps only the last), the test accuracy
of the live weights and of the Lookahead average, each with the running statistics as saved and with them
recomputed over `--batches` training batches (exact averages, no augmentation). If recomputing restores the
accuracy, the swing is in the statistics, not in what the network learned (issue 16).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

import common  # noqa: F401  (puts the project on sys.path)
from common import machine
from training.config import TRAIN_CONFIG, read_train_config
from training.data import load_dataset
from training.loop import evaluate, recompute_batchnorm_statistics
from training.model import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the training run's --out (its train_config.json)")
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    parser.add_argument("--batches", type=int, default=20, help="training batches the statistics are recomputed on")
    args = parser.parse_args()
    config = read_train_config(args.run)
    if config is None:
        parser.error(f"--run: {args.run / TRAIN_CONFIG} is missing or unreadable")
    data = load_dataset(config.data, config.format, config.input_size, config.val_split, config.seed)
    images = data.train.images[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))]
    print(f"machine: {machine()}; run {args.run} ({config.backbone}, {config.bits} bits, seed {config.seed})")
    print("\n| checkpoint | live, saved stats | live, recomputed | Lookahead, saved stats | Lookahead, recomputed |")
    print("|---|---|---|---|---|")
    for file in args.checkpoints:
        tensors = load_file(str(file))
        row = []
        for prefix in ("model.", "lookahead."):
            model = create_model(config.backbone, config.bits, data.class_names, config.input_size)
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            model.eval()
            row.append(evaluate(model, data.test, torch.device("cpu"), False))
            recompute_batchnorm_statistics(model, images[:args.batches * config.batch_size], config.batch_size)
            row.append(evaluate(model, data.test, torch.device("cpu"), False))
        print(f"| {file} | " + " | ".join(f"{a:.4f}" for a in row) + " |", flush=True)


if __name__ == "__main__":
    main()
