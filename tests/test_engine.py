"""End to end: generated images -> a tiny trained model -> build-index -> query, through the real CLIs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from engine.encode import Encoder, encode_files
from engine.export import export_catalog, import_hdf5
from engine.search import Searcher
from engine.synthetic import make_image_folder
from shards import Catalog
from training.images import list_images
from training.model import load_model


def cli(module, args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def built(image_folder, trained_model, tmp_path_factory):
    """A catalog built by the build-index CLI over the training images."""
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))))
    catalog = tmp_path_factory.mktemp("catalog") / "c"
    result = cli("engine.build_index", [image_folder, "--model", trained_model, "--catalog", catalog,
                                        "--shards", "3", "--workers", "1", "--batch-size", "64"], env)
    assert result.returncode == 0, result.stderr
    return catalog


def test_query_returns_mostly_same_class(built, tmp_path, cli_env):
    queries = make_image_folder(tmp_path / "q", per_class=2, seed=99, start=1000)
    result = cli("engine.query", ["--catalog", built, "-k", "5", "--json", *queries], cli_env)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == len(queries)
    same = [r["label"] == os.path.basename(os.path.dirname(a["query"])) for a in answers for r in a["results"]]
    assert np.mean(same) >= 0.7
    for answer in answers:  # the documented schema
        assert set(answer) == {"query", "results"}
        for rank, r in enumerate(answer["results"], 1):
            assert set(r) == {"rank", "id", "path", "label", "hamming", "distance", "metadata"} and r["rank"] == rank
            assert isinstance(r["hamming"], int) and isinstance(r["distance"], float) and os.path.exists(r["path"])
        distances = [r["distance"] for r in answer["results"]]
        assert distances == sorted(distances)


def test_query_table_html_ids_and_hamming_only(built, image_folder, tmp_path, cli_env):
    indexed = sorted((image_folder / "ring").iterdir())[0]
    page = tmp_path / "r.html"
    result = cli("engine.query", ["--catalog", built, "-k", "3", "--html", page, indexed], cli_env)
    assert result.returncode == 0, result.stderr
    assert "rank" in result.stdout and str(indexed) in result.stdout.splitlines()[2]  # itself, at distance 0
    assert page.read_text().count("data:image/png;base64,") >= 4
    with Catalog.open(built) as catalog:
        some_id = next(iter(catalog)).id
    result = cli("engine.query", ["--catalog", built, "--id", some_id, "--no-rerank", "--radius", "2", "--json"],
                 cli_env)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)[0]["results"]
    assert some_id in [r["id"] for r in hits if r["hamming"] == 0]
    assert all(r["distance"] is None and r["hamming"] <= 2 for r in hits)
    assert [(r["hamming"], r["id"]) for r in hits] == sorted((r["hamming"], r["id"]) for r in hits)


def test_searcher_api_breaks_down_time(built, image_folder):
    with Searcher(built) as searcher:
        results = searcher.search([next((image_folder / "dots").iterdir())], k=4)
        assert len(results[0]) == 4
        assert searcher.timings.coarse > 0 and searcher.timings.rerank > 0


def test_rerun_is_incremental_and_prune_removes_gone_files(built, image_folder, trained_model, tmp_path, cli_env):
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    catalog = tmp_path / "c"
    args = [images, "--model", trained_model, "--catalog", catalog, "--workers", "0"]
    assert cli("engine.build_index", args, cli_env).returncode == 0
    again = cli("engine.build_index", args, cli_env)
    assert again.returncode == 0 and "indexed 0, unchanged 240" in again.stdout
    changed = sorted((images / "circle").iterdir())[0]
    Image.open(sorted((images / "square").iterdir())[0]).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    for gone in sorted((images / "cross").iterdir())[:3]:
        gone.unlink()
    result = cli("engine.build_index", args + ["--prune"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "indexed 1, unchanged 236, re-indexed 1, pruned 3" in result.stdout
    with Catalog.open(catalog) as c:
        assert len(c) == 237
        assert {item.meta["path"] for item in c} == {str(p) for p in images.rglob("*.png")}


def test_bad_files_are_reported_and_skipped(trained_model, tmp_path, cli_env):
    images = tmp_path / "images"
    make_image_folder(images, per_class=3, classes=("circle", "square"))
    (images / "circle" / "empty.png").write_bytes(b"")
    (images / "circle" / "notes.jpg").write_text("plain text")
    good = (images / "square" / "square_00000.png").read_bytes()
    (images / "square" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("1", (12000, 8000)).save(images / "square" / "bomb.png")
    catalog = tmp_path / "c"
    result = cli("engine.build_index", [images, "--model", trained_model, "--catalog", catalog], cli_env)
    assert result.returncode == 0, result.stderr
    assert "indexed 6" in result.stdout and "failed 4" in result.stdout
    report = json.loads((catalog / "build-report.json").read_text())
    assert sorted(os.path.basename(f["path"]) for f in report["failures"]) == ["bomb.png", "cut.png", "empty.png",
                                                                               "notes.jpg"]


def test_encoding_pipelines_agree(image_folder, trained_model, tmp_path):
    """Worker processes that decode and encode (CPU), the prefetch thread, and any worker count give the same
    codes and features in file order, with bad files reported at their positions."""
    files = list_images(image_folder)[:90]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    files = files[:40] + [bad] + files[40:]
    encoder = Encoder(load_model(trained_model))

    def run(workers):
        batches = list(encode_files(encoder, files, batch_size=16, workers=workers))
        return ([p for b in batches for p in b.positions], np.concatenate([b.codes for b in batches]),
                np.concatenate([b.features for b in batches]), [f for b in batches for f in b.failures])

    positions, codes, features, failures = run(0)
    assert positions == [p for p in range(len(files)) if p != 40] and [f[0] for f in failures] == [40]
    for workers in (1, 2):
        other = run(workers)
        assert other[0] == positions and other[3] == failures
        assert (np.unpackbits(other[1]) == np.unpackbits(codes)).mean() > 0.99  # 1 vs 2 threads: float noise
        np.testing.assert_allclose(other[2], features, rtol=1e-4, atol=1e-5)


def test_killed_build_finishes_on_rerun_without_duplicates(trained_model, tmp_path, cli_env):
    files = make_image_folder(tmp_path / "images", per_class=150, size=32, seed=5)
    kill_mid_build_and_rerun(["-m", "engine.build_index", tmp_path / "images", "--model", trained_model, "--catalog",
                              tmp_path / "c", "--batch-size", "32", "--workers", "0"], tmp_path / "c", files, cli_env)


def kill_mid_build_and_rerun(args: list, catalog, files: list, env: dict, committed_bytes: int = 200_000) -> None:
    """Run `python ARGS` (a build-index), SIGKILL it once its first shard file holds `committed_bytes`, run it
    again: the rerun indexes the rest, and every file is in the catalog exactly once."""
    process = subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # a loaded 2-core host (a Ray driver beside a training run) took over 120 s
    while time.time() < deadline and process.poll() is None:
        shard = catalog / "shard-0000" / "data.mdb"
        if shard.exists() and shard.stat().st_size > committed_bytes:  # some batches are in
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with Catalog.open(catalog) as partial:
        done = len(partial)
    assert 0 < done < len(files), "the kill did not land mid-build"
    result = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"indexed {len(files) - done}, unchanged {done}" in result.stdout
    with Catalog.open(catalog) as finished:
        paths = [item.meta["path"] for item in finished]
    assert sorted(paths) == sorted(map(str, files))


def test_export_import_round_trip(built, tmp_path, cli_env):
    h5 = tmp_path / "c.h5"
    assert cli("engine.export", ["--catalog", built, "--out", h5], cli_env).returncode == 0
    result = cli("engine.export", ["--import", h5, "--catalog", tmp_path / "copy", "--shards", "2"], cli_env)
    assert result.returncode == 0, result.stderr
    with Catalog.open(built) as a, Catalog.open(tmp_path / "copy") as b:
        assert a.manifest.model_fingerprint == b.manifest.model_fingerprint
        items_a = {i.id: i for i in a}
        items_b = {i.id: i for i in b}
        assert items_a.keys() == items_b.keys()
        for key, item in items_a.items():
            other = items_b[key]
            assert np.array_equal(item.code, other.code) and np.array_equal(item.features, other.features)
            assert item.meta["path"] == other.meta["path"] and item.meta["label"] == other.meta["label"]


def test_export_import_api(built, tmp_path):
    n = export_catalog(built, tmp_path / "x.h5", progress=False)
    assert import_hdf5(tmp_path / "x.h5", tmp_path / "y", progress=False).added == n


def test_ivf_catalog_answers_like_the_flat_one_when_every_list_is_probed(built, tmp_path, cli_env):
    """An export imported as an ivf catalog, queried through the CLI: with --nprobe at or above the list count
    the pool (here every item) is the exact one, so the results are the flat catalog's."""
    export_catalog(built, tmp_path / "x.h5", progress=False)
    import_hdf5(tmp_path / "x.h5", tmp_path / "ivf", shards=2, index="ivf", progress=False)
    with Searcher(built) as flat, Searcher(tmp_path / "ivf") as ivf:
        assert ivf.catalog.manifest.index_type == "ivf"
        some = [int(i) for i in flat.catalog.coarse(flat.catalog.get([next(iter(flat.catalog)).id])[0].code[None],
                                                    m=5)[0].ids]
        expected = flat.search_ids(some, k=5, pool=1000)
        assert ivf.search_ids(some, k=5, pool=1000, nprobe=10_000) == expected
    answer = cli("engine.query", ["--catalog", tmp_path / "ivf", "--id", str(some[0]), "-k", "5", "--pool", "1000",
                                  "--nprobe", "10000", "--json"], cli_env)
    assert answer.returncode == 0, answer.stderr
    assert [r["id"] for r in json.loads(answer.stdout)[0]["results"]] == [r.id for r in expected[0]]


