"""Hostile and damaged storage (issue 34's storage items, issue 35's read-only catalog): crafted imports, damaged
shard bookkeeping, lost files and journals; each reproduced on a real catalog, then shown refused or reported."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest

from engine.export import import_hdf5
from engine.record import ENGINE_FILE, item_image, read_metadata_file, read_record
from engine.verify import verify_catalog
from shards import Catalog, CatalogError
from shards.catalog import JOURNAL
from shards.errors import DamagedError
from tests.damage import put_info
from tests.test_reliability import BITS, DIM, cli, edit_manifest, items, make_catalog, one_line_error, write_h5
from engine.errors import InputError as UserError


def findings(catalog):
    return [(f.place, f.id, f.problem) for f in verify_catalog(catalog).findings]


# --------------------------------------------------------------------------------- imports (items 1, 6, 15, 5b)
def crafted_export(path, paths, engine):
    """An export of len(paths) items whose `paths` dataset and `engine` attribute say what the test wants."""
    write_h5(path, n=len(paths))
    with h5py.File(path, "a") as f:
        f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        f.attrs["engine"] = json.dumps(engine)
    return path


def test_an_import_takes_no_image_folders_from_the_file(tmp_path, cli_env):
    photos = tmp_path / "photos"
    photos.mkdir()
    mine = photos / "mine.png"
    mine.write_bytes(b"an image of mine")
    file = crafted_export(tmp_path / "evil.h5", ["/etc/passwd", str(mine)],
                          engine=dict(image_roots=["/"], model_dir=str(tmp_path), codes="latent"))
    result = cli("engine.export", ["--import", file, "--catalog", tmp_path / "plain"], cli_env)
    assert result.returncode == 0, result.stderr
    record = read_record(tmp_path / "plain")
    assert record.image_roots == [] and record.model_dir is None  # nothing on this machine is trusted by the file
    assert item_image("/etc/passwd", record.image_roots) is None and item_image(str(mine), record.image_roots) is None
    from fastapi.testclient import TestClient

    from engine.api.app import create_app
    from engine.api.service import Service
    with TestClient(create_app(Service(tmp_path / "plain", read_only=True))) as client:
        answer = client.get("/items/0/image")
        assert answer.status_code == 404 and b"root:" not in answer.content

    result = cli("engine.export", ["--import", file, "--catalog", tmp_path / "given", "--image-root", photos],
                 cli_env)
    assert result.returncode == 0, result.stderr
    roots = read_record(tmp_path / "given").image_roots
    assert roots == [str(photos.resolve())]
    assert item_image(str(mine), roots) == mine.resolve() and item_image("/etc/passwd", roots) is None
    with TestClient(create_app(Service(tmp_path / "given", read_only=True))) as client:
        assert client.get("/items/0/image").status_code == 404
        assert client.get("/items/1/image").content == b"an image of mine"
    other = tmp_path / "other"
    other.mkdir()
    import_hdf5(file, tmp_path / "given", progress=False, image_roots=[other])  # a resumed import adds folders
    assert read_record(tmp_path / "given").image_roots == [str(photos.resolve()), str(other.resolve())]
    one_line_error(cli("engine.export", ["--import", file, "--catalog", tmp_path / "x", "--image-root",
                                         tmp_path / "nowhere"], cli_env))


def test_features_that_overflow_float16_are_refused_and_verify_flags_non_finite_rows(tmp_path, cli_env):
    ids, codes, features, metas = items(20)
    features[5] = 1e6  # finite as float32, inf as float16
    with Catalog.create(tmp_path / "c", BITS, DIM, shards=2) as catalog:
        with pytest.raises(CatalogError, match=rf"features of items \[{ids[5]}\] do not fit float16"):
            catalog.add(ids, codes, features, metas)
        assert len(catalog) == 0
        shard = catalog.shards[int(ids[5]) % 2]  # what a writer of an older latenthash stored
        shard.add(ids[5:6], codes[5:6], np.full((1, DIM), np.inf, np.float16), None)
    assert findings(tmp_path / "c") == [("shard-0000", int(ids[5]),
                                         "its features are not finite (NaN or inf): it would rank at random")]
    result = cli("engine.verify", ["--catalog", tmp_path / "c"], cli_env)
    assert result.returncode == 1 and "not finite" in result.stdout
    file = write_h5(tmp_path / "big.h5", features=features)
    with pytest.raises(UserError, match=r"features of item 5 \(row 5\) overflow float16"):
        import_hdf5(file, tmp_path / "copy", progress=False)
    assert not (tmp_path / "copy").exists()
    one_line_error(cli("engine.export", ["--import", file, "--catalog", tmp_path / "copy"], cli_env))


def unwritten_export(path, rows):
    """A few KB declaring `rows` items in gzip chunks that were never written (they read back as zeros)."""
    with h5py.File(path, "w") as f:
        f.attrs["bits"] = BITS
        for name, shape, dtype in (("ids", (rows,), np.int64), ("codes", (rows, BITS // 8), np.uint8),
                                   ("features", (rows, DIM), np.float32)):
            f.create_dataset(name, shape, dtype, chunks=(min(rows, 65536),) + shape[1:], compression="gzip")
    return path


PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""  # a small parent: a child's peak RSS counts what it had when forked


def test_an_import_checks_what_a_file_declares_before_reading_it(tmp_path, cli_env, monkeypatch):
    file = unwritten_export(tmp_path / "empty.h5", 10**8)
    assert file.stat().st_size < 100_000
    command = [sys.executable, "-m", "engine.export", "--import", file, "--catalog", tmp_path / "c", "--max-items",
               10**9]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, command)], capture_output=True, text=True,
                            env=cli_env, timeout=300)
    assert "'ids' declares 100000000 rows but the file does not store them" in result.stderr, result.stderr
    status, peak = map(int, result.stdout.split())
    assert status == 2 and peak < 600 << 10, f"peak RSS {peak >> 10} MiB"  # its ids alone are 763 MiB
    with pytest.raises(UserError, match="holds 1000000000 items, more than max_items 10000000"):
        import_hdf5(unwritten_export(tmp_path / "huge.h5", 10**9), tmp_path / "c", progress=False)
    full_disk = shutil.disk_usage(tmp_path)._replace(free=0)  # a real file, a disk that cannot hold it
    monkeypatch.setattr("engine.export.shutil.disk_usage", lambda path: full_disk)
    with pytest.raises(UserError, match="need about 0 MiB, but only 0 MiB are free"):
        import_hdf5(write_h5(tmp_path / "stored.h5", n=5), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("text", ['{"price": NaN}', '{"price": 1e400}', '{"a": -Infinity}',
                                  "[" * 5000 + "]" * 5000, '{"a": ' * 100 + "1" + "}" * 100])
def test_an_import_refuses_metadata_that_would_break_searches(tmp_path, cli_env, text):
    file = write_h5(tmp_path / "meta.h5", n=5)
    with h5py.File(file, "a") as f:
        rows = ['{"sku": "A"}'] * 5
        rows[3] = text
        f.create_dataset("metadata", data=np.array(rows, dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(UserError, match=r"metadata of item 3 \(row 3\)"):
        import_hdf5(file, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    result = cli("engine.export", ["--import", file, "--catalog", tmp_path / "c"], cli_env)
    one_line_error(result)
    assert "row 3" in result.stderr


def test_a_metadata_file_line_that_would_break_searches_is_reported_not_indexed(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "items.jsonl").write_text('{"path": "a.png", "price": NaN}\n{"path": "b.png", "price": 3}\n')
    products, problems = read_metadata_file(tmp_path / "items.jsonl", tmp_path)
    assert products == {(tmp_path / "b.png").resolve(): {"price": 3}}
    assert [p["line"] for p in problems] == [1] and "not a finite number" in problems[0]["error"]


# -------------------------------------------------------------------------------------- lost shard file (item 10)
def test_a_missing_shard_file_is_refused_and_repair_reports_the_loss(tmp_path, cli_env):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    with Catalog.open(catalog) as reader:
        held = len(reader.shards[0])
    data = catalog / "shard-0000" / "data.mdb"
    data.unlink()
    for readonly in (False, True):
        with pytest.raises(CatalogError, match=f"data.mdb: shard data file is missing .it held {held} items"):
            Catalog.open(catalog, readonly=readonly)
    assert not data.exists()  # a writer never starts an empty shard in its place
    result = cli("engine.verify", ["--catalog", catalog], cli_env)
    assert result.returncode == 1 and "shard data file is missing" in result.stdout, result.stdout
    result = cli("engine.verify", ["--catalog", catalog, "--repair"], cli_env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"it held {held} items when a writer last closed the catalog): those items are lost" in result.stdout
    assert "started shard-0000 again empty" in result.stdout and "1 not repaired" in result.stdout
    with Catalog.open(catalog) as reader:
        assert len(reader) == 3000 - held
    assert findings(catalog) == []


# ---------------------------------------------------------------------------------- damaged bookkeeping (item 11)
@pytest.mark.parametrize("key, value, message", [
    (b"generation", b"1x", r"stored generation b'1x' is not a whole number"),
    (b"blocks", b"99999999999", r"stored blocks 99999999999 does not match its feature blocks \(1\)"),
    (b"slots_used", b"-5", r"stored slots_used b'-5' is not a whole number"),
    (b"slots_used", b"700", r"stored slots_used 700 does not match its feature blocks \(1500\)"),
])
def test_damaged_shard_counters_are_refused_reported_and_repaired(tmp_path, cli_env, key, value, message):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    put_info(catalog / "shard-0001", key, value)
    for readonly in (True, False):
        with pytest.raises(DamagedError, match=message):
            Catalog.open(catalog, readonly=readonly)
    one_line_error(cli("engine.query", ["--catalog", catalog, "--id", 3], cli_env))
    result = cli("engine.verify", ["--catalog", catalog], cli_env)
    assert result.returncode == 1 and "shard-0001/data.mdb: stored" in result.stdout, result.stdout + result.stderr
    result = cli("engine.verify", ["--catalog", catalog, "--repair"], cli_env)
    assert result.returncode == 0 and "rewrote the damaged shard counters" in result.stdout, result.stdout
    assert findings(catalog) == []
    with Catalog.open(catalog, readonly=False) as writer:  # adds work again, after the items already there
        writer.add(*items(10, seed=1, start=5000))
    with Catalog.open(catalog) as reader:
        assert len(reader) == 3010 and findings(catalog) == []
        ids, codes, features, _ = items(3000)
        assert reader.search(codes[1:2], features[1:2], k=1)[0].ids.tolist() == [ids[1]]


def test_damaged_stored_index_bookkeeping_is_rebuilt_and_reported(tmp_path):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    put_info(catalog / "shard-0000", b"index_checksum", b"zz")
    ids, codes, features, _ = items(3000)
    with Catalog.open(catalog) as reader:  # a cache: rebuilt from the items, the catalog answers
        assert not reader.shards[0].index_loaded_from_disk
        assert reader.search(codes[:2], features[:2], k=1)[0].ids.tolist() == [ids[0]]
    assert findings(catalog) == [("shard-0000", None, "its stored search index has damaged bookkeeping "
                                  "(index_generation b'1', index_checksum b'zz'); rebuilt from the items in "
                                  "memory, a repair stores it again")]
    verify_catalog(catalog, repair=True)
    assert findings(catalog) == []


# --------------------------------------------------------------------------------------------- journals (item 13)
def test_a_journal_naming_committed_items_never_deletes_them(tmp_path, cli_env):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    ids = items(3000)[0]
    journal = catalog / JOURNAL

    def claiming_empty_shards() -> bytes:
        """A journal in today's format whose slot counts say the shards were empty: its items would all be new."""
        journal.unlink()
        with Catalog.open(catalog, readonly=False) as writer:
            writer.journal.write(ids[:5])
        raw = journal.read_bytes()
        return raw[:16] + np.zeros(2, np.int64).tobytes() + raw[32:]

    for crafted in (ids[:5].tobytes, claiming_empty_shards):  # an older latenthash's journal, then today's
        raw = crafted()
        journal.write_bytes(raw)
        with Catalog.open(catalog) as reader:  # readers never change the catalog
            assert len(reader) == 3000
        result = cli("engine.query", ["--catalog", catalog, "--id", ids[0], "-k", "3"], cli_env)
        assert result.returncode == 0, result.stderr
        assert journal.read_bytes() == raw
        with pytest.raises(DamagedError, match=r"names 5 items that were in the catalog before its batch"):
            Catalog.open(catalog, readonly=False)
        with Catalog.open(catalog) as reader:
            assert len(reader) == 3000
        assert findings(catalog)[-1][:2] == (JOURNAL, None) and "names 5 items" in findings(catalog)[-1][2]
        result = cli("engine.verify", ["--catalog", catalog, "--repair"], cli_env)
        assert result.returncode == 1 and "names 5 items" in result.stdout
    journal.unlink()
    for damage, said in ((journal.mkdir, "not a regular file"), (lambda: journal.write_bytes(b"1234567"),
                                                                 "not whole 8-byte ids")):
        damage()
        with pytest.raises(DamagedError, match=f"add.journal: damaged .*{said}"):
            Catalog.open(catalog, readonly=False)
        assert findings(catalog)[-1][:2] == (JOURNAL, None) and said in findings(catalog)[-1][2]
        with Catalog.open(catalog) as reader:
            assert len(reader) == 3000
        journal.rmdir() if journal.is_dir() else journal.unlink()


