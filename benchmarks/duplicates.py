"""Duplicate listings at scale: `engine.duplicates.find_duplicates` on scale.py's synthetic catalog with planted
copies, against the radius search it replaces, and the all-pairs search's cost on codes of growing skew.

  python benchmarks/duplicates.py --items 1000000 --radius 1 2 3 --workdir /tmp/latenthash-duplicates --keep

The catalog (scale.py's `build`: 1,000 code centres with 8% bit noise, 512-d float16 features) gets PLANTED copies
of random items: codes with up to `radius` bits flipped, features with small noise; a tenth of them copied twice.
Each radius runs in a fresh process (time per stage, pairs, groups, planted copies found, false groups, peak
RSS), radii interleaved over `--rounds`. The radius search it replaces (one `coarse(radius=R)` query per item) is
timed on `--sample` items and extrapolated. The skew table runs `shards.pairs.close_pairs` alone on codes drawn
uniformly, as scale.py's, and clustered tighter (fewer centres, less noise), against the cost model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine, peak_rss_mib
from scale import build

PLANTED = 1000
COPY_NOISE = 0.02  # feature noise per dimension: a copy lies ~0.45 from its source, random pairs ~32 apart
FIRST_COPY_ID = 10**12


def plant(path: Path, bits: int, dim: int, items: int, radius: int, seed: int = 7) -> None:
    """Add PLANTED copies of random items (a tenth of them copied twice) to the catalog at `path`."""
    from shards import Catalog
    rng = np.random.default_rng(seed)
    sources = np.sort(rng.choice(items, PLANTED, replace=False))
    twice = sources[: PLANTED // 10]
    copied = np.concatenate([sources, twice])
    with Catalog.open(path, readonly=False) as catalog:
        codes = np.stack([item.code for item in catalog.get(copied)])
        features = catalog.features(copied)
        flips = rng.integers(0, radius + 1, len(copied))
        code_bits = np.unpackbits(codes, axis=1)[:, :bits]
        for row, count in enumerate(flips):
            code_bits[row, rng.choice(bits, count, replace=False)] ^= 1
        ids = FIRST_COPY_ID + np.arange(len(copied))
        noisy = features + rng.normal(0, COPY_NOISE, features.shape).astype(np.float32)
        catalog.add(ids, np.packbits(code_bits, axis=1), noisy.astype(np.float16),
                    [{"path": f"/catalog/copy{i:08d}.jpg", "label": "copy"} for i in range(len(copied))])
    np.save(path / "planted.npy", np.stack([copied, ids, flips], axis=1))  # (source, copy, bits flipped)


def measure(path: Path, radius: int) -> dict:
    """In a fresh process: find_duplicates at `radius`, scored against the planted copies."""
    from engine.duplicates import DuplicateStats, find_duplicates
    from shards import Catalog
    begin = time.perf_counter()
    catalog = Catalog.open(path)
    open_s, open_rss = time.perf_counter() - begin, peak_rss_mib()
    stats = DuplicateStats()
    begin = time.perf_counter()
    groups = find_duplicates(catalog, radius, stats=stats)
    seconds = time.perf_counter() - begin
    catalog.close()
    planted = np.load(path / "planted.npy")
    group_of = {item.id: n for n, group in enumerate(groups) for item in group}
    found = sum(1 for source, copy, _ in planted if source in group_of and group_of.get(copy) == group_of[source])
    planted_ids = set(planted[:, :2].ravel().tolist())
    false_groups = sum(1 for group in groups if not {item.id for item in group} <= planted_ids)
    return dict(total_s=seconds, open_s=open_s, open_rss_mib=open_rss, peak_rss_mib=peak_rss_mib(),
                planted_found=found, planted_within=int((planted[:, 2] <= radius).sum()), false_groups=false_groups,
                **vars(stats))


def radius_queries(path: Path, radius: int, sample: int) -> dict:
    """In a fresh process: what one radius query per item costs (the search's own `coarse`), extrapolated."""
    from shards import Catalog
    with Catalog.open(path, threads=1) as catalog:
        ids, codes = catalog.codes()
        rows = np.random.default_rng(0).choice(len(ids), sample, replace=False)
        queries = codes[rows][:, : (catalog.bits + 7) // 8]
        begin = time.perf_counter()
        for start in range(0, sample, 100):
            catalog.coarse(queries[start:start + 100], radius=radius)
        per_query = (time.perf_counter() - begin) / sample
    return dict(radius=radius, radius_query_ms=1000 * per_query, all_items_s=per_query * len(ids))


def skewed_codes(n: int, bits: int, centres: int, noise: float, seed: int = 3) -> np.ndarray:
    """Padded codes around `centres` centres with `noise` bit noise (0 centres: uniform)."""
    from shards.codes import pad_codes
    rng = np.random.default_rng(seed)
    if centres == 0:
        return pad_codes(np.packbits(rng.random((n, bits)) < 0.5, axis=1), bits)
    centre_bits = rng.random((centres, bits)) < 0.5
    code_bits = centre_bits[rng.integers(0, centres, n)] ^ (rng.random((n, bits)) < noise)
    return pad_codes(np.packbits(code_bits, axis=1), bits)


def skew_row(n: int, bits: int, radius: int, centres: int, noise: float) -> dict:
    from shards.pairs import PairCount, close_pairs
    codes = skewed_codes(n, bits, centres, noise)
    count = PairCount()
    begin = time.perf_counter()
    pairs = sum(len(first) for first, _, _ in close_pairs(codes, bits, radius, count))
    seconds = time.perf_counter() - begin
    uniform_model = (radius + 1) * n * (n - 1) / 2 / 2 ** (bits / (radius + 1))
    return dict(n=n, bits=bits, radius=radius, centres=centres or "uniform", noise=noise, compared=count.compared,
                uniform_model=uniform_model, longest_run=count.longest_run, pairs=pairs, seconds=seconds,
                ns_per_compared=1e9 * seconds / max(1, count.compared))


def child(flag: str, *args: str) -> dict:
    command = [sys.executable, __file__, flag, *args]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def report(items: int, runs: list[dict], brute: list[dict], skew: list[dict]) -> None:
    print(f"\nmachine: {machine()}; {items:,} synthetic items + planted copies, 48-bit codes, 512-d float16\n")
    print("| radius | seconds | Hamming s | features s | groups s | pairs compared | longest run | pairs within R "
          "| confirmed | groups | copies found / within R | false groups | max distance | open RSS MiB "
          "| peak RSS MiB |")
    print("|" + "---|" * 15)
    for r in runs:
        s = r["seconds"]
        print(f"| {r['radius']} | {r['total_s']:.1f} | {s['hamming']:.1f} | {s['features']:.1f} | {s['groups']:.2f} | "
              f"{r['compared']:,} | {r['longest_run']:,} | {r['hamming_pairs']:,} | {r['confirmed_pairs']:,} | "
              f"{r['groups']:,} | {r['planted_found']:,} / {r['planted_within']:,} | {r['false_groups']} | "
              f"{r['max_distance']:.3f} | {r['open_rss_mib']:,.0f} | {r['peak_rss_mib']:,.0f} |")
    print("\n| radius | one radius query ms | one per item, extrapolated s | find_duplicates s (median) | ratio |")
    print("|---|---|---|---|---|")
    for b in brute:
        ours = float(np.median([r["total_s"] for r in runs if r["radius"] == b["radius"]]))
        print(f"| {b['radius']} | {b['radius_query_ms']:.2f} | {b['all_items_s']:,.0f} | {ours:.1f} | "
              f"{b['all_items_s'] / ours:,.0f}x |")
    print("\n| items | bits | radius | codes | bit noise | pairs compared | uniform model | longest run "
          "| pairs within R | seconds | ns / compared pair |")
    print("|" + "---|" * 11)
    for k in skew:
        print(f"| {k['n']:,} | {k['bits']} | {k['radius']} | {k['centres']} | {k['noise']} | {k['compared']:,} | "
              f"{k['uniform_model']:,.0f} | {k['longest_run']:,} | {k['pairs']:,} | {k['seconds']:.1f} | "
              f"{k['ns_per_compared']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--radius", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=2, help="runs per radius, interleaved")
    parser.add_argument("--sample", type=int, default=1000, help="radius queries timed for the extrapolation")
    parser.add_argument("--skew-items", type=int, default=200_000)
    parser.add_argument("--workdir", default="/tmp/latenthash-duplicates")
    parser.add_argument("--keep", action="store_true", help="keep the catalog for reruns (it is reused if there)")
    parser.add_argument("--measure", nargs=2, metavar=("CATALOG", "RADIUS"), help=argparse.SUPPRESS)
    parser.add_argument("--brute", nargs=3, metavar=("CATALOG", "RADIUS", "SAMPLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return
    if args.brute:
        print(json.dumps(radius_queries(Path(args.brute[0]), int(args.brute[1]), int(args.brute[2]))))
        return
    path = Path(args.workdir) / f"catalog-{args.items}"
    if not (path / "planted.npy").exists():
        shutil.rmtree(path, ignore_errors=True)
        begin = time.perf_counter()
        build(path, args.items, 48, 512, 2, "flat")
        plant(path, 48, 512, args.items, max(args.radius))
        print(f"built and planted in {time.perf_counter() - begin:.0f} s", flush=True)
    runs = []
    for round_ in range(args.rounds):
        for radius in (args.radius if round_ % 2 == 0 else args.radius[::-1]):
            runs.append(child("--measure", str(path), str(radius)))
            print(json.dumps(runs[-1]), flush=True)
    brute = [child("--brute", str(path), str(radius), str(args.sample)) for radius in args.radius]
    skew = [skew_row(args.skew_items, 48, radius, centres, noise) for radius in args.radius
            for centres, noise in ((0, 0.0), (1000, 0.08), (100, 0.05), (10, 0.05))]
    report(args.items, runs, brute, skew)
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
