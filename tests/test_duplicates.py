"""Duplicate listings (engine.duplicates, GET /duplicates): exact and re-encoded copies planted among the test
images are all found, distinct items never grouped; the all-pairs search against brute force."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import shards.pairs
from engine.build_index import build_index
from engine.duplicates import components, find_duplicates, main
from engine.synthetic import draw
from shards import Catalog, Filter, hamming_distances, pad_codes
from shards.pairs import PairCount, close_pairs
from tests.server_harness import running_server


# Each planted photo (drawn at 160 px: larger than the model's input, as shop photos are) with its copies: an
# exact one, one resized to 120 px (PNG), one resized and re-compressed (JPEG quality 90).
PLANTED = {"circle": ("copy.png", "120.png", "120-q90.jpg"), "triangle": ("copy.png", "120-q90.jpg"),
           "square": ("120-q90.jpg",), "dots": ("120.png",)}


def plant(folder) -> list[set[str]]:
    """Draw the planted photos and their copies into `folder`'s class folders; the expected groups of paths."""
    rng = np.random.default_rng(38)
    groups = []
    for kind, copies in PLANTED.items():
        photo = draw(kind, 160, rng)
        original = folder / kind / "photo.png"
        photo.save(original)
        group = {str(original.resolve())}
        for name in copies:
            copy = photo.resize((120, 120), Image.LANCZOS) if name.startswith("120") else photo
            copy.save(folder / kind / f"photo-{name}", quality=90)  # quality: JPEG only
            group.add(str((folder / kind / f"photo-{name}").resolve()))
        groups.append(group)
    return groups


@pytest.fixture(scope="module")
def planted(image_folder, trained_model, tmp_path_factory):
    """The test images plus the planted photos and copies, indexed: (catalog, expected groups, items)."""
    root = tmp_path_factory.mktemp("duplicates")
    folder = root / "images"
    shutil.copytree(image_folder, folder)
    groups = plant(folder)
    summary = build_index(folder, trained_model, root / "catalog", shards=2, progress=False, workers=0)
    return root / "catalog", groups, summary.indexed


def paths(groups) -> list[set[str]]:
    return [{item["path"] if isinstance(item, dict) else item.path for item in group} for group in groups]


def test_planted_copies_are_found_largest_group_first_and_nothing_else(planted):
    catalog_dir, expected, _ = planted
    with Catalog.open(catalog_dir) as catalog:
        groups = find_duplicates(catalog)
    assert {frozenset(g) for g in paths(groups)} == {frozenset(g) for g in expected}
    assert [len(group) for group in groups] == [4, 3, 2, 2]
    assert all(len({item.label for item in group}) == 1 and group[0].label in PLANTED for group in groups)
    assert all([item.id for item in group] == sorted(item.id for item in group) for group in groups)


def test_a_filter_and_the_distance_limit_narrow_the_groups(planted):
    catalog_dir, expected, _ = planted
    circle = {path for path in expected[0] if not path.endswith(".jpg")}  # identical or resized: codes agree
    with Catalog.open(catalog_dir) as catalog:
        one_label = find_duplicates(catalog, filter=Filter.parse(["square"], []))
        close_codes_only = find_duplicates(catalog, radius=0, filter=Filter.parse(["circle"], []))
        identical_only = find_duplicates(catalog, radius=0, max_distance=0.0)
    assert paths(one_label) == [expected[2]]
    assert paths(close_codes_only) == [circle]
    assert sorted(map(len, paths(identical_only))) == [2, 2]  # the exact copies


def test_cli_prints_json_groups_and_writes_the_page(planted, tmp_path, capsys):
    catalog_dir, expected, _ = planted
    page = tmp_path / "groups.html"
    assert main(["--catalog", str(catalog_dir), "--json", "--html", str(page)]) == 0
    result = capsys.readouterr()
    groups = json.loads(result.out)
    assert isinstance(groups, list) and all(isinstance(group, list) for group in groups)
    assert all({"id", "path", "label", "metadata"} <= set(item) for group in groups for item in group)
    assert {frozenset(g) for g in paths(groups)} == {frozenset(g) for g in expected}
    assert "4 groups from" in result.err
    text = page.read_text()
    assert text.count("<section>") == 4 and "group 1: 4 items" in text and text.count("data:image/png") == 11
    assert main(["--catalog", str(catalog_dir), "--radius", "0", "--max-distance", "0"]) == 0  # a table
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "group 1: 2 items" and table[3] == "group 2: 2 items" and len(table) == 6


