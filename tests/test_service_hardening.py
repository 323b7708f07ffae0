"""The service and image decoding under hostile requests (issues 34 and 35): each attack reproduced on a real
catalog, a real server or real image files, then shown refused, bounded or cleaned up."""
import asyncio
import builtins
import errno
import io
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

import training.images as images
from engine.metadata import check_product_metadata, parse_product_metadata
from engine.report import write_html
from engine.search import Result
from engine.synthetic import make_image_folder
from engine.verify import verify_catalog
from shards import Catalog
from shards.errors import CatalogError
from engine.errors import InputError as UserError
from training.images import BadImage, PixelBudget, load_image_bytes

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.api.app import create_app  # noqa: E402
from engine.api.service import Service  # noqa: E402
from engine.serve import main  # noqa: E402
from tests.server_harness import running_server  # noqa: E402

TOKEN = {"Authorization": "Bearer s3cret"}


def flat_png(width: int, height: int, rgba: tuple = (200, 30, 30, 128)) -> bytes:
    """A real RGBA PNG of one colour, compressed row by row: never holds its pixels (9400x9400 in ~1 s)."""
    row = b"\0" + bytes(rgba) * width
    packer = zlib.compressobj(1)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """The issue's upload: 9400x9400 RGBA, under Pillow's own bomb limit and the upload limit."""
    return flat_png(9400, 9400)


@pytest.fixture
def writable(shop, tmp_path):
    copy = tmp_path / "catalog"
    shutil.copytree(shop, copy)
    return copy


@pytest.fixture
def photo(tmp_path) -> bytes:
    return make_image_folder(tmp_path / "new", per_class=1, seed=33, start=800, classes=("cross",))[0].read_bytes()


def uploads(catalog: Path) -> list[str]:
    folder = catalog / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def add(client: TestClient, data: bytes, **form):
    return client.post("/items", files={"image": ("p.png", data, "image/png")}, data=form, headers=TOKEN)


# ---------------------------------------------------------------- decoding (issue 34 item 2)

def test_an_image_over_the_pixel_limit_is_refused_from_its_header(huge_png):
    start = time.perf_counter()
    with pytest.raises(BadImage, match="9400x9400 pixels"):
        load_image_bytes(huge_png, 32)
    assert time.perf_counter() - start < 1  # nothing decoded
    with pytest.raises(BadImage, match="over the limit of 1000"):
        load_image_bytes(flat_png(64, 64), 32, max_pixels=1000)


def test_a_jpeg_counts_at_the_scale_it_decodes_at():
    buffer = io.BytesIO()
    Image.new("RGB", (2400, 1600), (10, 120, 200)).save(buffer, format="JPEG")
    image = load_image_bytes(buffer.getvalue(), 32, max_pixels=100_000)  # 3.8 M pixels, decoded at 1/8
    assert image.shape == (3, 32, 32) and image[:, 16, 16].tolist() == pytest.approx([10, 120, 200], abs=3)


