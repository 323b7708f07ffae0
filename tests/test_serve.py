"""The search service (issue 17): every endpoint and error in-process, filters against a brute force over the
export, writes seen by the next search, and a real uvicorn server on 127.0.0.1 that stops cleanly on SIGTERM."""
import io
import json
import shutil
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from shards.filters import Filter
from engine.search import Searcher
from engine.synthetic import make_image_folder
from shards import Catalog, hamming_distances
from tests.server_harness import running_server

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.api.app import create_app  # noqa: E402
from engine.api.service import Service  # noqa: E402

FIELDS = {"rank", "id", "path", "label", "hamming", "distance", "metadata"}


@pytest.fixture
def writable(shop, tmp_path):
    copy = tmp_path / "catalog"
    shutil.copytree(shop, copy)
    return copy


def client_for(catalog, **options) -> TestClient:
    return TestClient(create_app(Service(catalog, **options)))


def png_bytes(path) -> bytes:
    return path.read_bytes()


def test_search_by_photo_and_by_id_match_the_searcher(shop, image_folder, tmp_path):
    query = make_image_folder(tmp_path / "q", per_class=1, seed=21, start=700, classes=("dots",))[0]
    with Searcher(shop) as searcher:
        expected = searcher.search([query], k=7)[0]
        some_id = expected[0].id
        expected_by_id = searcher.search_ids([some_id], k=5, pool=50)[0]
    with client_for(shop) as client:
        answer = client.post("/search?k=7", files={"image": ("q.png", png_bytes(query), "image/png")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["query"] == "q.png" and [r["id"] for r in body["results"]] == [r.id for r in expected]
        assert all(set(r) == FIELDS for r in body["results"])
        assert body["results"][0]["metadata"]["sku"].startswith("SKU-")
        answer = client.get(f"/search?id={some_id}&k=5&pool=50")
        assert [r["id"] for r in answer.json()["results"]] == [r.id for r in expected_by_id]


def brute_force(catalog, code, features, passing, k, rerank):
    """Top k among the passing items: by (Hamming, id), or, re-ranking the whole passing set, by (L2, id)."""
    with Catalog.open(catalog) as opened:
        items = [i for i in opened if passing(i.meta)]
    ids = np.array([i.id for i in items])
    hamming = hamming_distances(code[None], np.stack([i.code for i in items]))[0]
    if not rerank:
        return ids[np.lexsort((ids, hamming))][:k].tolist()
    squared = ((np.stack([i.features for i in items]) - features) ** 2).sum(1)
    return ids[np.lexsort((ids, squared))][:k].tolist()


@pytest.mark.parametrize("query, passing", [
    ("label=ring&label=dots", lambda m: m["label"] in ("ring", "dots")),
    ("where=brand:acme", lambda m: m.get("metadata", {}).get("brand") == "acme"),
    ("label=square&where=brand:acme&where=price:12", lambda m: m["label"] == "square" and
     m["metadata"]["brand"] == "acme" and m["metadata"]["price"] == 12),
])
def test_filters_are_exact(shop, query, passing):
    with Searcher(shop) as searcher:
        item = next(iter(searcher.catalog))
    with client_for(shop) as client:
        for rerank in (False, True):
            pool = "&pool=100000" if rerank else ""
            answer = client.get(f"/search?id={item.id}&k=8&rerank={str(rerank).lower()}{pool}&{query}")
            assert answer.status_code == 200, answer.text
            got = [r["id"] for r in answer.json()["results"]]
            assert got == brute_force(shop, item.code, item.features, passing, 8, rerank)
            assert got and all(passing({"label": r["label"], "metadata": r["metadata"]})
                               for r in answer.json()["results"])


def test_cli_filters_match_the_api(shop, cli_env):
    with Searcher(shop) as searcher:
        item = next(iter(searcher.catalog))
        expected = searcher.search_ids([item.id], k=6, filter=Filter.parse(["ring"], ["brand:acme"]))[0]
    result = subprocess.run([sys.executable, "-m", "engine.query", "--catalog", str(shop), "--id", str(item.id),
                             "-k", "6", "--label", "ring", "--where", "brand:acme", "--json"], capture_output=True,
                            text=True, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)[0]["results"]] == [r.id for r in expected]
    assert all(r.label == "ring" and r.metadata["brand"] == "acme" for r in expected) and expected


def test_items_and_their_images(shop):
    with Searcher(shop) as searcher:
        item = next(iter(searcher.catalog))
    with client_for(shop) as client:
        answer = client.get(f"/items/{item.id}").json()
        assert answer["id"] == item.id and answer["path"] == item.meta["path"] and answer["metadata"]["sku"]
        image = client.get(f"/items/{item.id}/image")
        assert image.status_code == 200 and image.content == open(item.meta["path"], "rb").read()
        assert client.get("/items/12345/image").status_code == 404
        assert client.get("/items/12345").json() == {"error": "no item 12345 in the catalog"}


def test_add_then_search_then_delete(writable, tmp_path):
    photo = make_image_folder(tmp_path / "new", per_class=1, seed=33, start=800, classes=("cross",))[0]
    data = png_bytes(photo)
    with client_for(writable, token="s3cret") as client:
        before = client.get("/healthz").json()["items"]
        files = {"image": ("new.png", data, "image/png")}
        form = {"label": "cross", "metadata": json.dumps({"sku": "NEW-1", "title": "a new cross"})}
        assert client.post("/items", files=files, data=form).status_code == 401
        added = client.post("/items", files=files, data=form, headers={"Authorization": "Bearer s3cret"})
        assert added.status_code == 200, added.text
        new_id = added.json()["id"]
        found = client.post("/search?k=3", files=files).json()["results"]
        assert found[0]["id"] == new_id and found[0]["distance"] < 0.05 and found[0]["metadata"]["sku"] == "NEW-1"
        assert client.get(f"/items/{new_id}/image").content == data
        assert client.get("/healthz").json()["items"] == before + 1
        bad = client.post("/items", files={"image": ("x.png", b"not an image", "image/png")},
                          headers={"Authorization": "Bearer s3cret"})
        assert bad.status_code == 400 and client.get("/healthz").json()["items"] == before + 1
        assert client.delete(f"/items/{new_id}").status_code == 401
        assert client.delete(f"/items/{new_id}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert new_id not in [r["id"] for r in client.post("/search?k=3", files=files).json()["results"]]
        assert client.delete(f"/items/{new_id}", headers={"Authorization": "Bearer s3cret"}).status_code == 404
    with Catalog.open(writable) as catalog:
        assert len(catalog) == before and not list(catalog.verify())


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_client_mistakes_get_4xx_never_5xx(shop, image_folder):
    good = png_bytes(next(image_folder.rglob("*.png")))
    with client_for(shop, max_upload_mb=0.05, read_only=True) as client:
        def upload(data, query="k=3"):
            return client.post(f"/search?{query}", files={"image": ("f.png", data, "image/png")})

        assert upload(b"\0" * 60_000).status_code == 413
        for data in (b"plain text", good[: len(good) // 2], bomb()):
            answer = upload(data)
            assert answer.status_code == 400 and "error" in answer.json(), answer.text
        for query in ("k=0", "k=abc", "pool=0", "radius=-1", "k=100000", "where=nocolon", "nprobe=0"):
            assert upload(good, query).status_code == 422, query
        assert client.get("/search?id=999").status_code == 404
        assert client.get("/search?id=-5").status_code == 422
        assert client.post("/items", files={"image": ("f.png", good, "image/png")}).status_code == 403
        assert client.delete("/items/1").status_code == 403
        assert upload(good).status_code == 200
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["bits"] == 16 and health["items"] == 240
        metrics = client.get("/metrics").text
        assert 'latenthash_requests_total{endpoint="/search",status="413"} 1.0' in metrics
        for stage in ("decode", "encode", "coarse", "rerank"):
            assert f'latenthash_stage_seconds_count{{stage="{stage}"}} 1.0' in metrics
        assert "latenthash_catalog_items 240.0" in metrics


def test_a_real_server_answers_and_stops_cleanly_on_sigterm(shop, cli_env, tmp_path):
    with running_server(shop, cli_env, "--read-only", log=tmp_path / "server.log") as (base, server):
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert json.loads(response.read())["items"] == 240
        with urllib.request.urlopen(f"{base}/", timeout=5) as response:
            assert b"search by photo" in response.read()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0  # a clean shutdown, not death by the signal uvicorn raises again
        log = (tmp_path / "server.log").read_text()
        assert "Application shutdown complete" in log and "Finished server process" in log and "Traceback" not in log


def test_items_of_an_imported_catalog_with_numeric_labels(tmp_path):
    """Labels are text in every answer, also where an import stored bare class numbers."""
    rng = np.random.default_rng(0)
    with Catalog.create(tmp_path / "c", 16, 8, shards=2) as catalog:
        catalog.add(np.arange(50), rng.integers(0, 256, (50, 2), dtype=np.uint8),
                    rng.standard_normal((50, 8)).astype(np.float32), [{"path": None, "label": i % 3} for i in range(50)])
    with client_for(tmp_path / "c", read_only=True) as client:
        assert client.get("/items/7").json() == {"id": 7, "path": None, "label": "1", "metadata": None}
        answer = client.get("/search?id=7&k=5")
        assert answer.status_code == 200 and all(isinstance(r["label"], str) for r in answer.json()["results"])


def test_photo_searches_and_adds_encode_through_the_searcher(writable, tmp_path, monkeypatch):
    """The service decodes and encodes uploads with `Searcher.encode_bytes` (one encoding path), within its
    --max-megapixels limit."""
    calls = []
    encode_bytes = Searcher.encode_bytes

    def spy(self, images, max_pixels, timings=None, crops=None):
        calls.append(max_pixels)
        return encode_bytes(self, images, max_pixels, timings, crops)

    monkeypatch.setattr(Searcher, "encode_bytes", spy)
    photo = make_image_folder(tmp_path / "new", per_class=1, seed=34, start=810, classes=("ring",))[0]
    files = {"image": ("p.png", png_bytes(photo), "image/png")}
    with client_for(writable, max_pixels=123_456) as client:
        assert client.post("/search?k=2", files=files).status_code == 200
        assert client.post("/items", files=files).status_code == 200
    assert calls == [123_456, 123_456]


def test_serve_help_loads_neither_fastapi_nor_torch(cli_env):
    """The app (engine.api) is imported once the server starts, not for --help."""
    probe = ("import sys\nfrom engine.serve import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('fastapi', 'torch', 'engine.api', 'prometheus_client') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
