"""Query a catalog: `python -m engine.query --catalog DIR IMAGE [IMAGE ...]`.

Two stages, as in Lin et al.: the `--pool` nearest codes by Hamming distance (or every code within
`--radius`), re-ranked by Euclidean distance on the stored features (`--no-rerank`: Hamming only).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from typing import TYPE_CHECKING

from engine.cli import (bounded_int, check_catalog_folder, check_input_file, check_output_file, program_name,
                        run_cli)
from engine.errors import InputError
from engine.inference import PATHS

if TYPE_CHECKING:
    from engine.batch import BatchQuery
    from engine.search import Result, Searcher

EXAMPLES = """examples:
  python -m engine.query --catalog catalogs/shop shoe.jpg
  python -m engine.query --catalog catalogs/shop -k 20 --pool 5000 a.jpg b.jpg --html results.html
  python -m engine.query --catalog catalogs/shop --radius 3 --no-rerank --json query.png
  python -m engine.query --catalog catalogs/big-ivf --nprobe 64 query.jpg     # ivf: more lists, higher recall
  python -m engine.query --catalog /shared/catalogs/shop --ray auto --shards-per-actor 2 query.jpg
  python -m engine.query --catalog catalogs/shop --id 1234567890123
  python -m engine.query --catalog catalogs/shop shoe.jpg --label shoes --label boots --where brand:acme
  python -m engine.query --catalog catalogs/shop --crop 120,80,300,260 room.jpg     # the lamp in the room
  python -m engine.query --catalog catalogs/shop --within-predicted 2 shoe.jpg     # its two likeliest classes
  python -m engine.query --catalog catalogs/shop --jsonl queries.jsonl > answers.jsonl
      # queries.jsonl: {"image": "a.jpg", "k": 5, "crop": "0,0,64,64"}  {"id": 42, "label": ["shoes"]} ...
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
JSONL_CHUNK = 256  # JSON-lines queries encoded and searched together
RUNTIME_MIN_PHOTOS = 128  # fewer query images on the command line encode eager, whatever the catalog's path: a
# runtime's conversion and compile cost the run ~2 s (one photo on a 224-px efficientnet_b0 catalog: 4.3-4.6 s
# eager against 6.3-6.5 s on openvino-bf16, whole runs) and save ~15 ms a photo, even at ~130 (benchmarks/RESULTS.md)


