"""Fan-out overhead of searching a catalog's shards on Ray actors, against the in-process catalog.

  python benchmarks/cluster.py --catalog /tmp/syn1m --queries 300

On a local Ray instance (this machine's cores): the same single queries (k 10, pool 1,000) through
`Catalog.search` (one thread) and through `RayCatalog.search` with 1 shard per actor and with every shard on one
actor, timed alternately; also the bare actor round trip. A catalog is scale.py's synthetic one (build it with
`python -c "from scale import build; ..."` or serve_load.py's --workdir).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--pool", type=int, default=1000)
    args = parser.parse_args()
    import ray

    from shards import Catalog
    from shards.cluster import RayCatalog, connect

    print(f"machine: {machine()}", flush=True)
    begin = time.perf_counter()
    connect("local")
    print(f"ray.init: {time.perf_counter() - begin:.1f} s", flush=True)
    local = Catalog.open(args.catalog, threads=1)
    rng = np.random.default_rng(0)
    ids = rng.choice(np.concatenate([s.code_index.ids for s in local.shards]), args.queries, replace=False)
    items = local.get(ids)
    codes = np.stack([i.code for i in items])
    features = np.stack([i.features for i in items])
    shards = local.manifest.shard_count
    setups = {"in-process Catalog": local}
    for per_actor in sorted({1, shards}):
        begin = time.perf_counter()
        remote = RayCatalog(args.catalog, "local", per_actor, timeout=60)
        print(f"{len(remote.actors)} actor(s) ready in {time.perf_counter() - begin:.1f} s", flush=True)
        setups[f"Ray, {len(remote.actors)} actor(s) x {per_actor} shard(s)"] = remote
    for name, catalog in setups.items():  # warm-up: merged indices, feature tables
        catalog.search(codes[:2], features[:2], k=10, pool=args.pool)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for q in range(args.queries):
        names = list(setups) if q % 2 else list(reversed(setups))
        for name in names:
            begin = time.perf_counter()
            setups[name].search(codes[q:q + 1], features[q:q + 1], k=10, pool=args.pool)
            samples[name].append(time.perf_counter() - begin)
        if q < 5:
            assert all(np.array_equal(setups[n].search(codes[q:q + 1], features[q:q + 1], k=10, pool=args.pool)[0].ids,
                                      local.search(codes[q:q + 1], features[q:q + 1], k=10, pool=args.pool)[0].ids)
                       for n in setups)
    remote = next(c for c in setups.values() if isinstance(c, RayCatalog))
    again = sum(c.reranked_again for c in setups.values() if isinstance(c, RayCatalog))
    trips = []
    for _ in range(200):
        begin = time.perf_counter()
        ray.get(remote.actors[0].count.remote())
        trips.append(time.perf_counter() - begin)
    base = statistics.median(samples["in-process Catalog"]) * 1000
    print(f"\n{len(local):,} items, {shards} shards, k 10, pool {args.pool:,}, {args.queries} single queries\n")
    print("| search | p50 ms | p90 ms | p50 / in-process | bar: 2 x in-process + 2 ms |")
    print("|---|---|---|---|---|")
    for name, times in samples.items():
        p50, p90 = statistics.median(times) * 1000, float(np.percentile(times, 90)) * 1000
        print(f"| {name} | {p50:.2f} | {p90:.2f} | {p50 / base:.2f} | {'met' if p50 <= 2 * base + 2 else 'not met'} |")
    print(f"\nactor round trip (count()): p50 {statistics.median(trips) * 1000:.2f} ms, "
          f"p99 {float(np.percentile(trips, 99)) * 1000:.2f} ms")
    print(f"queries whose fine stage ran a second round trip: {again} of {2 * (args.queries + 7)}")


if __name__ == "__main__":
    main()