def test_readers_leave_out_a_cut_short_batch_and_the_next_writer_rolls_it_back(tmp_path, cli_env):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    batch = items(40, seed=2, start=7000)
    with Catalog.open(catalog, readonly=False) as writer:  # what a writer killed between its shard commits left
        writer.journal.write(batch[0])
        first = batch[0] % 2 == 0
        writer.shards[0].add(batch[0][first], batch[1][first], batch[2][first].astype(np.float16), None)
    raw = (catalog / JOURNAL).read_bytes()
    with Catalog.open(catalog) as reader:
        assert len(reader) == 3000 and reader.get(batch[0][first][:1]) == [None]
        assert not reader.present(batch[0]).any() and sorted(i.id for i in reader) == sorted(items(3000)[0])
        assert not reader.search(batch[1][first][:1], k=1)[0].ids[0] in batch[0]
        assert "a batch cut short is still to be rolled back (20 of its items were committed" in \
            reader.journal_problem()
    assert (catalog / JOURNAL).read_bytes() == raw
    with Catalog.open(catalog, readonly=False) as writer:
        assert len(writer) == 3000 and not (catalog / JOURNAL).exists()
        writer.add(*batch)
    assert findings(catalog) == []


# ------------------------------------------------------------------------------------ engine.json (item 12)
@pytest.mark.parametrize("damage, place, message", [
    (None, None, None),
    (lambda c: (c / ENGINE_FILE).write_text((c / ENGINE_FILE).read_text()[:40]), ENGINE_FILE, "damaged"),
    (lambda c: (c / ENGINE_FILE).unlink(), ENGINE_FILE, "missing: queries on new images cannot find model"),
    (lambda c: (c / ENGINE_FILE).write_text(json.dumps(dict(json.loads((c / ENGINE_FILE).read_text()),
                                                            model_dir=str(c / "gone")))),
     ENGINE_FILE, "its model cannot be loaded"),
    (lambda c: edit_manifest(c, model_fingerprint="0" * 16), "manifest.json", "model fingerprint 0000000000000000"),
])
def test_verify_reports_what_queries_on_new_images_need(shop, tmp_path, cli_env, damage, place, message):
    catalog = tmp_path / "c"
    shutil.copytree(shop, catalog)
    if damage is None:
        assert findings(catalog) == []
        return
    damage(catalog)
    found = findings(catalog)
    assert [(p, i) for p, i, _ in found] == [(place, None)] and message in found[0][2], found
    result = cli("engine.verify", ["--catalog", catalog, "--repair"], cli_env)
    assert result.returncode == 1 and message in result.stdout, result.stdout + result.stderr


