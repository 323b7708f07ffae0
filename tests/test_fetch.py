"""Photos by URL (issue 38 item 3): build-index's image_url rows and POST /items with image_url, fetched from a real
HTTP(S) server on 127.0.0.1 (allowed explicitly); with no allowance, internal addresses and redirects to them are
refused before any connection; limits, retries and timeouts against real misbehaving answers."""
import io
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.build_index import REPORT_FILE, build_index, main as build_index_main
from engine.fetch import (EVERY_NETWORK, FETCHED, FetchFailed, FetchPolicy, FetchTimeout, RefusedURL, cache_file,
                          fetch, fetch_photos, network)
from engine.record import read_metadata_file, read_record
from engine.synthetic import make_image_folder
from shards import Catalog

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.api.app import create_app  # noqa: E402
from engine.api.service import Service  # noqa: E402

LOOPBACK = (network("127.0.0.1/32"),)  # this test server's address, and no other
FAST = dict(backoff=0.01, connect_timeout=2, total_timeout=5)


class PhotoHandler(BaseHTTPRequestHandler):
    """Answers GETs from the server's `routes` ({path: (status, body, headers)} or a callable writing the answer)
    and counts every request per path in `hits`."""

    def do_GET(self):
        self.server.hits[self.path] += 1
        route = self.server.routes.get(self.path, (404, b"not here", {}))
        if callable(route):
            return route(self)
        status, body, headers = route
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def undeclared(body: bytes):
    """An answer of unknown length: the body ends when the connection closes."""
    def answer(handler):
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def slow(seconds: float):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(int(seconds / 0.05)):  # a byte at a time: each read is quick, the whole is not
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)
    return answer


def flaky(photo: bytes, failures: int):
    def answer(handler):
        if handler.server.hits[handler.path] <= failures:
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(photo)))
            handler.end_headers()
            handler.wfile.write(photo)
    return answer