def crop_text(text: str) -> str:
    """--crop's argparse type: `x,y,w,h`, checked at parse time (the box against each image at search time)."""
    from training.images import CropBox

    try:
        CropBox.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name("engine.query"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="query image files (an indexed path is read from the catalog)")
    parser.add_argument("--catalog", required=True, help="catalog directory made by build-index")
    parser.add_argument("--id", type=bounded_int(0, MAX_ID), action="append", default=[],
                        help="query with a catalog item id")
    parser.add_argument("--jsonl", metavar="FILE", help="read queries as JSON lines from FILE (- for stdin), each "
                        '{"image": PATH} or {"id": N} with optional k, pool, radius, nprobe, rerank, label, where, '
                        'crop, within ("predicted") and within_top (the flags give the defaults); print one JSON line '
                        'per query, in order: {"line", "query", "results"} or {"line", "query", "error"}')
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
    parser.add_argument("--crop", type=crop_text, metavar="X,Y,W,H", help="search with this region of each query "
                        "image (pixels of the upright image, as a viewer shows it)")
    parser.add_argument("--within-predicted", type=bounded_int(1, 100), nargs="?", const=1, default=0, metavar="N",
                        help="only items of the query's most likely class as the model predicts it (N: of its N most "
                        "likely classes), with --label/--where; classes are matched to labels by name or number "
                        "(without N, put the flag after the images)")
    parser.add_argument("--ray", metavar="ADDRESS", help="search the shards on Ray actors: 'local' starts a private "
                        "instance, 'auto' or HOST:PORT joins a cluster (results equal the in-process search)")
    parser.add_argument("--shards-per-actor", type=bounded_int(1), default=1, help="with --ray (default %(default)s)")
    parser.add_argument("--model", help="model directory (default: the one that built the catalog)")
    parser.add_argument("--inference-path", choices=PATHS, help="how query images are encoded (default: eager for "
                        f"fewer than {RUNTIME_MIN_PHOTOS} images on the command line, whose run a runtime's start-up "
                        "would slow, else, and with --jsonl, the catalog's path; paths find nearly the same items)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of the results")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check alone, before torch or Faiss load."""
    if args.jsonl is not None:
        if args.images or args.id or args.html:
            raise InputError("--jsonl reads every query from its file: give no image, --id or --html with it")
        if args.jsonl != "-":
            check_input_file(args.jsonl, "--jsonl")
    elif not args.images and not args.id:
        raise InputError("give at least one query image or --id (or --jsonl FILE)")
    elif args.crop and not args.images:
        raise InputError("--crop applies to query images, and none was given")
    if args.html:
        check_output_file(args.html, "--html")
    check_catalog_folder(args.catalog)


def search_arguments(searcher: Searcher, args: argparse.Namespace) -> tuple[list[str], list[list[Result]]]:
    """(query names, their results) for the images and ids on the command line."""
    from shards.filters import Filter
    from training.images import CropBox

    rule = Filter.parse(args.label, args.where)
    queries, results = [], []
    if args.images:
        queries += list(args.images)
        results += searcher.search(args.images, args.k, args.pool, args.radius, args.rerank, rule, args.nprobe,
                                   CropBox.parse(args.crop) if args.crop else None, args.within_predicted)
    if args.id:
        queries += [f"id:{i}" for i in args.id]
        results += searcher.search_ids(args.id, args.k, args.pool, args.radius, args.rerank, rule, args.nprobe,
                                       args.within_predicted)
    return queries, results


def print_results(searcher: Searcher, args: argparse.Namespace) -> None:
    from engine.report import write_html

    queries, results = search_arguments(searcher, args)
    if args.json:
        print(json.dumps([{"query": q, "results": [asdict(r) for r in rs]} for q, rs in zip(queries, results)],
                         indent=2))
    else:
        print("\n\n".join(format_table(q, rs) for q, rs in zip(queries, results)))
    if args.html:
        record = searcher.record  # engine.json as the search read it
        write_html(args.html, queries, results, f"latenthash: {args.catalog}",
                   record.image_roots if record is not None else [], searcher.query_labels(args.images, args.id))
        print(f"wrote {args.html}", file=sys.stderr)


def line_defaults(args: argparse.Namespace) -> dict:
    """A JSON line's parameters where it names none: the flags'."""
    return {"k": args.k, "pool": args.pool, "radius": args.radius, "nprobe": args.nprobe, "rerank": args.rerank,
            "label": args.label, "where": args.where, "within": "predicted" if args.within_predicted else None,
            "within_top": args.within_predicted or 1}


def line_query(text: str, defaults: dict, crop: str | None) -> BatchQuery:
    """One JSON line as a query (InputError, in one line, for a bad one): the parameters of POST /search/batch's
    queries, with `image` a file path; `crop` (the flag's) applies to an image line that names none."""
    from pydantic import ValidationError

    from engine.api.schemas import BatchQueryModel
    from engine.batch import BatchQuery

    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"not JSON: {error}") from None
    if not isinstance(fields, dict):
        raise InputError('a line must be a JSON object: {"image": PATH} or {"id": N}, plus parameters')
    fields = {name: [value] if name in ("label", "where") and isinstance(value, str) else value
              for name, value in fields.items()}
    if "image" in fields and crop is not None:
        fields.setdefault("crop", crop)
    try:
        query = BatchQueryModel.model_validate({**defaults, **fields})
    except ValidationError as error:
        raise InputError("; ".join(f"{'.'.join(str(part) for part in problem['loc']) or 'line'}: {problem['msg']}"
                                   for problem in error.errors())) from None
    if query.id is not None:
        return BatchQuery(f"id:{query.id}", query.options(), None, query.id)
    if not isinstance(query.image, str) or not Path(query.image).is_file():
        raise InputError(f"query image not found: {query.image}")
    return BatchQuery(query.image, query.options(), Path(query.image), crop=query.crop_box)


def answer_lines(searcher: Searcher, args: argparse.Namespace) -> None:
    """--jsonl: one JSON line out per query line in, in order; queries read, encoded and searched
    JSONL_CHUNK lines at a time (a bad line answers its own error and the others go on)."""
    from engine.batch import run_queries

    defaults = line_defaults(args)
    source = sys.stdin if args.jsonl == "-" else open(args.jsonl, encoding="utf-8", errors="replace")
    with source:
        lines = ((number, text) for number, text in enumerate(source, 1) if text.strip())
        while chunk := list(itertools.islice(lines, JSONL_CHUNK)):
            parsed: list[tuple[int, BatchQuery | str]] = []
            for number, text in chunk:
                try:
                    parsed.append((number, line_query(text, defaults, args.crop)))
                except InputError as error:
                    parsed.append((number, str(error)))
            answers = iter(run_queries(searcher, [query for _, query in parsed if not isinstance(query, str)]))
            for number, query in parsed:
                answer = {"query": None, "error": query} if isinstance(query, str) else asdict(next(answers))
                if answer.get("error") is None:
                    answer.pop("error", None)
                else:
                    answer.pop("results", None)
                print(json.dumps({"line": number, **answer}))
            sys.stdout.flush()


def query_path(args: argparse.Namespace) -> str | None:
    """--inference-path, else eager for a few photos on the command line (None: the catalog's path)."""
    if args.inference_path is not None:
        return args.inference_path
    return "eager" if args.jsonl is None and len(args.images) < RUNTIME_MIN_PHOTOS else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        check_args(args)
        from engine.encode import NoModelRecorded
        from engine.search import Searcher

        try:
            with Searcher(args.catalog, args.model, args.device, ray=args.ray,
                          shards_per_actor=args.shards_per_actor, inference_path=query_path(args)) as searcher:
                if args.jsonl is not None:
                    answer_lines(searcher, args)
                else:
                    print_results(searcher, args)
        except NoModelRecorded as error:  # the command's flag for what the library says is missing
            raise InputError(f"{error}: pass --model MODEL_DIR, or record it with engine.export --import FILE "
                             "--model MODEL_DIR") from None
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
