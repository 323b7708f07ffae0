"""Scale benchmark: synthetic catalogs of clustered codes and 512-d float16 features.

  python benchmarks/scale.py --items 1000000 --bits 48 64 --shards 2 8

Builds each catalog, then measures search in fresh subprocesses (1 and 2 threads, with and without torch
imported) side by side with a bare Faiss IndexBinaryFlat over the same codes. Single two-stage queries are
300 different queries, each run once (median and 90th percentile), after a first search that is timed apart.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import disk_mib, machine, peak_rss_mib, timed

CHUNK = 100_000


def synthetic_chunk(start: int, n: int, bits: int, dim: int, seed: int = 0):
    """Clustered codes (1,000 centres, 8% bit noise) and matching float16 features."""
    centres = np.random.default_rng(seed).random((1000, bits)) < 0.5
    rng = np.random.default_rng(seed + 1 + start)
    cluster = rng.integers(0, 1000, n)
    code_bits = centres[cluster] ^ (rng.random((n, bits)) < 0.08)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    features[:, : min(dim, 64)] += cluster[:, None] % 64 * 0.1
    return np.arange(start, start + n, dtype=np.int64), np.packbits(code_bits, axis=1), features.astype(np.float16)


def build(path: Path, items: int, bits: int, dim: int, shards: int, index: str, metadata: bool = True) -> dict:
    from shards import Catalog
    add_seconds = 0.0
    with Catalog.create(path, bits, dim, shards=shards, index=index) as catalog:
        for start in range(0, items, CHUNK):
            ids, codes, features = synthetic_chunk(start, min(CHUNK, items - start), bits, dim)
            metas = [{"path": f"/catalog/img{i:08d}.jpg", "label": int(i % 15)} for i in ids] if metadata else None
            begin = time.perf_counter()
            catalog.add(ids, codes, features, metas)
            add_seconds += time.perf_counter() - begin
        begin = time.perf_counter()
    close_seconds = time.perf_counter() - begin
    return dict(add_items_per_s=items / add_seconds, close_s=close_seconds, disk_mib=disk_mib(path))


def interleaved(first, second, rounds: int = 60) -> tuple[float, float]:
    """Median seconds of two calls timed alternately (order swapped each round), so drift hits both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds + 4):
        for which in ((0, 1) if round_ % 2 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which]()
            if round_ >= 4:
                samples[which].append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def search_phase(path: Path, threads: int, import_torch: bool, queries: int) -> dict:
    """Runs in a fresh process: open time, memory, coarse / two-stage latency, bare Faiss beside it."""
    if import_torch:
        import torch  # noqa: F401  (its OpenMP runtime beside Faiss's)
    import faiss
    from shards import Catalog
    begin = time.perf_counter()
    catalog = Catalog.open(path, threads=threads)
    open_s = time.perf_counter() - begin
    bits, dim = catalog.bits, catalog.manifest.feature_dim
    _, query_codes, query_features = synthetic_chunk(10**9, queries, bits, dim, seed=0)
    query_features = query_features.astype(np.float32)
    one, one_f = query_codes[:1], query_features[:1]
    result = dict(open_s=open_s, items=len(catalog))
    begin = time.perf_counter()
    catalog.search(one, one_f, k=10, pool=1000)
    result["first_search_ms"] = 1000 * (time.perf_counter() - begin)  # builds the feature locator
    # Every single query a different one, run once: each touches features no earlier query read.
    singles = []
    for q in range(1, min(queries, 301)):
        begin = time.perf_counter()
        catalog.search(query_codes[q:q + 1], query_features[q:q + 1], k=10, pool=1000)
        singles.append(time.perf_counter() - begin)
    result["two_stage_1q_ms"] = 1000 * statistics.median(singles)
    result["two_stage_1q_p90_ms"] = 1000 * float(np.percentile(singles, 90))
    result["coarse_batch_ms_per_q"] = 1000 * timed(lambda: catalog.coarse(query_codes, m=1000), 1, 1) / queries
    result["two_stage_batch_ms_per_q"] = 1000 * timed(
        lambda: catalog.search(query_codes, query_features, k=10, pool=1000), 1, 0) / queries
    if catalog.manifest.index_type == "flat":
        codes = np.concatenate([s.code_index.codes for s in catalog.shards])
        bare = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        bare.add(codes)
        padded = np.zeros((queries, codes.shape[1]), np.uint8)
        padded[:, : query_codes.shape[1]] = query_codes
        faiss.omp_set_num_threads(threads)
        result["bare_faiss_batch_ms_per_q"] = 1000 * timed(lambda: bare.search(padded, 1000), 1, 1) / queries
        # Single-query times here swing between two levels (~1.7 and ~3 ms) from call to call, so the catalog
        # and bare Faiss are timed alternately and compared by their medians.
        ours, theirs = interleaved(lambda: catalog.coarse(one, m=1000), lambda: bare.search(padded[:1], 1000))
        result["coarse_1q_ms"], result["bare_faiss_1q_ms"] = 1000 * ours, 1000 * theirs
        result["coarse_vs_bare"] = ours / theirs
    # What the read-time integrity check costs: every returned item's code and feature row checked against its
    # CRC-32, timed alternately against the same search with the check switched off.
    rows = catalog._rows  # shards.features.FeatureRows: the re-ranking stage's reads and checks
    q = query_codes[1:2], query_features[1:2]

    def unchecked():
        rows.check = lambda ids, found: None
        catalog.search(*q, k=10, pool=1000)
        del rows.check  # the class's own check again

    checked, bare_search = interleaved(lambda: catalog.search(*q, k=10, pool=1000), unchecked)
    result["two_stage_checked_ms"], result["two_stage_unchecked_ms"] = 1000 * checked, 1000 * bare_search
    begin = time.perf_counter()
    problems = list(catalog.verify())
    result["verify_items_per_s"] = len(catalog) / (time.perf_counter() - begin)
    result["verify_problems"] = len(problems)
    result["peak_rss_mib"] = peak_rss_mib()
    catalog.close()
    return result


