"""Duplicate listings: `python -m engine.duplicates --catalog DIR`.

Groups of near-identical items (the same product photographed once and listed twice, a photo re-uploaded resized
or re-compressed): every pair of items whose codes lie within Hamming `--radius` (found exactly, by multi-index
hashing over the catalog's codes: `CatalogReader.close_pairs`), confirmed by the Euclidean distance of their stored
features (at most `--max-distance`), joined into groups (connected components), largest first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from typing import TYPE_CHECKING

from engine.cli import (bounded_float, bounded_int, check_catalog_folder, check_output_file, program_name,
                        run_cli)
from engine.errors import InputError

if TYPE_CHECKING:
    from shards import CatalogReader
    from shards.filters import Filter

# Re-encoded copies (resized, re-compressed) of a photo flip up to two bits of the test model's codes. At 1M items
# on 2 cores, radius 1 took ~10 s, 2 ~40 s and 3 ~2 min, each more comparing ~6x the pairs (benchmarks/duplicates.py).
DEFAULT_RADIUS = 2
# Without --max-distance: this fraction of the median distance between two items drawn at random, so the default
# follows any backbone's feature scale. Measured on the test suite's model (tests/test_duplicates.py's catalog):
# copies resized, or resized and re-compressed (JPEG 90), lay within 0.06 of it, and the closest distinct items
# within the radius 0.113 apart: 0.08 leaves a margin of ~1.4x on either side. (Full-size JPEG 90 copies of
# 160-pixel drawings reached 0.09: pass --max-distance for such a model.) Check it against a model's own copies.
DEFAULT_DISTANCE_FRACTION = 0.08
SAMPLE_ITEMS = 2000  # items whose pairwise distances estimate the median


@dataclass
class DuplicateItem:
    id: int
    path: str | None
    label: str | None
    metadata: dict | None  # product metadata (SKU, title, price, ...), where the item has any


@dataclass
class DuplicateStats:
    """What a search for duplicates found and what it cost."""

    items: int = 0
    radius: int = 0
    max_distance: float = 0.0
    compared: int = 0  # code pairs whose Hamming distance was computed
    longest_run: int = 0  # most codes that shared one substring (the skew that makes the cost grow)
    hamming_pairs: int = 0  # pairs within the radius
    confirmed_pairs: int = 0  # ... and within max_distance
    groups: int = 0
    seconds: dict = field(default_factory=dict)


def median_distance(catalog: CatalogReader, ids: np.ndarray, seed: int = 0) -> float:
    """The median Euclidean distance between two of `ids` drawn at random (from up to SAMPLE_ITEMS of them)."""
    if len(ids) < 2:
        return 0.0
    sample = np.sort(np.random.default_rng(seed).choice(ids, min(len(ids), SAMPLE_ITEMS), replace=False))
    rows = catalog.features(sample)
    norms = (rows * rows).sum(1)
    squared = norms[:, None] + norms[None, :] - 2 * rows @ rows.T
    return float(np.sqrt(max(0.0, np.median(squared[np.triu_indices(len(sample), 1)]))))


def components(first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """The connected components of the graph with these edges, as sorted id arrays, largest first (ties: the
    smaller first id). Union by hooking roots onto the smaller root, then pointer jumping, until every edge's
    ends share a root (a few rounds)."""
    nodes, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    a, b = inverse[:len(first)], inverse[len(first):]
    parent = np.arange(len(nodes))
    while len(a) and (parent[a] != parent[b]).any():
        root_a, root_b = parent[a], parent[b]
        low = np.minimum(root_a, root_b)
        np.minimum.at(parent, root_a, low)
        np.minimum.at(parent, root_b, low)
        while not np.array_equal(parent[parent], parent):
            parent = parent[parent]
    order = np.lexsort((nodes, parent))
    starts = np.flatnonzero(np.r_[True, parent[order][1:] != parent[order][:-1]])
    groups = np.split(nodes[order], starts[1:]) if len(nodes) else []
    return sorted(groups, key=lambda group: (-len(group), int(group[0])))


def described(catalog: CatalogReader, groups: list[np.ndarray]) -> list[list[DuplicateItem]]:
    """The groups' items as a shop sees them (path, label, product metadata), read in one call."""
    from shards.filters import stored_label

    ids = np.concatenate(groups) if groups else np.empty(0, np.int64)
    metas = iter(catalog.metadata(ids))
    return [[DuplicateItem(int(i), (m or {}).get("path"), stored_label(m), (m or {}).get("metadata"))
             for i, m in zip(group, metas)] for group in groups]