def huge_png() -> bytes:
    """A small file of 96 million pixels: over the decoder's pixel limit."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(routes: dict, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), PhotoHandler)
    server.daemon_threads = True
    server.routes, server.hits = routes, Counter()
    server.handle_error = lambda request, address: None  # a client that hung up on purpose (limits, timeouts)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def photos(image_folder):
    """(base URL, server, photo bytes by name): six photos, a 404, an oversized photo, a page that is no image,
    redirects."""
    files = sorted(image_folder.rglob("*.png"))[:6]
    data = {f"p{n}.png": file.read_bytes() for n, file in enumerate(files)}
    routes = {f"/{name}": (200, body, {"Content-Type": "image/png"}) for name, body in data.items()}
    server = start_server(routes)
    port = server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    routes.update({
        "/big.png": (200, b"\x89PNG" + bytes(300_000), {}),
        "/big-undeclared.png": undeclared(b"\x89PNG" + bytes(300_000)),
        "/page.png": (200, b"<html>sold out</html>", {"Content-Type": "text/html"}),
        "/huge.png": (200, huge_png(), {}),
        "/slow.png": slow(3),
        "/flaky.png": flaky(data["p0.png"], failures=1),
        "/down.png": (503, b"", {}),
        "/moved.png": (302, b"", {"Location": "/p1.png"}),
        "/to-other-loopback.png": (302, b"", {"Location": f"http://127.0.0.2:{port}/p1.png"}),
        "/to-metadata.png": (307, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}),
        "/to-file.png": (302, b"", {"Location": "file:///etc/passwd"}),
        "/loop.png": (302, b"", {"Location": "/loop.png"}),
    })
    yield base, server, data
    server.shutdown()
    server.server_close()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_build_index_fetches_image_url_rows_once_and_lists_failures(photos, trained_model, tmp_path, capsys):
    base, server, data = photos
    empty = tmp_path / "no-local-photos"
    empty.mkdir()
    rows = [{"image_url": f"{base}/{name}", "sku": f"SKU-{n}"} for n, name in enumerate(data)]
    rows += [{"image_url": f"{base}/missing.png", "sku": "gone"}, {"image_url": f"{base}/big.png", "sku": "big"},
             {"image_url": f"{base}/page.png"}, {"image_url": f"{base}/huge.png"},
             {"image_url": "ftp://example.com/a.png"}, {"sku": "no photo"}]
    items = write_rows(tmp_path / "items.jsonl", rows)
    catalog = tmp_path / "catalog"
    policy = FetchPolicy(max_bytes=100_000, allowed_networks=LOOPBACK, **FAST)
    summary = build_index(empty, trained_model, catalog, shards=2, progress=False, workers=0, metadata=items,
                          fetch=policy)
    assert summary.indexed == 6 and summary.found == 10 and summary.failed == 4
    assert summary.fetched == dict(urls=10, fetched=7, cached=0, failed=3, stale=[],
                                   seconds=summary.fetched["seconds"])
    report = json.loads((catalog / REPORT_FILE).read_text())
    reasons = {failure["url"]: failure["error"] for failure in report["failures"]}
    assert set(reasons) == {f"{base}/{name}.png" for name in ("missing", "big", "page", "huge")}
    assert "404" in reasons[f"{base}/missing.png"] and "over the limit" in reasons[f"{base}/big.png"]
    assert "not an image" in reasons[f"{base}/page.png"]
    assert "pixels to decode, over the limit" in reasons[f"{base}/huge.png"]  # fetched, then refused by the decoder
    assert [p["line"] for p in report["metadata_unmatched"]] == [11, 12]
    assert "only http and https" in report["metadata_unmatched"][0]["error"]
    fetched = (catalog / FETCHED).resolve()
    assert str(fetched) in read_record(catalog).image_roots  # the service may show these photos
    with Catalog.open(catalog, readonly=True) as opened:
        stored = [item.meta for item in opened]
    assert sorted(m["metadata"]["sku"] for m in stored) == [f"SKU-{n}" for n in range(6)]
    by_url = {m["metadata"]["image_url"]: m["path"] for m in stored}
    assert all(Path(by_url[f"{base}/{name}"]).read_bytes() == body for name, body in data.items())
    assert {p.name for p in fetched.iterdir()} >= {p.split("/")[-1] for p in by_url.values()}

    hits = dict(server.hits)  # again, from the command line: the cached photos are not fetched again
    write_rows(items, rows[1:])  # and one product left the shop: --prune removes it and its photo
    code = build_index_main([str(empty), "--model", str(trained_model), "--catalog", str(catalog), "--metadata",
                             str(items), "--allow-url-network", "127.0.0.1", "--max-photo-mb", "0.09", "--workers", "0",
                             "--prune"])
    assert code == 0
    assert all(server.hits[f"/{name}"] == hits[f"/{name}"] for name in data)
    assert server.hits["/missing.png"] == hits["/missing.png"] + 1  # a failure is tried again
    again = json.loads((catalog / REPORT_FILE).read_text())
    assert (again["indexed"], again["unchanged"], again["pruned"]) == (0, 5, 1)
    assert again["fetched"]["cached"] == 6 and again["fetched"]["fetched"] == 0
    assert "image_url photos: 0 fetched, 6 already here, 3 failed of 9 URLs" in capsys.readouterr().err
    assert not Path(by_url[f"{base}/p0.png"]).exists() and len(list(fetched.iterdir())) == 6


def dated(state: dict):
    """A photo with a Last-Modified time that answers If-Modified-Since as a CDN does; `state` may change."""
    def answer(handler):
        since = handler.headers.get("If-Modified-Since")
        if since is not None and parsedate_to_datetime(since).timestamp() >= state["modified"]:
            handler.send_response(304)
            handler.end_headers()
            return
        handler.send_response(state.get("status", 200))
        handler.send_header("Last-Modified", formatdate(state["modified"], usegmt=True))
        handler.send_header("Content-Length", str(len(state["body"])))
        handler.end_headers()
        handler.wfile.write(state["body"])
    return answer


def test_refresh_fetches_only_changed_photos_and_keeps_those_it_cannot_check(photos, tmp_path):
    base, server, data = photos
    state = {"body": data["p0.png"], "modified": 1_700_000_000}
    server.routes["/dated.png"] = dated(state)
    url, folder = f"{base}/dated.png", tmp_path / FETCHED
    file = cache_file(folder, url)
    policy = FetchPolicy(allowed_networks=LOOPBACK, retries=0, **FAST)
    refresh = FetchPolicy(allowed_networks=LOOPBACK, retries=0, refresh=True, **FAST)

    def outcome(report):
        return report.fetched, report.cached, len(report.failures), len(report.stale), report.files

    assert outcome(fetch_photos(folder, {file: url}, policy)) == (1, 0, 0, 0, [file])
    assert file.stat().st_mtime == 1_700_000_000 and server.hits["/dated.png"] == 1
    assert outcome(fetch_photos(folder, {file: url}, policy)) == (0, 1, 0, 0, [file])  # not asked again
    assert outcome(fetch_photos(folder, {file: url}, refresh)) == (0, 1, 0, 0, [file])  # asked: 304
    assert server.hits["/dated.png"] == 2 and file.read_bytes() == data["p0.png"]
    state.update(body=data["p1.png"], modified=1_700_000_100)  # the shop replaced the photo
    assert outcome(fetch_photos(folder, {file: url}, refresh)) == (1, 0, 0, 0, [file])
    assert file.read_bytes() == data["p1.png"] and file.stat().st_mtime == 1_700_000_100
    state.update(modified=1_700_000_200, status=500)  # the server fails: the photo stays, and is reported
    report = fetch_photos(folder, {file: url}, refresh)
    assert outcome(report) == (0, 1, 0, 1, [file]) and "500" in report.stale[0]["error"]
    assert file.read_bytes() == data["p1.png"]


def test_a_metadata_row_needs_a_path_unless_urls_are_fetched(tmp_path):
    items = write_rows(tmp_path / "items.jsonl", [{"image_url": "https://cdn.example.com/a.jpg", "sku": "A"}])
    products, problems = read_metadata_file(items, tmp_path)
    assert products == {} and "no \"path\" string" in problems[0]["error"]
    products, problems = read_metadata_file(items, tmp_path, tmp_path / FETCHED)
    assert not problems and list(products.values()) == [{"image_url": "https://cdn.example.com/a.jpg", "sku": "A"}]


def test_limits_retries_and_timeouts(photos):
    base, server, data = photos
    allowed = FetchPolicy(max_bytes=100_000, allowed_networks=LOOPBACK, retries=2, **{**FAST, "total_timeout": 0.5})
    assert fetch(f"{base}/moved.png", allowed).data == data["p1.png"]
    assert fetch(f"{base}/p2.png", FetchPolicy(allowed_networks=EVERY_NETWORK)).data == data["p2.png"]
    with pytest.raises(FetchFailed, match="404"):
        fetch(f"{base}/sold out/ü.png?size=large&q=a b", allowed)
    assert server.hits["/sold%20out/%C3%BC.png?size=large&q=a%20b"] == 1
    before = server.hits["/flaky.png"]
    assert fetch(f"{base}/flaky.png", allowed).data == data["p0.png"] and server.hits["/flaky.png"] == before + 2
    for path, problem, tries in (("/missing.png", "404", 1), ("/down.png", "503", 3),
                                 ("/big.png", "300004 bytes, over the limit", 1),
                                 ("/big-undeclared.png", "more than 100000 bytes", 1),
                                 ("/loop.png", "more than 5 redirects", 1)):
        before = server.hits[path]
        with pytest.raises(FetchFailed, match=problem):
            fetch(f"{base}{path}", allowed)
        assert server.hits[path] - before == tries * (6 if path == "/loop.png" else 1), path  # 4xx: no retry
    started = time.monotonic()
    with pytest.raises(FetchTimeout, match="no answer within 0.5 s"):
        fetch(f"{base}/slow.png", FetchPolicy(allowed_networks=LOOPBACK, retries=0, total_timeout=0.5))
    assert time.monotonic() - started < 2  # the drip is cut off at the deadline, not read to its end


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/p0.png", "http://localhost:{port}/p0.png",
                                 "http://10.0.0.1/a.png", "http://192.168.1.1/a.png", "http://[::1]:{port}/p0.png",
                                 "http://[::ffff:127.0.0.1]:{port}/p0.png", "http://169.254.169.254/latest/",
                                 "http://[fe80::1]/a.png", "http://0.0.0.0:{port}/p0.png", "http://224.0.0.1/a.png",
                                 "http://100.64.0.1/a.png", "http://[2002:7f00:1::]/a.png",
                                 "ftp://example.com/a.png", "file:///etc/passwd", "not a url", "http:///a.png"])
def test_internal_addresses_and_other_schemes_are_refused_before_connecting(photos, url):
    base, server, data = photos
    before = sum(server.hits.values())
    with pytest.raises(RefusedURL):
        fetch(url.format(port=server.server_address[1]), FetchPolicy(**FAST))
    assert sum(server.hits.values()) == before


@pytest.mark.parametrize("path", ["/to-other-loopback.png", "/to-metadata.png", "/to-file.png"])
def test_every_redirect_is_checked_again(photos, path):
    base, server, data = photos
    with pytest.raises(RefusedURL):  # 127.0.0.1 is allowed; where it redirects to is not
        fetch(f"{base}{path}", FetchPolicy(allowed_networks=LOOPBACK, **FAST))


def test_https_connects_to_the_checked_address_and_verifies_the_certificate(photos, tmp_path, monkeypatch):
    base, server, data = photos
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    secure = start_server({"/p0.png": (200, data["p0.png"], {})}, tls)
    url = f"https://127.0.0.1:{secure.server_address[1]}/p0.png"
    policy = FetchPolicy(allowed_networks=LOOPBACK, **{**FAST, "retries": 0})
    try:
        with pytest.raises(FetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(url, policy)  # a certificate no trusted authority signed
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted now: the same fetch succeeds
        assert fetch(url, policy).data == data["p0.png"]
    finally:
        secure.shutdown()
        secure.server_close()


def test_post_items_with_image_url(photos, shop, tmp_path):
    base, server, _ = photos
    catalog = tmp_path / "catalog"
    shutil.copytree(shop, catalog)
    token = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(Service(catalog, token="s3cret", max_upload_mb=0.1))) as client:
        refused = client.post("/items", data={"image_url": f"{base}/p0.png"}, headers=token)
        assert refused.status_code == 400 and "private" in refused.json()["error"]
        assert client.post("/items", data={"image_url": "http://[::1]/x.png"}, headers=token).status_code == 400
    policy = FetchPolicy(allowed_networks=LOOPBACK, retries=0, **{**FAST, "total_timeout": 0.5})
    new = make_image_folder(tmp_path / "new", per_class=1, seed=33, start=800, classes=("cross",))[0].read_bytes()
    server.routes["/new.png"] = (200, new, {})  # a photo the shop does not hold yet
    with TestClient(create_app(Service(catalog, token="s3cret", max_upload_mb=0.1, urls=policy))) as client:
        before = client.get("/healthz").json()["items"]
        added = client.post("/items", data={"image_url": f"{base}/new.png", "label": "by-url",
                                            "metadata": json.dumps({"sku": "URL-1"})}, headers=token)
        assert added.status_code == 200, added.text
        found = client.post("/search?k=1", files={"image": ("new.png", new, "image/png")}).json()["results"]
        assert found[0]["id"] == added.json()["id"] and found[0]["metadata"] == {"sku": "URL-1"}
        assert client.get(f"/items/{added.json()['id']}/image").content == new
        for path, status in (("/missing.png", 502), ("/big.png", 502), ("/slow.png", 504), ("/page.png", 400),
                             ("/to-other-loopback.png", 400)):
            answer = client.post("/items", data={"image_url": f"{base}{path}"}, headers=token)
            assert answer.status_code == status and set(answer.json()) == {"error"}, (path, answer.text)
        both = client.post("/items", data={"image_url": f"{base}/new.png"}, headers=token,
                           files={"image": ("new.png", new, "image/png")})
        assert both.status_code == 422 and client.post("/items", headers=token).status_code == 422
        assert client.get("/healthz").json()["items"] == before + 1
    with Catalog.open(catalog) as opened:
        assert not list(opened.verify())
        assert np.count_nonzero(opened.present(np.array([added.json()["id"]]))) == 1
