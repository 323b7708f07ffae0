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
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from engine.errors import InputError

if TYPE_CHECKING:
    import torch

    from training.model import HashingNet

Features = Callable[["torch.Tensor"], "torch.Tensor"]  # uint8 images (N, 3, S, S) -> float features (N, D)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferencePath:
    """One way to compute features. `runtime`: the module it needs besides torch; `cpu_flags`: the units its
    precision needs (any one of them); `forks`: whether it may run inside the CPU build's forked worker
    processes (a runtime with its own thread pool must not be used across fork; it runs in this process
    beside decoding workers instead)."""

    name: str
    precision: str
    build: Callable[["HashingNet"], Features | None]
    runtime: str | None = None
    cpu_flags: tuple[str, ...] = ()
    forks: bool = False

    def unavailable(self, device_type: str) -> str | None:
        """Why this path cannot run here (None if it can)."""
        if self.name != "eager" and device_type != "cpu":
            return f"it runs on a CPU, not on {device_type}"
        if self.runtime is not None and importlib.util.find_spec(self.runtime) is None:
            return f"{self.runtime} is not installed"
        if self.cpu_flags and not set(self.cpu_flags) & cpu_flags():
            return f"this CPU lacks {' / '.join(self.cpu_flags)}"
        return None


def _eager(_model: "HashingNet") -> None:
    """None: HashingNet.encode runs its own module (channels_last on a CPU), as training and evaluation do."""
    return None


def _compiled(model: "HashingNet") -> Features:
    """torch.compile (inductor) with the weights frozen into the graph as constants, fed channels_last; a second
    batch size recompiles once with the batch axis dynamic (not one compile per size)."""
    import torch

    from training.model import FeatureExtractor

    compiled = torch.compile(FeatureExtractor(model).eval(), dynamic=None, options={"freezing": True})
    return lambda images: compiled(images.contiguous(memory_format=torch.channels_last))


def _onnxruntime(model: "HashingNet") -> Features:
    """ONNX Runtime's CPU provider on the features exported through torch.onnx (batch axis dynamic)."""
    import io

    import onnxruntime
    import torch

    from training.model import FeatureExtractor

    file = io.BytesIO()
    example = torch.zeros(1, 3, model.config.input_size, model.config.input_size, dtype=torch.uint8)
    torch.onnx.export(FeatureExtractor(model).eval(), (example,), file, input_names=["images"],
                      output_names=["features"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(file.getvalue(), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": _numpy(images)})[0]).to(images.device)


def _openvino(precision: str) -> Callable[["HashingNet"], Features]:
    """OpenVINO's CPU plugin at `precision` (its inference precision hint: f32, or bf16 on AVX512-BF16/AMX
    units, which keeps fp32 where its graph transformations judge bf16 unsafe)."""
    def build(model: "HashingNet") -> Features:
        import openvino
        import torch

        compiled = openvino.Core().compile_model(_openvino_graph(model), "CPU",
                                                 {"INFERENCE_PRECISION_HINT": precision})
        requests = threading.local()  # an infer request serves one call at a time: one per calling thread

        def features(images: torch.Tensor) -> torch.Tensor:
            if not hasattr(requests, "request"):
                requests.request = compiled.create_infer_request()
            return torch.from_numpy(requests.request.infer([_numpy(images)])[0].copy()).to(images.device)
        return features
    return build


_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its OpenVINO graph


def _openvino_graph(model: "HashingNet") -> "openvino.Model":
    """The features traced into an OpenVINO graph once per process (seconds for a resnet50); both precisions
    compile from it."""
    import openvino
    import torch

    from training.model import FeatureExtractor

    if model not in _graphs:
        size = model.config.input_size
        example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        _graphs[model] = openvino.convert_model(FeatureExtractor(model).eval(), example_input=example,
                                                input=[(-1, 3, size, size)])
    return _graphs[model]


def _numpy(images: "torch.Tensor"):
    """A runtime's input: contiguous NCHW uint8 pixels in host memory."""
    return images.detach().cpu().contiguous().numpy()


BF16_UNITS = ("avx512_bf16", "amx_bf16")
PATHS = {path.name: path for path in (
    InferencePath("eager", "fp32", _eager, forks=True),
    InferencePath("compile", "fp32", _compiled),
    InferencePath("onnxruntime", "fp32", _onnxruntime, runtime="onnxruntime"),
    InferencePath("openvino", "fp32", _openvino("f32"), runtime="openvino"),
    InferencePath("openvino-bf16", "bf16", _openvino("bf16"), runtime="openvino", cpu_flags=BF16_UNITS),
)}
PATH_CHOICES = ("auto", *PATHS)

# What `auto` runs per backbone family at an input size of at least AUTO_MIN_INPUT_SIZE: the first path of its row
# that can run here, else eager. Measured side by side with eager by benchmarks/photo_path.py on a 2 vCPU EPYC
# with AVX-512 and AVX512-BF16, no AMX, 224 px (benchmarks/RESULTS.md, "Photo path"): openvino-bf16 built resnet50
# 2.6x, efficientnet_b0 2.2-3.2x and convnext_tiny 3.3x as many images per second as eager (decoding included)
# and encoded a single photo in 0.26-0.50 of its time, top-10 results 0.997-1.000 the same. Hosts without bf16
# units were not measured, so there the rows find nothing and eager runs; so do smaller inputs (at 32 px the
# runtimes built 0.65-0.80x as fast: decoding dominates, and a runtime decodes on one thread) and the families
# not measured.
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


def check_path_name(name: str) -> None:
    """InputError for a name that is neither a path nor `auto`."""
    if name not in PATH_CHOICES:
        raise InputError(f"inference path must be one of {', '.join(PATH_CHOICES)}, not {name!r}")


def runnable(name: str, device_type: str) -> str:
    """The path that runs when `name` is asked for here: itself, or eager where it cannot run."""
    return name if PATHS[name].unavailable(device_type) is None else "eager"


class Inference:
    """A path for one model, built on first use in the process that uses it: a forked worker or a Ray actor
    (which gets it pickled, without what was built) builds its own, as runtimes' sessions cannot cross either."""

    def __init__(self, name: str = "eager", model: "HashingNet | None" = None):
        self.name, self.model = name, model
        self._built: tuple[Features | None] | None = None
        self._lock = threading.Lock()

    @property
    def forks(self) -> bool:
        return PATHS[self.name].forks

    @property
    def features(self) -> Features | None:
        """uint8 images -> features on this path (None: the model's own module, eager)."""
        with self._lock:
            if self._built is None:
                self._built = (PATHS[self.name].build(self.model),)
            return self._built[0]

    def __getstate__(self) -> dict:
        return {"name": self.name, "model": self.model}

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