def test_a_large_image_decodes_in_little_more_memory_than_its_pixels(tmp_path, cli_env):
    """36 M RGBA pixels (144 MB decoded): converting the whole image to RGB cost four more copies (~600 MB)."""
    (tmp_path / "big.png").write_bytes(flat_png(6000, 6000))
    script = """
import re, sys, torch
from training.images import load_image_bytes
data = open(sys.argv[1], "rb").read()
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = status("VmRSS")
image = load_image_bytes(data, 32)
print(status("VmHWM") - before, image[:, 0, 0].tolist())
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.png")], capture_output=True,
                            text=True, env=cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    grown, corner = result.stdout.split(maxsplit=1)
    assert int(grown) < 1.4 * 6000 * 6000 * 4, f"{int(grown) >> 20} MiB"
    assert json.loads(corner) == [227, 142, 142]  # red at alpha 128 over white


def test_reducing_in_strips_equals_converting_the_whole_image(monkeypatch):
    monkeypatch.setattr(images, "STRIP_PIXELS", 5000)  # many strips, the last one short
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (257, 300, 4), dtype=np.uint8), "RGBA")
    strips = images._reduced_rgb(image, 4)
    assert np.array_equal(np.asarray(strips), np.asarray(images._to_rgb(image).reduce(4)))


def test_decodes_in_flight_are_bounded_in_pixels(monkeypatch):
    budget, held, peak, lock = PixelBudget(100), [0], [0], threading.Lock()

    def decode(pixels: int) -> None:
        with budget.taking(pixels):
            with lock:
                held[0] += min(pixels, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(pixels, 100)

    threads = [threading.Thread(target=decode, args=(n,)) for n in (60, 60, 60, 500, 30, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert peak[0] <= 100 and not any(t.is_alive() for t in threads)

    taken = []

    class Spy(PixelBudget):
        def taking(self, pixels):
            taken.append(pixels)
            return super().taking(pixels)

    monkeypatch.setattr(images, "DECODING", Spy(10**9))
    load_image_bytes(flat_png(40, 30), 32)
    assert taken == [1200]


def test_the_service_refuses_the_huge_upload_with_400(shop, huge_png):
    with TestClient(create_app(Service(shop, read_only=True))) as client:
        answer = client.post("/search", files={"image": ("bomb.png", huge_png, "image/png")})
        assert answer.status_code == 400 and "9400x9400 pixels" in answer.json()["error"]
    with TestClient(create_app(Service(shop, read_only=True, max_pixels=1000))) as client:
        small = client.post("/search", files={"image": ("s.png", flat_png(40, 30), "image/png")})
        assert small.status_code == 400 and "over the limit of 1000" in small.json()["error"]  # --max-megapixels


# ---------------------------------------------------------------- metadata (item 5)

@pytest.mark.parametrize("text, problem", [
    ('{"price": NaN}', "NaN is not a finite number"),
    ('{"price": Infinity}', "Infinity is not a finite number"),
    ('{"price": -Infinity}', "Infinity is not a finite number"),
    ('{"price": 1e400}', "inf is not a finite number"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nested deeper than 32 levels"),
    ("[" * 60_000, "nested deeper than 32 levels"),
    ('{"a": "' + "x" * 70_000 + '"}', "64 KiB"),
])
def test_metadata_must_be_finite_shallow_and_small(text, problem):
    with pytest.raises(UserError, match=problem):
        parse_product_metadata(text)


def test_metadata_values_are_checked_as_json():
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    for value, problem in [({"a": [1.0, float("nan")]}, "finite"), (deep, "deeper"), ({1: "x"}, "keys"),
                           ({"a": {1, 2}}, "set is not a JSON value"), ([1], "must be a JSON object")]:
        with pytest.raises(UserError, match=problem):
            check_product_metadata(value)
    fine = {"sku": "S-1", "price": 12.5, "tags": ["a", None, True], "size": {"eu": 42}}
    assert check_product_metadata(fine) is fine and check_product_metadata(None) is None


def test_non_finite_or_deep_metadata_is_refused_by_the_api(writable, photo):
    with TestClient(create_app(Service(writable, token="s3cret"))) as client:
        for text in ('{"price": NaN}', '{"price": 1e400}', '{"a": ' * 2000 + "1" + "}" * 2000):
            answer = add(client, photo, metadata=text)
            assert answer.status_code == 400 and "metadata" in answer.json()["error"], answer.text
        assert client.get("/healthz").json()["items"] == 240 and uploads(writable) == []
        added = add(client, photo, metadata='{"price": 12.5}')
        assert added.status_code == 200 and client.get(f"/search?id={added.json()['id']}").status_code == 200


# ---------------------------------------------------------------- adds, deletes and their photos (4, 8, 9)

def test_readding_a_photo_with_another_label_or_metadata_is_a_conflict(writable, photo):
    with TestClient(create_app(Service(writable, token="s3cret"))) as client:
        first = add(client, photo, label="cross", metadata='{"sku": "A"}')
        item = first.json()["id"]
        assert add(client, photo, label="cross", metadata='{"sku": "A"}').json() == {"id": item}
        for form in ({"label": "ring", "metadata": '{"sku": "A"}'}, {"label": "cross", "metadata": '{"sku": "B"}'},
                     {"label": "cross"}):
            answer = add(client, photo, **form)
            assert answer.status_code == 409 and answer.json()["id"] == item, answer.text
            assert f"item {item} already holds this photo" in answer.json()["error"]
        stored = client.get(f"/items/{item}").json()
        assert stored["label"] == "cross" and stored["metadata"] == {"sku": "A"}


def test_a_deleted_items_photo_goes_with_it(writable, photo):
    with TestClient(create_app(Service(writable, token="s3cret"))) as client:
        item = add(client, photo).json()["id"]
        assert len(uploads(writable)) == 1
        assert client.delete(f"/items/{item}", headers=TOKEN).status_code == 200
        assert uploads(writable) == []


def test_orphan_photos_are_reported_by_verify_and_cleaned(writable, photo):
    """A kill between writing a photo and committing its item (or between deleting an item and its photo)."""
    with TestClient(create_app(Service(writable, token="s3cret"))) as client:
        item = add(client, photo).json()["id"]
    with Catalog.open(writable, readonly=False) as catalog:
        catalog.delete([item])  # the item went, its photo stayed
    (writable / "uploads" / "0123abcd.part").write_bytes(b"cut short")
    report = verify_catalog(writable)
    assert [(f.place, f.problem.split(" (")[0]) for f in report.findings] == [("uploads",
                                                                             "2 photos belong to no item")]
    repaired = verify_catalog(writable, repair=True)
    assert "removed 2 uploaded photos that belonged to no item" in repaired.repaired and uploads(writable) == []
    assert verify_catalog(writable).findings == []

    (writable / "uploads" / "0123abcd.part").write_bytes(b"cut short")
    Service(writable).close()  # a writer opening the catalog cleans up too
    assert uploads(writable) == []


def test_a_moved_catalogs_photos_are_not_orphans(writable, photo, tmp_path):
    with TestClient(create_app(Service(writable, token="s3cret"))) as client:
        add(client, photo)
    moved = tmp_path / "moved"
    shutil.move(writable, moved)
    report = verify_catalog(moved, repair=True)
    assert not [f for f in report.findings if f.place == "uploads"] and len(uploads(moved)) == 1


class FullDisk:
    """A file whose writes fail as on a full disk (it was created: an empty file is left unless removed)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_answers_507_and_leaves_nothing_behind(writable, photo, monkeypatch):
    real_open = io.open

    def full_uploads(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and Path(file).parent.name == "uploads" else handle

    service = Service(writable, token="s3cret")
    with TestClient(create_app(service)) as client:
        with monkeypatch.context() as patch:
            patch.setattr(io, "open", full_uploads)
            patch.setattr(builtins, "open", full_uploads)
            answer = add(client, photo)
        assert answer.status_code == 507 and answer.json()["error"] == ("insufficient storage: the disk is full; "
                                                                         "nothing was added"), answer.text
        assert uploads(writable) == []

        def failed_commit(*args, **kwargs):  # what the shard layer raises when LMDB's commit finds no room
            try:
                raise lmdb.DiskError("mdb_txn_commit: No space left on device")
            except lmdb.Error as error:
                raise CatalogError("shard-0000/data.mdb: write failed, nothing of it was committed") from error

        monkeypatch.setattr(service.writer, "add", failed_commit)
        answer = add(client, photo)
        assert answer.status_code == 507 and "the disk is full" in answer.json()["error"], answer.text
        assert uploads(writable) == [] and client.get("/healthz").json()["items"] == 240

        def short_write(*args, **kwargs):  # the photo fitted, LMDB's commit did not: it says EIO, not ENOSPC
            try:
                raise lmdb.Error("mdb_txn_commit: Input/output error")
            except lmdb.Error as error:
                raise CatalogError("shard-0000/data.mdb: write failed (mdb_txn_commit: Input/output error); is "
                                   "the disk full?") from error

        monkeypatch.setattr(service.writer, "add", short_write)
        answer = add(client, photo)
        assert answer.status_code == 507 and "input/output error" in answer.json()["error"], answer.text
        assert uploads(writable) == [] and client.get("/healthz").json()["items"] == 240


# ---------------------------------------------------------------- request bodies (item 3)

def post_in_chunks(app, chunks: int, chunk: bytes, declared: int | None = None) -> tuple[int, dict, int]:
    """(status, JSON body, chunks the app read) of a multipart POST /search streamed to the ASGI app."""
    head = (b'--B\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    read, sent = [0], []

    async def receive():
        read[0] += 1
        body = head + chunk if read[0] == 1 else chunk
        return {"type": "http.request", "body": body, "more_body": read[0] < chunks}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=B")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/search", "raw_path": b"/search", "query_string": b"k=3",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read[0]


def test_a_body_over_the_limit_is_not_read_past_it(shop):
    service = Service(shop, read_only=True, max_upload_mb=1)
    try:
        app = create_app(service)
        status, body, read = post_in_chunks(app, 400, b"\0" * (256 << 10))  # 100 MiB, chunked
        assert status == 413 and body == {"error": "upload over the 1 MiB limit (--max-upload-mb)"}
        assert read <= 10  # the limit and the form's slack (2 MiB), not the whole body
        status, body, read = post_in_chunks(app, 1200, b"\0" * (256 << 10), declared=300 << 20)
        assert status == 413 and read == 0  # refused from its Content-Length
    finally:
        service.close()


def test_a_stalled_upload_does_not_hold_up_sigterm(writable, cli_env, tmp_path):
    log = tmp_path / "server.log"
    with running_server(writable, cli_env, "--shutdown-timeout", "1", log=log) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        head = ("POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                "Content-Length: {}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as refused:
            refused.sendall(head.format(300 << 20).encode())
            assert refused.recv(4096).startswith(b"HTTP/1.1 413 ")  # no byte of the body needed
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(head.format(100_000).encode() + b"--B\r\n" + b"\0" * 1000)  # then nothing
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=20) == 0
        finally:
            stalled.close()
    assert "Application shutdown complete" in log.read_text()
    with Catalog.open(writable, readonly=False):  # the writer lock was released
        pass


# ---------------------------------------------------------------- flags (item 16)

@pytest.mark.parametrize("flag, value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
                                         ("--max-upload-mb", "-1"), ("--max-upload-mb", "0"), ("--port", "0"),
                                         ("--port", "65536"), ("--port", "x"), ("--shards-per-actor", "0"),
                                         ("--max-megapixels", "nan"), ("--shutdown-timeout", "-1"),
                                         ("--shutdown-timeout", "inf")])
def test_numeric_flags_are_refused_in_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--catalog", "nowhere", flag, value])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {flag}: " in error.splitlines()[-1] and "Traceback" not in error


def test_the_help_says_where_writes_go_with_ray(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "adds and deletes go through the actors too" in text and "still commit here" not in text


# ---------------------------------------------------------------- as a stranger sees it (issue 35)

def test_every_client_mistake_answers_one_error_shape(shop):
    with TestClient(create_app(Service(shop, read_only=True))) as client:
        answer = client.get("/search?id=abc&k=0")
        assert answer.status_code == 422 and set(answer.json()) == {"error"}
        assert "query id" in answer.json()["error"] and "query k" in answer.json()["error"]
        answer = client.post("/search")
        assert answer.status_code == 422 and answer.json()["error"].startswith("body image: ")
        assert client.get("/nowhere").json() == {"error": "Not Found"}
        schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"]["4XX"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorModel"}, (method, path)


def test_the_docs_and_icon_are_served_without_a_network(shop):
    with TestClient(create_app(Service(shop, read_only=True))) as client:
        for page in ("/docs", "/redoc"):
            text = client.get(page).text
            sources = [part.split('"')[1] for part in text.split("src=")[1:]] + \
                      [part.split('"')[1] for part in text.split('rel="stylesheet" href=')[1:]]
            assert sources and all(s.startswith("/") for s in sources), sources
            assert all(client.get(s).status_code == 200 for s in sources)
        icon = client.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


def test_the_result_page_shows_product_fields_escaped(tmp_path):
    hits = [Result(1, 11, None, "shoes", 0, 0.0, {"title": "<b>Boot</b>", "price": 12.5, "sku": "S-1",
                                                 "url": "https://shop.example/p/1?a=1&b=2"}),
            Result(2, 12, None, "shoes", 1, 0.5, {"name": "Clog", "url": "javascript:alert(1)"})]
    page = tmp_path / "r.html"
    write_html(page, ["/photos/" + "a-very-long-file-name-" * 6 + ".png"], [hits], "t", [])
    text = page.read_text()
    assert "&lt;b&gt;Boot&lt;/b&gt;" in text and "12.5" in text and "SKU S-1" in text and "Clog" in text
    assert '<a href="https://shop.example/p/1?a=1&amp;b=2" rel="noopener noreferrer">shop.example</a>' in text
    assert "javascript:" not in text
    assert "figcaption { overflow-wrap: anywhere; }" in text  # long file names wrap inside the caption
