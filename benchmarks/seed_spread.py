"""One training recipe over many seeds, side by side: does the loss fall every epoch, and how far apart do
accuracy and mAP@1000 land? (issue 16)

  python benchmarks/seed_spread.py --data ../shared/data/cifar-10-batches-py --out runs/spread --seeds 1 2 3
  python benchmarks/seed_spread.py --data DIR --out runs/spread --seeds 1 2 3 4 5 6 --parallel 6 --deadline 400 \\
      --variant default= --variant fp32="--amp off" --variant nb32="--norm-bias-lr-scale 32"
  python benchmarks/seed_spread.py --out runs/spread --report     # the table of the runs in OUT

Each run is training.train's `--recipe cifar10-48` (README's 48-bit command; `--recipe` names another recipe
or gives the flags themselves) plus its variant's flags and `--seed S`, in a process of its own; `--parallel`
runs share the machine (one GPU, or the cores split among them). A finished
run encodes the test and training sets and scores them on the paper's protocol (as benchmarks/paper_table.py:
mAP@1000 by Hamming ranking and by the two-stage search), and keeps its packed codes. With `--deadline`, no run
starts that the finished ones say cannot end in time, and runs still going at the deadline are stopped and
reported as such. The table (a row per run, then mean and range per variant) goes to OUT/seed_spread.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401
from common import machine
from training.recipes import RECIPES

RECIPE = "cifar10-48"  # README.md's 48-bit command
TOP_K = 1000


def recipe_flags(text: str) -> list[str]:
    """The training.train flags of `--recipe`: a named recipe (training/recipes.py), or the flags themselves as
    before recipes had names."""
    if text in RECIPES:
        return ["--recipe", text]
    if text.startswith("-"):
        return shlex.split(text)
    raise argparse.ArgumentTypeError(f"'{text}' is neither a recipe ({', '.join(RECIPES)}) nor training.train flags")


def first_rise(losses: list[float]) -> str:
    """'' when the training loss fell every epoch, else where it first rose ('5: 1.219 -> 1.267')."""
    for epoch, (before, after) in enumerate(zip(losses, losses[1:]), start=2):
        if after >= before:
            return f"{epoch}: {before:.3f} -> {after:.3f}"
    return ""


def run_one(run_dir: Path, data: str, train_flags: list[str]) -> int:
    """Train (the real command line), then encode and score as paper_table.py does; writes RUN/score.json and
    RUN/codes.npz."""
    import numpy as np
    import torch

    from paper_table import encode_all, score
    from training.data import load_dataset
    from training.model import load_model
    from training.train import main as train_main

    model_dir = run_dir / "model"
    code = train_main(["--data", data, "--out", str(model_dir), *train_flags])
    if code:
        return code
    summary = json.loads((model_dir / "summary.json").read_text())
    losses = [record["train_loss"] for record in summary["history"]]
    dataset = load_dataset(data)
    model = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    (query_codes, query_features), (db_codes, db_features) = (encode_all(model, dataset.test.images),
                                                              encode_all(model, dataset.train.images))
    encode_seconds = time.perf_counter() - start
    features = "backbone, mirror-averaged" if model.config.mirror_average else "backbone"
    row = score(argparse.Namespace(top_k=TOP_K), (dataset.test.labels.numpy(), dataset.train.labels.numpy()),
                "latent", features, model.config.bits, (query_codes, db_codes), (query_features, db_features))
    np.savez(run_dir / "codes.npz", test=query_codes, train=db_codes)
    result = dict(losses=losses, loss_rise=first_rise(losses), val_acc=summary.get("val_acc"),
                  val_acc_tta=summary.get("val_acc_tta"), map=row["map"], two_stage_map=row["two_stage_map"],
                  train_seconds=summary["seconds"], encode_seconds=round(encode_seconds, 1),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else machine())
    (run_dir / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def schedule(args: argparse.Namespace, variants: dict[str, list[str]]) -> None:
    """Run every (seed, variant) with at most --parallel at once, inside --deadline when one is given."""
    jobs = [(name, seed) for seed in args.seeds for name in variants]
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start, durations, running = time.monotonic(), [], {}
    while jobs or running:
        for key, (process, began) in list(running.items()):
            if process.poll() is not None:
                durations.append(time.monotonic() - began)
                del running[key]
                print(f"{key[0]} seed {key[1]}: exit {process.returncode} after {durations[-1]:.0f}s", flush=True)
        elapsed = time.monotonic() - start
        if args.deadline and elapsed > args.deadline:
            for key, (process, _) in running.items():
                os.killpg(process.pid, signal.SIGTERM)
                print(f"{key[0]} seed {key[1]}: stopped at the deadline", flush=True)
            break
        expected = statistics.median(durations) if durations else 0.0
        while jobs and len(running) < args.parallel and not (args.deadline and elapsed + expected > args.deadline):
            name, seed = jobs.pop(0)
            run_dir = args.out / name / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--one", str(run_dir), "--data", args.data, "--",
                       *args.recipe, *variants[name], "--seed", str(seed), "--overwrite"]
            with open(run_dir / "log.txt", "w") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            running[(name, seed)] = (process, time.monotonic())
        if args.deadline and jobs and not running and elapsed + expected > args.deadline:
            break
        time.sleep(1)
    if jobs:
        print(f"not started (deadline): {', '.join(f'{n} seed {s}' for n, s in jobs)}", flush=True)


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def spread(values: list[float | None]) -> str:
    """'mean (min-max)' of the values a run recorded ('-' where none did: --no-tta, say)."""
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})" if values else "-"


def report(out: Path) -> str:
    """A row per finished run, then mean and range per variant; also OUT/seed_spread.json."""
    rows = []
    for score_file in sorted(out.glob("*/seed*/score.json")):
        row = json.loads(score_file.read_text())
        row.update(variant=score_file.parent.parent.name, seed=int(score_file.parent.name[4:]))
        rows.append(row)
    rows.sort(key=lambda r: (r["variant"], r["seed"]))
    (out / "seed_spread.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"{len(rows)} runs; {rows[0]['device'] if rows else machine()}", "",
             "| variant | seed | loss falls every epoch | val acc (TTA) | mAP@1000 (two-stage) | train s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        falls = "yes" if not r["loss_rise"] else f"no: epoch {r['loss_rise']}"
        lines.append(f"| {r['variant']} | {r['seed']} | {falls} | {number(r['val_acc'])} "
                     f"({number(r['val_acc_tta'])}) | {r['map']:.4f} ({r['two_stage_map']:.4f}) | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "| variant | runs | loss falls every epoch | mAP@1000 mean (range) | val acc TTA mean (range) |",
              "|---|---|---|---|---|"]
    for variant in sorted({r["variant"] for r in rows}):
        group = [r for r in rows if r["variant"] == variant]
        monotone = sum(not r["loss_rise"] for r in group)
        lines.append(f"| {variant} | {len(group)} | {monotone} of {len(group)} | "
                     f"{spread([r['map'] for r in group])} | {spread([r['val_acc_tta'] for r in group])} |")
    text = "\n".join(lines) + "\n"
    (out / "seed_spread.md").write_text(text)
    return text


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    if not name or "/" in name:
        raise argparse.ArgumentTypeError(f"--variant NAME=FLAGS, got '{text}'")
    return name, shlex.split(flags)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a child: --one RUN_DIR --data DATA -- TRAIN_FLAGS
        split = argv.index("--")
        return run_one(Path(argv[1]), argv[3], argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CIFAR-10 python batches directory (or any training.train --data)")
    parser.add_argument("--out", type=Path, required=True, help="one folder per variant and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="NAME=FLAGS added to the recipe (repeatable; default: the recipe alone, 'default')")
    parser.add_argument("--recipe", type=recipe_flags, default=RECIPE,
                        help=f"the training.train recipe of every run ({', '.join(RECIPES)}), or its flags as one "
                        f"argument: --recipe='--bits 12 ...' (default: {RECIPE})")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--deadline", type=float, help="seconds: start no run that cannot end by then")
    parser.add_argument("--report", action="store_true", help="only print the table of the runs in --out")
    args = parser.parse_args(argv)
    if args.report and not args.out.is_dir():
        parser.error(f"--report: {args.out} does not exist")
    if not args.report:
        if not args.data:
            parser.error("--data is required (unless --report)")
        if args.parallel < 1:
            parser.error("--parallel must be at least 1")
        schedule(args, dict(args.variant or [("default", [])]))
    print(report(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
