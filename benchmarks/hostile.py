"""Issue 34's fault campaign, re-run after the fixes: hostile requests and hostile files, each through the public
surfaces (the CLIs as subprocesses, a real `engine.serve` on 127.0.0.1).

  python benchmarks/hostile.py --trials 5 [--out DIR] [--holes 1 2 ...]

For each numbered hole of the issue, `--trials` trials vary what they can (which shard, counter and garbage value,
which items a journal names, which metadata bomb, body sizes, when SIGTERM comes, ...) and count: lost (items that
were in the catalog and are gone when they should not be), unopenable (the catalog no longer opens where it
should), tracebacks (in a CLI's stderr or a server's log), wrong answers (a forbidden file served, NaN in output,
a stale result, a silent success where a refusal was due, verify calling damage clean, ...) and 5xx (server
statuses >= 500; a full disk's 507 is the answer hole 9 asks for, not counted as one). Every non-zero comes with
the facts to reproduce it. A small model is trained first (like tests/conftest.py). Hole 2 also runs
benchmarks/upload_memory.py (defaults and --max-megapixels 100) for the server's RSS under four 9400x9400 uploads.
Hole 9 fills a real tmpfs (needs root to mount one; without, it says which test covers it). Traffic goes to
127.0.0.1 only; servers and temporary folders are removed at the end. The table is printed, then one JSON line.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import common  # noqa: F401  (puts the project on sys.path)
from common import machine
from serve_load import multipart
from tests.damage import put_info

COLUMNS = ("lost", "unopenable", "tracebacks", "wrong", "5xx")
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BITS, DIM, ITEMS = 48, 16, 3000  # the synthetic catalogs of the storage holes (no model needed)
ENV = dict(os.environ, PYTHONPATH=str(common.ROOT))
ENV.pop("LATENTHASH_TOKEN", None)
ENV["TQDM_DISABLE"] = os.environ["TQDM_DISABLE"] = "1"  # no progress bars, here or in the CLIs


# ------------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Tally:
    """One hole's counts; every count comes with a note saying what happened, to reproduce it."""
    hole: str
    varied: str
    trials: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    notes: list = field(default_factory=list)
    measured: list = field(default_factory=list)  # facts for the table (sizes, times, RSS), not faults
    aborted: int = 0  # trials the campaign itself could not finish (a bug here, or a hang there)

    def flag(self, column: str, fact: str) -> None:
        self.counts[column] += 1
        self.notes.append(f"{column}: {fact}")

    def expect(self, holds: bool, fact: str, column: str = "wrong") -> bool:
        if not holds:
            self.flag(column, fact)
        return holds

    def row(self) -> str:
        cells = [str(self.trials)] + [str(self.counts[c]) for c in COLUMNS]
        aborted = [f"**{self.aborted} trials aborted** (see the JSON)"] if self.aborted else []
        facts = "; ".join(self.measured + aborted)
        return f"| {self.hole} | {' | '.join(cells)} | {self.varied}{'; ' + facts if facts else ''} |"


def trials_of(tally: Tally, trials: int, trial: Callable[[int], None]) -> None:
    """Run `trial(t)` for each t, counting it; a trial this script could not finish is counted apart, with why."""
    for t in range(trials):
        tally.trials += 1
        try:
            trial(t)
        except Exception as error:  # noqa: BLE001  (reported, never hidden)
            tally.aborted += 1
            tally.notes.append(f"aborted: trial {t}: {type(error).__name__}: {str(error)[:300]}")


@dataclass
class Context:
    work: Path
    rng: random.Random
    images: Path  # 240 generated PNGs in ten class folders
    model: Path  # trained on them (16 bits)
    shop: Path  # build-index of the images, 3 shards, with product metadata
    synthetic: dict  # shard count -> a catalog of ITEMS synthetic items (no model)
    logs: Path

    def folder(self, name: str) -> Path:
        """A new, empty folder under the work folder."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))

    def photo(self, size: int = 32, noise: bool = False) -> bytes:
        """A new PNG no other call returns: a drawn shape (or, with `noise`, random pixels that compress badly)."""
        from PIL import Image

        from engine.synthetic import CLASSES, draw

        seed = self.rng.getrandbits(32)
        picture = (Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
                   if noise else draw(self.rng.choice(CLASSES), size, np.random.default_rng(seed)))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- surfaces
def cli(tally: Tally, module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` as a user runs it; a traceback in its stderr is counted."""
    command = [sys.executable, "-m", module, *map(str, args)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    except subprocess.TimeoutExpired:
        tally.flag("wrong", f"{module} {' '.join(map(str, args))[:200]}: still running after {timeout} s")
        return subprocess.CompletedProcess(command, -9, "", "timed out")
    if "Traceback" in result.stderr:
        tally.flag("tracebacks", f"{module} {' '.join(map(str, args))[:200]}: {raised(result.stderr)}")
    return result


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else ""


def raised(text: str) -> str:
    """The exception line of the last traceback in `text` (progress bars may be printed after it)."""
    after = text.rsplit("Traceback", 1)[-1].splitlines()
    return next((line[:300] for line in reversed(after) if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)),
                last_line(text))


def refused(result: subprocess.CompletedProcess) -> bool:
    """A user's mistake or damage answered as the CLIs promise: a non-zero exit and one `error:` line."""
    return result.returncode not in (0, -9) and "error:" in last_line(result.stderr) \
        and "Traceback" not in result.stderr


