"""Check a catalog in full, like fsck: `python -m engine.verify --catalog DIR`.

Reads every item record and checks its code and feature row against the checksum stored with it, its metadata,
and each shard's search index against its items; the manifest is checked against every shard's layout record
on open. Exit status 0: no damage; 1: damage found (each damaged item is listed); 2: not a catalog.
`--repair` finishes an interrupted batch's rollback, rebuilds search indices from the items and deletes damaged
items, so that re-running build-index encodes their images again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import run_cli
from training.errors import program_name
from shards.errors import CatalogError


@dataclass
class Finding:
    place: str  # shard folder (or file) name
    id: int | None  # the damaged item, or None for the shard or catalog as a whole
    problem: str


@dataclass
class Report:
    items: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def verify_catalog(catalog_dir: str | os.PathLike, repair: bool = False) -> Report:
    """Every problem found in the catalog; with `repair`, what was done about them."""
    from shards.catalog import Catalog, Manifest

    Manifest.read(Path(catalog_dir))  # not a catalog at all: the caller's mistake, raised as is
    report = Report()
    try:
        catalog = Catalog.open(catalog_dir, readonly=not repair)
    except CatalogError as error:
        report.findings.append(Finding("catalog", None, str(error)))
        return report
    with catalog:
        report.items = len(catalog)
        report.findings = [Finding(*finding) for finding in catalog.verify()]
        if repair and report.findings:
            damaged = np.array([f.id for f in report.findings if f.id is not None], dtype=np.int64)
            if len(damaged):
                catalog.delete(damaged)
                report.repaired.append(f"deleted {len(damaged)} damaged items: re-run build-index to encode them "
                                       "again")
            for shard in catalog.shards:
                shard.rebuild_index()
            report.repaired.append("rebuilt every shard's search index from its items")
    return report


EXAMPLES = """examples:
  python -m engine.verify --catalog catalogs/shop
  python -m engine.verify --catalog catalogs/shop --json > damage.json
  python -m engine.verify --catalog catalogs/shop --repair && build-index photos/ --model M --catalog catalogs/shop
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("engine.verify"), description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalog directory to check")
    parser.add_argument("--repair", action="store_true",
                        help="roll back a cut-short batch, rebuild search indices, delete damaged items")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    def body() -> int:
        report = verify_catalog(args.catalog, args.repair)
        if args.json:
            print(json.dumps(asdict(report), indent=2))
        else:
            for finding in report.findings:
                item = f"item {finding.id}" if finding.id is not None else "-"
                print(f"{finding.place}\t{item}\t{finding.problem}")
            for action in report.repaired:
                print(f"repaired: {action}")
            print(f"{report.items} items checked, {len(report.findings)} problems found")
        return 1 if report.findings and not report.repaired else 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
