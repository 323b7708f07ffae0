"""Query a catalog: `python -m engine.query --catalog DIR IMAGE [IMAGE ...]`.

Two stages, as in Lin et al.: the `--pool` nearest codes by Hamming distance (or every code within
`--radius`), re-ranked by Euclidean distance on the stored features (`--no-rerank`: Hamming only).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from typing import TYPE_CHECKING

from engine.cli import bounded_int, program_name, run_cli
from engine.errors import InputError

if TYPE_CHECKING:
    from engine.search import Result

EXAMPLES = """examples:
  python -m engine.query --catalog catalogs/shop shoe.jpg
  python -m engine.query --catalog catalogs/shop -k 20 --pool 5000 a.jpg b.jpg --html results.html
  python -m engine.query --catalog catalogs/shop --radius 3 --no-rerank --json query.png
  python -m engine.query --catalog catalogs/big-ivf --nprobe 64 query.jpg     # ivf: more lists, higher recall
  python -m engine.query --catalog /shared/catalogs/shop --ray auto --shards-per-actor 2 query.jpg
  python -m engine.query --catalog catalogs/shop --id 1234567890123
  python -m engine.query --catalog catalogs/shop shoe.jpg --label shoes --label boots --where brand:acme
"""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """Text with control characters escaped (a file name holding a newline must not split a table row)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def format_table(query: str, results: list[Result]) -> str:
    lines = [f"query: {printable(query)}", f"{'rank':>4}  {'hamming':>7}  {'distance':>9}  {'label':<12}  path"]
    for r in results:
        distance = f"{r.distance:9.4f}" if r.distance is not None else f"{'-':>9}"
        lines.append(f"{r.rank:>4}  {r.hamming:>7}  {distance}  {printable(r.label or '-'):<12}  {printable(r.path)}")
    if not results:
        lines.append("  (no results: try a larger --pool or --radius)")
    return "\n".join(lines)


MAX_ID = 2**63 - 1  # ids are 63-bit (engine.record.item_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.query"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="query image files (an indexed path is read from the catalog)")
    parser.add_argument("--catalog", required=True, help="catalog directory made by build-index")
    parser.add_argument("--id", type=bounded_int(0, MAX_ID), action="append", default=[],
                        help="query with a catalog item id")
    parser.add_argument("-k", type=bounded_int(1), default=10, help="results per query (default %(default)s)")
    parser.add_argument("--pool", type=bounded_int(1), help="coarse candidates by Hamming distance "
                        "(default 100*k, at least 1000)")
    parser.add_argument("--radius", type=bounded_int(0),
                        help="coarse pool = every code within this Hamming distance (0 to the code length)")
    parser.add_argument("--nprobe", type=bounded_int(1), help="ivf catalogs: inverted lists each shard visits "
                        "(more: higher recall, slower; default: 1/64 of them, at least 16, more for a pool that spans "
                        "many lists; all of them: exact)")
    parser.add_argument("--no-rerank", dest="rerank", action="store_false", help="rank by Hamming distance only")
    parser.add_argument("--label", action="append", default=[],
                        help="only items with this label (repeatable: any of them); exact, not a post-filter")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD:VALUE",
                        help="only items whose product metadata has FIELD equal to VALUE (repeatable: all of them)")
    parser.add_argument("--ray", metavar="ADDRESS", help="search the shards on Ray actors: 'local' starts a private "
                        "instance, 'auto' or HOST:PORT joins a cluster (results equal the in-process search)")
    parser.add_argument("--shards-per-actor", type=bounded_int(1), default=1, help="with --ray (default %(default)s)")
    parser.add_argument("--model", help="model directory (default: the one that built the catalog)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of the results")
    args = parser.parse_args(argv)

    def body() -> int:
        if not args.images and not args.id:
            raise InputError("give at least one query image or --id")
        if not Path(args.catalog).is_dir():
            raise InputError(f"--catalog {args.catalog}: no such folder (make one with build-index)")
        from engine.encode import NoModelRecorded
        from engine.report import write_html
        from engine.search import Searcher
        from shards.filters import Filter

        rule = Filter.parse(args.label, args.where)
        try:
            with Searcher(args.catalog, args.model, args.device, ray=args.ray,
                          shards_per_actor=args.shards_per_actor) as searcher:
                queries, results = [], []
                if args.images:
                    queries += list(args.images)
                    results += searcher.search(args.images, args.k, args.pool, args.radius, args.rerank, rule,
                                               args.nprobe)
                if args.id:
                    queries += [f"id:{i}" for i in args.id]
                    results += searcher.search_ids(args.id, args.k, args.pool, args.radius, args.rerank, rule,
                                                   args.nprobe)
                labels = searcher.query_labels(args.images, args.id)
        except NoModelRecorded as error:  # the command's flag for what the library says is missing
            raise InputError(f"{error}: pass --model MODEL_DIR, or record it with engine.export --import FILE "
                             "--model MODEL_DIR") from None
        if args.json:
            print(json.dumps([{"query": q, "results": [asdict(r) for r in rs]} for q, rs in zip(queries, results)],
                             indent=2))
        else:
            print("\n\n".join(format_table(q, rs) for q, rs in zip(queries, results)))
        if args.html:
            record = searcher.record  # engine.json as the search read it
            write_html(args.html, queries, results, f"latenthash: {args.catalog}",
                       record.image_roots if record is not None else [], labels)
            print(f"wrote {args.html}", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
