"""Kill trials: SIGKILL build-index and import at random moments, then check what a user would see.

  python benchmarks/reliability.py --trials 16 --images 3000

Each trial starts the real command in a subprocess, kills it at a random moment, and then checks: did its worker
processes die with it, does the catalog open, does re-running the same command finish, and does the finished
catalog hold every item exactly once with the right content (compared with an uninterrupted run). Traffic stays on
this machine; every loop is bounded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the project on sys.path)
from common import machine


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _contents(catalog: Path, with_codes: bool) -> dict:
    """Each item's path and label, and its code if `with_codes` (imports; a resumed build encodes other batches,
    and a code bit near the threshold may differ with the batch's float arithmetic)."""
    from shards import Catalog
    with Catalog.open(catalog) as opened:
        return {item.id: (item.code.tobytes() if with_codes else b"", item.meta.get("path"), item.meta.get("label"))
                for item in opened}


def kill_trial(command: list[str], catalog: Path, reference: dict, delay: float, env: dict, with_codes: bool) -> dict:
    """Run `command`, SIGKILL it after `delay` s, and report what was left and what a re-run gives."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + delay
    while time.time() < deadline and process.poll() is None:
        workers.update(_children(process.pid))
        time.sleep(0.02)
    finished_first = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(5)
    outcome = dict(delay_s=round(delay, 2), finished_before_kill=finished_first,
                   workers_seen=len(workers), workers_alive_after_5s=sum(_alive(w) for w in workers))
    for worker in workers:  # leave nothing behind, whatever happened
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
    if (catalog / "manifest.json").exists():
        try:
            outcome["items_after_kill"] = len(_contents(catalog, with_codes))
            outcome["opened"] = True
        except Exception as error:  # what the user would see instead of a catalog
            outcome["opened"], outcome["open_error"] = False, str(error)[:200]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    outcome["rerun_exit"] = rerun.returncode
    if rerun.returncode:
        outcome["rerun_error"] = rerun.stderr.strip().splitlines()[-1][:200] if rerun.stderr.strip() else ""
        return outcome
    final = _contents(catalog, with_codes)
    outcome["lost"] = len(set(reference) - set(final))
    outcome["unexpected"] = len(set(final) - set(reference))
    outcome["wrong_content"] = sum(final[i] != reference[i] for i in set(final) & set(reference))
    return outcome


def summarise(name: str, trials: list[dict], total: int) -> str:
    torn = [t for t in trials if 0 < t.get("items_after_kill", 0) < total]
    return (f"| {name} | {len(trials)} ({len(torn)} with part of the items in) | "
            f"{sum(t.get('workers_alive_after_5s', 0) > 0 for t in trials)} | "
            f"{sum(not t.get('opened', True) for t in trials)} | {sum(t['rerun_exit'] != 0 for t in trials)} | "
            f"{sum(t.get('lost', 0) for t in trials)} | {sum(t.get('unexpected', 0) for t in trials)} | "
            f"{sum(t.get('wrong_content', 0) for t in trials)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="kills per scenario")
    parser.add_argument("--images", type=int, default=3000, help="images in the build-index folder")
    parser.add_argument("--import-items", type=int, default=150_000, help="items in the imported HDF5 file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", choices=("build", "import"), default=["build", "import"])
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args()
    from engine.synthetic import make_image_folder
    from training.train import TrainConfig, train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="latenthash-kills-"))
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    rng = random.Random(args.seed)
    print(f"machine: {machine()}")
    images = work / "images"
    if not images.exists():
        make_image_folder(images, per_class=args.images // 10, size=32, seed=1)
    model = work / "model"
    if not (model / "config.json").exists():
        train(TrainConfig(data=str(images), out=str(model), backbone="cifar_convnet_small", bits=48, epochs=1,
                          batch_size=64, val_split=0.1, tta=False, keep_collapsed=True))  # codes do not matter here
    rows, log = [], {}
    if "build" in args.scenarios:
        _build_trials(work, images, model, args, env, rng, rows, log)
    if "import" in args.scenarios:
        _import_trials(work, args, env, rng, rows, log)
    print("\n| scenario | kills | workers alive 5 s after | would not open | re-run failed | lost | unexpected | "
          "wrong content |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    (work / "kills.json").write_text(json.dumps(log, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


def _build_trials(work: Path, images: Path, model: Path, args: argparse.Namespace, env: dict, rng: random.Random,
                  rows: list, log: dict) -> None:
    for batch in (64, 1000):
        name = f"build-index, batch {batch}, 2 workers"
        reference_dir = work / f"reference-{batch}"
        command = [sys.executable, "-m", "engine.build_index", str(images), "--model", str(model), "--catalog", "{}",
                   "--batch-size", str(batch), "--workers", "2"]
        start = time.perf_counter()
        subprocess.run([c.format(reference_dir) for c in command], env=env, check=True, capture_output=True)
        full = time.perf_counter() - start
        reference = _contents(reference_dir, with_codes=False)
        trials = []
        for trial in range(args.trials):
            catalog = work / f"kill-{batch}-{trial}"
            trials.append(kill_trial([c.format(catalog) for c in command], catalog, reference,
                                     rng.uniform(0.3, full), env, with_codes=False))
            print(json.dumps(dict(scenario=name, **trials[-1])), flush=True)
            shutil.rmtree(catalog)
        log[name] = trials
        rows.append(summarise(name, trials, len(reference)))


def _import_trials(work: Path, args: argparse.Namespace, env: dict, rng: random.Random, rows: list, log: dict) -> None:
    source = work / "source"
    h5 = work / "items.h5"
    _write_import_file(h5, source, args.import_items)
    name = f"import of {args.import_items:,} items (batches of 50,000)"
    reference = _contents(source, with_codes=True)
    command = [sys.executable, "-m", "engine.export", "--import", str(h5), "--catalog", "{}"]
    start = time.perf_counter()
    subprocess.run([c.format(work / "timing") for c in command], env=env, check=True, capture_output=True)
    full = time.perf_counter() - start
    trials = []
    for trial in range(args.trials):
        catalog = work / f"import-{trial}"
        trials.append(kill_trial([c.format(catalog) for c in command], catalog, reference, rng.uniform(0.2, full),
                                 env, with_codes=True))
        print(json.dumps(dict(scenario=name, **trials[-1])), flush=True)
        shutil.rmtree(catalog)
    log[name] = trials
    rows.append(summarise(name, trials, len(reference)))


def _write_import_file(h5: Path, source: Path, n: int) -> None:
    """A catalog of n synthetic items (48-bit codes, 512-d features) exported to HDF5: what a GPU box sends."""
    import numpy as np

    from engine.export import export_catalog
    from shards import Catalog

    if not source.exists():
        rng = np.random.default_rng(0)
        with Catalog.create(source, 48, 512, shards=4) as catalog:
            for start in range(0, n, 50_000):
                ids = np.arange(start, min(n, start + 50_000), dtype=np.int64)
                catalog.add(ids, rng.integers(0, 256, (len(ids), 6), dtype=np.uint8),
                            rng.standard_normal((len(ids), 512)).astype(np.float32),
                            [{"path": f"/shop/{i}.jpg", "label": str(i % 15)} for i in ids])
    if not h5.exists():
        export_catalog(source, h5, progress=False)


if __name__ == "__main__":
    main()
