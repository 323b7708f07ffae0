"""Crashes, full disks, odd directory entries, damaged and hostile files: each hole the fault campaign of issue 13
found, reproduced first, then shown closed."""
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest

from engine.export import export_catalog, import_hdf5
from engine.record import ENGINE_FILE, item_id, read_record
from engine.search import Searcher
from engine.synthetic import make_image_folder
from engine.verify import verify_catalog
from shards import Catalog, CatalogError
from shards.errors import DamagedError
from shards.records import id_keys
from training.data import load_dataset
from engine.errors import InputError
from training.errors import UserError
from training.model import load_model
from tests.test_data import write_cifar10

BITS, DIM = 48, 16


def items(n, seed=0, start=0):
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64) * 7 + 3
    return (ids, rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8),
            rng.standard_normal((n, DIM)).astype(np.float32), [{"path": f"/x/{i}.png", "label": "a"} for i in ids])


def make_catalog(path, n=3000, shards=2, **kwargs):
    with Catalog.create(path, BITS, DIM, shards=shards, **kwargs) as catalog:
        catalog.add(*items(n))
    return path


def cli(module, args, env, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, **kwargs)


def one_line_error(result, code=2):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error:"), \
        result.stderr


# ---------------------------------------------------------------------------------------------------- crash safety
def raise_last_page(data_file: Path, pages: int) -> None:
    """Make LMDB's newest meta page claim `pages` more pages than the file holds: the state a crash leaves when the
    last pages LMDB allocated were freed in the same transaction (valid, as LMDB never reads them)."""
    raw = bytearray(data_file.read_bytes())
    page = struct.unpack_from("<I", raw, 40)[0]  # the page size, kept in the free DB's record of meta page 0
    newest = max((0, page), key=lambda offset: struct.unpack_from("<Q", raw, offset + 144)[0])
    last = struct.unpack_from("<Q", raw, newest + 136)[0]
    struct.pack_into("<Q", raw, newest + 136, last + pages)
    data_file.write_bytes(bytes(raw))


def test_a_file_ending_before_its_last_free_page_opens_for_readers_and_writers(tmp_path):
    catalog = make_catalog(tmp_path / "c")
    data = catalog / "shard-0000" / "data.mdb"
    raise_last_page(data, 13)
    size = data.stat().st_size
    expected = items(3000)
    with Catalog.open(catalog) as reader:  # no write needed to read it
        assert len(reader) == 3000 and data.stat().st_size == size
        hits = reader.search(expected[1][:3], expected[2][:3], k=1)
        assert [h.ids[0] for h in hits] == expected[0][:3].tolist()
    with Catalog.open(catalog, readonly=False) as writer:  # a writer makes the file whole again
        assert data.stat().st_size == size + 13 * 4096
        writer.add(*items(10, seed=1, start=5000))
    with Catalog.open(catalog) as reader:
        assert len(reader) == 3010 and not list(reader.verify())


