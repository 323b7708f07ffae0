"""The paper's table: mAP@1000 and precision@k on CIFAR-10 (or MNIST), one model per code length.

  python benchmarks/paper_table.py --data ../shared/data/cifar-10-batches-py --bits 12 32 48
  python benchmarks/paper_table.py --dataset mnist --data ../shared/data/mnist --bits 48
  python benchmarks/paper_table.py --data ../shared/data/cifar-10-batches-py --bits 48 --models runs/

Protocol (DESIGN.md section 1): queries = the test set, database = the training set, both in their original
order; Hamming ranking with ties by database order; AP normalised by the relevant items found in the top K.
Models are trained from scratch unless `--models DIR` holds `bitsK/` (or a model for that length directly).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import common  # noqa: F401
from common import machine
from engine.metrics import retrieval_metrics, two_stage_metrics
from training.data import load_dataset
from training.model import load_model
from training.train import TrainConfig, train

PAPER_CIFAR10 = {12: 0.8930, 32: 0.8972, 48: 0.8973}  # Lin et al. 2015, Table 1 (AlexNet, ImageNet-pretrained)


def encode_all(model, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    codes, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            c, f = model.encode(images[start:start + batch_size])
            codes.append(c)
            features.append(f)
    return np.concatenate(codes), np.concatenate(features)


def find_model(models: Path | None, bits: int) -> Path | None:
    if models is None:
        return None
    for candidate in (models / f"bits{bits}", models):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text())["bits"] == bits:
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dataset", choices=("cifar10", "mnist"), default="cifar10")
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 32, 48])
    parser.add_argument("--models", type=Path, help="directory of trained models (bitsK/ subfolders)")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_table"))
    parser.add_argument("--backbone", default="cifar_convnet_small")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, args.dataset)
    query_labels, db_labels = data.test.labels.numpy(), data.train.labels.numpy()
    results = []
    for bits in args.bits:
        model_dir, train_seconds = find_model(args.models, bits), None
        if model_dir is None:
            model_dir = args.out / "models" / f"bits{bits}"
            start = time.perf_counter()
            train(TrainConfig(data=args.data, out=str(model_dir), format=args.dataset, backbone=args.backbone,
                              bits=bits, epochs=args.epochs, batch_size=args.batch_size,
                              label_smoothing=args.label_smoothing), dataset=data)
            train_seconds = time.perf_counter() - start
        model = load_model(model_dir)
        start = time.perf_counter()
        query_codes, query_features = encode_all(model, data.test.images)
        db_codes, db_features = encode_all(model, data.train.images)
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        hamming_map, precision = retrieval_metrics(query_codes, query_labels, db_codes, db_labels, args.top_k)
        metric_seconds = time.perf_counter() - start
        two_stage_map, two_stage_precision = two_stage_metrics(query_codes, query_labels, query_features, db_codes,
                                                               db_labels, db_features, pool=args.top_k,
                                                               top_k=args.top_k)
        summary = json.loads((model_dir / "summary.json").read_text()) if (model_dir / "summary.json").exists() else {}
        results.append(dict(bits=bits, model=str(model_dir), map=hamming_map, two_stage_map=two_stage_map,
                            precision=precision.tolist(), two_stage_precision=two_stage_precision.tolist(),
                            train_seconds=train_seconds or summary.get("seconds"), val_acc=summary.get("val_acc"),
                            encode_seconds=encode_seconds, metric_seconds=metric_seconds))
        print(f"{bits} bits: mAP@{args.top_k} {hamming_map:.4f} (Hamming), {two_stage_map:.4f} (two-stage); "
              f"metric {metric_seconds:.1f}s", flush=True)
    lines = [f"{args.dataset}, mAP@{args.top_k}: {len(query_labels):,} test queries vs {len(db_labels):,} training "
             f"images; machine: {machine()}", "",
             "| bits | mAP (Hamming) | mAP (two-stage) | P@100 | paper mAP | test acc | train s | metric s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        paper = PAPER_CIFAR10.get(r["bits"]) if args.dataset == "cifar10" else None
        lines.append(f"| {r['bits']} | {r['map']:.4f} | {r['two_stage_map']:.4f} | {r['precision'][99]:.4f} | "
                     f"{paper if paper else '-'} | {r['val_acc'] if r['val_acc'] is not None else '-'} | "
                     f"{r['train_seconds']:.0f} | {r['metric_seconds']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / f"paper_table_{args.dataset}.md").write_text(table + "\n")
    (args.out / f"paper_table_{args.dataset}.json").write_text(json.dumps(results) + "\n")
    plot(results, args.out / f"precision_at_k_{args.dataset}.png", args.dataset)


def plot(results: list[dict], file: Path, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        k = np.arange(1, len(r["precision"]) + 1)
        axis.plot(k, r["precision"], label=f"{r['bits']} bits (Hamming)")
        axis.plot(k, r["two_stage_precision"], linestyle="--", label=f"{r['bits']} bits (two-stage)")
    axis.set(xlabel="number of top-ranked images k", ylabel="precision@k", title=f"{dataset}: precision at k")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(file, dpi=120)
    print(f"wrote {file}")


if __name__ == "__main__":
    main()