@contextmanager
def server(ctx: Context, tally: Tally, catalog: Path, *options: str,
           env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m engine.serve` on 127.0.0.1 (running_server); its log is read for tracebacks afterwards."""
    from tests.server_harness import running_server

    log = ctx.logs / f"server-{len(list(ctx.logs.iterdir())):03d}.log"
    try:
        with running_server(catalog, env or ENV, *options, log=log, timeout=180) as started:
            yield started
    finally:
        text = log.read_text(errors="replace") if log.exists() else ""
        for _ in range(text.count("Traceback")):
            tally.flag("tracebacks", f"{log.name} (engine.serve {catalog.name} {' '.join(options)}): "
                                     f"{raised(text)}")


def call(tally: Tally, base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         expected_5xx: tuple = (), timeout: float = 120) -> tuple[int, bytes]:
    """(status, body) of one request; a status >= 500 not in `expected_5xx` is counted."""
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, data = error.code, error.read()
    if status >= 500 and status not in expected_5xx:
        tally.flag("5xx", f"{method} {path[:120]}: {status} {data[:200]!r}")
    return status, data


def post_photo(tally: Tally, base: str, data: bytes, path: str = "/items", expected_5xx: tuple = (),
               **form: str) -> tuple[int, dict]:
    body, kind = multipart({"image": ("photo.png", data, "image/png"), **form})
    status, raw = call(tally, base, "POST", path, body, {"Content-Type": kind, **AUTH}, expected_5xx)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw[:200].decode(errors="replace")}


def has_non_finite(text: str) -> bool:
    """NaN or Infinity in JSON output (Python's json writes them; strict JSON has neither)."""
    return bool(re.search(r"\b(NaN|-?Infinity)\b", text))


# ------------------------------------------------------------------------------------------------------ set-up
def synthetic_items(n: int, seed: int = 0, start: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64) * 7 + 3
    return (ids, rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8),
            rng.standard_normal((n, DIM)).astype(np.float32), [{"path": f"/x/{i}.png", "label": "a"} for i in ids])


def prepare(work: Path, rng: random.Random) -> Context:
    """Images, a model trained on them (as tests/conftest.py does), a built catalog and synthetic ones (kept
    from an earlier run in the same --workdir)."""
    from engine.build_index import build_index
    from engine.synthetic import make_image_folder
    from shards import Catalog
    from training.train import TrainConfig, train

    images, model = work / "images", work / "model"
    if not images.exists():
        make_image_folder(images, per_class=24, size=32, seed=0)
    for epochs in () if (model / "config.json").exists() else (8, 16):  # more if the codes cannot tell classes apart
        try:
            with open(work / "train.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
                train(TrainConfig(data=str(images), out=str(model), backbone="cifar_convnet_small", bits=16,
                                  epochs=epochs, batch_size=32, lr=8.0, val_split=0.2, tta=False))
            break
        except Exception as error:  # noqa: BLE001
            if epochs == 16 or "apart" not in str(error):
                raise
            shutil.rmtree(model, ignore_errors=True)
    lines = [json.dumps({"path": str(file.relative_to(images)), "sku": f"SKU-{n}", "price": 10 + n % 7})
             for n, file in enumerate(sorted(images.rglob("*.png")))]
    (work / "items.jsonl").write_text("\n".join(lines) + "\n")
    if not (work / "shop").exists():
        build_index(images, model, work / "shop", shards=3, progress=False, workers=0,
                    metadata=work / "items.jsonl")
    synthetic = {shards: work / f"synthetic-{shards}" for shards in (2, 3)}
    for shards, folder in synthetic.items():
        if not folder.exists():
            with Catalog.create(folder, BITS, DIM, shards=shards) as catalog:
                catalog.add(*synthetic_items(ITEMS))
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=work))
    return Context(work, rng, images, model, work / "shop", synthetic, logs)


def copy_catalog(ctx: Context, source: Path, name: str) -> Path:
    target = ctx.folder(name) / "catalog"
    shutil.copytree(source, target)
    return target


def present_ids(catalog: Path) -> set[int]:
    """The ids a reader sees (in-process: the measurement, not the surface under test)."""
    from shards import Catalog

    with Catalog.open(catalog) as opened:
        return {item.id for item in opened}


def opens(tally: Tally, catalog: Path, why: str) -> bool:
    from shards import Catalog, CatalogError

    try:
        Catalog.open(catalog).close()
        return True
    except CatalogError as error:
        tally.flag("unopenable", f"{why}: {str(error)[:200]}")
        return False


def write_export(path: Path, n: int, **datasets) -> Path:
    """An HDF5 file of n synthetic items as engine.export writes them; `datasets` adds or replaces datasets
    (None: left out), `attrs` sets file attributes."""
    import h5py

    rng = np.random.default_rng(n)
    attrs = datasets.pop("attrs", {})
    data = dict(ids=np.arange(n, dtype=np.int64), codes=rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8),
                features=rng.standard_normal((n, DIM)).astype(np.float32))
    data.update(datasets)
    with h5py.File(path, "w") as f:
        f.attrs["bits"] = BITS
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, value in data.items():
            if isinstance(value, list):
                f.create_dataset(name, data=np.array(value, dtype=object), dtype=h5py.string_dtype())
            elif value is not None:
                f.create_dataset(name, data=value)
    return path


# ------------------------------------------------------------------------- 1: forbidden files through an import
def hole_forbidden_files(ctx: Context, tally: Tally, trials: int) -> None:
    """An HDF5 export whose engine record claims image folders ("/", ...) and whose paths name files outside
    them, imported and served read-only: only files under folders given with --image-root may be served."""
    base = ctx.folder("forbidden")
    photos = base / "photos"
    photos.mkdir()
    mine = photos / "mine.png"
    mine.write_bytes(ctx.photo())
    marker = f"SECRET-{ctx.rng.getrandbits(64):016x}".encode()
    (base / "secret.txt").write_bytes(marker)
    (photos / "link.png").symlink_to(base / "secret.txt")
    targets = {"/etc/passwd": b"root:", "/proc/self/environ": b"PATH=", "/proc/self/cmdline": b"engine.serve",
               str(base / "secret.txt"): marker, str(photos / "link.png"): marker,
               f"{photos}/../secret.txt": marker, f"{photos}/../../../../../../etc/passwd": b"root:"}
    claims = [["/"], ["/etc", "/proc"], [str(ctx.work)], [str(photos), "/"], [str(base)]]

    def trial(t: int) -> None:
        forbidden = ctx.rng.sample(sorted(targets), 4)
        paths = forbidden + [str(mine)]
        engine = dict(image_roots=claims[t % len(claims)], model_dir=str(ctx.model), codes="latent")
        file = write_export(base / f"evil-{t}.h5", len(paths), paths=paths, attrs={"engine": json.dumps(engine)})
        given = t % 2 == 1
        catalog = base / f"catalog-{t}"
        result = cli(tally, "engine.export", "--import", file, "--catalog", catalog,
                     *(["--image-root", photos] if given else []))
        if not tally.expect(result.returncode == 0, f"trial {t}: the import failed: {last_line(result.stderr)}"):
            return
        with server(ctx, tally, catalog, "--read-only") as (url, _):
            for item, path in enumerate(paths):
                status, body = call(tally, url, "GET", f"/items/{item}/image")
                if path == str(mine):
                    want = 200 if given else 404
                    tally.expect(status == want and (body == mine.read_bytes()) == given,
                                 f"trial {t}: its own photo answered {status} (expected {want}, --image-root "
                                 f"{'given' if given else 'not given'})")
                else:
                    tally.expect(status == 404 and targets[path] not in body,
                                 f"trial {t}: {path} answered {status} ({len(body)} bytes) with image_roots "
                                 f"{engine['image_roots']} in the file")

    trials_of(tally, trials, trial)


# ------------------------------------------------------------------------------------ 2: memory under huge uploads
def hole_huge_uploads(ctx: Context, tally: Tally, trials: int) -> dict:
    """benchmarks/upload_memory.py as it is (defaults and --max-megapixels 100: idle and peak RSS), then the same
    attack `trials` times on a server of our own, whose log is read and whose statuses are all counted."""
    from upload_memory import BAR, huge_png, memory

    command = [sys.executable, str(Path(__file__).with_name("upload_memory.py")), "--max-megapixels", "100"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    tally.expect("Traceback" not in result.stderr, f"upload_memory.py: {raised(result.stderr)}", "tracebacks")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for run in report["runs"]:
        tally.trials += 1
        for status in run["statuses"]:
            tally.expect(status < 500, f"upload_memory.py {run['options']}: status {status}", "5xx")
        expected = 400 if run["options"] == "defaults" else 200
        tally.expect(run["statuses"] == [expected] * run["clients"] and run["passed"],
                     f"upload_memory.py {run['options']}: statuses {run['statuses']}, peak {run['peak_rss_mib']} "
                     f"MiB = {run['ratio']}x idle (bar {BAR}x)")
        tally.measured.append(f"upload_memory.py {run['options']}: idle {run['idle_rss_mib']} MiB, peak "
                              f"{run['peak_rss_mib']} MiB = **{run['ratio']:.2f}x** ({run['seconds']} s, statuses "
                              f"{'/'.join(map(str, sorted(set(run['statuses']))))})")
    upload = huge_png()
    with server(ctx, tally, ctx.shop, "--read-only") as (url, process):
        post_photo(tally, url, ctx.photo(), "/search?k=3")  # the model's first inference belongs to idling

        def trial(t: int) -> None:
            time.sleep(0.5)
            idle = memory(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
            clients, statuses = 4 + t % 3, []  # four, then five and six at once
            threads = [threading.Thread(target=lambda: statuses.append(
                post_photo(tally, url, upload, f"/search?k={1 + t}")[0])) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            peak = memory(process.pid, "VmHWM")
            ratios.append(peak / idle)
            tally.expect(statuses == [400] * clients and peak < BAR * idle,
                         f"trial {t}: {clients} uploads answered {statuses}, peak {peak >> 20} MiB over idle "
                         f"{idle >> 20} MiB")

        ratios: list[float] = []
        trials_of(tally, trials, trial)
    tally.measured.append(f"our server, defaults: peak at most {max(ratios, default=0):.2f}x idle")
    return report


# -------------------------------------------------------------------------------------------- 3: request bodies
FORM_HEAD = (b'--B\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
             b"Content-Type: image/png\r\n\r\n")
FORM_END = b"\r\n--B--\r\n"


def stream(port: int, path: str, size: int, declared: int | None, seconds: float = 20) -> tuple[int | None, int]:
    """(the status the server answered, bytes the kernel accepted) for a multipart POST of a `size`-byte file,
    sent in 1 MiB pieces while the server has not answered: with a Content-Length of `declared` (which may lie),
    or chunked when None."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Authorization: Bearer {TOKEN}\r\n")
    head += "Transfer-Encoding: chunked\r\n" if declared is None else f"Content-Length: {declared}\r\n"
    pieces = [FORM_HEAD] + [b"\0" * min(1 << 20, size - at) for at in range(0, size, 1 << 20)] + [FORM_END]
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as connection:
        connection.sendall(head.encode() + b"\r\n")
        stop = time.monotonic() + seconds
        for piece in pieces + ([b""] if declared is None else []):  # a chunked body ends with an empty chunk
            if time.monotonic() > stop or select.select([connection], [], [], 0)[0]:
                break  # the server answered (or closed the connection)
            try:
                connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if declared is None else piece)
            except OSError:  # the server stopped reading (timeout) or closed the connection
                break
            sent += len(piece)
        connection.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer:
                data = connection.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return (int(match.group(1)) if match else None), sent


def spooled_bytes(pid: int, folder: Path) -> int:
    """Bytes in the files a process holds open under `folder` (the form parser's spooled uploads: unnamed
    O_TMPFILE files, seen only through the process's descriptors)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += fd.stat().st_size
        except OSError:
            pass
    return total


def hole_request_bodies(ctx: Context, tally: Tally, trials: int) -> None:
    """A --max-upload-mb 2 server sent bodies of up to 300 MB (declared, chunked, lying about their length):
    it must answer 413 (or 400 for a malformed request) having read and spooled no more than the limit allows."""
    catalog = copy_catalog(ctx, ctx.shop, "bodies")
    spool = ctx.folder("bodies-tmp")
    limit = 2 << 20
    allowed = limit + (1 << 20)  # the upload limit and the form's slack (engine.api.middleware.FORM_SLACK)
    whole = len(FORM_HEAD) + len(FORM_END)
    shapes = [("300 MB, declared", 300 << 20, (300 << 20) + whole, {413}),
              ("300 MB, chunked", 300 << 20, None, {413}),
              ("40 MB, chunked", 40 << 20, None, {413}),
              ("300 MB, declaring 1 MB", 300 << 20, 1 << 20, {400, 413, 422, None}),
              ("2.5 MB, declared", 5 << 19, (5 << 19) + whole, {413})]
    with server(ctx, tally, catalog, "--token", TOKEN, "--max-upload-mb", "2",
                env=dict(ENV, TMPDIR=str(spool))) as (url, process):
        port = int(url.rsplit(":", 1)[1])

        def trial(t: int) -> None:
            name, size, declared, wanted = shapes[t % len(shapes)]
            path = ctx.rng.choice(["/search?k=3", "/items"])
            peak, done = [0], threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], spooled_bytes(process.pid, spool))
                    time.sleep(0.002)

            watcher = threading.Thread(target=watch)
            watcher.start()
            start = time.perf_counter()
            try:
                status, sent = stream(port, path, size, declared)
            finally:
                done.set()
                watcher.join()
            seconds = time.perf_counter() - start
            tally.expect(status in wanted, f"trial {t}: {name} to {path} answered {status} (expected {wanted})")
            if status is not None and status >= 500:
                tally.flag("5xx", f"trial {t}: {name} to {path} answered {status}")
            tally.expect(peak[0] <= allowed and sent < 64 << 20,
                         f"trial {t}: {name} to {path}: {peak[0] >> 10} KiB spooled, {sent >> 20} MiB accepted "
                         "before the answer")
            tally.measured.append(f"{name}: {status} after {seconds:.1f} s, {sent / (1 << 20):.0f} MiB sent, "
                                  f"{peak[0] / (1 << 20):.1f} MiB spooled")
            status, _ = call(tally, url, "GET", "/healthz")
            tally.expect(status == 200, f"trial {t}: /healthz answered {status} after {name}")

        trials_of(tally, trials, trial)
        tally.expect(process.poll() is None, "the server exited during the body trials", "unopenable")


# ------------------------------------------------------------------------- 4: uploaded photos, deletes and kills
def hole_upload_orphans(ctx: Context, tally: Tally, trials: int) -> None:
    """Adds and deletes through a writable server, SIGKILLed at a random moment of each trial and restarted:
    a deleted item's photo goes at once; after a restart every committed item (and its photo) is there, no
    deleted item is back, and no photo belongs to no item."""
    from engine.record import item_id
    from engine.uploads import upload_file

    catalog = copy_catalog(ctx, ctx.shop, "orphans")
    state = dict(committed=set(), deleted=set(), unsure=set())
    cleaned = []

    def check_after_restart(url: str, t: int) -> None:
        for item in sorted(state["committed"] - state["unsure"]):
            status, _ = call(tally, url, "GET", f"/items/{item}")
            if tally.expect(status == 200, f"after kill {t}: committed item {item} answers {status}", "lost"):
                status, _ = call(tally, url, "GET", f"/items/{item}/image")
                tally.expect(status == 200, f"after kill {t}: item {item}'s photo answers {status}")
        for item in sorted(state["deleted"] - state["unsure"]):
            status, _ = call(tally, url, "GET", f"/items/{item}")
            tally.expect(status == 404, f"after kill {t}: deleted item {item} answers {status}")
        folder = catalog / "uploads"
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            status, _ = call(tally, url, "GET", f"/items/{item_id(file)}")
            tally.expect(status == 200 and not file.name.endswith(".part"),
                         f"after kill {t}: {file.name} belongs to no item after the restart")

    def add_and_delete(url: str, stop: threading.Event) -> None:
        """Until the server dies: add new photos, deleting every third one added."""
        n = 0
        while not stop.is_set():
            data = ctx.photo()
            item = item_id(upload_file(catalog, data))
            state["unsure"].add(item)
            try:
                status, _ = post_photo(tally, url, data, label="kill")
                if status != 200:
                    return
                state["committed"].add(item)
                state["unsure"].discard(item)
                n += 1
                if n % 3 == 0:
                    victim = item
                    state["unsure"].add(victim)
                    status, _ = call(tally, url, "DELETE", f"/items/{victim}", headers=AUTH)
                    if status != 200:
                        return
                    state["committed"].discard(victim)
                    state["deleted"].add(victim)
                    state["unsure"].discard(victim)
                    tally.expect(not upload_file(catalog, data).exists(),
                                 f"item {victim} was deleted but its photo stayed")
            except (OSError, http.client.HTTPException):  # the kill
                return

    def trial(t: int) -> None:
        with server(ctx, tally, catalog, "--token", TOKEN) as (url, process):
            log = max(ctx.logs.iterdir())
            if t:
                check_after_restart(url, t - 1)
                cleaned.extend(re.findall(r"removed (\d+) uploaded photos", log.read_text()))
            if t == trials:
                return
            stop = threading.Event()
            worker = threading.Thread(target=add_and_delete, args=(url, stop))
            worker.start()
            time.sleep(ctx.rng.uniform(0.3, 2.5))
            process.send_signal(signal.SIGKILL)
            process.wait()
            stop.set()
            worker.join(timeout=120)

    for t in range(trials + 1):  # the last start only checks what the last kill left
        try:
            trial(t)
        except RuntimeError as error:  # running_server: the server would not start on the catalog
            tally.flag("unopenable", f"restart after kill {t - 1}: {error}")
        except Exception as error:  # noqa: BLE001
            tally.aborted += 1
            tally.notes.append(f"aborted: kill {t}: {type(error).__name__}: {error}")
    tally.trials = trials
    adds = len(state["committed"]) + len(state["deleted"])
    tally.measured.append(f"{adds} adds and {len(state['deleted'])} deletes answered 200; the restarts removed "
                          f"{sum(map(int, cleaned))} orphan photos the kills left")


# ------------------------------------------------------------------------------------------ 5: metadata bombs
BOMBS = ['{"price": NaN}', '{"price": Infinity}', '{"price": -Infinity}', '{"price": 1e400}',
         '{"a": [1, 2, -1e999]}', '{"a": ' * 40 + "1" + "}" * 40, '{"a": ' * 5000 + "1" + "}" * 5000,
         "[" * 60_000 + "]" * 60_000, '{"a": "' + "x" * 70_000 + '"}', '{"nested": {"x": [NaN]}}']


def hole_metadata(ctx: Context, tally: Tally, trials: int) -> None:
    """One metadata bomb per trial through each way metadata comes in: POST /items (400, nothing added), an HDF5
    import (one error line naming the row, no catalog) and build-index --metadata (the line reported, the item
    indexed without it); nothing non-finite or deeper than 32 levels may reach a catalog or a response."""
    catalog = copy_catalog(ctx, ctx.shop, "metadata")
    base = ctx.folder("metadata-files")
    with server(ctx, tally, catalog, "--token", TOKEN) as (url, _):
        before = json.loads(call(tally, url, "GET", "/healthz")[1])["items"]

        def trial(t: int) -> None:
            bomb = BOMBS[t % len(BOMBS)] if t < len(BOMBS) else ctx.rng.choice(BOMBS)
            what = f"trial {t}: metadata {bomb[:30]}... ({len(bomb)} chars)"
            status, answer = post_photo(tally, url, ctx.photo(), metadata=bomb)
            tally.expect(status == 400 and "metadata" in answer.get("error", ""),
                         f"{what}: POST /items answered {status} {str(answer)[:120]}")
            items = json.loads(call(tally, url, "GET", "/healthz")[1])["items"]
            tally.expect(items == before, f"{what}: the catalog holds {items} items, not {before}")
            import_bomb(ctx, tally, base, t, bomb, what)
            index_bomb(ctx, tally, base, t, bomb, what)

        trials_of(tally, trials, trial)
        tally.expect(not (catalog / "uploads").exists() or not list((catalog / "uploads").iterdir()),
                     "refused adds left photos in uploads/")


def import_bomb(ctx: Context, tally: Tally, base: Path, t: int, bomb: str, what: str) -> None:
    rows = [json.dumps({"sku": f"S-{i}"}) for i in range(6)]
    row = ctx.rng.randrange(len(rows))
    rows[row] = bomb
    file = write_export(base / f"bomb-{t}.h5", len(rows), metadata=rows)
    result = cli(tally, "engine.export", "--import", file, "--catalog", base / f"imported-{t}")
    tally.expect(refused(result) and f"row {row}" in result.stderr and not (base / f"imported-{t}").exists(),
                 f"{what}: import exited {result.returncode}: {last_line(result.stderr or result.stdout)}")


def index_bomb(ctx: Context, tally: Tally, base: Path, t: int, bomb: str, what: str) -> None:
    """build-index --metadata with the bomb on one image's line: reported, and nothing of it stored."""
    folder = base / f"photos-{t}"
    folder.mkdir()
    for n, source in enumerate(ctx.rng.sample(sorted(ctx.images.rglob("*.png")), 4)):
        shutil.copy(source, folder / f"p{n}.png")
    lines = [json.dumps({"path": f"p{n}.png", "sku": f"S-{n}"}) for n in range(4)]
    victim = ctx.rng.randrange(4)
    lines[victim] = bomb if bomb.startswith("[") else '{"path": "p%d.png", "x": %s}' % (victim, bomb)
    (base / f"items-{t}.jsonl").write_text("\n".join(lines) + "\n")
    catalog = base / f"indexed-{t}"
    result = cli(tally, "engine.build_index", folder, "--model", ctx.model, "--catalog", catalog, "--metadata",
                 base / f"items-{t}.jsonl", "--workers", "0", "--shards", "2")
    if not tally.expect(result.returncode == 0, f"{what}: build-index exited {result.returncode}: "
                                                f"{last_line(result.stderr)}"):
        return
    report = json.loads((catalog / "build-report.json").read_text())
    tally.expect(len(report.get("metadata_unmatched", [])) == 1, f"{what}: build-report.json lists "
                                                                 f"{report.get('metadata_unmatched')}")
    exported = cli(tally, "engine.export", "--catalog", catalog, "--out", base / f"out-{t}.h5")
    if tally.expect(exported.returncode == 0, f"{what}: export exited {exported.returncode}"):
        import h5py

        with h5py.File(base / f"out-{t}.h5") as f:
            stored = [text for text in f["metadata"].asstr()[:] if text]
        tally.expect(len(stored) == 3 and not any(has_non_finite(s) or s.count("{") > 33 for s in stored),
                     f"{what}: the catalog stores {len(stored)} metadata objects: {[s[:60] for s in stored]}")


# -------------------------------------------------------------------------------------- 6: float16 overflow
def hole_float16(ctx: Context, tally: Tally, trials: int) -> None:
    """Features finite as float32 but not as float16: an import is refused naming the row; a catalog an older
    writer stored them in is flagged by verify, and a search that meets the row refuses (no NaN answered)."""
    from shards import Catalog

    base = ctx.folder("float16")
    values = [1e6, -1e5, 65520.0, 7e4, 3e38, -65536.0]

    def trial(t: int) -> None:
        value, row = values[t % len(values)], ctx.rng.randrange(20)
        features = np.random.default_rng(t).standard_normal((20, DIM)).astype(np.float32)
        features[row, ctx.rng.sample(range(DIM), ctx.rng.randint(1, DIM))] = value
        file = write_export(base / f"overflow-{t}.h5", 20, features=features)
        result = cli(tally, "engine.export", "--import", file, "--catalog", base / f"imported-{t}")
        tally.expect(refused(result) and f"row {row}" in result.stderr and not (base / f"imported-{t}").exists(),
                     f"trial {t}: feature {value} in row {row}: import exited {result.returncode}: "
                     f"{last_line(result.stderr or result.stdout)}")
        catalog = copy_catalog(ctx, ctx.synthetic[2], "float16")
        ids, codes, _, _ = synthetic_items(ITEMS)
        neighbour = ctx.rng.randrange(ITEMS)
        bad_id = int(ids.max()) + 7 * (t + 1)
        bad = np.full((1, DIM), [np.inf, -np.inf, np.nan][t % 3], np.float16)
        with Catalog.open(catalog, readonly=False) as writer:  # what a writer of an older latenthash stored
            writer.shards[bad_id % 2].add(np.array([bad_id]), codes[neighbour:neighbour + 1], bad, None)
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 1 and "not finite" in result.stdout,
                     f"trial {t}: verify exited {result.returncode} on a stored {bad[0, 0]} row: "
                     f"{last_line(result.stdout)}")
        result = cli(tally, "engine.query", "--catalog", catalog, "--id", ids[neighbour], "--json", "-k", "5")
        results = json.loads(result.stdout)[0]["results"] if result.returncode == 0 else []
        ranked = [(r["rank"], r["distance"]) for r in results if r["id"] == bad_id]
        tally.expect(refused(result) or (result.returncode == 0 and not has_non_finite(result.stdout) and not ranked),
                     f"trial {t}: a query next to item {bad_id}, whose stored features are all {bad[0, 0]}, exited "
                     f"{result.returncode} ranking it (rank, distance) {ranked}; non-finite in the output: "
                     f"{has_non_finite(result.stdout)}")
        answers.append("refused" if result.returncode else "ranked" if ranked else "answered")

    answers: list[str] = []

    trials_of(tally, trials, trial)
    tally.measured.append(f"a query next to the stored row: {answers.count('refused')} refused in one line, "
                          f"{answers.count('ranked')} ranked it, {answers.count('answered')} left it out")


# ----------------------------------------------------------------------------------- 7: a changed file's old path
def hole_changed_file(ctx: Context, tally: Tally, trials: int) -> None:
    """An indexed file changed in place (rewritten, replaced, copied with its source's time, cut to garbage) and
    queried by its old path must be encoded again: the same results as a copy of the new content elsewhere."""
    base = ctx.folder("changed")
    photos = base / "photos"
    files = sorted(ctx.images.rglob("*.png"))
    chosen = ctx.rng.sample(files, 30)
    for n, source in enumerate(chosen):
        (photos / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, photos / source.parent.name / f"item{n}.png")
    catalog = base / "catalog"
    result = cli(tally, "engine.build_index", photos, "--model", ctx.model, "--catalog", catalog, "--workers", "0")
    if not tally.expect(result.returncode == 0, f"build-index exited {result.returncode}"):
        return
    indexed = sorted(photos.rglob("*.png"))
    ways = ["rewrite", "replace", "copy2", "garbage"]

    def trial(t: int) -> None:
        target = indexed[t % len(indexed)]
        other = ctx.rng.choice([f for f in files if f.parent.name != target.parent.name])
        way = ways[t % len(ways)]
        fresh = base / f"fresh-{t}.png"
        if way == "garbage":
            target.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif way == "rewrite":
            target.write_bytes(other.read_bytes())
        elif way == "replace":
            shutil.copy(other, base / "incoming.png")
            os.replace(base / "incoming.png", target)
        else:
            shutil.copy2(other, target)  # keeps the source's mtime
        shutil.copy(target, fresh)
        result = cli(tally, "engine.query", "--catalog", catalog, "--json", "-k", "5", target, fresh)
        if way == "garbage":
            tally.expect(refused(result), f"trial {t}: a garbage file at an indexed path answered "
                                          f"{result.returncode}: {result.stdout[:200]}")
            return
        if not tally.expect(result.returncode == 0, f"trial {t} ({way}): query exited {result.returncode}: "
                                                    f"{last_line(result.stderr)}"):
            return
        by_path, by_copy = (answer["results"] for answer in json.loads(result.stdout))
        tally.expect([(r["id"], round(r["distance"], 3)) for r in by_path]
                     == [(r["id"], round(r["distance"], 3)) for r in by_copy],
                     f"trial {t} ({way}): {target.name} replaced by {other.name} answers from its old code")

    trials_of(tally, trials, trial)


# ------------------------------------------------------------------------------- 8: the same photo added again
def hole_readd(ctx: Context, tally: Tally, trials: int) -> None:
    """A photo added again: the same label and metadata give its id (200); another label, other metadata or none
    give 409 with its id, and the stored item keeps what it had."""
    catalog = copy_catalog(ctx, ctx.shop, "readd")
    with server(ctx, tally, catalog, "--token", TOKEN) as (url, _):
        def trial(t: int) -> None:
            data = ctx.photo()
            label, product = f"label-{t}", {"sku": f"S-{t}", "price": 10 + t}
            status, first = post_photo(tally, url, data, label=label, metadata=json.dumps(product))
            if not tally.expect(status == 200, f"trial {t}: the first add answered {status} {first}"):
                return
            item = first["id"]
            changes = [dict(label=label, metadata=json.dumps(product)),
                       dict(label="other", metadata=json.dumps(product)),
                       dict(label=label, metadata=json.dumps(dict(product, price=product["price"] + 1))),
                       dict(label=label), dict(metadata=json.dumps(product)), dict()]
            ctx.rng.shuffle(changes)
            for form in changes:
                same = form.get("label") == label and form.get("metadata") == json.dumps(product)
                status, answer = post_photo(tally, url, data, **form)
                tally.expect((status, answer.get("id")) == ((200, item) if same else (409, item)),
                             f"trial {t}: re-adding with {form} answered {status} {answer}")
            stored = json.loads(call(tally, url, "GET", f"/items/{item}")[1])
            tally.expect((stored["label"], stored["metadata"]) == (label, product),
                         f"trial {t}: item {item} now holds {stored}")

        trials_of(tally, trials, trial)


# ------------------------------------------------------------------------------------------- 9: a full disk
PHOTO_SIDE, PHOTO_BYTES = 256, 197_200  # random pixels: a PNG of about that size


def hole_full_disk(ctx: Context, tally: Tally, trials: int) -> None:
    """A writable server on a catalog in a small tmpfs, filled by a ballast file to leave a random amount free:
    adds answer 200 until the disk is full, then 507 with nothing partial left; freed, adds work again."""
    from engine.record import item_id

    disk = ctx.folder("disk")
    size = (sum(f.stat().st_size for f in ctx.shop.rglob("*") if f.is_file()) >> 10) + 6 * 1024
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        tally.measured.append("no tmpfs could be mounted: covered by tests/test_service_hardening.py::"
                              "test_a_full_disk_answers_507_and_leaves_nothing_behind")
        return
    try:
        catalog = disk / "catalog"
        shutil.copytree(ctx.shop, catalog)
        with server(ctx, tally, catalog, "--token", TOKEN) as (url, process):
            def trial(t: int) -> None:
                # odd trials: room for one photo and a little more, so that LMDB's commit, not the photo, meets
                # the full disk (a short write: EIO)
                left = ctx.rng.randint(20, 800) << 10 if t % 2 == 0 else PHOTO_BYTES + (ctx.rng.randint(8, 40) << 10)
                ballast = disk / "ballast"
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                with open(ballast, "wb") as out:
                    out.write(b"\0" * max(0, free - left))
                before = json.loads(call(tally, url, "GET", "/healthz")[1])["items"]
                added, statuses = [], []
                for _ in range(12):
                    status, answer = post_photo(tally, url, ctx.photo(PHOTO_SIDE, noise=True), expected_5xx=(507,))
                    statuses.append(status)
                    if status == 200:
                        added.append(answer["id"])
                    elif status == 507:
                        tally.expect("nothing was added" in answer.get("error", ""), f"trial {t}: 507 said {answer}")
                        break
                    else:
                        tally.flag("wrong", f"trial {t}: an add on a filling disk answered {status} {answer}")
                        break
                tally.expect(statuses[-1] != 200, f"trial {t}: {len(statuses)} adds with {left >> 10} KiB free "
                                                  f"never met a full disk: {statuses}")
                items = json.loads(call(tally, url, "GET", "/healthz")[1])["items"]
                tally.expect(items == before + len(added), f"trial {t}: {items} items after {len(added)} adds "
                                                           f"to {before}")
                for item in added:
                    status, _ = call(tally, url, "GET", f"/search?id={item}&k=1")
                    tally.expect(status == 200, f"trial {t}: item {item} added before the disk filled answers "
                                                f"{status}", "lost")
                for file in sorted((catalog / "uploads").iterdir()):
                    status, _ = call(tally, url, "GET", f"/items/{item_id(file)}")
                    tally.expect(status == 200, f"trial {t}: {file.name} left in uploads/ by a full disk")
                ballast.unlink()
                status, answer = post_photo(tally, url, ctx.photo(), expected_5xx=(507,))
                tally.expect(status == 200, f"trial {t}: once freed, an add answered {status} {answer}")
                tally.measured.append(f"{left >> 10} KiB free: {statuses.count(200)} adds, then "
                                      f"{statuses[-1]}")

            trials_of(tally, trials, trial)
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 0, f"verify after the full-disk trials exited {result.returncode}: "
                                             f"{result.stdout[-300:]}", "unopenable")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    tally.measured[:] = [f"tmpfs of {size >> 10} MiB, " + "; ".join(tally.measured)]


# --------------------------------------------------------------------------------------- 10: a lost data.mdb
def hole_missing_data(ctx: Context, tally: Tally, trials: int) -> None:
    """A shard's data.mdb (or its whole folder) gone: queries refuse it, nothing recreates an empty shard behind
    the user's back, verify reports it, --repair starts the shard again empty and keeps every other item."""
    def trial(t: int) -> None:
        shards = 2 + t % 2
        catalog = copy_catalog(ctx, ctx.synthetic[shards], "missing")
        ids = synthetic_items(ITEMS)[0]
        gone = ctx.rng.randrange(shards)
        folder = catalog / f"shard-{gone:04d}"
        way = ["data.mdb", "data.mdb and lock.mdb", "data.mdb, renamed"][t % 3]
        if way == "data.mdb, renamed":
            (folder / "data.mdb").rename(folder / "data.mdb.old")
        else:
            (folder / "data.mdb").unlink()
            if "lock" in way:
                (folder / "lock.mdb").unlink()
        kept = {int(i) for i in ids if i % shards != gone}
        other = ctx.rng.choice(sorted(kept))
        what = f"trial {t}: {way} of shard {gone} of {shards} gone"
        result = cli(tally, "engine.query", "--catalog", catalog, "--id", other, "-k", "3")
        tally.expect(refused(result) and "missing" in result.stderr,
                     f"{what}: query exited {result.returncode}: {last_line(result.stderr or result.stdout)}")
        tally.expect(not (folder / "data.mdb").exists(), f"{what}: a reader recreated data.mdb")
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 1 and "missing" in result.stdout, f"{what}: verify exited "
                                                                            f"{result.returncode}")
        result = cli(tally, "engine.verify", "--catalog", catalog, "--repair")
        tally.expect(result.returncode == 1 and "those items are lost" in result.stdout,
                     f"{what}: verify --repair exited {result.returncode}: {last_line(result.stdout)}")
        if opens(tally, catalog, f"{what}, after --repair"):
            lost = kept - present_ids(catalog)
            for item in sorted(lost)[:3]:
                tally.flag("lost", f"{what}: item {item} of another shard")
            tally.counts["lost"] += max(0, len(lost) - 3)

    trials_of(tally, trials, trial)


# --------------------------------------------------------------------------------- 11: damaged bookkeeping
def hole_bookkeeping(ctx: Context, tally: Tally, trials: int) -> None:
    """A shard's counters, its stored index's checksum or add.journal damaged: refused (counters) or worked
    around (index, journal) with the right answers, reported by verify, repaired without losing an item."""
    from shards.catalog import JOURNAL

    counters = [(b"generation", lambda r: b"1x"),
                (b"generation", lambda r: bytes(r.choice(b"abxyz-_~") for _ in range(3))),
                (b"blocks", lambda r: str(r.randint(2, 10**11)).encode()), (b"blocks", lambda r: b"-1"),
                (b"slots_used", lambda r: str(r.randint(-10**6, -1)).encode()),
                (b"slots_used", lambda r: str(r.randint(1, 400)).encode())]
    damages = ["counter", "index_checksum", "journal directory", "journal of 7 bytes", "counter"]

    def trial(t: int) -> None:
        shards = 2 + t % 2
        catalog = copy_catalog(ctx, ctx.synthetic[shards], "bookkeeping")
        shard = ctx.rng.randrange(shards)
        damage = damages[t % len(damages)]
        if damage == "counter":
            key, garbage = ctx.rng.choice(counters)
            value = garbage(ctx.rng)
            put_info(catalog / f"shard-{shard:04d}", key, value)
            damage = f"{key.decode()} = {value!r}"
        elif damage == "index_checksum":
            put_info(catalog / f"shard-{shard:04d}", b"index_checksum", os.urandom(4).hex().encode())
        elif damage == "journal directory":
            (catalog / JOURNAL).mkdir()
        else:
            (catalog / JOURNAL).write_bytes(os.urandom(7))
        what = f"trial {t}: {damage} in shard {shard} of {shards}"
        ids, codes, features, _ = synthetic_items(ITEMS)
        probe = ctx.rng.randrange(ITEMS)
        refusal_due = "=" in damage
        result = cli(tally, "engine.query", "--catalog", catalog, "--id", ids[probe], "-k", "1", "--json")
        if refusal_due:
            tally.expect(refused(result), f"{what}: query exited {result.returncode}")
        elif tally.expect(result.returncode == 0, f"{what}: query exited {result.returncode}: "
                                                  f"{last_line(result.stderr)}"):
            top = json.loads(result.stdout)[0]["results"][0]["id"]
            tally.expect(top == ids[probe], f"{what}: --id {ids[probe]} ranks {top} first")
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 1, f"{what}: verify exited {result.returncode}: {result.stdout[-200:]}")
        result = cli(tally, "engine.verify", "--catalog", catalog, "--repair")
        journal = damage.startswith("journal")
        tally.expect(result.returncode == (1 if journal else 0), f"{what}: verify --repair exited "
                                                                 f"{result.returncode}: {result.stdout[-200:]}")
        if journal:
            (catalog / JOURNAL).rmdir() if (catalog / JOURNAL).is_dir() else (catalog / JOURNAL).unlink()
        if opens(tally, catalog, f"{what}, after --repair"):
            missing = {int(i) for i in ids} - present_ids(catalog)
            tally.expect(not missing, f"{what}: {len(missing)} items gone after --repair", "lost")
            result = cli(tally, "engine.verify", "--catalog", catalog)
            tally.expect(result.returncode == 0, f"{what}: verify after --repair exited {result.returncode}: "
                                                 f"{result.stdout[-200:]}")
            check_search(tally, catalog, codes, features, ids, what)

    trials_of(tally, trials, trial)


def check_search(tally: Tally, catalog: Path, codes, features, ids, what: str) -> None:
    """Each of 20 items' own code and features finds it first (in-process: the measurement)."""
    from shards import Catalog

    rows = np.arange(0, len(ids), len(ids) // 20)
    with Catalog.open(catalog) as opened:
        found = [int(hits.ids[0]) for hits in opened.search(codes[rows], features[rows], k=1)]
    wrong = [int(ids[r]) for r, top in zip(rows, found) if top != ids[r]]
    tally.expect(not wrong, f"{what}: items {wrong[:5]} are not found by their own code and features")


# ------------------------------------------------------------------------ 12: engine.json and the model it names
def hole_engine_record(ctx: Context, tally: Tally, trials: int) -> None:
    """engine.json cut, gone or naming a lost or changed model, or the manifest's fingerprint changed: verify
    reports it (exit 1), and a query with a new photo refuses in one line instead of using another model."""
    query = ctx.folder("record-query") / "new.png"
    query.write_bytes(ctx.photo())

    def damage_model(catalog: Path, edit: Callable[[Path], None]) -> None:
        copy = catalog.parent / "model"
        shutil.copytree(ctx.model, copy)
        edit(copy)
        record = json.loads((catalog / "engine.json").read_text())
        (catalog / "engine.json").write_text(json.dumps(dict(record, model_dir=str(copy))))

    def flip_weights(model: Path) -> None:
        weights = next(model.glob("*.safetensors"))
        raw = bytearray(weights.read_bytes())
        spot = ctx.rng.randrange(len(raw) // 2, len(raw))
        raw[spot] ^= 0xFF
        weights.write_bytes(bytes(raw))

    def change_mean(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config["mean"] = [m + 0.01 for m in config["mean"]]
        (model / "config.json").write_text(json.dumps(config))

    def cut(c: Path) -> None:
        text = (c / "engine.json").read_text()
        (c / "engine.json").write_text(text[:ctx.rng.randrange(1, len(text) - 1)])

    def fingerprint(c: Path) -> None:
        manifest = json.loads((c / "manifest.json").read_text())
        (c / "manifest.json").write_text(json.dumps(dict(manifest, model_fingerprint=os.urandom(8).hex())))

    damages = [("engine.json cut short", cut), ("engine.json deleted", lambda c: (c / "engine.json").unlink()),
               ("model folder gone", lambda c: (c / "engine.json").write_text(json.dumps(dict(
                   json.loads((c / "engine.json").read_text()), model_dir=str(c / "gone"))))),
               ("manifest fingerprint changed", fingerprint),
               ("model weights changed", lambda c: damage_model(c, flip_weights)),
               ("model mean changed", lambda c: damage_model(c, change_mean))]

    def trial(t: int) -> None:
        name, damage = damages[t % len(damages)]
        catalog = copy_catalog(ctx, ctx.shop, "record")
        damage(catalog)
        what = f"trial {t}: {name}"
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 1, f"{what}: verify exited {result.returncode}: {result.stdout[-200:]}")
        result = cli(tally, "engine.query", "--catalog", catalog, "--json", query)
        tally.expect(refused(result), f"{what}: a query with a new photo exited {result.returncode}: "
                                      f"{last_line(result.stderr) or result.stdout[:120]}")
        if opens(tally, catalog, what):
            present = present_ids(catalog)
            tally.expect(len(present) == 240, f"{what}: {len(present)} items", "lost")

    trials_of(tally, trials, trial)


# ------------------------------------------------------------------------ 13: a journal naming committed items
def hole_journal(ctx: Context, tally: Tally, trials: int) -> None:
    """A journal (an older latenthash's, or today's claiming other slot counts) naming items committed before it:
    readers (query, verify, export, a read-only server) answer and never delete; a writer's open refuses."""
    from shards import Catalog
    from shards.catalog import JOURNAL

    def trial(t: int) -> None:
        shards = 2 + t % 2
        catalog = copy_catalog(ctx, ctx.synthetic[shards], "journal")
        ids = synthetic_items(ITEMS)[0]
        named = np.array(sorted(ctx.rng.sample(ids.tolist(), ctx.rng.randint(1, 60))), dtype=np.int64)
        way = ["older format", "slots zero", "slots as they are", "slots one lower"][t % 4]
        with Catalog.open(catalog, readonly=False) as writer:
            writer.journal.write(named)
        raw = (catalog / JOURNAL).read_bytes()
        header = raw[:len(raw) - 8 * len(named) - 8 * shards]
        slots = np.frombuffer(raw, np.int64, shards, len(header))
        if way == "older format":
            raw = named.tobytes()
        elif way == "slots zero":
            raw = header + np.zeros(shards, np.int64).tobytes() + named.tobytes()
        elif way == "slots one lower":
            raw = header + (slots - 1).tobytes() + named.tobytes()
        (catalog / JOURNAL).write_bytes(raw)
        what = f"trial {t}: journal ({way}) naming {len(named)} committed items"
        result = cli(tally, "engine.query", "--catalog", catalog, "--id", named[0], "-k", "1", "--json")
        if tally.expect(result.returncode == 0, f"{what}: query exited {result.returncode}: "
                                                f"{last_line(result.stderr)}"):
            tally.expect(json.loads(result.stdout)[0]["results"][0]["id"] == named[0], f"{what}: wrong top result")
        result = cli(tally, "engine.verify", "--catalog", catalog)
        tally.expect(result.returncode == 1 and JOURNAL in result.stdout, f"{what}: verify exited "
                                                                          f"{result.returncode}")
        result = cli(tally, "engine.export", "--catalog", catalog, "--out", catalog.parent / "out.h5")
        tally.expect(result.returncode == 0 and f"exported {ITEMS} items" in result.stdout,
                     f"{what}: export said {result.stdout.strip()[:100]} {last_line(result.stderr)}")
        if t % 4 == 0:
            with server(ctx, tally, catalog, "--read-only") as (url, _):
                items = json.loads(call(tally, url, "GET", "/healthz")[1])["items"]
                tally.expect(items == ITEMS, f"{what}: a read-only server sees {items} items")
        result = cli(tally, "engine.verify", "--catalog", catalog, "--repair")
        tally.expect(result.returncode == 1 and "names" in result.stdout,
                     f"{what}: verify --repair exited {result.returncode}: {result.stdout[-200:]}")
        tally.expect((catalog / JOURNAL).read_bytes() == raw, f"{what}: the journal was changed")
        if opens(tally, catalog, what):
            missing = {int(i) for i in ids} - present_ids(catalog)
            tally.expect(not missing, f"{what}: {len(missing)} items gone (named: {len(named)})", "lost")

    trials_of(tally, trials, trial)


# ---------------------------------------------------------------------------- 14: SIGTERM with stalled uploads
def hole_sigterm(ctx: Context, tally: Tally, trials: int) -> None:
    """SIGTERM while uploads stall (half a body, half a header) and a client keeps searching: the server exits 0
    within --shutdown-timeout and a margin, closes the catalog (the next writer opens it), answers no 5xx."""
    catalog = copy_catalog(ctx, ctx.shop, "sigterm")
    head = ("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {{length}}\r\n\r\n")
    some_id = next(iter(sorted(present_ids(ctx.shop))))

    def trial(t: int) -> None:
        grace = [0.5, 1.0, 2.0][t % 3]
        with server(ctx, tally, catalog, "--token", TOKEN, "--shutdown-timeout", str(grace)) as (url, process):
            port = int(url.rsplit(":", 1)[1])
            stalled = []
            for _ in range(ctx.rng.randint(1, 4)):
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                kind = ctx.rng.choice(["body", "header"])
                if kind == "body":
                    length = ctx.rng.randint(10_000, 1_500_000)
                    path = ctx.rng.choice(["/search", "/items"])
                    connection.sendall(head.format(path=path, length=length).encode() + b"--B\r\n"
                                       + b"\0" * ctx.rng.randint(0, length // 2))
                else:
                    connection.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Le")
                stalled.append(connection)
            stop, statuses = threading.Event(), []

            def search() -> None:
                while not stop.is_set():
                    try:
                        statuses.append(call(tally, url, "GET", f"/search?id={some_id}&k=3", timeout=30)[0])
                    except (OSError, http.client.HTTPException):  # the server has stopped
                        return

            searcher = threading.Thread(target=search)
            searcher.start()
            time.sleep(ctx.rng.uniform(0.1, 1.5))
            start = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=grace + 30)
            except subprocess.TimeoutExpired:
                code = None
            seconds = time.perf_counter() - start
            stop.set()
            searcher.join(timeout=60)
            for connection in stalled:
                connection.close()
            what = f"trial {t}: {len(stalled)} stalled, --shutdown-timeout {grace}"
            tally.expect(code == 0 and seconds < grace + 15, f"{what}: exit {code} after {seconds:.1f} s")
            tally.measured.append(f"{len(stalled)} stalled, grace {grace:g} s: exit {code} in {seconds:.1f} s")
        log = max(ctx.logs.iterdir()).read_text()
        tally.expect("Application shutdown complete" in log, f"{what}: no clean shutdown in the log")

    trials_of(tally, trials, trial)
    from shards import Catalog, CatalogError
    try:
        Catalog.open(catalog, readonly=False).close()  # the last server released the writer lock
    except CatalogError as error:
        tally.flag("unopenable", f"after the last SIGTERM: {error}")


# ------------------------------------------------------------------------- 15: an HDF5 declaring 10^8 items
PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(status.stderr)
print(status.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""  # a small parent: a child's peak RSS counts what it had when forked


def hole_declared_rows(ctx: Context, tally: Tally, trials: int) -> None:
    """A few-KB HDF5 declaring 10^8 to 10^13 rows it never stored: refused from what it declares (and from the
    free disk, and --max-items) in one line, with a bounded peak RSS and no catalog left."""
    import h5py

    base = ctx.folder("declared")
    unstored = ("does not store them", "MiB are free")  # whichever check comes first: both read no row
    cases = [(10**8, ["--max-items", 10**9], unstored), (10**9, [], ("items, more than",)),
             (10**13, ["--max-items", 10**14], ("MiB are free",)), (3 * 10**8, ["--max-items", 10**9], unstored),
             (10**8, ["--max-items", 10**9, "--shards", 2], unstored)]

    def trial(t: int) -> None:
        rows, options, said = cases[t % len(cases)]
        file = base / f"declared-{t}.h5"
        chunk = ctx.rng.choice([4096, 65536])
        with h5py.File(file, "w") as f:
            f.attrs["bits"] = BITS
            for name, shape, dtype in (("ids", (rows,), np.int64), ("codes", (rows, BITS // 8), np.uint8),
                                       ("features", (rows, DIM), np.float32)):
                f.create_dataset(name, shape, dtype, chunks=(min(rows, chunk),) + shape[1:], compression="gzip")
        catalog = base / f"catalog-{t}"
        command = [sys.executable, "-m", "engine.export", "--import", str(file), "--catalog", str(catalog),
                   *map(str, options)]
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True,
                                env=ENV, timeout=600)
        status, peak = map(int, result.stdout.split())
        what = f"trial {t}: {file.stat().st_size >> 10} KiB declaring {rows:.0e} rows"
        tally.expect("Traceback" not in result.stderr, f"{what}: {raised(result.stderr)}", "tracebacks")
        tally.expect(status == 2 and any(s in result.stderr for s in said) and not catalog.exists(),
                     f"{what}: exit {status}: {last_line(result.stderr)}")
        tally.expect(peak < 600 << 10, f"{what}: peak RSS {peak >> 10} MiB")
        tally.measured.append(f"{rows:.0e} rows: peak {peak >> 10} MiB")

    trials_of(tally, trials, trial)
    peaks = [int(m.split("peak ")[1].split()[0]) for m in tally.measured]
    tally.measured[:] = [f"one `error:` line each, peak RSS {min(peaks)}-{max(peaks)} MiB"] if peaks else []


# ------------------------------------------------------------------------------------------ 16: CLI bounds
def hole_cli_bounds(ctx: Context, tally: Tally, trials: int) -> None:
    """Out-of-range numbers on the command lines: exit 2, one line, no traceback (radius past the code length
    too, which only the catalog can tell)."""
    some = min(present_ids(ctx.shop))
    shop = ["--catalog", ctx.shop]
    quick = [("engine.query", shop + ["--id", 2**63]), ("engine.query", shop + ["--id", -1]),
             ("engine.query", shop + ["--id", 2**64 + 5]), ("engine.query", shop + ["--id", "1e3"]),
             ("engine.query", shop + ["-k", 0, "--id", some]), ("engine.query", shop + ["--pool", -5, "--id", some])]
    quick += [("engine.serve", shop + ["--max-upload-mb", v]) for v in ("nan", "inf", "-1", "0", "1e400", "-inf")]
    quick += [("engine.serve", shop + [flag, v]) for flag, v in (("--max-megapixels", "nan"), ("--port", "65536"),
                                                                 ("--shutdown-timeout", "inf"), ("--port", "-80"))]
    radius = [("engine.query", shop + ["--id", some, "--radius", r]) for r in (17, 64, 10**9)]

    def trial(t: int) -> None:
        cases = ctx.rng.sample(quick, 4) + [radius[t % len(radius)]]
        for module, args in cases:
            result = cli(tally, module, *args, timeout=120)
            tally.expect(result.returncode == 2 and refused(result),
                         f"{module} {' '.join(map(str, args[2:]))}: exit {result.returncode}: "
                         f"{last_line(result.stderr) or result.stdout[:100]}")

    trials_of(tally, trials, trial)


# ------------------------------------------------------------------------ 17: other numeric flags (beyond the issue)
def hole_other_flags(ctx: Context, tally: Tally, trials: int) -> None:
    """The numeric flags of build-index and export --import the issue did not list: exit 2, one line, no
    traceback, and no catalog left behind."""
    base = ctx.folder("flags")
    photos = base / "photos"
    photos.mkdir()
    for n, source in enumerate(sorted(ctx.images.rglob("*.png"))[:4]):
        shutil.copy(source, photos / f"p{n}.png")
    file = write_export(base / "items.h5", 20)
    build = ["engine.build_index", photos, "--model", ctx.model, "--catalog"]
    cases = [build + [None, *flags] for flags in (["--shards", 0], ["--shards", 5000], ["--batch-size", 0],
                                                   ["--batch-size", -4], ["--workers", -1], ["--workers", -8],
                                                   ["--codes", "itq", "--code-bits", 0],
                                                   ["--codes", "itq", "--fit-samples", -1])]
    cases += [["engine.export", "--import", file, "--catalog", None, *flags]
              for flags in (["--shards", 0], ["--shards", -3], ["--shards", 10**5], ["--max-items", 0])]
    ctx.rng.shuffle(cases)

    def trial(t: int) -> None:
        for n in (2 * t, 2 * t + 1):
            module, *args = cases[n % len(cases)]
            catalog = base / f"catalog-{n}"
            args = [catalog if a is None else a for a in args]
            result = cli(tally, module, *args)
            shown = " ".join(str(a) for a in args[args.index(catalog) + 1:])
            tally.expect(refused(result) and not catalog.exists(),
                         f"{module} {shown}: exit {result.returncode}: {raised(result.stderr)}; catalog "
                         f"{'left' if catalog.exists() else 'not made'}")

    trials_of(tally, trials, trial)


# ------------------------------------------------------------------------------------------------------ main
HOLES = {
    1: ("1 imported `image_roots: [\"/\"]`, paths to /etc/passwd, served `--read-only`", hole_forbidden_files,
        "4 of 7 forbidden paths (/etc, /proc/self, `..`, a symlink out) a trial, 5 claimed root lists, with and "
        "without `--image-root`"),
    2: ("2 four concurrent 9400x9400 RGBA PNG `POST /search`", hole_huge_uploads,
        "upload_memory.py once (defaults, `--max-megapixels 100`), then 4-6 concurrent uploads per trial"),
    3: ("3 bodies past `--max-upload-mb 2`", hole_request_bodies,
        "declared, chunked and lying bodies of 2.5-300 MB to /search and /items"),
    4: ("4 uploaded photos after deletes and kills", hole_upload_orphans,
        "adds and deletes SIGKILLed at 0.3-2.5 s, restarted"),
    5: ("5 NaN / Infinity / 1e400 / deep / huge metadata", hole_metadata,
        "one of 10 bombs a trial via `POST /items`, `--import` and `build-index --metadata`"),
    6: ("6 features overflowing float16", hole_float16,
        "1e6, -1e5, 65520, 7e4, 3e38 in random columns of a random row; a stored inf/-inf/NaN row"),
    7: ("7 changed file queried by its old path", hole_changed_file,
        "rewritten, replaced by rename, copied with its source's mtime, garbage"),
    8: ("8 the same photo re-added with another label or metadata", hole_readd,
        "5 changed forms in random order"),
    9: ("9 full disk during `POST /items`", hole_full_disk, "real tmpfs, 20-800 KiB left free"),
    10: ("10 missing `data.mdb`", hole_missing_data, "which shard of 2-3; file, file + lock, renamed"),
    11: ("11 damaged shard bookkeeping", hole_bookkeeping,
         "generation, blocks, slots_used garbage; index_checksum; add.journal a directory or 7 bytes"),
    12: ("12 damaged/missing engine.json, lost or changed model, changed fingerprint", hole_engine_record,
         "cut, deleted, model gone, fingerprint, weights byte, mean"),
    13: ("13 journal naming committed items, read-only opens", hole_journal,
         "1-60 named items; older format, slots zero / as they are / one lower"),
    14: ("14 SIGTERM with stalled uploads", hole_sigterm,
         "1-4 stalled bodies or headers, a client searching, SIGTERM at 0.1-1.5 s, grace 0.5-2 s"),
    15: ("15 HDF5 declaring 1e8 items", hole_declared_rows, "1e8, 3e8, 1e9, 1e13 rows"),
    16: ("16 CLI bounds", hole_cli_bounds, "4 of 16 bad numbers a trial + `--radius` 17 / 64 / 1e9 (16-bit codes)"),
    17: ("(beyond the issue) other numeric flags of build-index and `export --import`", hole_other_flags,
         "2 of 12 a trial: shards, batch size, workers, code bits, fit samples, max items"),
}


