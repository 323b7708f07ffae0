"""engine.query at its edges: arguments refused before anything heavy loads, a pool that does not change the top
result with k, and a changed file queried by its old path."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from engine.build_index import build_index
from engine.search import Searcher
from shards import Catalog, Filter


@pytest.mark.parametrize("args, message", [
    (["-k", "0", "x.png"], "argument -k: must be at least 1, got 0"),
    (["--pool", "0", "x.png"], "argument --pool: must be at least 1, got 0"),
    (["--radius", "-1", "x.png"], "argument --radius: must be at least 0, got -1"),
    (["--id", "9223372036854775808"], "argument --id: must be between 0 and 9223372036854775807"),
    (["--id", "12x"], "argument --id: not an integer: '12x'"),
])
def test_bad_arguments_fail_in_one_line_before_torch_loads(args, message, tmp_path, cli_env):
    probe = ("import sys\nfrom engine.query import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', code)")
    result = subprocess.run([sys.executable, "-c", probe, "--catalog", str(tmp_path), *args], capture_output=True,
                            text=True, env=cli_env, timeout=120)
    assert message in result.stderr and "Traceback" not in result.stderr and "m=None" not in result.stderr
    assert result.stdout.strip() == "torch not loaded 2"


def test_radius_past_the_code_length_is_refused(shop, cli_env):
    with Searcher(shop) as searcher:  # closed: a catalog left open read-only here would refuse later writers
        some = next(iter(searcher.catalog)).id
    result = subprocess.run([sys.executable, "-m", "engine.query", "--catalog", str(shop), "--id", str(some),
                             "--radius", "17"], capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "radius must be between 0 and the code length (16 bits), got 17" in result.stderr


def test_the_top_result_does_not_change_with_k(tmp_path):
    rng = np.random.default_rng(0)
    n, bits, dim = 5000, 32, 8
    codes = np.packbits(rng.random((n, bits)) < 0.5, axis=1)
    features = rng.standard_normal((n, dim)).astype(np.float32)
    with Catalog.create(tmp_path / "c", bits, dim, shards=2, feature_dtype="float32") as catalog:
        catalog.add(np.arange(n), codes, features)
        tens = catalog.search(codes[:20], features[:20] + 0.5, k=10)
        for k in (1, 2, 5):
            assert [h.ids[0] for h in catalog.search(codes[:20], features[:20] + 0.5, k=k)] == [h.ids[0] for h in tens]


def test_a_changed_file_is_encoded_again_not_answered_from_its_old_code(image_folder, trained_model, tmp_path):
    first, other = sorted(image_folder.iterdir())[0], sorted(image_folder.iterdir())[5]
    cat, dog = sorted(first.glob("*.png"))[0], sorted(other.glob("*.png"))[0]
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(cat, folder / "item.png")
    build_index(folder, trained_model, tmp_path / "catalog", shards=1, progress=False, workers=0)
    shutil.copy(dog, folder / "item.png")  # same path, new content (and size/mtime)
    with Searcher(tmp_path / "catalog") as searcher:
        stored = next(iter(searcher.catalog)).features
        _, features = searcher.encode([folder / "item.png"])
        _, expected = searcher.encode([dog])
    assert np.allclose(features[0], expected[0], atol=1e-3) and not np.allclose(features[0], stored, atol=1e-3)


def test_searcher_searches_through_the_catalogs_one_two_stage_search(tmp_path):
    """`Searcher.search_codes` has no path of its own: it asks the catalog's read contract to `search`, whose
    both-stages step (a round trip on Ray) gets the searcher's timings; a filter and Hamming order alone too."""
    rng = np.random.default_rng(1)
    codes = np.packbits(rng.random((300, 32)) < 0.5, axis=1)
    features = rng.standard_normal((300, 8)).astype(np.float32)
    with Catalog.create(tmp_path / "c", 32, 8, shard_count=2) as catalog:
        catalog.add(np.arange(300), codes, features, [{"label": str(i % 3)} for i in range(300)])
    with Searcher(tmp_path / "c") as searcher:
        both_stages, calls = searcher.catalog._both_stages, []
        searcher.catalog._both_stages = lambda *args: calls.append(args[-1]) or both_stages(*args)
        found = searcher.search_codes(codes[:2], features[:2], k=3, filter=Filter.parse(["1"]))
        assert calls == [searcher.timings] and searcher.timings.coarse > 0 and searcher.timings.rerank > 0
        assert all(len(results) == 3 and all(r.label == "1" for r in results) for results in found)
        assert all(r.distance is None for r in searcher.search_codes(codes[:1], features[:1], k=3, rerank=False)[0])
        assert len(calls) == 1


@pytest.mark.parametrize("module, args, message", [
    ("engine.build_index", ["IMAGES", "--model", "M", "--catalog", "C", "--workers", "-1"],
     "argument --workers: must be at least 0, got -1"),
    ("engine.build_index", ["IMAGES", "--model", "M", "--catalog", "C", "--shards", "0"],
     "argument --shards: must be at least 1, got 0"),
    ("engine.demo", ["--per-class", "0"], "argument --per-class: must be at least 1, got 0"),
])
def test_other_commands_refuse_bad_numbers_in_one_line_and_leave_nothing(module, args, message, tmp_path, cli_env):
    args = [str(tmp_path / "C") if a == "C" else str(tmp_path) if a == "IMAGES" else a for a in args]
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=cli_env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "C").exists()