# ----------------------------------------------------------------------------------- read-only catalogs (issue 35)
READ_AS_NOBODY = """
import json, sys
from engine.verify import verify_catalog
from shards import Catalog, CatalogError
from tests.test_reliability import items
import os
os.setgid(65534); os.setuid(65534)
catalog = sys.argv[1]
out = {}
with Catalog.open(catalog) as reader:
    ids, codes, features, _ = items(3000)
    out["found"] = int(reader.search(codes[7:8], features[7:8], k=1)[0].ids[0]) == int(ids[7])
out["findings"] = [f.problem for f in verify_catalog(catalog).findings]
try:
    Catalog.open(catalog, readonly=False)
except CatalogError as error:
    out["writer"] = str(error)
print(json.dumps(out))
"""


def readable_by_everyone(path: Path) -> bool:
    """Whether every user may reach and read `path` (each folder above it searchable by others)."""
    return all(folder.stat().st_mode & 0o001 for folder in [path, *path.parents]) and bool(path.stat().st_mode & 0o004)


def test_a_catalog_the_user_cannot_write_is_read_without_being_called_damaged(tmp_path, cli_env):
    """Tests run as root, which ignores permission bits: the check runs as user nobody, on a copy of the catalog
    that nobody may read but not write (a folder outside root's private temporary folder)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to user nobody")
    if not readable_by_everyone(Path(sys.prefix)) or not readable_by_everyone(Path(__file__).parents[1]):
        pytest.skip("user nobody cannot read this Python installation or checkout (a private folder above it)")
    make_catalog(tmp_path / "c", n=3000, shards=2)
    outside = Path(tempfile.mkdtemp(prefix="latenthash-readonly-"))
    try:
        catalog = outside / "c"
        shutil.copytree(tmp_path / "c", catalog)
        for folder, _, files in os.walk(outside):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(Path(folder) / name, 0o644)
        result = subprocess.run([sys.executable, "-c", READ_AS_NOBODY, str(catalog)], capture_output=True,
                                text=True, env=cli_env, timeout=300, cwd=outside)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["found"] and out["findings"] == []
        assert "writer.lock: cannot open for writing (Permission denied)" in out["writer"]
    finally:
        shutil.rmtree(outside)


def test_verify_reports_stored_metadata_that_would_break_searches_and_keeps_the_items(tmp_path, cli_env):
    ids, codes, features, metas = items(30)
    metas[4]["metadata"] = {"price": float("nan")}  # as a version before the metadata checks stored it
    metas[9]["metadata"] = {"title": "fine", "price": 12.5}
    with Catalog.create(tmp_path / "c", BITS, DIM, shards=2) as catalog:
        catalog.add(ids, codes, features, metas)
    for repair in ([], ["--repair"]):
        result = cli("engine.verify", ["--catalog", tmp_path / "c", *repair], cli_env)
        assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
        assert f"item {ids[4]}" in result.stdout + result.stderr and f"item {ids[9]}" not in result.stdout
    with Catalog.open(tmp_path / "c") as catalog:
        assert len(catalog) == 30  # the user's data: reported, never deleted


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_stored_non_finite_feature_row_is_refused_not_ranked(tmp_path, value):
    ids, codes, features, metas = items(300)
    with Catalog.create(tmp_path / "c", BITS, DIM, shards=2) as catalog:
        catalog.add(ids, codes, features, metas)
    bad = int(ids[-1]) + 7
    with Catalog.open(tmp_path / "c", readonly=False) as writer:  # as a version before the float16 check stored it
        writer.shards[bad % 2].add(np.array([bad]), codes[42:43], np.full((1, DIM), value, np.float16), None)
    with Catalog.open(tmp_path / "c") as catalog:
        with pytest.raises(DamagedError, match=rf"items \[{bad}\] have features that are not finite"):
            catalog.search(codes[42:43], features[42:43], k=3)
        clean = catalog.search(codes[7:8], features[7:8], k=3, pool=3)  # a pool without it is answered
        assert np.isfinite(clean[0].distances).all()
    assert any(place_id == bad for _, place_id, _ in findings(tmp_path / "c"))