def table(tallies: list[Tally]) -> str:
    head = "| hole | trials | lost | unopenable | tracebacks | wrong answers | 5xx | varied; measured |"
    return "\n".join([head, "|---|---|---|---|---|---|---|---|"] + [t.row() for t in tallies])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per hole (default %(default)s)")
    parser.add_argument("--out", help="folder for hostile.md and hostile.json (the table, every note)")
    parser.add_argument("--holes", type=int, nargs="+", choices=sorted(HOLES), default=sorted(HOLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    started = time.perf_counter()
    print(f"machine: {machine()}, {date.today()}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="latenthash-hostile-"))
    tallies, upload_memory = [], None
    try:
        ctx = prepare(work, random.Random(args.seed))
        print(f"set-up: {time.perf_counter() - started:.0f} s", flush=True)
        for number in args.holes:
            name, run, varied = HOLES[number]
            tally = Tally(name, varied)
            begun = time.perf_counter()
            try:
                outcome = run(ctx, tally, args.trials)
            except Exception as error:  # noqa: BLE001  (reported with the hole's row, never hidden)
                tally.aborted += 1
                tally.notes.append(f"aborted: {type(error).__name__}: {str(error)[:300]}")
                outcome = None
            if number == 2:
                upload_memory = outcome
            tallies.append(tally)
            print(json.dumps(dict(hole=number, seconds=round(time.perf_counter() - begun, 1), trials=tally.trials,
                                  aborted=tally.aborted, **tally.counts, notes=tally.notes[:20])), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = table(tallies)
    seconds = round(time.perf_counter() - started)
    print(f"\n{text}\n\n{seconds} s in all", flush=True)
    summary = dict(benchmark="hostile", machine=machine(), date=str(date.today()), trials=args.trials,
                   seconds=seconds, holes=[dict(hole=t.hole, trials=t.trials, aborted=t.aborted, **t.counts,
                                                notes=t.notes, measured=t.measured) for t in tallies],
                   upload_memory=upload_memory)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "hostile.md").write_text(text + "\n")
        (Path(args.out) / "hostile.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