def hash_recall(path_flat: Path, path_hash: Path, queries: int = 200) -> dict:
    from shards import Catalog
    with Catalog.open(path_flat) as flat, Catalog.open(path_hash) as hashed:
        _, q, _ = synthetic_chunk(10**9, queries, flat.bits, flat.manifest.feature_dim)
        exact = flat.coarse(q, m=100)
        approx = hashed.coarse(q, m=100)
        recall = np.mean([len(np.intersect1d(a.ids, b.ids)) / max(1, len(a)) for a, b in zip(exact, approx)])
        radius_equal = all(np.array_equal(a.ids, b.ids) for a, b in zip(flat.coarse(q[:20], radius=3),
                                                                      hashed.coarse(q[:20], radius=3)))
        return dict(hash_knn_recall_at_100=float(recall),
                    hash_1q_ms=1000 * timed(lambda: hashed.coarse(q[:1], m=100)),
                    flat_1q_ms=1000 * timed(lambda: flat.coarse(q[:1], m=100)),
                    hash_radius3_equals_flat=radius_equal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, nargs="+", default=[48, 64])
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="where catalogs are built (default: a temp dir)")
    parser.add_argument("--hash", action="store_true", help="also build an IndexBinaryHash catalog for recall")
    parser.add_argument("--codes-only-items", type=int, default=0, metavar="N",
                        help="also a catalog of N 64-bit codes with 1-d features and no metadata (e.g. 10000000)")
    parser.add_argument("--search-only", metavar="CATALOG", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--import-torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_only:
        print(json.dumps(search_phase(Path(args.search_only), args.threads, args.import_torch, args.queries)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="latenthash-scale-"))
    print(f"machine: {machine()}; {args.items:,} items, {args.dim}-d float16 features\n")
    rows = []
    for bits in args.bits:
        for shards in args.shards:
            path = workdir / f"b{bits}-s{shards}"
            shutil.rmtree(path, ignore_errors=True)
            built = build(path, args.items, bits, args.dim, shards, "flat")
            for threads in (1, 2):
                for torch_too in (False, True):
                    command = [sys.executable, __file__, "--search-only", str(path), "--threads", str(threads),
                               "--queries", str(args.queries)] + (["--import-torch"] if torch_too else [])
                    measured = json.loads(subprocess.run(command, capture_output=True, text=True,
                                                         check=True).stdout)
                    rows.append(dict(bits=bits, shards=shards, threads=threads, torch=torch_too, **built, **measured))
                    print(json.dumps(rows[-1]), flush=True)
            if args.hash and bits == args.bits[0] and shards == args.shards[0]:
                hashed = workdir / f"b{bits}-s{shards}-hash"
                shutil.rmtree(hashed, ignore_errors=True)
                build(hashed, args.items, bits, args.dim, shards, "hash")
                print(json.dumps(dict(bits=bits, shards=shards, **hash_recall(path, hashed))), flush=True)
                shutil.rmtree(hashed)
            shutil.rmtree(path)
    if args.codes_only_items:
        path = workdir / "codes-only"
        shutil.rmtree(path, ignore_errors=True)
        built = build(path, args.codes_only_items, 64, 1, 8, "flat", metadata=False)
        command = [sys.executable, __file__, "--search-only", str(path), "--queries", "100"]
        measured = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        rows.append(dict(bits=64, shards=8, threads=1, torch=False, **built, **measured))
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(path)
    print("\n| bits | shards | threads | torch | add items/s | open s | disk MiB | RSS MiB | coarse 1q ms | bare Faiss "
          "1q ms | ratio 1q | coarse batch ms/q | bare batch ms/q | first search ms | two-stage 1q ms (p90) | "
          "two-stage batch ms/q | checked / unchecked 1q ms | verify items/s |")
    print("|" + "---|" * 18)
    for r in rows:
        print(f"| {r['bits']} | {r['shards']} | {r['threads']} | {'yes' if r['torch'] else 'no'} | "
              f"{r['add_items_per_s']:,.0f} | {r['open_s']:.3f} | {r['disk_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
              f"{r['coarse_1q_ms']:.2f} | {r['bare_faiss_1q_ms']:.2f} | {r['coarse_vs_bare']:.2f} | "
              f"{r['coarse_batch_ms_per_q']:.3f} | {r['bare_faiss_batch_ms_per_q']:.3f} | "
              f"{r['first_search_ms']:.0f} | {r['two_stage_1q_ms']:.2f} ({r['two_stage_1q_p90_ms']:.2f}) | "
              f"{r['two_stage_batch_ms_per_q']:.2f} | {r['two_stage_checked_ms']:.2f} / "
              f"{r['two_stage_unchecked_ms']:.2f} | {r['verify_items_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
