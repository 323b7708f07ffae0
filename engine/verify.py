"""Check a catalog in full, like fsck: `python -m engine.verify --catalog DIR`.

Reads every item record and checks its code and feature row against the checksum stored with it, that its
features are finite, its metadata, each shard's counters and search index against its items, a journal left by
a killed writer, and engine.json with the model it names against the manifest's fingerprint; the manifest is
checked against every shard's layout record on open. Exit status 0: no damage (or all of it repaired); 1: damage
found or left (each problem is listed); 2: not a catalog.
`--repair` finishes an interrupted batch's rollback, rewrites damaged shard counters from the records, rebuilds
search indices from the items and deletes damaged items, so that re-running build-index encodes their images
again. A shard whose data file is lost is started again empty, and its loss reported (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.uploads import UPLOADS, orphan_uploads, remove_uploads
from engine.cli import program_name, run_cli
from shards.errors import CatalogError, DamagedError


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
    unrepaired: int = 0  # findings still true after this run (all of them without --repair)


def verify_catalog(catalog_dir: str | os.PathLike, repair: bool = False) -> Report:
    """Every problem found in the catalog; with `repair`, what was done about them."""
    from shards.catalog import Catalog
    from shards.journal import JOURNAL
    from shards.manifest import Manifest

    path = Path(catalog_dir)
    manifest = Manifest.read(path)  # not a catalog at all: the caller's mistake, raised as is
    report = Report(findings=_engine_findings(path, manifest.model_fingerprint))
    kept = len(report.findings)  # what --repair cannot fix: the model is the user's to restore
    cut_short = os.path.lexists(path / JOURNAL)
    try:
        catalog = Catalog.open(path, readonly=not repair, repair=repair)
    except CatalogError as error:
        report.findings.append(Finding("catalog", None, str(error)))
        report.unrepaired = len(report.findings)
        return report
    with catalog:
        report.items = len(catalog)
        _report_repairs_on_open(catalog, report, cut_short and not os.path.lexists(path / JOURNAL))
        kept += len(catalog.lost)
        found = [Finding(*finding) for finding in catalog.verify()]
        report.findings += found
        unusable = _product_findings(catalog)  # the user's data, not damage: reported, never deleted
        report.findings += unusable
        kept += len(unusable)
        orphans = orphan_uploads(path, catalog)  # before damaged items go: their photos are kept
        if orphans:
            report.findings.append(Finding(UPLOADS, None, f"{len(orphans)} photos belong to no item (an add or a "
                                                          f"delete was cut short), e.g. {orphans[0].name}"))
            if repair:
                report.repaired.append(remove_uploads(orphans))
        if repair and (found or catalog.repairs):
            damaged = np.array([f.id for f in found if f.id is not None], dtype=np.int64)
            if len(damaged):
                catalog.delete(damaged)
                report.repaired.append(f"deleted {len(damaged)} damaged items: re-run build-index to encode them "
                                       "again")
            catalog.rebuild_indices()
            report.repaired.append("rebuilt every shard's search index from its items")
    report.unrepaired = kept if repair else len(report.findings)
    return report


def _product_findings(catalog) -> list[Finding]:
    """Items whose product metadata every search that returns them would fail to answer (non-finite numbers,
    nesting too deep), as older versions accepted it."""
    from engine.errors import InputError
    from engine.metadata import check_product_metadata

    findings = []
    try:
        for item, meta in catalog.metadata_items():
            try:
                check_product_metadata((meta or {}).get("metadata"))
            except InputError as error:
                findings.append(Finding("metadata", item, f"{error}: delete the item and add it again with valid "
                                                          "metadata"))
    except DamagedError:  # a record that does not decode: the item checks above list it as damage
        pass
    return findings


def _report_repairs_on_open(catalog, report: Report, rolled_back: bool) -> None:
    """What a repairing open did before anything could be checked: shards started again, counters rewritten,
    a cut-short batch rolled back."""
    from shards.journal import JOURNAL

    for number, held in catalog.lost.items():
        folder = f"shard-{number:04d}"
        report.findings.append(Finding(folder, None, f"its data file is missing ({held}): those items are lost"))
        report.repaired.append(f"started {folder} again empty, so the catalog opens: restore its data.mdb from a "
                               "backup, or re-run build-index (or the import) to add its items again")
    for folder, problem in catalog.repairs:
        report.findings.append(Finding(folder, None, problem))
    if catalog.repairs:
        report.repaired.append("rewrote the damaged shard counters from the feature blocks")
    if rolled_back:
        report.findings.append(Finding(JOURNAL, None, "a batch cut short was still to be rolled back"))
        report.repaired.append("rolled back the batch cut short")


def _engine_findings(path: Path, fingerprint: str | None) -> list[Finding]:
    """What queries on new images need besides the items: engine.json, the model it names, and that model (with
    the code maker) being the one the manifest says made the codes."""
    from engine.record import ENGINE_FILE, read_record
    from shards.manifest import MANIFEST

    try:
        record = read_record(path)
    except CatalogError as error:
        return [Finding(ENGINE_FILE, None, str(error))]
    if record is None:
        if fingerprint is None:  # codes from elsewhere, never tied to a model: nothing to find
            return []
        return [Finding(ENGINE_FILE, None, f"missing: queries on new images cannot find model {fingerprint}, "
                                           "which made the codes; re-run build-index with --model to record it")]
    if record.model_dir is None:
        if fingerprint is not None and fingerprint.split("+")[0] != record.model_fingerprint:
            return [Finding(MANIFEST, None, f"model fingerprint {fingerprint}, but engine.json says the codes "
                                                   f"were made by {record.model_description()}")]
        return []
    from engine.encode import load_encoder  # torch: only for a catalog that names its model
    from engine.errors import USER_ERRORS

    try:
        made_by = load_encoder(path, device="cpu").fingerprint
    except (*USER_ERRORS, OSError) as error:
        return [Finding(ENGINE_FILE, None, f"its model cannot be loaded: {error}")]
    if made_by != fingerprint:
        return [Finding(MANIFEST, None, f"model fingerprint {fingerprint}, but the model and code maker "
                                               f"engine.json names are {made_by}: queries on new images are refused")]
    return []


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
            left = f", {report.unrepaired} not repaired" if args.repair and report.unrepaired else ""
            found = len(report.findings)
            print(f"{report.items} items checked, {found} {'problem' if found == 1 else 'problems'} found{left}")
        return 1 if report.unrepaired else 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
