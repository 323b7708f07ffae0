"""The whole engine in one run: generate labeled images, train a hashing model, build a catalog, query it.

`python -m engine.demo` (or `latenthash-demo`) uses built-in defaults and needs no download; it finishes in
a few minutes on a laptop CPU and leaves everything (images, model, catalog, HTML page) in --out.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from engine.build_index import build_index
from engine.cli import bounded_int, program_name, run_cli
from engine.errors import InputError
from engine.query import format_table
from engine.synthetic import CLASSES, make_image_folder
from training.train import TrainConfig, train


MARKER = ".latenthash-demo"  # written into the demo's folder: the one folder a later demo may replace


def prepare_folder(out: Path) -> None:
    """An empty `out` for the demo: a folder an earlier demo made is replaced, any other folder with something
    in it is refused (`--out ~/photos` must not delete the photos)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; the demo needs a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise InputError(f"{out} already holds files that the demo did not make; the demo replaces only "
                             "a folder it made itself: give a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by latenthash-demo; a later demo run with this --out replaces this folder\n")


def run_demo(out: Path, per_class: int, queries_per_class: int, epochs: float, bits: int, backbone: str,
             seed: int) -> dict:
    from engine.metrics import retrieval_metrics, two_stage_metrics
    from engine.report import write_html
    from engine.search import Searcher

    started = time.perf_counter()
    prepare_folder(out)
    images, queries = out / "images", out / "queries"
    print(f"1/4 drawing {per_class * len(CLASSES)} catalog images and {queries_per_class * len(CLASSES)} "
          f"held-out queries in {len(CLASSES)} classes under {out}")
    make_image_folder(images, per_class=per_class, seed=seed)
    query_files = make_image_folder(queries, per_class=queries_per_class, seed=seed + 1, start=per_class)

    print(f"2/4 training {backbone} with a {bits}-bit latent layer for {epochs:g} epochs")
    summary = train(TrainConfig(data=str(images), out=str(out / "model"), backbone=backbone, bits=bits,
                                epochs=epochs, val_split=0.1, seed=seed, tta=False))

    print("3/4 build-index")
    build = build_index(images, out / "model", out / "catalog", shards=2, batch_size=256)
    print(f"    indexed {build.indexed} images at {build.images_per_second:.0f} img/s")

    print("4/4 querying with held-out images")
    with Searcher(out / "catalog") as searcher:
        codes, features = searcher.encode(query_files)
        results = searcher.search_codes(codes, features, k=10, pool=200)
        items = list(searcher.catalog)
        image_roots = searcher.record.image_roots
    query_labels = np.array([CLASSES.index(p.parent.name) for p in query_files])
    db_labels = np.array([CLASSES.index(item.meta["label"]) for item in items])
    db_codes = np.stack([item.code for item in items])
    db_features = np.stack([item.features for item in items])
    hamming_map, _ = retrieval_metrics(codes, query_labels, db_codes, db_labels, top_k=100)
    two_stage_map, _ = two_stage_metrics(codes, query_labels, features, db_codes, db_labels, db_features,
                                         pool=200, top_k=100)
    shown = [0, len(query_files) // 2, len(query_files) - 1]
    for i in shown:
        print()
        print(format_table(str(query_files[i]), results[i][:5]))
    precision = np.mean([[r.label == query_files[i].parent.name for r in rs] for i, rs in enumerate(results)])
    page = out / "results.html"
    write_html(page, [str(query_files[i]) for i in range(0, len(query_files), queries_per_class)],
               [results[i] for i in range(0, len(query_files), queries_per_class)], "latenthash demo",
               image_roots,
               [query_files[i].parent.name for i in range(0, len(query_files), queries_per_class)])
    report = dict(val_acc=summary.get("val_acc"), precision_at_10=float(precision), map_hamming=float(hamming_map),
                  map_two_stage=float(two_stage_map), seconds=time.perf_counter() - started)
    print()
    print(f"validation accuracy {report['val_acc']:.3f}; held-out queries: precision@10 {precision:.3f}, "
          f"mAP@100 {hamming_map:.3f} (Hamming ranking), {two_stage_map:.3f} (two-stage)")
    print(f"results page: {page}")
    print(f"done in {report['seconds']:.0f}s. Try: python -m engine.query --catalog {out / 'catalog'} "
          f"{query_files[0]}")
    return report


EXAMPLES = """examples:
  latenthash-demo                                   # ten classes, 300 images each, into ./latenthash-demo
  python -m engine.demo --out /tmp/latenthash-demo --epochs 4
  python -m engine.demo --per-class 40 --queries-per-class 3 --epochs 4 --bits 24   # a quick look, under a minute
  python -m engine.demo --backbone cifar_convnet --bits 12 --seed 1
"""


def build_parser() -> argparse.ArgumentParser:
    """The demo's options, each described: the demo is where a newcomer starts."""
    parser = argparse.ArgumentParser(prog=program_name("engine.demo"), description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--out", default="latenthash-demo",
                        help="folder for the images, model, catalog and results page: new, empty, or one an earlier "
                        "demo made (which is replaced); any other folder is refused (default %(default)s)")
    parser.add_argument("--per-class", type=bounded_int(1), default=300,
                        help="catalog images drawn per class, ten classes; the model trains on them "
                        "(default %(default)s)")
    parser.add_argument("--queries-per-class", type=bounded_int(1), default=10,
                        help="held-out query images per class, never trained on nor indexed (default %(default)s)")
    parser.add_argument("--epochs", type=float, default=6,
                        help="training passes over the catalog images (default %(default)s)")
    parser.add_argument("--bits", type=bounded_int(1), default=48,
                        help="code length of the model (default %(default)s)")
    parser.add_argument("--backbone", default="cifar_convnet_small",
                        help="timm model name of the backbone (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the drawn images and of training (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run_demo(Path(args.out), args.per_class, args.queries_per_class, args.epochs, args.bits,
                                    args.backbone, args.seed) and 0)


if __name__ == "__main__":
    sys.exit(main())
