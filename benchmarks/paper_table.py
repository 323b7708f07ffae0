"""The paper's table: mAP@1000 and precision@k on CIFAR-10 (or MNIST), every method measured on one protocol.

  python benchmarks/paper_table.py --data ../shared/data/cifar-10-batches-py --bits 12 32 48
  python benchmarks/paper_table.py --dataset mnist --data ../shared/data/mnist --bits 48
  python benchmarks/paper_table.py --data ../shared/data/cifar-10-batches-py --bits 48 --models runs/ \\
      --inference-path openvino-bf16             # the same answers on another inference path?
  python benchmarks/paper_table.py --data ../shared/data/cifar-10-batches-py --bits 12 32 48 --models runs/ \\
      --methods latent lsh itq itq-cca ksh cnnh cnnh+ --features gist backbone

Protocol (docs/ARCHITECTURE.md, "Evaluation protocol"): queries = the test set, database = the training set, both in their original
order; Hamming ranking with ties by database order; AP normalised by the relevant items found in the top K.

Methods: `latent` is the paper's latent layer; `lsh`, `itq`, `itq-cca`, `ksh` hash features after the fact
(fitted on the training set: `--features gist` = 512-d GIST as the original comparisons, `backbone` = the
latent model's own backbone features); `cnnh`, `cnnh+` train the same backbone on CNNH target codes.
Networks are trained from scratch unless `--models DIR` holds them (`bitsK/`, `cnnh/bitsK/`, `cnnh+/bitsK/`).
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
from engine.encode import Encoder
from engine.inference import PATHS
from engine.metrics import retrieval_metrics, two_stage_metrics
from training.config import read_train_config
from training.data import Dataset, load_dataset
from training.gist import gist
from training.hashers import CODE_MAKERS, SUPERVISED, fit_code_maker
from training.model import load_model
from training.train import TrainConfig, train

NETWORKS = ("latent", "cnnh", "cnnh+")
METHODS = ("latent", *CODE_MAKERS, "cnnh", "cnnh+")
# Lin et al. 2015, Table 1 (CIFAR-10 mAP). Only their own row was measured by them; the baseline rows were
# copied from Xia et al. (AAAI 2014), who used another split and protocol (docs/ARCHITECTURE.md, "Evaluation protocol").
PAPER_CIFAR10 = {
    "latent": {12: 0.8930, 32: 0.8972, 48: 0.8973},
    "cnnh+": {12: 0.465, 32: 0.521, 48: 0.532},
    "cnnh": {12: 0.439, 32: 0.509, 48: 0.522},
    "ksh": {12: 0.303, 32: 0.346, 48: 0.356},
    "itq-cca": {12: 0.264, 32: 0.288, 48: 0.295},
    "lsh": {12: 0.121, 32: 0.120, 48: 0.120},
}


def encode_all(encoder: Encoder, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    codes, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            c, f = encoder.encode(images[start:start + batch_size])
            codes.append(c)
            features.append(f)
    return np.concatenate(codes), np.concatenate(features)


def model_subdir(objective: str, bits: int) -> Path:
    return Path(f"bits{bits}") if objective == "latent" else Path(objective) / f"bits{bits}"


def find_model(models: Path | None, objective: str, bits: int) -> Path | None:
    if models is None:
        return None
    candidates = [models / model_subdir(objective, bits)] + ([models] if objective == "latent" else [])
    for candidate in candidates:
        config = candidate / "config.json"
        if config.is_file():
            stored = json.loads(config.read_text())
            if stored["bits"] == bits and stored.get("extra", {}).get("objective", "latent") == objective:
                return candidate
    return None


def recorded_training_seconds(model_dir: Path) -> float | None:
    """A saved model's training time, plus its backbone's when it was trained on another model's (--weights DIR):
    the cost of the whole network from scratch."""
    summary = model_dir / "summary.json"
    if not summary.is_file():
        return None
    seconds = json.loads(summary.read_text()).get("seconds")
    config = read_train_config(model_dir)
    weights = config.weights if config else None
    if seconds is not None and weights and Path(weights).is_dir():
        backbone_seconds = recorded_training_seconds(Path(weights))
        seconds = None if backbone_seconds is None else seconds + backbone_seconds
    return seconds


def network(args: argparse.Namespace, data: Dataset, objective: str, bits: int) -> tuple[Path, float | None]:
    """A trained network for (objective, bits): found in --models, or trained now; and its training seconds."""
    found = find_model(args.models, objective, bits)
    if found is not None:
        return found, recorded_training_seconds(found)
    out = args.out / "models" / model_subdir(objective, bits)
    epochs = args.epochs if objective == "latent" else (args.cnnh_epochs or args.epochs)
    start = time.perf_counter()
    train(TrainConfig(data=args.data, out=str(out), format=args.dataset, backbone=args.backbone, bits=bits,
                      epochs=epochs, batch_size=args.batch_size, label_smoothing=args.label_smoothing,
                      objective=objective), dataset=data)
    return out, time.perf_counter() - start


def gist_features(args: argparse.Namespace, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """GIST of the test and training images, cached in --out (.npz of plain arrays, read without pickle)."""
    cached = args.out / f"gist_{args.dataset}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as stored:
            return stored["test"], stored["train"]
    start = time.perf_counter()
    test, train_set = gist(data.test.images), gist(data.train.images)
    print(f"GIST of {len(test) + len(train_set):,} images in {time.perf_counter() - start:.0f}s", flush=True)
    np.savez(cached, test=test, train=train_set)
    return test, train_set


def score(args: argparse.Namespace, labels: tuple[np.ndarray, np.ndarray], method: str, features: str, bits: int,
          codes: tuple[np.ndarray, np.ndarray], vectors: tuple[np.ndarray, np.ndarray], **extra) -> dict:
    """One row: mAP and P@k by Hamming ranking, and by the two-stage search re-ranking on `vectors`."""
    (query_labels, db_labels), (query_codes, db_codes) = labels, codes
    start = time.perf_counter()
    hamming_map, precision = retrieval_metrics(query_codes, query_labels, db_codes, db_labels, args.top_k)
    metric_seconds = time.perf_counter() - start
    two_stage_map, two_stage_precision = two_stage_metrics(query_codes, query_labels, vectors[0], db_codes,
                                                           db_labels, vectors[1], pool=args.top_k, top_k=args.top_k)
    print(f"{method} ({features}), {bits} bits: mAP@{args.top_k} {hamming_map:.4f} (Hamming), "
          f"{two_stage_map:.4f} (two-stage); metric {metric_seconds:.1f}s", flush=True)
    return dict(method=method, features=features, bits=bits, map=hamming_map, two_stage_map=two_stage_map,
                precision=precision.round(5).tolist(), two_stage_precision=two_stage_precision.round(5).tolist(),
                metric_seconds=metric_seconds, **extra)


def run(args: argparse.Namespace) -> tuple[list[dict], Dataset]:
    data = load_dataset(args.data, args.dataset)
    labels = (data.test.labels.numpy(), data.train.labels.numpy())
    code_makers = [m for m in args.methods if m in CODE_MAKERS]
    gist_vectors = gist_features(args, data) if code_makers and "gist" in args.features else None
    networks = [m for m in NETWORKS if m in args.methods]
    if code_makers and "backbone" in args.features and "latent" not in networks:
        networks.insert(0, "latent")  # its backbone features are what the code makers hash
    rows = []
    for bits in args.bits:
        feature_sets = {"gist": ("gist", gist_vectors)}  # --features name -> (label in the table, vectors)
        for objective in networks:
            model_dir, train_seconds = network(args, data, objective, bits)
            model = load_model(model_dir)
            encoder = Encoder(model).using(args.inference_path)
            start = time.perf_counter()
            (query_codes, query_vectors), (db_codes, db_vectors) = (encode_all(encoder, data.test.images),
                                                                    encode_all(encoder, data.train.images))
            encode_seconds = time.perf_counter() - start
            label = "backbone, mirror-averaged" if model.config.mirror_average else "backbone"
            if objective == "latent":
                feature_sets["backbone"] = (label, (query_vectors, db_vectors))
            if objective in args.methods:
                rows.append(score(args, labels, objective, label, bits, (query_codes, db_codes),
                                  (query_vectors, db_vectors), model=str(model_dir), fit_seconds=train_seconds,
                                  encode_seconds=encode_seconds, inference_path=encoder.inference.name))
        for method in code_makers:
            for label, vectors in (feature_sets[features] for features in args.features):
                if bits > vectors[1].shape[1] and method in ("itq", "itq-cca"):
                    print(f"skipping {method} ({label}) at {bits} bits: more bits than feature dimensions")
                    continue
                maker = fit_code_maker(method, vectors[1], bits, labels[1] if method in SUPERVISED else None,
                                       seed=args.seed)
                start = time.perf_counter()
                codes = (maker.encode(vectors[0]), maker.encode(vectors[1]))
                rows.append(score(args, labels, method, label, bits, codes, vectors,
                                  fit_seconds=maker.fit_seconds, encode_seconds=time.perf_counter() - start))
    return rows, data


def tables(rows: list[dict], args: argparse.Namespace, queries: int, database: int) -> str:
    bits = sorted({r["bits"] for r in rows})
    paper = PAPER_CIFAR10 if args.dataset == "cifar10" else {}
    lines = [f"{args.dataset}, mAP@{args.top_k} by Hamming ranking: {queries:,} test queries vs {database:,} "
             f"training images; machine: {machine()}", "",
             "| method | features | " + " | ".join(f"{b} bits" for b in bits) + " | paper (" +
             "/".join(str(b) for b in sorted(PAPER_CIFAR10['latent'])) + " bits) |",
             "|---|---|" + "---|" * len(bits) + "---|"]
    for method, features in dict.fromkeys((r["method"], r["features"]) for r in rows):
        cells = {r["bits"]: r for r in rows if (r["method"], r["features"]) == (method, features)}
        printed = paper.get(method)
        lines.append(f"| {method} | {features} | " + " | ".join(
            f"{cells[b]['map']:.4f}" if b in cells else "-" for b in bits) + " | " +
            ("/".join(f"{v:.3f}" for v in printed.values()) if printed and (method in NETWORKS or features == "gist")
             else "-")
            + " |")
    k = min(100, args.top_k)  # P@100, or P@top_k when the ranking is shorter
    lines += ["", f"| method | features | bits | mAP (Hamming) | mAP (two-stage) | P@{k} | fit/train s | encode s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") is not None else "-"
        lines.append(f"| {r['method']} | {r['features']} | {r['bits']} | {r['map']:.4f} | {r['two_stage_map']:.4f} "
                     f"| {r['precision'][k - 1]:.4f} | {fit} | {r['encode_seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], file: Path, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits = sorted({r["bits"] for r in rows})
    figure, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 4), squeeze=False, sharey=True)
    colours = {method: f"C{i}" for i, method in enumerate(METHODS)}  # one colour per method, dotted = GIST
    for axis, b in zip(axes[0], bits):
        for r in (r for r in rows if r["bits"] == b):
            k = np.arange(1, len(r["precision"]) + 1)
            axis.plot(k, r["precision"], color=colours[r["method"]], linestyle=":" if r["features"] == "gist" else "-",
                      label=f"{r['method']} ({r['features']})")
            if r["method"] == "latent":
                axis.plot(k, r["two_stage_precision"], color="black", linestyle="--", label="latent, two-stage")
        axis.set(xlabel="number of top-ranked images k", title=f"{dataset}, {b} bits: precision at k")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision@k")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(file, dpi=120)
    print(f"wrote {file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dataset", choices=("cifar10", "mnist"), default="cifar10")
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 32, 48])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["latent"])
    parser.add_argument("--features", nargs="+", choices=("gist", "backbone"), default=["gist"],
                        help="what lsh/itq/itq-cca/ksh hash (default: GIST, as the original comparisons)")
    parser.add_argument("--models", type=Path, help="directory of trained models (bitsK/, cnnh/bitsK/, ...)")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_table"))
    parser.add_argument("--backbone", default="cifar_convnet_small")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--cnnh-epochs", type=float, help="epochs of the CNNH networks (default: --epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the code makers")
    parser.add_argument("--inference-path", choices=list(PATHS), default="eager",
                        help="how the networks encode (engine/inference.py; default %(default)s, the reference)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, data = run(args)
    name = args.dataset if args.methods == ["latent"] else f"{args.dataset}_methods"
    table = tables(rows, args, len(data.test), len(data.train))
    print("\n" + table)
    (args.out / f"paper_table_{name}.md").write_text(table + "\n")
    (args.out / f"paper_table_{name}.json").write_text(json.dumps(rows) + "\n")
    plot(rows, args.out / f"precision_at_k_{name}.png", args.dataset)


if __name__ == "__main__":
    main()