@pytest.mark.parametrize("args, message", [
    (["--radius", "-1"], "argument --radius: must be at least 0, got -1"),
    (["--max-distance", "nan"], "argument --max-distance: must be a finite number, got 'nan'"),
    (["--radius", "x"], "argument --radius: not an integer: 'x'"),
])
def test_bad_flags_are_refused_in_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--catalog", str(tmp_path), *args])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and message in error and "Traceback" not in error


def test_bad_catalog_and_radius_past_the_code_length_are_one_line_errors(planted, tmp_path, capsys):
    assert main(["--catalog", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --catalog {tmp_path / 'none'}: no such folder (make one " \
                                              "with build-index)"
    assert main(["--catalog", str(planted[0]), "--radius", "17"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "radius must be between 0 and the code length (16 bits), got 17" in error


def test_get_duplicates_through_a_real_server(planted, cli_env, tmp_path):
    catalog_dir, expected, items = planted
    with running_server(catalog_dir, cli_env, "--read-only", log=tmp_path / "server.log") as (base, _):
        with urllib.request.urlopen(f"{base}/duplicates", timeout=120) as response:
            answer = json.loads(response.read())
        with urllib.request.urlopen(f"{base}/duplicates?label=square&label=dots&radius=1", timeout=120) as response:
            filtered = json.loads(response.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/duplicates?radius=-1", timeout=30)
        with pytest.raises(urllib.error.HTTPError) as too_far:  # the service's bound: the CLI takes any
            urllib.request.urlopen(f"{base}/duplicates?radius=3", timeout=30)
    assert {frozenset(g) for g in paths(answer["groups"])} == {frozenset(g) for g in expected}
    assert {frozenset(g) for g in paths(filtered["groups"])} == {frozenset(g) for g in expected[2:]}
    assert filtered["items"] == 24 * 2 + 4 and filtered["radius"] == 1
    assert answer["items"] == items and answer["radius"] == 2 and answer["max_distance"] > 0
    assert refused.value.code == 422 and too_far.value.code == 422
    assert "less than or equal to 2" in too_far.value.read().decode()


def test_one_duplicate_search_at_a_time_in_the_service(planted):
    from fastapi.testclient import TestClient

    from engine.api.app import create_app
    from engine.api.service import Service

    with TestClient(create_app(Service(planted[0], read_only=True))) as client:
        service = client.app.state.service
        with service.duplicate_search:  # as a search in progress holds it
            busy = client.get("/duplicates")
        assert busy.status_code == 429 and "a duplicate search is running" in busy.json()["error"]
        assert client.get("/duplicates").status_code == 200


@pytest.mark.parametrize("bits, radius", [(16, 2), (48, 3), (48, 0), (12, 12), (130, 1)])
def test_close_pairs_equal_brute_force(bits, radius, monkeypatch):
    """Clustered codes (long runs of equal keys), a radius of the whole code, codes past 64 bits, and chunks of
    a few pairs: every pair within the radius, once."""
    monkeypatch.setattr(shards.pairs, "CHUNK_PAIRS", 5)
    rng = np.random.default_rng(bits + radius)
    centres = rng.random((4, bits)) < 0.5
    codes = pad_codes(np.packbits(centres[rng.integers(0, 4, 200)] ^ (rng.random((200, bits)) < 0.05), axis=1),
                      bits)
    distances = hamming_distances(codes, codes)
    expected = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(distances <= radius, 1)))}
    count = PairCount()
    found = [(int(a), int(b), int(d)) for chunk in close_pairs(codes, bits, radius, count) for a, b, d in
             zip(*chunk)]
    assert len(found) == len({(a, b) for a, b, _ in found}) and {(a, b) for a, b, _ in found} == expected
    assert all(distances[a, b] == d for a, b, d in found) and count.compared >= len(expected)


def test_components_join_chains_largest_first():
    groups = components(np.array([7, 3, 20, 9]), np.array([9, 7, 21, 30]))
    assert [g.tolist() for g in groups] == [[3, 7, 9, 30], [20, 21]]
    assert components(np.empty(0, np.int64), np.empty(0, np.int64)) == []
