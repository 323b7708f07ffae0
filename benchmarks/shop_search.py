"""Shop searches (issue 38): many queries at once against one at a time, and search within the predicted class.

  python benchmarks/shop_search.py --model MODEL_DIR --cifar ../shared/data/cifar-10-batches-py \
      --queries ../shared/data/cifar10-sample-png --database 10000 --work /tmp/shop-search

Builds (once, kept in --work) a catalog of --database CIFAR-10 training photos (PNG files from data_batch_2 on,
class folders, through engine.build_index) with the model; the queries are the CIFAR-10 test photos of --queries
(a class-folder PNG set). Then:

1. `within`: each query encoded once; its search timed plain, within its predicted class and within its top two
   (A B C A B C ... per query, so the host's swings hit all three); P@10 = results of the query's class / 10.
2. `batch`: queries/s of --batch photo queries one at a time against one batch: in process (Searcher.search per
   photo vs engine.batch.run_queries), through a real server (POST /search per photo vs one POST /search/batch)
   and through the command (one `engine.query` process per photo vs one `--jsonl` process), interleaved
   `--rounds` times.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine


def write_database(cifar: Path, folder: Path, count: int) -> None:
    """`count` CIFAR-10 training photos as PNG class folders, from data_batch_2 on (the first batch holds the
    small training sets of RESULTS' issue-35 runs)."""
    from PIL import Image

    names = pickle.load(open(cifar / "batches.meta", "rb"), encoding="latin1")["label_names"]
    written = 0
    for batch in range(2, 6):
        data = pickle.load(open(cifar / f"data_batch_{batch}", "rb"), encoding="latin1")
        images = data["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for n, (image, label) in enumerate(zip(images, data["labels"])):
            if written == count:
                return
            (folder / names[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / names[label] / f"b{batch}_{n:05d}.png")
            written += 1


def catalog_for(args: argparse.Namespace) -> Path:
    from engine.build_index import build_index

    catalog = args.work / "catalog"
    if not catalog.is_dir():
        photos = args.work / "database"
        if not photos.is_dir():
            write_database(args.cifar, photos, args.database)
        build_index(photos, args.model, catalog, shards=4, progress=False)
    return catalog


def query_files(folder: Path) -> list[tuple[Path, str]]:
    return [(file, file.parent.name) for file in sorted(folder.glob("*/*.png"))]


def within(catalog: Path, queries: list[tuple[Path, str]], repeat: int) -> dict:
    """P@10 and search latency, plain and within the predicted classes (top 1, top 2)."""
    from engine.search import Searcher

    with Searcher(catalog, threads=1) as searcher:
        codes, features = searcher.encode([file for file, _ in queries])
        labels = [label for _, label in queries]
        predicted = np.argmax(searcher.encoder.class_scores(features), axis=1)
        accuracy = float(np.mean([searcher.encoder.class_names[c] == label for c, label in zip(predicted, labels)]))
        variants = {"plain": 0, "within top-1": 1, "within top-2": 2}
        seconds = {name: [] for name in variants}
        precision = {name: [] for name in variants}
        for row, label in enumerate(labels):
            for repetition in range(repeat):
                for name, top in variants.items():
                    start = time.perf_counter()
                    results = searcher.search_codes(codes[row:row + 1], features[row:row + 1], k=10,
                                                    within_predicted=top)[0]
                    seconds[name].append(time.perf_counter() - start)
                    if repetition == 0:
                        precision[name].append(sum(r.label == label for r in results) / 10)
    return {"queries": len(queries), "classifier_top1": accuracy,
            "rows": [{"search": name, "p_at_10": float(np.mean(precision[name])),
                      "median_ms": 1000 * statistics.median(seconds[name]),
                      "mean_ms": 1000 * statistics.fmean(seconds[name])} for name in variants]}


def in_process(catalog: Path, files: list[Path], rounds: int) -> dict:
    from engine.batch import BatchQuery, run_queries
    from engine.search import Searcher

    with Searcher(catalog, threads=1) as searcher:  # as the service's: one Faiss thread per search
        photos = [file.read_bytes() for file in files]

        def one_at_a_time():
            for photo in photos:
                codes, features = searcher.encode_bytes([photo])
                searcher.search_codes(codes, features, k=10)

        def batch():
            run_queries(searcher, [BatchQuery(f"q{n}", image=photo) for n, photo in enumerate(photos)])

        return interleaved({"one at a time": one_at_a_time, "batch": batch}, len(files), rounds)


def served(catalog: Path, files: list[Path], rounds: int, env: dict) -> dict:
    import httpx

    from tests.server_harness import running_server

    photos = [(file.name, file.read_bytes(), "image/png") for file in files]
    queries = json.dumps([{"image": n, "k": 10} for n in range(len(files))])
    with running_server(catalog, env, "--read-only") as (base, _), httpx.Client(base_url=base, timeout=600) as http:
        def one_at_a_time():
            for photo in photos:
                http.post("/search?k=10", files={"image": photo}).raise_for_status()

        def batch():
            http.post("/search/batch", data={"queries": queries},
                      files=[("images", photo) for photo in photos]).raise_for_status()

        return interleaved({"one at a time": one_at_a_time, "batch": batch}, len(files), rounds)


def command(catalog: Path, files: list[Path], processes: int, rounds: int, env: dict, work: Path) -> dict:
    """One `engine.query` process per photo (`processes` of them, each paying the start-up) vs one --jsonl
    process answering every photo."""
    lines = work / "queries.jsonl"
    lines.write_text("".join(json.dumps({"image": str(file)}) + "\n" for file in files))
    query = [sys.executable, "-m", "engine.query", "--catalog", str(catalog), "--json"]

    def one_at_a_time():
        for file in files[:processes]:
            subprocess.run(query + [str(file)], env=env, check=True, capture_output=True)

    def batch():
        subprocess.run(query[:-1] + ["--jsonl", str(lines)], env=env, check=True, capture_output=True)

    counts = {"one at a time": processes, "batch": len(files)}
    return interleaved({"one at a time": one_at_a_time, "batch": batch}, counts, rounds)


def interleaved(variants: dict, queries: int | dict, rounds: int) -> dict:
    """Queries/s of each variant, run in turn (A B A B ...) `rounds` times after one warm-up each; the median."""
    counts = queries if isinstance(queries, dict) else {name: queries for name in variants}
    for run in variants.values():
        run()
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"queries": counts[name], "queries_per_s": counts[name] / statistics.median(seconds[name]),
                   "seconds": seconds[name]} for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained CIFAR-10 model directory")
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 python batches (the database's photos)")
    parser.add_argument("--queries", type=Path, required=True, help="class folders of query PNGs (CIFAR-10 test)")
    parser.add_argument("--database", type=int, default=10000, help="catalog photos (default %(default)s)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shop-search")
    parser.add_argument("--batch", type=int, default=64, help="photos per batch (default %(default)s)")
    parser.add_argument("--processes", type=int, default=4, help="command runs one at a time (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="timed searches per query and variant (within)")
    parser.add_argument("--only", choices=("within", "batch"), help="one part only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    catalog = catalog_for(args)
    queries = query_files(args.queries)
    report = {"host": machine(), "model": str(args.model), "database": args.database}
    if args.only in (None, "within"):
        report["within"] = within(catalog, queries, args.repeat)
        print(json.dumps(report["within"], indent=1), flush=True)
    if args.only in (None, "batch"):
        files = [file for file, _ in queries[::max(1, len(queries) // args.batch)]][:args.batch]
        report["batch"] = {"in process": in_process(catalog, files, args.rounds),
                           "service": served(catalog, files, args.rounds, env),
                           "command": command(catalog, files, args.processes, args.rounds, env, args.work)}
        print(json.dumps(report["batch"], indent=1), flush=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
