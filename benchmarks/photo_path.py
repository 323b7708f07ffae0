"""The photo path per inference path (engine/inference.py), side by side with eager fp32 in one run.

  python benchmarks/photo_path.py --backbone efficientnet_b0 --photos 64
  python benchmarks/photo_path.py --backbone resnet50 --photos 64 --paths eager openvino openvino-bf16
  python benchmarks/photo_path.py --backbone cifar_convnet --input-size 32 --photos 256
  python benchmarks/photo_path.py --photos 256 --paths eager openvino-bf16 --lane-pixels 1605632  # whole calls too
  python benchmarks/photo_path.py --model runs/cifar48 --photos 256      # a trained model's answers
  python benchmarks/photo_path.py --model runs/cifar48 --images ../shared/data/cifar10-sample-png   # real files

Writes `--photos` synthetic 1600x1200 JPEGs (benchmarks/indexing.py's, quality 90), or takes `--images`' files,
and, per path: build img/s (build-index's pipeline for a large job, `engine.encode.encode_files`, decoding
included, batch 32: eager in one worker process per core, a concurrent runtime in one thread per core of this
process, each on its own stream, any other path in this process beside one prefetch thread), ms per single
query's encode (batch 1, decoded as a query has it), GFLOP/s achieved (the backbone's FLOPs, 2 per multiply-add,
counted by torch's FlopCounterMode) and its fraction of the host's peak, bit agreement with eager, and top-10
overlap with eager:
two-stage search (Hamming pool of 20, Euclidean re-rank) of each photo among the others, when queries and
catalog come from the path ("same") and when the path's queries search eager's codes ("cross"). CPU time per
image and per query are given too: on a host shared with other work, wall-clock rates follow the share of the
cores a path's threads get, CPU time follows the path. Peak = cores x clock (`--clock-ghz`, default
/proc/cpuinfo's, the nominal one in a VM) x FLOP per cycle per core: `--flops-per-cycle` fp32 (default 32: two
256-bit FMA pipes, as Zen 4 runs AVX-512), x2 for bf16 (VDPBF16PS: two products per fp32 lane), x4 for int8
(VNNI).

Rounds interleave the builds (A B C A B C ...) and single queries take turns in blocks of 6 photos, so this shared
host's swings hit every path alike; medians are reported.
Random-init backbones (no hub weights offline) get flush-to-zero: their denormal activations slow eager fp32
several-fold where trained weights would not, and runtimes flush them anyway. The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import common  # noqa: F401
from common import machine
from engine.encode import PROCESS_MIN_IMAGES, Encoder, default_streams, default_workers, encode_files
from engine import inference
from engine.inference import LANE_PIXELS, PATHS, auto_path
from indexing import write_photos
from training.images import list_images, load_image
from training.model import create_backbone, hashing_net, load_model

PRECISION_FACTOR = {"fp32": 1, "bf16": 2, "int8": 4}
BATCH = 32  # build-index's batch here: one per worker process at a time
ONE_STREAM = " (one stream)"  # a row's suffix: `--one-stream`


def make_encoder(args: argparse.Namespace) -> Encoder:
    if args.model:
        return Encoder(load_model(args.model, device=torch.device("cpu")))
    torch.set_flush_denormal(True)
    classes = [f"class{n}" for n in range(10)]
    model = hashing_net(create_backbone(args.backbone), args.backbone, 48, classes, args.input_size).eval()
    return Encoder(model)


def backbone_flops(encoder: Encoder) -> float:
    """FLOPs of one image through the backbone (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = encoder.input_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.model.features(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return float(counter.get_total_flops())


def peak_gflops(flops_per_cycle: int, clock_ghz: float | None) -> tuple[float, float]:
    """(host fp32 peak in GFLOP/s, the clock it assumes): cores x clock x FLOP per cycle per core. The clock
    defaults to what /proc/cpuinfo reports, which in a VM is the nominal one: a core boosting above it makes a
    fraction of peak over 100%."""
    if clock_ghz is None:
        clock_ghz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo")
                        if line.startswith("cpu MHz")) / 1000
    return (os.cpu_count() or 1) * clock_ghz * flops_per_cycle, clock_ghz


def cpu_seconds() -> float:
    """CPU time of this process's threads and its waited-for children (the pipeline's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_rate(encoder: Encoder, files: list[Path], one_stream: bool = False
               ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """build-index's pipeline for a large job (batch 32): img/s, images per CPU second, codes and features in
    file order. `one_stream`: a concurrent path's calls one at a time beside one prefetch thread instead."""
    workers = default_workers(PROCESS_MIN_IMAGES, torch.device("cpu"), encoder.inference.forks)
    streams = 1 if one_stream else default_streams(PROCESS_MIN_IMAGES, encoder, BATCH)
    start, cpu = time.perf_counter(), cpu_seconds()
    batches = list(encode_files(encoder, files, batch_size=BATCH, workers=workers, streams=streams))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    codes, features = np.concatenate([b.codes for b in batches]), np.concatenate([b.features for b in batches])
    return len(files) / seconds, len(files) / cpu, codes, features


def query_ms(encoders: dict[str, Encoder], photos: list[torch.Tensor], queries: int, block: int = 6
             ) -> dict[str, tuple[float, float]]:
    """Per path, median ms and CPU ms to encode one pre-decoded photo (batch 1, a view of its decoded HWC pixels),
    as a query does. The paths take turns in blocks of `block` photos, each after one untimed photo: this shared
    VM swings (5.7-10 ms for the same call minutes apart), and paths alternating photo by photo slow each other
    (one's threads still spin-wait on the cores when the other starts: eager 42 ms instead of 16-22)."""
    samples = {name: ([], []) for name in encoders}
    with torch.inference_mode():
        for first in range(0, queries, block):
            for name, encoder in encoders.items():
                encoder.encode(photos[first % len(photos)][None])
                for index in range(first, min(first + block, queries)):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    encoder.encode(photos[index % len(photos)][None])
                    samples[name][0].append(time.perf_counter() - start)
                    samples[name][1].append(time.process_time() - cpu_start)
    return {name: (1000 * statistics.median(wall), 1000 * statistics.median(cpu))
            for name, (wall, cpu) in samples.items()}


def top10(codes: np.ndarray, features: np.ndarray, db_codes: np.ndarray, db_features: np.ndarray,
          pool: int = 20) -> list[set[int]]:
    """Each query's top 10 among the others: Hamming pool (ties by position), then Euclidean re-rank."""
    bits, db_bits = np.unpackbits(codes, axis=1), np.unpackbits(db_codes, axis=1)
    results = []
    for row in range(len(codes)):
        hamming = (bits[row] != db_bits).sum(1).astype(np.float64)
        hamming[row] = np.inf
        candidates = np.argsort(hamming, kind="stable")[:pool]
        distances = ((db_features[candidates] - features[row]) ** 2).sum(1)
        results.append(set(candidates[np.argsort(distances, kind="stable")[:10]].tolist()))
    return results


def overlap(found: list[set[int]], reference: list[set[int]]) -> float:
    return float(np.mean([len(a & b) / max(1, len(b)) for a, b in zip(found, reference)]))


def ready(encoder: Encoder, images: torch.Tensor) -> Encoder:
    """The encoder with its graphs converted and compiled (at first use): one photo's, a batch's and the build's
    streams' (all compiled when built)."""
    with torch.inference_mode():
        encoder.encode(images[:1])
        encoder.encode(images[:2])
        if encoder.inference.concurrent:
            encoder.inference.in_streams(default_streams(PROCESS_MIN_IMAGES, encoder, BATCH), BATCH
                                         ).features(images[:2])
    return encoder


@contextlib.contextmanager
def lanes_of(pixels: int) -> Iterator[None]:
    """Streams built inside have `pixels` input pixels per call on a lane instead of LANE_PIXELS."""
    default, inference.LANE_PIXELS = inference.LANE_PIXELS, pixels
    try:
        yield
    finally:
        inference.LANE_PIXELS = default


def measure(args: argparse.Namespace, files: list[Path]) -> dict:
    base = make_encoder(args)
    photos = [load_image(f, base.input_size) for f in files[:args.queries]]  # as a query decodes them: views
    images = torch.stack(photos)
    encoders = {}
    for name in args.paths:
        start = time.perf_counter()
        encoders[name] = ready(base.using(name), images)
        print(f"{name}: ready in {time.perf_counter() - start:.1f}s", flush=True)
        if args.one_stream and encoders[name].inference.concurrent:
            encoders[name + ONE_STREAM] = encoders[name]
        if args.lane_pixels and encoders[name].inference.concurrent:
            with lanes_of(args.lane_pixels):
                encoders[f"{name} ({args.lane_pixels} px a lane)"] = ready(base.using(name), images)
    rows = {name: dict(build=[], build_cpu=[], query=[], query_cpu=[]) for name in encoders}
    for _ in range(args.rounds):
        for name, encoder in encoders.items():
            rate, per_cpu, codes, features = build_rate(encoder, files, one_stream=name.endswith(ONE_STREAM))
            rows[name]["answers"] = (codes, features)
            rows[name]["build"].append(rate)
            rows[name]["build_cpu"].append(per_cpu)
        for name, (wall, cpu) in query_ms(encoders, photos, args.queries).items():
            rows[name]["query"].append(wall)
            rows[name]["query_cpu"].append(cpu)
    return dict(rows=rows, flops=backbone_flops(base), backbone=base.model.config.backbone)


def summarise(args: argparse.Namespace, measured: dict) -> dict:
    rows, flops = measured["rows"], measured["flops"]
    peak, clock = peak_gflops(args.flops_per_cycle, args.clock_ghz)
    eager_codes, eager_features = rows["eager"]["answers"]
    reference = top10(eager_codes, eager_features, eager_codes, eager_features)
    table = {}
    for name, row in rows.items():
        codes, features = row["answers"]
        build, query = statistics.median(row["build"]), statistics.median(row["query"])
        precision = PATHS[name.split(" (")[0]].precision
        gflops = build * flops / 1e9
        table[name] = dict(build_img_s=round(build, 2), query_ms=round(query, 2), gflops=round(gflops, 1),
                           build_img_cpu_s=round(statistics.median(row["build_cpu"]), 2),
                           query_cpu_ms=round(statistics.median(row["query_cpu"]), 2),
                           peak_fraction=round(gflops / (peak * PRECISION_FACTOR[precision]), 3),
                           precision=precision,
                           bit_agreement=round(float((np.unpackbits(codes, 1) == np.unpackbits(eager_codes, 1))
                                                     .mean()), 4),
                           top10_same=round(overlap(top10(codes, features, codes, features), reference), 3),
                           top10_cross=round(overlap(top10(codes, features, eager_codes, eager_features),
                                                     reference), 3))
    return dict(table=table, peak_fp32_gflops=round(peak, 1), clock_ghz=round(clock, 2),
                gflop_per_image=round(flops / 1e9, 3))


def print_table(args: argparse.Namespace, summary: dict, backbone: str) -> None:
    eager = summary["table"]["eager"]
    print(f"\nhost: {machine()}; torch {torch.__version__}; backbone {backbone} at {args.input_size or 'its'} px, "
          f"{summary['gflop_per_image']} GFLOP/image; fp32 peak {summary['peak_fp32_gflops']} GFLOP/s "
          f"({args.flops_per_cycle} FLOP/cycle/core at {summary['clock_ghz']} GHz); "
          f"{args.images or f'{args.photos} photos 1600x1200'}, {args.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.1f} (others' work shares the cores: per-CPU-second rates hold)")
    print("| path | build img/s | x eager | img per CPU-s | x eager | query ms | / eager | query CPU ms | / eager | "
          "GFLOP/s | of peak | bits agree | top-10 same | top-10 cross |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in summary["table"].items():
        print(f"| {name} | {row['build_img_s']} | {row['build_img_s'] / eager['build_img_s']:.2f} | "
              f"{row['build_img_cpu_s']} | {row['build_img_cpu_s'] / eager['build_img_cpu_s']:.2f} | "
              f"{row['query_ms']} | {row['query_ms'] / eager['query_ms']:.2f} | "
              f"{row['query_cpu_ms']} | {row['query_cpu_ms'] / eager['query_cpu_ms']:.2f} | {row['gflops']} | "
              f"{row['peak_fraction']:.1%} ({row['precision']}) | {row['bit_agreement']} | {row['top10_same']} | "
              f"{row['top10_cross']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_b0", help="timm name, random init (speed)")
    parser.add_argument("--model", help="a trained model directory instead of --backbone (answers)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--images", help="a folder of image files to use instead of synthetic photos")
    parser.add_argument("--queries", type=int, default=30, help="single-photo encodes per path per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--paths", nargs="+", default=None,
                        help="default: every path that runs here but compile (minutes of set-up per process, "
                        "measured slower than eager on this host: RESULTS)")
    parser.add_argument("--one-stream", action="store_true",
                        help="also build on each concurrent path one call at a time beside one prefetch thread (the "
                        "pipeline without streams), as a row of its own")
    parser.add_argument("--lane-pixels", type=int, help="also build on each concurrent path with this many input "
                        f"pixels per call on a lane (engine.inference.LANE_PIXELS, {LANE_PIXELS}), as a row of "
                        "its own: 1605632 (32 photos at 224 px) runs each batch whole")
    parser.add_argument("--flops-per-cycle", type=int, default=32, help="fp32 FLOP per cycle per core")
    parser.add_argument("--clock-ghz", type=float, help="the clock the peak assumes (default: /proc/cpuinfo's, "
                        "nominal in a VM; a boosting core exceeds that peak)")
    args = parser.parse_args()
    if not args.images and args.photos < BATCH * (os.cpu_count() or 1):
        parser.error(f"--photos must be at least {BATCH} x cores ({BATCH * (os.cpu_count() or 1)}): fewer leave "
                     "eager's worker processes without a batch each")
    if args.model:
        args.input_size = json.loads((Path(args.model) / "config.json").read_text())["input_size"]
    args.paths = args.paths or [n for n, p in PATHS.items() if n != "compile" and p.unavailable("cpu") is None]
    args.paths = ["eager"] + [n for n in args.paths if n != "eager"]
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(list_images(args.images or write_photos(Path(tmp), args.photos, 1600, 1200)))
        measured = measure(args, files)
    summary = summarise(args, measured)
    print_table(args, summary, measured["backbone"])
    chosen = auto_path(measured["backbone"], args.input_size, "cpu")
    chosen = chosen if chosen in summary["table"] else "eager"
    eager, best = summary["table"]["eager"], summary["table"][chosen]
    print(json.dumps(dict(host=machine(), backbone=measured["backbone"], path=chosen, paths=summary["table"],
                          query_ms_eager=eager["query_ms"], query_ms=best["query_ms"],
                          build_img_s_eager=eager["build_img_s"], build_img_s=best["build_img_s"],
                          build_img_cpu_s_eager=eager["build_img_cpu_s"], build_img_cpu_s=best["build_img_cpu_s"],
                          query_cpu_ms_eager=eager["query_cpu_ms"], query_cpu_ms=best["query_cpu_ms"],
                          load_average=round(os.getloadavg()[0], 1),
                          top10_overlap=best["top10_same"], top10_cross=best["top10_cross"],
                          bit_agreement=best["bit_agreement"])))


if __name__ == "__main__":
    main()
