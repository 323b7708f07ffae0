"""Inference paths: the ways to compute a model's features (uint8 images -> pooled backbone features), one
registry entry each.

Only the features go through a path (the heavy part); the latent layer, its threshold and the classifier stay
fp32 eager on them, so codes differ between paths only as far as features do. A runtime's graph takes the uint8
pixels and normalises them itself: torch's own normalising step beside it left OpenMP threads spinning on the
cores the runtime's pool needed (efficientnet_b0, one photo, openvino-bf16: 9.1-10.3 ms per call after a torch
normalise at 2 threads, 5.8-7.0 ms after a single-threaded one). Which path is fastest depends on the host's units
and the backbone family, so `auto` follows a small table measured by benchmarks/photo_path.py
(benchmarks/RESULTS.md, "Inference paths"); eager fp32 is the fallback everywhere. Torch and the runtimes are
imported inside the builders: engine.record reads the names without loading them.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from engine.errors import InputError

if TYPE_CHECKING:
    import types

    import numpy as np
    import openvino
    import torch

    from training.model import HashingNet

Features = Callable[["torch.Tensor"], "torch.Tensor"]  # uint8 images (N, 3, S, S) -> float features (N, D)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferencePath:
    """One way to compute features. `build(model, streams, batch)`: its features function; `runtime`: the module
    it needs besides torch; `cpu_flags`: the units its precision needs (any one of them); `forks`: whether it may
    run inside the CPU build's forked worker processes (a runtime with its own thread pool must not be used
    across fork); `concurrent`: whether it can be built for `streams` calls at once, each on its share of the
    cores, so that a large build decodes and encodes a batch per core as eager's forked workers do, `batch` images
    per call (the others get streams=1, batch=None)."""

    name: str
    precision: str
    build: Callable[["HashingNet", int, int | None], Features | None]
    runtime: str | None = None
    cpu_flags: tuple[str, ...] = ()
    forks: bool = False
    concurrent: bool = False

    def unavailable(self, device_type: str) -> str | None:
        """Why this path cannot run here (None if it can)."""
        if self.name != "eager" and device_type != "cpu":
            return f"it runs on a CPU, not on {device_type}"
        if self.runtime is not None and importlib.util.find_spec(self.runtime) is None:
            return f"{self.runtime} is not installed"
        if self.cpu_flags and not set(self.cpu_flags) & cpu_flags():
            return f"this CPU lacks {' / '.join(self.cpu_flags)}"
        return None


def _eager(_model: "HashingNet", _streams: int, _batch: int | None) -> None:
    """None: HashingNet.encode runs its own module (channels_last on a CPU), as training and evaluation do."""
    return None


def _compiled(model: "HashingNet", _streams: int, _batch: int | None) -> Features:
    """torch.compile (inductor) with the weights frozen into the graph as constants, fed channels_last; a second
    batch size recompiles once with the batch axis dynamic (not one compile per size)."""
    import torch

    from training.model import FeatureExtractor

    compiled = torch.compile(FeatureExtractor(model).eval(), dynamic=None, options={"freezing": True})
    return lambda images: compiled(images.contiguous(memory_format=torch.channels_last))


def _onnxruntime(model: "HashingNet", _streams: int, _batch: int | None) -> Features:
    """ONNX Runtime's CPU provider on the features exported through torch.onnx (batch axis dynamic)."""
    import io

    import onnxruntime
    import torch

    from training.model import FeatureExtractor

    file = io.BytesIO()
    example = torch.zeros(1, 3, model.config.input_size, model.config.input_size, dtype=torch.uint8)
    with _tracing:
        torch.onnx.export(FeatureExtractor(model).eval(), (example,), file, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(file.getvalue(), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": _numpy(images)})[0]).to(images.device)


def _openvino(precision: str) -> Callable[["HashingNet", int, int | None], Features]:
    """OpenVINO's CPU plugin at `precision` (its inference precision hint: f32, or bf16 on AVX512-BF16/AMX
    units, which keeps fp32 where its graph transformations judge bf16 unsafe). A single photo runs on the graph
    fixed at batch 1: 4.80 against 5.33 ms on the dynamic one (efficientnet_b0, bf16, AVX-512 EPYC, interleaved
    medians). `streams` > 1 compiles the graph once per stream, each on its share of the cores and fixed at
    `lane_batch` images, compiled at once (a build uses them all)."""
    def build(model: "HashingNet", streams: int, batch: int | None) -> Features:
        config: dict = {"INFERENCE_PRECISION_HINT": precision}
        graph = _openvino_graph(model)
        if streams > 1:
            threads = max(1, (os.cpu_count() or 1) // streams)
            config |= {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
            lane = _fixed_batch(graph, lane_batch(batch, model.config.input_size)) if batch else graph
            return _Lanes([_OpenVinoGraph(lane, config) for _ in range(streams)])
        batched, single = _OpenVinoGraph(graph, config), _OpenVinoGraph(_fixed_batch(graph, 1), config)
        return lambda images: (single if len(images) == 1 else batched)(images)
    return build


def _fixed_batch(graph: "openvino.Model", images: int) -> "openvino.Model":
    """A copy of the graph with its batch axis fixed: static shapes run faster than the dynamic axis."""
    fixed = graph.clone()
    fixed.reshape([images, *graph.input().get_partial_shape()[1:]])
    return fixed


LANE_PIXELS = 4 * 224 * 224  # input pixels per call on a one-thread lane, at most: its activations stay near the
# core. build-index's pipeline, efficientnet_b0 bf16 on 1600x1200 JPEGs: 1.06-1.10x the img/s of whole 32-photo
# calls (convnext_tiny 1.02x, resnet50 1.01x: RESULTS, "Photo path"); at 32-64 px a batch of 32 is under it


def lane_batch(batch: int, input_size: int) -> int:
    """Images per call on a lane: the size of the fewest parts of at most LANE_PIXELS input pixels each that a
    batch splits into, as equal as can be (the last part is padded to it)."""
    largest = max(1, LANE_PIXELS // input_size ** 2)
    batch = max(1, batch)
    return -(-batch // -(-batch // largest))


class _OpenVinoGraph:
    """A graph compiled at its first use (a service that never sees a single photo never compiles the batch-1
    graph); an infer request serves one call at a time, so each calling thread has its own. A graph whose batch
    is fixed (`_fixed_batch`) runs a call in parts of that many images, the last one padded."""

    def __init__(self, graph: "openvino.Model", config: dict):
        batch_axis = graph.input().get_partial_shape()[0]
        self.graph, self.config = graph, config
        self.fixed = batch_axis.get_length() if batch_axis.is_static else None
        self._compiled = None
        self._lock = threading.Lock()
        self._requests = threading.local()

    def compiled(self) -> "openvino.CompiledModel":
        with self._lock:
            if self._compiled is None:
                self._compiled = _core().compile_model(self.graph, "CPU", self.config)
            return self._compiled

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        import numpy as np
        import torch

        pixels = _numpy(images)  # parts and padding in numpy, as _numpy says why
        if self.fixed is None:
            return torch.from_numpy(self._infer(pixels)).to(images.device)
        parts = []
        for start in range(0, len(pixels), self.fixed):
            part = pixels[start:start + self.fixed]
            if len(part) < self.fixed:
                part = np.concatenate([part, np.zeros((self.fixed - len(part), *part.shape[1:]), part.dtype)])
            parts.append(self._infer(part))
        return torch.from_numpy(np.concatenate(parts)[:len(pixels)]).to(images.device)

    def _infer(self, pixels: "np.ndarray") -> "np.ndarray":
        if not hasattr(self._requests, "request"):
            self._requests.request = self.compiled().create_infer_request()
        return self._requests.request.infer([pixels])[0].copy()  # the request's own buffer is reused


class _Lanes:
    """Compilations of a graph (their configs give each its threads), compiled at once, every calling thread
    bound to one of them in turn:
    what OpenVINO's own streams (PERFORMANCE_HINT THROUGHPUT) should do, but with a second compiled model in the
    process they ran at times on one core between them (resnet50: 12-24 img/s instead of 23-45)."""

    def __init__(self, lanes: list[_OpenVinoGraph]):
        self._lanes = lanes
        for lane in self._lanes:
            lane.compiled()
        self._turn = itertools.count()
        self._mine = threading.local()

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        if not hasattr(self._mine, "lane"):  # consecutive threads get different lanes
            self._mine.lane = self._lanes[next(self._turn) % len(self._lanes)]
        return self._mine.lane(images)


_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its OpenVINO graph
_tracing = threading.Lock()  # torch's tracer is not thread-safe: two Inferences of one model (a query's, a
# build's streams variant) or of two models trace one at a time (torch.compile, which compiles at its first call,
# is not covered)


def _openvino_graph(model: "HashingNet") -> "openvino.Model":
    """The features traced into an OpenVINO graph once per process (seconds for a resnet50); both precisions
    compile from it."""
    import torch

    from training.model import FeatureExtractor

    openvino = _import_openvino()
    with _tracing:
        if model not in _graphs:
            size = model.config.input_size
            example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
            _graphs[model] = openvino.convert_model(FeatureExtractor(model).eval(), example_input=example,
                                                    input=[(-1, 3, size, size)])
        return _graphs[model]


def _import_openvino() -> "types.ModuleType":
    """openvino with its usage telemetry off. Unless a user has run `opt_in_out --opt_out` (or runs in CI), its
    import and model converter send usage events to Google Analytics (20 for an import and one conversion), each
    from a process that a thread of the telemetry package forks beside the runtime's and torch's running threads:
    a test process here hung in one such fork. Imported here first, openvino's converter takes the stub it has for
    a missing telemetry package; imported elsewhere first (its import event then sent), its converter's modules are
    pointed at that stub."""
    with _importing:
        if "openvino" not in sys.modules:
            saved = sys.modules.get("openvino_telemetry")
            sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # its import fails: the stub
            try:
                importlib.import_module("openvino")
            finally:
                if saved is None:
                    sys.modules.pop("openvino_telemetry", None)
                else:
                    sys.modules["openvino_telemetry"] = saved
        import openvino

        try:
            from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils, utils
        except ImportError:  # if ovc's layout changes, test_openvino_sends_no_telemetry fails
            return openvino
        convert_impl.tm = telemetry_utils.tm = utils.tm = telemetry_stub
        return openvino


_importing = threading.Lock()


@functools.cache
def _core() -> "openvino.Core":
    """One OpenVINO Core for the process. With a Core made for each compilation and dropped after it (the earlier
    way), the suite's process died of SIGSEGV once OpenVINO ran in most tests (a Python object overwritten in the
    main thread, in both runs at the same test); with one Core the same suite ran through (one run)."""
    return _import_openvino().Core()


def _numpy(images: "torch.Tensor") -> "np.ndarray":
    """A runtime's input: contiguous NCHW uint8 pixels in host memory. A decoded photo is a view of its HWC
    pixels: numpy copies it on this thread, where torch's parallel copy left OpenMP threads spinning on the
    runtime's cores (efficientnet_b0 bf16, one photo as a query decodes it: 5.66 against 9.07 ms)."""
    import numpy as np

    return np.ascontiguousarray(images.detach().cpu().numpy())


BF16_UNITS = ("avx512_bf16", "amx_bf16")
PATHS = {path.name: path for path in (
    InferencePath("eager", "fp32", _eager, forks=True),
    InferencePath("compile", "fp32", _compiled),
    InferencePath("onnxruntime", "fp32", _onnxruntime, runtime="onnxruntime"),
    InferencePath("openvino", "fp32", _openvino("f32"), runtime="openvino", concurrent=True),
    InferencePath("openvino-bf16", "bf16", _openvino("bf16"), runtime="openvino", cpu_flags=BF16_UNITS,
                  concurrent=True),
)}
PATH_CHOICES = ("auto", *PATHS)

# What `auto` runs per backbone family at an input size of at least AUTO_MIN_INPUT_SIZE: the first path of its row
# that can run here, else eager. Measured side by side with eager by benchmarks/photo_path.py on a 2 vCPU EPYC
# with AVX-512 and AVX512-BF16, no AMX, 224 px (benchmarks/RESULTS.md, "Photo path"), build-index decoding and
# encoding a batch per core: openvino-bf16 built efficientnet_b0 2.9-3.4x, resnet50 2.7-2.9x and convnext_tiny 2.4-2.5x
# as many images per second as eager (decoding included) and encoded a single photo in 0.27-0.47 of its time, top-10
# results 0.991-1.000 the same. Hosts without bf16 units were not measured, so there the rows find nothing and eager
# runs; so do the families not measured and smaller inputs: the runtime now builds those faster too (cifar_convnet
# at 32 px 1.35-1.98x, resnet18 at 64 px 1.68x), but with OpenVINO in every test process (auto on the CIFAR test
# model) the suite's process died of SIGSEGV, which did not recur with one OpenVINO Core per process (`_core`, one
# full run); left: on small jobs the runtime is slower (one prefetch thread: 0.65-0.80x), each process converts and
# compiles (~1.1 s), and tests assume eager's bits (Ray's actors encode eager): RESULTS, "Lanes at a fixed batch,
# and no torch copies beside the runtime".
AUTO_TABLE: dict[str, tuple[str, ...]] = {
    "convnext": ("openvino-bf16",),
    "efficientnet": ("openvino-bf16",),
    "resnet": ("openvino-bf16",),
}
AUTO_MIN_INPUT_SIZE = 224


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def auto_path(backbone: str, input_size: int, device_type: str) -> str:
    """The measured best path for a backbone (timm name) at an input size on this host: the first available in
    its family's row, else eager."""
    family = next((f for f in AUTO_TABLE if backbone.startswith(f)), None)
    candidates = AUTO_TABLE[family] if family is not None and input_size >= AUTO_MIN_INPUT_SIZE else ()
    return next((name for name in candidates if PATHS[name].unavailable(device_type) is None), "eager")


def check_path_name(name: str, choices: Sequence[str] = PATH_CHOICES) -> None:
    """InputError for a name that is not one of `choices` (the paths and `auto`)."""
    if name not in choices:
        raise InputError(f"inference path must be one of {', '.join(choices)}, not {name!r}")


def runnable(name: str, device_type: str) -> str:
    """The path that runs when `name` is asked for here: itself, or eager where it cannot run."""
    return name if PATHS[name].unavailable(device_type) is None else "eager"


class Inference:
    """A path for one model, built on first use in the process that uses it: a forked worker or a Ray actor
    (which gets it pickled, without what was built) builds its own, as runtimes' sessions cannot cross either.
    `streams`: calls it serves at once (a concurrent path only), of `batch` images each (None: any number)."""

    def __init__(self, name: str = "eager", model: "HashingNet | None" = None, streams: int = 1,
                 batch: int | None = None):
        self.name, self.model, self.streams, self.batch = name, model, streams, batch
        self._built: tuple[Features | None] | None = None
        self._variants: dict[tuple[int, int], Inference] = {}  # by streams and batch, built once per process
        self._lock = threading.Lock()

    @property
    def forks(self) -> bool:
        return PATHS[self.name].forks

    @property
    def concurrent(self) -> bool:
        return PATHS[self.name].concurrent

    def in_streams(self, streams: int, batch: int) -> Inference:
        """This path for `streams` calls of `batch` images at once (compiled for them at its first use, then
        kept)."""
        if not self.concurrent:
            raise ValueError(f"inference path {self.name} runs one call at a time")
        batch = batch if streams > 1 else None  # one call at a time takes any batch
        if (streams, batch) == (self.streams, self.batch):
            return self
        with self._lock:
            return self._variants.setdefault((streams, batch), Inference(self.name, self.model, streams, batch))

    @property
    def features(self) -> Features | None:
        """uint8 images -> features on this path (None: the model's own module, eager)."""
        with self._lock:
            if self._built is None:
                self._built = (PATHS[self.name].build(self.model, self.streams, self.batch),)
            return self._built[0]

    def __getstate__(self) -> dict:
        return {"name": self.name, "model": self.model, "streams": self.streams, "batch": self.batch}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def prepare(name: str, model: "HashingNet", device_type: str) -> Inference:
    """`name`'s path (or `auto`'s choice) for `model`, built at first use; a path that cannot run here falls back
    to eager with a one-line note, since every path computes the same features."""
    check_path_name(name)
    chosen = auto_path(model.config.backbone, model.config.input_size, device_type) if name == "auto" else name
    reason = PATHS[chosen].unavailable(device_type)
    if reason is not None:
        log.warning("inference path %s cannot run here (%s): using eager", chosen, reason)
        chosen = "eager"
    return Inference(chosen, model)
