"""build-index throughput against the same model on pre-decoded tensors, and query latency by stage.

  python benchmarks/indexing.py --model runs/cifar48-small --images ../shared/data/cifar10-sample-png \\
      --cifar-test ../shared/data/cifar-10-batches-py

`--cifar-test` writes the 10,000 CIFAR-10 test images as PNG files into a temp dir and indexes them too.
`--photos N --photo-size 800x800 1600x1200` writes N product-photo-like JPEGs (quality 90) per size, and
`--backbone resnet50` (instead of `--model`) measures a randomly initialised 224-px timm backbone (speed only):

  python benchmarks/indexing.py --backbone resnet50 --photos 160 --photo-size 800x800 1600x1200

`--ray` adds, in the same rounds, a build on Ray Data's actor pool (`build-index --ray local`) and its rate as
a ratio to the local build's: over the whole encoding (the actors' start-up included) and after the first batch.

Per directory: one first build (a cold process: model load, first-call set-up), then `--rounds` rounds that
alternate a fresh build-index with the same model encoding the pre-decoded tensors, so that this shared host's
speed swings hit both alike; the ratio is of the two medians.
"""
from __future__ import annotations

import argparse
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import common  # noqa: F401
from common import machine
from engine.build_index import BuildSummary, build_index
from engine.encode import default_workers
from engine.search import Searcher
from training.images import list_images, load_image
from training.model import load_model


def write_cifar_test_pngs(batches: Path, out: Path) -> Path:
    with open(batches / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="latin1")  # the official CIFAR-10 format
    names = pickle.load(open(batches / "batches.meta", "rb"), encoding="latin1")["label_names"]
    images = test["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for index, (pixels, label) in enumerate(zip(images, test["labels"])):
        folder = out / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    return out


def write_photos(out: Path, count: int, width: int, height: int) -> Path:
    """JPEGs (quality 90) of the synthetic scenes, upscaled to a photo's size with sensor-like noise, so that
    decoding costs what a real photo's does (a flat upscale would compress to almost nothing)."""
    import numpy as np

    from engine.synthetic import CLASSES, draw

    rng = np.random.default_rng(0)
    for index in range(count):
        kind = CLASSES[index % len(CLASSES)]
        scene = np.asarray(draw(kind, 128, rng).resize((width, height), Image.BICUBIC), np.int16)
        noisy = np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8)
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(folder / f"{index:05d}.jpg", quality=90)
    return out


def predecoded_rate(model, tensors: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), batch_size):
            model.encode(tensors[i:i + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def query_latency(catalog: Path, queries: list[Path]) -> dict:
    with Searcher(catalog) as searcher:
        searcher.search(queries[:2], k=10)  # warm-up: model load, first touches
        rows = {}
        for label, batches in (("single", [[q] for q in queries[:50]]), ("batch of 100", [queries[:100]])):
            searcher.timings = type(searcher.timings)()
            for batch in batches:
                searcher.search(batch, k=10, pool=1000)
            n = sum(len(b) for b in batches)
            t = searcher.timings
            rows[label] = {stage: 1000 * getattr(t, stage) / n for stage in ("decode", "encode", "coarse", "rerank")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (or --backbone)")
    parser.add_argument("--backbone", help="a timm backbone, randomly initialised at 224 px, 48 bits (speed only)")
    parser.add_argument("--photos", type=int, default=0, help="JPEG photos to write per --photo-size")
    parser.add_argument("--photo-size", nargs="+", default=["800x800"], metavar="WxH")
    parser.add_argument("--images", nargs="*", default=[], help="image directories to index")
    parser.add_argument("--cifar-test", help="CIFAR-10 python batches dir: also index its test set as PNGs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None,
                        help="build-index worker processes (default: build-index's, by job size and device)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating build / pre-decoded rounds")
    parser.add_argument("--ray", action="store_true",
                        help="also build with --ray local (an instance started once, before the rounds)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="latenthash-indexing-"))
    directories = [Path(d) for d in args.images]
    if args.cifar_test:
        directories.append(write_cifar_test_pngs(Path(args.cifar_test), work / "cifar10-test-png"))
    for size in args.photo_size if args.photos else []:
        width, height = (int(v) for v in size.split("x"))
        directories.append(write_photos(work / f"photos-{size}", args.photos, width, height))
    if args.model is None:
        if args.backbone is None:
            parser.error("give --model or --backbone")
        from engine.synthetic import CLASSES
        from training.model import create_model, save_model

        args.model = str(work / f"model-{args.backbone}")
        save_model(create_model(args.backbone, 48, list(CLASSES), 224), args.model)
    model = load_model(args.model)
    print(f"machine: {machine()}; model {args.model} ({model.config.backbone}, {model.config.bits} bits, "
          f"{model.config.input_size}px); batch {args.batch_size}\n")
    if args.ray:
        from shards.cluster import connect

        begin = time.perf_counter()
        connect("local")
        print(f"ray.init (once per cluster, not in the builds' rates): {time.perf_counter() - begin:.1f} s\n")
    ray_columns = (" Ray build-index img/s (median) | Ray / local | after the first batch: local, Ray img/s | "
                   "Ray / local |") if args.ray else ""
    print("| images | files | worker processes | first build img/s | build-index img/s (median) | "
          f"pre-decoded img/s (median) | ratio |{ray_columns}")
    print("|---|---|---|---|---|---|---|" + "---|---|---|---|" * args.ray)
    catalogs = []
    for directory in directories:
        files = list_images(directory)
        catalog = work / f"catalog-{directory.name}"

        def build(ray: str | None = None) -> BuildSummary:
            shutil.rmtree(catalog, ignore_errors=True)
            return build_index(directory, args.model, catalog, shards=2, batch_size=args.batch_size,
                               workers=args.workers, progress=False, ray=ray)

        def median(summaries: list[BuildSummary], rate: str = "images_per_second") -> float:
            return statistics.median(getattr(s, rate) for s in summaries)

        first = build().images_per_second
        tensors = torch.stack([load_image(f, model.config.input_size) for f in files])
        builds, baselines, ray_builds = [], [], []
        for _ in range(args.rounds):
            builds.append(build())
            baselines.append(predecoded_rate(model, tensors, args.batch_size))
            if args.ray:
                ray_builds.append(build("local"))
        built, baseline = median(builds), statistics.median(baselines)
        workers = default_workers(len(files)) if args.workers is None else args.workers
        on_ray = ""
        if args.ray:
            steady = median(builds, "steady_images_per_second")
            ray_built, ray_steady = median(ray_builds), median(ray_builds, "steady_images_per_second")
            on_ray = (f" {ray_built:.0f} | {ray_built / built:.2f} | {steady:.0f}, {ray_steady:.0f} | "
                      f"{ray_steady / steady:.2f} |")
        print(f"| {directory.name} | {len(files)} | {workers} | {first:.0f} | {built:.0f} | {baseline:.0f} | "
              f"{built / baseline:.2f} |{on_ray}", flush=True)
        catalogs.append((catalog, files))
    catalog, _ = catalogs[-1]
    queries = list_images(directories[0])
    print(f"\nquery latency on {catalog.name}, ms per query (k=10, pool 1000):\n")
    print("| mode | decode | encode | coarse | re-rank | total |")
    print("|---|---|---|---|---|---|")
    for mode, stages in query_latency(catalog, queries).items():
        print(f"| {mode} | " + " | ".join(f"{v:.2f}" for v in stages.values()) + f" | {sum(stages.values()):.2f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