@pytest.mark.parametrize("module, args, message", [
    ("engine.build_index", ["/no/such/dir", "--model", "M", "--catalog", "C"], "does not exist"),
    ("engine.query", ["--catalog", "/no/such/catalog", "x.png"], "/no/such/catalog: no such folder"),
    ("engine.export", ["--import", "/no/such.h5", "--catalog", "C"], "no such HDF5 file"),
    ("engine.query", ["--catalog", "C", "--nprobe", "0", "x.png"], "argument --nprobe: must be at least 1"),
    ("engine.build_index", ["/tmp", "--model", "M", "--catalog", "C", "--index", "lsh"], "invalid choice: 'lsh'"),
])
def test_cli_errors_are_one_line(module, args, message, cli_env, tmp_path):
    result = cli(module, args, cli_env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_catalog_of_another_model_is_refused(built, image_folder, tmp_path, cli_env):
    from training.model import create_model, save_model
    other = tmp_path / "other"
    save_model(create_model("cifar_convnet_small", 16, ["a", "b"]), other)
    result = cli("engine.build_index", [image_folder, "--model", other, "--catalog", built], cli_env)
    assert result.returncode == 2 and "not comparable" in result.stderr and "Traceback" not in result.stderr


def test_query_with_missing_image_is_one_line_error(built, cli_env):
    result = cli("engine.query", ["--catalog", built, "/no/such/image.png"], cli_env)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("codes", ["itq", "ksh"])
def test_build_index_with_a_code_maker_over_the_model_features(codes, image_folder, trained_model, tmp_path,
                                                               cli_env):
    """--codes fits a code maker on the model's features (KSH with the folder labels), keeps it with the
    catalog, and queries encode through it; the catalog then refuses other codes."""
    catalog = tmp_path / "c"
    result = cli("engine.build_index", [image_folder, "--model", trained_model, "--catalog", catalog,
                                        "--codes", codes, "--code-bits", "24", "--workers", "0"], cli_env)
    assert result.returncode == 0, result.stderr
    record = json.loads((catalog / "engine.json").read_text())
    assert record["codes"] == codes and (catalog / record["code_maker"]).is_file()
    queries = make_image_folder(tmp_path / "q", per_class=2, seed=7, start=500)
    with Searcher(catalog) as searcher:
        assert searcher.catalog.bits == 24 and searcher.encoder.bits == 24
        answers = searcher.search(queries, k=5, rerank=False)
    same = [r.label == os.path.basename(os.path.dirname(q)) for q, a in zip(queries, answers) for r in a]
    assert np.mean(same) >= 0.6
    again = cli("engine.build_index", [image_folder, "--model", trained_model, "--catalog", catalog,
                                       "--codes", "lsh"], cli_env)
    assert again.returncode == 2 and f"holds {codes} codes" in again.stderr and "Traceback" not in again.stderr


def test_query_on_ray_answers_as_in_process(built, cli_env):
    """`engine.query --ray local` starts a private Ray instance, one actor per 2 shards, and prints what the
    in-process search prints, filters included."""
    pytest.importorskip("ray")
    with Searcher(built) as searcher:
        some = str(next(iter(searcher.catalog)).id)
    args = ["--catalog", built, "--id", some, "-k", "8", "--pool", "60", "--label", "ring", "--label", "dots", "--json"]
    local = cli("engine.query", args, cli_env)
    remote = cli("engine.query", args + ["--ray", "local", "--shards-per-actor", "2"], cli_env)
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)


