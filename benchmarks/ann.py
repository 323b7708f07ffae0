"""Approximate coarse search at 10M-100M codes: flat vs IVF (vs HNSW), recall against the exact scan.

  python benchmarks/ann.py --items 10000000 --nprobe 8 16 32 64 128
  python benchmarks/ann.py --items 100000000 --shards 8 --nprobe 4 8 16 --skip-flat-batch
  python benchmarks/ann.py --real MODEL_DIR --data ../shared/data/cifar-10-batches-py --nprobe 1 2 4 8 16

Builds the indices through the catalog's own index registry (`shards.index`), one `CodeIndex` per shard, and
merges per-shard results exactly as `Catalog.coarse` does (by distance, then id). Synthetic codes are scale.py's
clustered 64-bit codes with 16-d features that follow the clusters. Reported per setting: single-query and
batched time per query on one thread, recall@1,000 of the exact coarse top-1,000 (tie-aware: a returned code
counts when its distance is within the exact 1,000th distance, since equal distances are interchangeable), and
recall@10 of the two-stage top-10 (pool 1,000 re-ranked by Euclidean distance) against the exact two-stage top-10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine, peak_rss_mib

POOL, K = 1000, 10


def synthetic(items: int, queries: int, bits: int, dim: int) -> tuple[np.ndarray, ...]:
    from scale import synthetic_chunk

    parts = [synthetic_chunk(start, min(1_000_000, items - start), bits, dim) for start in range(0, items, 1_000_000)]
    codes = np.concatenate([p[1] for p in parts])
    features = np.concatenate([p[2] for p in parts])
    del parts
    _, query_codes, query_features = synthetic_chunk(10**10, queries, bits, dim)
    return codes, features, query_codes, query_features.astype(np.float32)


def real(model_dir: Path, data: Path) -> tuple[np.ndarray, ...]:
    """A trained model's codes and features of a labelled dataset: the training images are the database, the
    test images the queries (the paper's protocol)."""
    from paper_table import encode_all
    from training.data import load_dataset
    from training.model import load_model

    model = load_model(model_dir)
    dataset = load_dataset(data, input_size=model.config.input_size)
    (query_codes, query_features), (codes, features) = (encode_all(model, dataset.test.images),
                                                        encode_all(model, dataset.train.images))
    return codes, features.astype(np.float16), query_codes, query_features.astype(np.float32)


def split(codes: np.ndarray, shards: int, kind: str, **options) -> tuple[list, float]:
    """One CodeIndex per shard (ids = positions, as a catalog's are ids in order), and the build seconds."""
    from shards.index import CodeIndex, index_type

    begin = time.perf_counter()
    bounds = np.linspace(0, len(codes), shards + 1).astype(np.int64)
    units = [CodeIndex(np.arange(a, b, dtype=np.int64), codes[a:b], index_type(kind), **options)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return units, time.perf_counter() - begin


def coarse(units: list, queries: np.ndarray, m: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard top m merged exactly by (distance, id): (distances, ids), each (n, m)."""
    parts = [unit.search_knn(queries, m, nprobe) for unit in units]
    distances = np.concatenate([p[0] for p in parts], 1)
    ids = np.concatenate([p[1] for p in parts], 1)
    distances = np.where(ids < 0, np.iinfo(np.int32).max, distances)
    order = np.lexsort((ids, distances), axis=-1)[:, :m]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)


def rerank(features: np.ndarray, query_features: np.ndarray, pools: np.ndarray) -> np.ndarray:
    """Top K of each pool by Euclidean distance on the stored features (ties by id)."""
    out = np.empty((len(pools), K), np.int64)
    for row, (query, pool) in enumerate(zip(query_features, pools)):
        pool = pool[pool >= 0]
        squared = ((features[pool].astype(np.float32) - query) ** 2).sum(1)
        out[row] = pool[np.lexsort((pool, squared))[:K]]
    return out


def per_query_ms(search, queries: np.ndarray, single: int) -> tuple[float, float]:
    """(median ms of `single` one-query calls, ms per query of one batched call over every query)."""
    times = []
    for q in queries[:single]:
        begin = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    search(queries)
    return 1000 * statistics.median(times), 1000 * (time.perf_counter() - begin) / len(queries)


def recall_at_pool(exact_d: np.ndarray, found_d: np.ndarray) -> float:
    """Tie-aware recall@POOL: returned codes within each query's exact POOL-th distance."""
    cut = exact_d[:, -1:]
    return float(np.mean(np.minimum((found_d <= cut).sum(1), POOL) / POOL))


def recall_at_k(exact: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(exact, found)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--real", type=Path, help="a trained model directory: its codes of --data instead of "
                        "synthetic ones (database: the training images; queries: the test images)")
    parser.add_argument("--data", type=Path, help="the labelled dataset for --real (e.g. CIFAR-10's python batches)")
    parser.add_argument("--shards", type=int, default=1, help="indices the codes are split into (merged exactly)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--single", type=int, default=100, help="queries timed one by one")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--hnsw-items", type=int, default=0, help="also build IndexBinaryHNSW over this many codes")
    parser.add_argument("--skip-flat-batch", action="store_true", help="time the exact scan one query at a time only")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    begin = time.perf_counter()
    codes, features, queries, query_features = real(args.real, args.data) if args.real else synthetic(
        args.items, args.queries, 64, 16)
    queries, query_features = queries[:args.queries], query_features[:args.queries]
    print(f"data: {len(codes):,} codes of {codes.shape[1] * 8} bits, {len(queries)} queries "
          f"({time.perf_counter() - begin:.0f} s)", flush=True)
    rows = []

    flat, flat_build = split(codes, args.shards, "flat")
    exact_d, exact_ids = coarse(flat, queries, POOL)
    exact_top = rerank(features, query_features, exact_ids)
    single, batch = per_query_ms(lambda q: coarse(flat, q, POOL), queries,
                                 args.single if not args.skip_flat_batch else args.single)
    if args.skip_flat_batch:
        batch = float("nan")
    two_stage = per_query_ms(lambda q: rerank(features, query_features[:len(q)], coarse(flat, q, POOL)[1]),
                             queries, args.single)[0]
    rows.append(dict(index="flat", nprobe="-", build_s=flat_build, single_ms=single, batch_ms=batch,
                     two_stage_ms=two_stage, recall_pool=1.0, recall_10=1.0))
    print(json.dumps(rows[-1]), flush=True)
    del flat

    ivf, ivf_build = split(codes, args.shards, "ivf")
    lists = [unit.index.nlist for unit in ivf]
    memory = sum(faiss.serialize_index_binary(unit.index).nbytes for unit in ivf[:1]) * len(ivf)
    print(f"ivf: {lists[0]} lists per shard, built in {ivf_build:.0f} s, ~{memory / 2**20:.0f} MiB", flush=True)
    for nprobe in args.nprobe:
        found_d, found_ids = coarse(ivf, queries, POOL, nprobe)
        single, batch = per_query_ms(lambda q: coarse(ivf, q, POOL, nprobe), queries, args.single)
        two_stage = per_query_ms(lambda q: rerank(features, query_features[:len(q)], coarse(ivf, q, POOL, nprobe)[1]),
                                 queries, args.single)[0]
        rows.append(dict(index=f"ivf ({lists[0]} lists/shard)", nprobe=nprobe, build_s=ivf_build, single_ms=single,
                         batch_ms=batch, two_stage_ms=two_stage, recall_pool=recall_at_pool(exact_d, found_d),
                         recall_10=recall_at_k(exact_top, rerank(features, query_features, found_ids))))
        print(json.dumps(rows[-1]), flush=True)
    del ivf

    if args.hnsw_items:
        subset = codes[:args.hnsw_items]
        begin = time.perf_counter()
        hnsw = faiss.IndexBinaryHNSW(codes.shape[1] * 8, 32)
        hnsw.add(subset)
        build = time.perf_counter() - begin
        sub_d, sub_ids = coarse(split(subset, 1, "flat")[0], queries, POOL)
        sub_top = rerank(features, query_features, sub_ids)
        for ef in (1000, 2000):
            hnsw.hnsw.efSearch = ef

            def search(q):
                d, i = hnsw.search(q, POOL)
                order = np.lexsort((i, d), axis=-1)
                return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
            found_d, found_ids = search(queries)
            single, batch = per_query_ms(search, queries, args.single)
            rows.append(dict(index=f"hnsw M=32 ({args.hnsw_items:,} items)", nprobe=f"ef {ef}", build_s=build,
                             single_ms=single, batch_ms=batch, two_stage_ms=float("nan"),
                             recall_pool=recall_at_pool(sub_d, found_d),
                             recall_10=recall_at_k(sub_top, rerank(features, query_features, found_ids))))
            print(json.dumps(rows[-1]), flush=True)

    print(f"\npeak RSS {peak_rss_mib():.0f} MiB; {len(codes):,} codes in {args.shards} shard(s)\n")
    print("| index | nprobe | build s | single query ms | batched ms/query | two-stage ms | recall@1000 | recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['nprobe']} | {r['build_s']:.0f} | {r['single_ms']:.2f} | {r['batch_ms']:.2f} | "
              f"{r['two_stage_ms']:.2f} | {r['recall_pool']:.3f} | {r['recall_10']:.3f} |")


if __name__ == "__main__":
    main()