def find_duplicates(catalog: CatalogReader, radius: int = DEFAULT_RADIUS, max_distance: float | None = None,
                    filter: Filter | None = None, stats: DuplicateStats | None = None) -> list[list[DuplicateItem]]:
    """Groups of near-identical items, largest first, each sorted by id: every pair within Hamming `radius`
    (exactly) whose features lie within `max_distance` (default: DEFAULT_DISTANCE_FRACTION of the median
    distance between random items of the whole catalog), joined transitively; only items that pass `filter`.
    `stats`: filled in."""
    from shards.pairs import PairCount

    if max_distance is not None and not 0 <= max_distance < float("inf"):
        raise InputError(f"max_distance must be a finite number of at least 0, got {max_distance}")
    stats = stats if stats is not None else DuplicateStats()
    start = time.perf_counter()
    count = PairCount()
    found = list(catalog.close_pairs(radius, filter, count))  # checks the radius first
    first = np.concatenate([f for f, _, _ in found]) if found else np.empty(0, np.int64)
    second = np.concatenate([s for _, s, _ in found]) if found else np.empty(0, np.int64)
    if max_distance is None:  # the feature space's scale, whatever the filter: the same pairs count as copies
        max_distance = DEFAULT_DISTANCE_FRACTION * median_distance(catalog, catalog.codes()[0])
    hamming_done = time.perf_counter()
    keep = catalog.pair_distances(first, second) <= max_distance if len(first) else np.zeros(0, bool)
    features_done = time.perf_counter()
    groups = described(catalog, components(first[keep], second[keep]))
    stats.items, stats.radius, stats.max_distance = count.items, radius, float(max_distance)
    stats.compared, stats.longest_run = count.compared, count.longest_run
    stats.hamming_pairs, stats.confirmed_pairs, stats.groups = len(first), int(keep.sum()), len(groups)
    stats.seconds = dict(hamming=hamming_done - start, features=features_done - hamming_done,
                         groups=time.perf_counter() - features_done)
    return groups


def format_groups(groups: list[list[DuplicateItem]]) -> str:
    from engine.query import printable

    if not groups:
        return "no duplicates found"
    lines = []
    for number, group in enumerate(groups, 1):
        lines.append(f"group {number}: {len(group)} items")
        lines += [f"  {item.id:>20}  {printable(item.label or '-'):<12}  {printable(item.path)}" for item in group]
    return "\n".join(lines)


EXAMPLES = """examples:
  python -m engine.duplicates --catalog catalogs/shop
  python -m engine.duplicates --catalog catalogs/shop --radius 3 --max-distance 4.5 --json > groups.json
  python -m engine.duplicates --catalog catalogs/shop --label shoes --where brand:acme --html duplicates.html
  python -m engine.duplicates --catalog /shared/catalogs/shop --ray auto
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name("engine.duplicates"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory made by build-index")
    parser.add_argument("--radius", type=bounded_int(0), default=DEFAULT_RADIUS,
                        help="pairs whose codes differ in at most this many bits (default %(default)s; each more "
                        "costs several times the time)")
    parser.add_argument("--max-distance", type=bounded_float(0),
                        help="... and whose features lie at most this far apart (Euclidean; default "
                        f"{DEFAULT_DISTANCE_FRACTION} of the median distance between random items)")
    parser.add_argument("--label", action="append", default=[], help="only items with this label (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD:VALUE",
                        help="only items whose product metadata has FIELD equal to VALUE (repeatable)")
    parser.add_argument("--ray", metavar="ADDRESS", help="read the shards from Ray actors ('local', 'auto' or "
                        "HOST:PORT)")
    parser.add_argument("--shards-per-actor", type=bounded_int(1), default=1, help="with --ray (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of groups, each a list of items")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of the groups")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        check_catalog_folder(args.catalog)
        if args.html:
            check_output_file(args.html, "--html")
        from engine.report import write_groups_html
        from engine.search import Searcher
        from shards.filters import Filter

        rule = Filter.parse(args.label, args.where)
        stats = DuplicateStats()
        with Searcher(args.catalog, ray=args.ray, shards_per_actor=args.shards_per_actor) as searcher:
            groups = find_duplicates(searcher.catalog, args.radius, args.max_distance, rule, stats)
        print(json.dumps([[asdict(item) for item in group] for group in groups], indent=2) if args.json
              else format_groups(groups))
        print(f"{stats.groups} groups from {stats.confirmed_pairs} pairs (of {stats.hamming_pairs} within radius "
              f"{stats.radius}; max distance {stats.max_distance:.4g}) among {stats.items} items", file=sys.stderr)
        if args.html:
            record = searcher.record
            write_groups_html(args.html, groups, f"latenthash duplicates: {args.catalog}",
                              record.image_roots if record is not None else [])
            print(f"wrote {args.html}", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