def test_photo_bytes_encode_as_their_file_and_bad_bytes_are_input_errors(shop, image_folder, tmp_path):
    """`Searcher.encode_bytes` (what the service's photo search and adds use) gives a file's codes, adds its
    seconds to the timings it is given, and words an unusable image as bad input (a ValueError)."""
    from engine.errors import InputError
    from engine.search import Timings

    photo = make_image_folder(tmp_path / "q", per_class=1, seed=3, start=600, classes=("ring",))[0]
    with Searcher(shop) as searcher:
        codes, features = searcher.encode([photo])
        timings = Timings()
        from_bytes = searcher.encode_bytes([photo.read_bytes()], timings=timings)
        assert np.array_equal(from_bytes[0], codes) and np.allclose(from_bytes[1], features)
        assert timings.decode > 0 and timings.encode > 0
        with pytest.raises(InputError, match="not a usable image"):
            searcher.encode_bytes([b"plain text"])
        with pytest.raises(ValueError, match="over the limit of 100"):
            searcher.encode_bytes([photo.read_bytes()], max_pixels=100)


def test_a_query_reads_engine_json_once(shop, tmp_path, monkeypatch):
    import engine.record

    reads = []
    parse = engine.record.parse_record
    monkeypatch.setattr(engine.record, "parse_record", lambda raw, where: reads.append(where) or parse(raw, where))
    photo = make_image_folder(tmp_path / "q", per_class=1, seed=4, start=610, classes=("dots",))[0]
    with Searcher(shop) as searcher:
        searcher.search([photo], k=3)
        searcher.query_labels([photo])
    assert len(reads) == 1, reads


def test_engine_json_is_written_durably(tmp_path, monkeypatch):
    """engine.json is fsynced before its rename and its folder after, as the catalog's manifest is."""
    import stat

    from engine.record import EngineRecord, read_record, write_record

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    write_record(tmp_path, EngineRecord(codes="itq", image_roots=["/photos"]))
    assert synced == [False, True]
    assert read_record(tmp_path) == EngineRecord(codes="itq", image_roots=["/photos"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json"]


def test_build_index_records_the_models_config_and_writes_a_code_maker_only_into_a_catalog(
        image_folder, trained_model, tmp_path):
    """engine.json's model_config is the model's config.json (read once, by load_model); a fitted code maker is
    written once its catalog exists, so a build whose catalog cannot be made leaves no folder behind."""
    from engine.build_index import build_index
    from engine.record import read_record

    build_index(image_folder, trained_model, tmp_path / "c", shards=1, progress=False, workers=0)
    assert read_record(tmp_path / "c").model_config == json.loads((trained_model / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown index type"):
        build_index(image_folder, trained_model, tmp_path / "itq", index="nope", codes="itq", code_bits=16,
                    progress=False, workers=0)
    assert not (tmp_path / "itq").exists()