@pytest.mark.parametrize("keep", [0.97, 0.6, 0.2])
def test_a_file_cut_short_is_refused_by_readers_and_writers_without_crashing(tmp_path, keep):
    catalog = make_catalog(tmp_path / "c", n=20000, shards=1)
    data = catalog / "shard-0000" / "data.mdb"
    raw = data.read_bytes()
    data.write_bytes(raw[:int(len(raw) * keep) // 4096 * 4096])
    for readonly in (True, False, True):
        with pytest.raises(CatalogError, match="truncated"):
            Catalog.open(catalog, readonly=readonly)
    report = verify_catalog(catalog)
    assert report.findings and "truncated" in report.findings[0].problem


def test_forked_children_never_hold_the_writer_lock(tmp_path):
    writer = Catalog.open(make_catalog(tmp_path / "c"), readonly=False)
    started, started_here = os.pipe()
    child = os.fork()
    if child == 0:  # a decoding worker that lives on (or an orphan whose parent was killed)
        os.write(started_here, b"1")  # running: the at-fork handler has let go of the lock
        time.sleep(30)
        os._exit(0)
    try:
        os.read(started, 1)  # not in the instant between fork and the child's handler, which nothing can close
        writer.close()
        with Catalog.open(tmp_path / "c", readonly=False) as again:  # the child's copy of the lock is gone
            assert len(again) == 3000
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(started_here)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def test_workers_die_with_a_sigkilled_build_index(trained_model, tmp_path, cli_env):
    images = tmp_path / "images"
    make_image_folder(images, per_class=120, size=32, seed=3)
    catalog = tmp_path / "c"
    args = ["-m", "engine.build_index", images, "--model", trained_model, "--catalog", catalog, "--batch-size",
            "64", "--workers", "2"]
    process = subprocess.Popen([sys.executable, *map(str, args)], env=cli_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 120
    while time.time() < deadline and process.poll() is None and len(workers) < 2:
        workers = children(process.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the build never started its workers"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "workers outlived their parent"
    result = cli("engine.build_index", args[2:], cli_env)
    assert result.returncode == 0, result.stderr
    with Catalog.open(catalog) as done:
        assert len(done) == 1200


def test_import_resumes_and_reports_conflicts(tmp_path, cli_env):
    source = make_catalog(tmp_path / "src", n=5000)
    h5 = tmp_path / "all.h5"
    export_catalog(source, h5, progress=False)
    with h5py.File(h5) as f, h5py.File(tmp_path / "half.h5", "w") as half:  # what a killed import committed
        for name in ("ids", "codes", "features", "labels", "paths"):
            half.create_dataset(name, data=f[name][:2500])
        for key, value in f.attrs.items():
            half.attrs[key] = value
    import_hdf5(tmp_path / "half.h5", tmp_path / "copy", progress=False)
    result = cli("engine.export", ["--import", h5, "--catalog", tmp_path / "copy"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "imported 2500 items" in result.stdout and "2500 already there" in result.stdout
    with Catalog.open(source) as a, Catalog.open(tmp_path / "copy") as b:
        assert {i.id: (i.code.tobytes(), i.features.tobytes(), i.meta) for i in a} == \
            {i.id: (i.code.tobytes(), i.features.tobytes(), i.meta) for i in b}
    with h5py.File(h5, "a") as f:
        f["features"][7] = f["features"][7] + 1
    result = cli("engine.export", ["--import", h5, "--catalog", tmp_path / "copy"], cli_env)
    assert result.returncode == 1 and "1 ids are already in the catalog with other content" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkilled_imports_resume_with_every_item_once(tmp_path, cli_env):
    source = tmp_path / "src"
    rng = np.random.default_rng(3)
    with Catalog.create(source, BITS, 256, shards=3) as catalog:  # 256-d: each 50,000-item batch takes a while
        for start in range(0, 110000, 55000):
            ids = np.arange(start, start + 55000, dtype=np.int64)
            catalog.add(ids, rng.integers(0, 256, (55000, BITS // 8), dtype=np.uint8),
                        rng.standard_normal((55000, 256)).astype(np.float32), [{"path": f"/x/{i}"} for i in ids])
    h5 = tmp_path / "all.h5"
    export_catalog(source, h5, progress=False)
    with Catalog.open(source) as catalog:
        expected = {item.id: (item.code.tobytes(), item.features.tobytes(), item.meta["path"]) for item in catalog}
    kills_mid_import = 0
    for trial in range(3):
        copy = tmp_path / f"copy{trial}"
        process = subprocess.Popen([sys.executable, "-m", "engine.export", "--import", str(h5), "--catalog",
                                    str(copy)], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill while a batch is being committed: its journal exists from before the first shard's commit until
        # after the last one. Trial n waits for the journal of batch n (of 3), then up to 50 ms more.
        deadline, appearances, present = time.time() + 120, 0, False
        while time.time() < deadline and process.poll() is None and appearances <= trial:
            now = (copy / "add.journal").exists()
            appearances += now and not present
            present = now
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        cut_short = (copy / "add.journal").exists()
        with Catalog.open(copy) as partial:  # a reader leaves a cut-short batch out, and the journal in place
            seen = len(partial)
        kills_mid_import += cut_short or 0 < seen < 110000
        assert seen in (0, 50000, 100000, 110000) and (copy / "add.journal").exists() == cut_short
        with Catalog.open(copy, readonly=False) as writer:  # a writer rolls it back
            assert len(writer) == seen and not (copy / "add.journal").exists()
        result = cli("engine.export", ["--import", h5, "--catalog", copy], cli_env)
        assert result.returncode == 0, result.stderr
        with Catalog.open(copy) as done:
            assert {i.id: (i.code.tobytes(), i.features.tobytes(), i.meta["path"]) for i in done} == expected
    assert kills_mid_import >= 1, "no kill landed during the import: the test proved nothing"


def limited_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_gives_one_error_and_leaves_a_catalog_that_opens(tmp_path, cli_env):
    source = make_catalog(tmp_path / "src", n=100000, shards=2)
    h5 = tmp_path / "all.h5"
    export_catalog(source, h5, progress=False)
    import_hdf5(h5, tmp_path / "probe", progress=False)
    largest = max(f.stat().st_size for f in (tmp_path / "probe").glob("shard-*/data.mdb"))
    outcomes = set()
    for fraction in (0.3, 0.7, 0.95):  # the disk fills in the first batch, the second, or while storing the index
        copy = tmp_path / f"copy{fraction}"
        result = cli("engine.export", ["--import", h5, "--catalog", copy], cli_env,
                     preexec_fn=limited_file_size(int(largest * fraction)))
        one_line_error(result, code=2)
        assert "is the disk full?" in result.stderr or "could not be written" in result.stderr
        if (copy / "manifest.json").exists():
            with Catalog.open(copy) as partial:  # whole batches of 50,000 only, every item intact
                outcomes.add(len(partial))
                assert len(partial) in (0, 50000, 100000, 110000) and not list(partial.verify())
        else:
            outcomes.add(0)  # nothing was committed: no catalog is left, the folder is reusable
        result = cli("engine.export", ["--import", h5, "--catalog", copy], cli_env)
        assert result.returncode == 0, result.stderr
        with Catalog.open(copy) as done:
            assert len(done) == 100000 and not list(done.verify())
    assert len(outcomes) >= 2, outcomes


def test_a_creation_that_hit_a_full_disk_leaves_a_reusable_folder(tmp_path, cli_env):
    source = make_catalog(tmp_path / "src", n=2000)
    h5 = tmp_path / "all.h5"
    export_catalog(source, h5, progress=False)
    copy = tmp_path / "copy"
    result = cli("engine.export", ["--import", h5, "--catalog", copy], cli_env, preexec_fn=limited_file_size(6000))
    one_line_error(result, code=2)
    result = cli("engine.export", ["--import", h5, "--catalog", copy], cli_env)
    assert result.returncode == 0, result.stderr
    with Catalog.open(copy) as done:
        assert len(done) == 2000


def test_debris_of_a_failed_creation_is_cleared(tmp_path):
    (tmp_path / "c" / "shard-0000").mkdir(parents=True)
    (tmp_path / "c" / "shard-0000" / "data.mdb").write_bytes(b"\0" * 4096)  # a 4 KB file and no manifest
    make_catalog(tmp_path / "c")
    with Catalog.open(tmp_path / "c") as catalog:
        assert len(catalog) == 3000


# ----------------------------------------------------------------------------------------- bad directory entries
def test_odd_directory_entries_are_reported_and_skipped(trained_model, tmp_path, cli_env):
    images = tmp_path / "images"
    make_image_folder(images, per_class=3, classes=("circle", "square"))
    circle = images / "circle"
    os.symlink(circle / "missing.png", circle / "dangling.png")
    os.symlink(circle / "loop.png", circle / "loop.png")
    os.mkfifo(circle / "x.png")
    odd_name = os.fsencode(circle) + b"/caf\xe9.png"  # Latin-1, not UTF-8
    with open(odd_name, "wb") as f:
        f.write((circle / "circle_00000.png").read_bytes())
    catalog = tmp_path / "c"
    result = cli("engine.build_index", [images, "--model", trained_model, "--catalog", catalog], cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "indexed 7" in result.stdout and "failed 3" in result.stdout
    report = json.loads((catalog / "build-report.json").read_text())
    assert sorted(os.path.basename(f["path"]) for f in report["failures"]) == ["dangling.png", "loop.png", "x.png"]
    with Catalog.open(catalog) as c:
        paths = {item.id: item.meta["path"] for item in c}
    assert paths[item_id(odd_name)].endswith("caf\\xe9.png")  # a stable id from the bytes, a readable path
    again = cli("engine.build_index", [images, "--model", trained_model, "--catalog", catalog], cli_env, timeout=120)
    assert "indexed 0, unchanged 7" in again.stdout, again.stderr


# --------------------------------------------------------------------------------------------------------- trust
def test_a_crafted_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "cifar"
    write_cifar10(root)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (root / "data_batch_1").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}, protocol=2))
    with pytest.raises(UserError, match="refused to load posix.system"):
        load_dataset(root)
    assert not marker.exists()


def test_a_changed_model_is_refused(trained_model, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for name in ("model.safetensors", "config.json"):
        (model / name).write_bytes((trained_model / name).read_bytes())
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-64:] = os.urandom(64)
    (model / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(UserError, match="changed since the model was saved"):
        load_model(model)
    (model / "model.safetensors").write_bytes((trained_model / "model.safetensors").read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["mean"] = [0.5, 0.5, 0.5]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="changed since the model was saved"):
        load_model(model)


def edit_manifest(catalog, **fields):
    manifest = json.loads((catalog / "manifest.json").read_text())
    manifest.update(fields)
    (catalog / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (dict(shard_count=2), "shard-0002, shard-0003 also exist"),
    (dict(feature_dim=8), "does not match the catalog manifest: block_items|feature_dim"),
    (dict(bits=64), "does not match the catalog manifest: bits"),
])
def test_a_manifest_that_disagrees_with_its_shards_is_refused(tmp_path, change, message):
    catalog = make_catalog(tmp_path / "c", shards=4)
    edit_manifest(catalog, **change)
    with pytest.raises(CatalogError, match=message):
        Catalog.open(catalog)


def test_garbage_in_feature_rows_is_found_by_verify_and_by_search(tmp_path, cli_env):
    catalog = make_catalog(tmp_path / "c", n=3000, shards=2)
    ids, codes, features, _ = items(3000)
    victim = int(ids[10])
    with Catalog.open(catalog) as reader:  # find the victim's feature row inside data.mdb
        row = reader.features([victim])[0].astype(np.float16).tobytes()
    data = catalog / f"shard-{victim % 2:04d}" / "data.mdb"
    raw = data.read_bytes()
    assert raw.count(row) == 1
    garbage = np.random.default_rng(7).standard_normal(DIM).astype(np.float16)  # finite, plausible numbers
    data.write_bytes(raw.replace(row, garbage.tobytes()))
    result = cli("engine.verify", ["--catalog", catalog], cli_env)
    assert result.returncode == 1
    assert f"item {victim}\tchecksum mismatch" in result.stdout and "1 problem found" in result.stdout
    with Catalog.open(catalog) as reader:
        with pytest.raises(DamagedError, match=f"items \\[{victim}\\] are damaged"):  # it would be returned
            reader.search(codes[10:11], garbage[None].astype(np.float32), k=5)
        with pytest.raises(CatalogError, match="damaged"):
            reader.features([victim])
        assert len(reader.search(codes[11:12], features[11:12], k=5)[0]) == 5  # the rest still answers
    from fastapi.testclient import TestClient

    from engine.api.app import create_app
    from engine.api.service import Service
    with TestClient(create_app(Service(catalog, read_only=True))) as client:  # damage is the server's fault
        answer = client.get(f"/search?id={victim}&k=5")
        assert answer.status_code == 500 and "damaged" in answer.json()["error"]
        assert client.get(f"/search?id={int(ids[11])}&k=5").status_code == 200
    result = cli("engine.verify", ["--catalog", catalog, "--repair"], cli_env)
    assert result.returncode == 0 and "deleted 1 damaged items" in result.stdout, result.stdout + result.stderr
    assert verify_catalog(catalog).findings == []


def test_a_damaged_stored_index_is_rebuilt_from_the_items(tmp_path):
    catalog = make_catalog(tmp_path / "c", shards=1)
    data = catalog / "shard-0000" / "data.mdb"
    raw = bytearray(data.read_bytes())
    ids, codes, _, _ = items(3000)
    stored = np.ascontiguousarray(np.pad(codes, ((0, 0), (0, 2)))[np.argsort(ids)]).tobytes()
    at = bytes(raw).find(stored[:4096])
    assert at > 0
    raw[at + 100] ^= 0xFF  # one code inside the stored index's copy
    data.write_bytes(bytes(raw))
    with Catalog.open(catalog) as reader:
        assert not reader.shards[0].index_loaded_from_disk
        assert np.array_equal(reader.coarse(codes[:1], m=1)[0].ids, ids[:1])


def write_h5(path, n=20, dim=DIM, **overrides):
    rng = np.random.default_rng(0)
    data = dict(ids=np.arange(n, dtype=np.int64), codes=rng.integers(0, 256, (n, 6), dtype=np.uint8),
                features=rng.standard_normal((n, dim)).astype(np.float32))
    data.update(overrides)
    with h5py.File(path, "w") as f:
        f.attrs["bits"] = 48
        for name, value in data.items():
            if value is not None:
                f.create_dataset(name, data=value)
    return path


def test_crafted_hdf5_imports_are_refused_and_leave_no_catalog(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(20 * DIM * 4))
    external = tmp_path / "external.h5"
    with h5py.File(external, "w") as f:
        f.attrs["bits"] = 48
        f.create_dataset("ids", data=np.arange(20))
        f.create_dataset("codes", data=np.zeros((20, 6), np.uint8))
        f.create_dataset("features", (20, DIM), np.float32, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    linked = write_h5(tmp_path / "linked.h5", features=None)
    with h5py.File(linked, "a") as f:
        f["features"] = h5py.ExternalLink(str(write_h5(tmp_path / "other.h5")), "features")
    nan = np.ones((20, DIM), np.float32)
    nan[3, 2] = np.nan
    (tmp_path / "text.h5").write_text("not hdf5")
    cases = {
        external: "keeps its data outside the file",
        linked: "link to elsewhere",
        write_h5(tmp_path / "nan.h5", features=nan): "not finite",
        write_h5(tmp_path / "flat.h5", features=np.ones(20, np.float32)): "2-D float array",
        tmp_path / "text.h5": "not a readable HDF5 file",
        write_h5(tmp_path / "ids.h5", ids=np.zeros(20, np.int64)): "not unique",
        write_h5(tmp_path / "neg.h5", ids=-np.arange(1, 21)): "non-negative",
        write_h5(tmp_path / "codes.h5", codes=np.zeros((20, 5), np.uint8)): r"codes must have shape \(20, 6\)",
    }
    for file, message in cases.items():
        target = tmp_path / f"catalog-{file.stem}"
        with pytest.raises(InputError, match=message):
            import_hdf5(file, target, progress=False)
        assert not target.exists()
    with pytest.raises(InputError, match="more than max_items 10"):
        import_hdf5(write_h5(tmp_path / "big.h5"), tmp_path / "big", progress=False, max_items=10)


def test_catalog_files_stay_inside_the_catalog(built_catalog, tmp_path, cli_env):
    record = json.loads((built_catalog / ENGINE_FILE).read_text())
    for bad in ("../code-maker.safetensors", "/etc/passwd"):
        (built_catalog / ENGINE_FILE).write_text(json.dumps(dict(record, code_maker=bad)))
        with pytest.raises(CatalogError, match="code_maker must be a file name inside the catalog"):
            read_record(built_catalog)
    (built_catalog / ENGINE_FILE).write_text(json.dumps(record))
    outside = tmp_path / "private.png"  # an image that no item of the catalog was indexed from
    make_image_folder(tmp_path / "elsewhere", per_class=1, classes=("circle",))
    outside.write_bytes(next((tmp_path / "elsewhere" / "circle").iterdir()).read_bytes())
    copy = tmp_path / "copy.h5"
    export_catalog(built_catalog, copy, progress=False)
    with h5py.File(copy, "a") as f:  # an import whose metadata points at it
        paths = f["paths"].asstr()[:]
        paths[0] = str(outside)
        del f["paths"]
        f.create_dataset("paths", data=paths.astype(object), dtype=h5py.string_dtype())
        first = int(f["ids"][0])
    import_hdf5(copy, tmp_path / "imported", progress=False)
    (tmp_path / "imported" / ENGINE_FILE).write_text(json.dumps(record))
    page = tmp_path / "page.html"
    result = cli("engine.query", ["--catalog", tmp_path / "imported", "--id", first, "-k", "3", "--html", page],
                 cli_env)
    assert result.returncode == 0, result.stderr
    assert str(outside) in result.stdout
    assert page.read_text().count("data:image/png") == 2  # the two items under the image folder, not the outsider


@pytest.fixture(scope="module")
def built_catalog(image_folder, trained_model, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("catalog") / "c"
    from engine.build_index import build_index
    build_index(image_folder, trained_model, catalog, shards=2, progress=False, workers=0)
    return catalog


# ------------------------------------------------------------------------------------------------- config bounds
def test_model_config_bounds(trained_model, tmp_path):
    for change, message in [(dict(input_size=100000), "input_size must be an integer in"),
                            (dict(bits="abc"), "bits must be an integer"),
                            (dict(surprise=1), "unknown fields surprise"),
                            (dict(std=[0, 1, 1]), "std must be three finite numbers, all positive")]:
        model = tmp_path / "m"
        model.mkdir(exist_ok=True)
        (model / "model.safetensors").write_bytes((trained_model / "model.safetensors").read_bytes())
        config = json.loads((trained_model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(UserError, match=message):
            load_model(model)


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "manifest.json").write_bytes(b"\xff\xfe garbage"), "corrupted manifest"),
    (lambda c: edit_manifest(c, bits="abc"), "bits must be an integer"),
    (lambda c: edit_manifest(c, shard_count=0), "shard_count must be an integer in"),
    (lambda c: edit_manifest(c, shard_count=-1), "shard_count must be an integer in"),
    (lambda c: edit_manifest(c, surprise=True), "unknown fields surprise"),
])
def test_damaged_catalog_files_give_one_clear_error(tmp_path, cli_env, damage, message):
    catalog = make_catalog(tmp_path / "c")
    damage(catalog)
    with pytest.raises(CatalogError, match=message):
        Catalog.open(catalog, readonly=False)
    result = cli("engine.query", ["--catalog", catalog, "--id", 3], cli_env)
    one_line_error(result)


def test_damaged_engine_record_and_metadata(built_catalog, tmp_path, cli_env):
    for text in ("{truncated", '{"codes": "nope"}', '{"model_dir": 5}', "[]"):
        (tmp_path / ENGINE_FILE).write_text(text)
        with pytest.raises(CatalogError, match="engine.json"):
            read_record(tmp_path)
    catalog = make_catalog(tmp_path / "c", shards=1)
    with Catalog.open(catalog, readonly=False) as writer:
        shard = writer.shards[0]
        with shard.env.begin(write=True) as txn:
            txn.put(id_keys([3])[0], b"\xc1 not msgpack", db=shard._meta)
    with Catalog.open(catalog) as reader:
        with pytest.raises(CatalogError, match="metadata of item 3 is damaged"):
            reader.metadata([3])
    assert [(f.id, f.problem) for f in verify_catalog(catalog).findings] == [(3, "its metadata is damaged")]
    assert msgpack.unpackb(msgpack.packb({"a": 1})) == {"a": 1}


def test_query_table_escapes_control_characters(built_catalog, tmp_path, cli_env):
    from engine.query import format_table
    from engine.search import Result

    table = format_table("q\nx", [Result(1, 5, "/a/evil\nname\x1b[2J.png", "l\tb", 0, 0.5)])
    assert len(table.splitlines()) == 3 and "evil\\x0aname\\x1b[2J.png" in table and "l\\x09b" in table
    with Searcher(built_catalog) as searcher:
        assert searcher.search_ids([next(iter(searcher.catalog)).id], k=2)[0]
