"""The hashing network of Lin et al. (CVPRW 2015): backbone -> latent layer (Linear + sigmoid) -> classifier.

Any timm backbone works; thresholding the latent sigmoid at 0.5 gives the binary code, and the pooled
backbone features (what the latent layer reads) are kept for Euclidean re-ranking.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import timm
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from training import backbones  # noqa: F401  (registers the CIFAR-native backbones with timm)
from training.errors import Setting, UserError
from training.files import atomic_write

FORMAT_VERSION = 2  # 2: mirror_average
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and feed it images the way it was trained."""

    backbone: str
    bits: int
    class_names: list[str]
    input_size: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int = 0
    # encode() averages an image's features with its mirror's: codes and re-ranking features that a
    # horizontal flip cannot change, for twice the encoding cost (only where a flip keeps the meaning)
    mirror_average: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    """auto = CUDA when there is a GPU, else CPU; asking for CUDA without one is the user's error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(Setting("device"), " cuda asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise UserError(Setting("device"), f" must be auto, cpu or cuda, not '{name}'")
    return torch.device(name)


def check_backbone_name(name: str) -> None:
    """Fail with close suggestions for a name timm does not know."""
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown backbone '{name}'{hint}")


class HashingNet(nn.Module):
    """Backbone + latent layer H (K sigmoid units) + classifier, trained with plain cross-entropy.

    `forward` takes uint8 images (N, 3, S, S): normalisation lives inside the model so that training,
    indexing and querying can never disagree on it.
    """

    def __init__(self, config: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.config = config
        self.backbone = backbone
        feature_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features  # pooled output width
        config.feature_dim = feature_dim
        self.latent = nn.Linear(feature_dim, config.bits)
        self.classifier = nn.Linear(config.bits, len(config.class_names))
        nn.init.normal_(self.latent.weight, std=0.005)  # the paper's initialisation of H
        nn.init.constant_(self.latent.bias, 1.0)
        self.auxiliary: nn.Linear | None = None  # training only (TrainConfig.aux_weight); save_model leaves it out
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: the re-ranking features and the latent layer's input."""
        return self.backbone(self.normalize(images))

    def forward(self, images: torch.Tensor, with_latent: bool = False):
        """Class logits; with `with_latent`, (latent pre-activations, class logits, auxiliary logits or None) for
        the training losses."""
        features = self.features(images)
        latent = self.latent(features)
        logits = self.classifier(torch.sigmoid(latent))
        if not with_latent:
            return logits
        auxiliary = self.auxiliary(features) / 9 if self.auxiliary is not None else None  # airbench's head scale
        return latent, logits, auxiliary

    @torch.no_grad()
    def encode(self, images: torch.Tensor, run_features: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes (uint8, np.packbits order: bit i = latent unit i, MSB first) and float32 features.
        `run_features`: another way to compute `features` (engine/inference.py); the latent layer stays fp32
        here, so paths differ only as far as their features do. None: this module, channels_last on a CPU
        (measured 1.25-1.53x faster for resnet50, efficientnet_b0 and the CIFAR nets; 0.95x for convnext)."""
        images = images.to(self.mean.device)
        if run_features is None and images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        run = run_features or self.features
        features = run(images).float()
        if self.config.mirror_average:  # the latent layer is affine: this averages its pre-activations too
            features = 0.5 * (features + run(images.flip(-1)).float())
        activations = torch.sigmoid(self.latent(features))
        bits = (activations > 0.5).cpu().numpy()
        return np.packbits(bits, axis=1), features.cpu().numpy()


class FeatureExtractor(nn.Module):
    """A model's `features` (uint8 images in, normalised inside) as a module of its own: what an inference
    runtime traces, so that its graph normalises the pixels too."""

    def __init__(self, model: HashingNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


def create_model(
    backbone: str,
    bits: int,
    class_names: list[str],
    input_size: int = 32,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
) -> HashingNet:
    """Build a hashing network on a timm backbone (`pretrained` = timm hub weights, `weights` = a local file)."""
    if bits < 1:
        raise UserError(f"bits must be at least 1, got {bits}")
    if len(class_names) < 2:
        raise UserError(f"need at least two classes to train, found {len(class_names)}")
    return hashing_net(create_backbone(backbone, pretrained, weights), backbone, bits, class_names, input_size)


def create_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None) -> nn.Module:
    """A timm backbone without its classifier; `pretrained` = timm's hub weights, `weights` = a local file."""
    check_backbone_name(name)
    try:
        net = (_create_offline(name) if pretrained and not hub_reachable()
               else timm.create_model(name, pretrained=pretrained, num_classes=0))
    except (ValueError, RuntimeError, OSError) as error:
        raise UserError(f"could not create backbone '{name}' (pretrained={pretrained}): "
                        f"{first_line(error)}") from error
    if weights is not None:
        load_backbone_weights(net, weights)
    return net


def _create_offline(name: str) -> nn.Module:
    """The backbone with hub weights from the local cache, or at once one line saying they cannot be had."""
    from urllib.error import URLError

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        with hub_offline():
            return timm.create_model(name, pretrained=True, num_classes=0)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, URLError):  # URLError: weights hosted elsewhere
        raise UserError(Setting("pretrained"), f": {name}'s weights are not in the local cache and {hub_endpoint()} "
                        "cannot be reached (no internet?); run once with internet, or give a local file with ",
                        Setting("weights")) from None


def hashing_net(net: nn.Module, backbone: str, bits: int, class_names: list[str], input_size: int) -> HashingNet:
    """The hashing network on a built backbone, normalising images as the backbone's weights expect."""
    data_config = timm.data.resolve_data_config({}, model=net)
    config = ModelConfig(backbone=backbone, bits=bits, class_names=list(class_names), input_size=input_size,
                         mean=tuple(data_config.get("mean", IMAGENET_MEAN)),
                         std=tuple(data_config.get("std", IMAGENET_STD)))
    return HashingNet(config, net)


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's message cut to its first line: libraries append paragraphs of advice to theirs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers at all (through the same client and proxies a download uses). Asked
    once, with a short timeout: offline, huggingface_hub retries each file for ~50 s before it gives up."""
    from huggingface_hub import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout)
        return True
    except Exception:  # any failure to get an answer (DNS, refused, timeout, TLS): not reachable
        return False


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (its HF_HUB_OFFLINE setting, read when it was imported) for a block."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local .safetensors or .pth/.pt state dict into the backbone, ignoring its classifier head. A
    latenthash model (its directory or model.safetensors) gives its backbone: train other bit lengths on it."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError("cannot read ", Setting("weights"), f" file {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if isinstance(state, dict) and "model" in state:
                state = state["model"]
    except Exception as error:  # any unreadable file: one line, not torch's paragraphs of advice
        raise UserError("cannot read ", Setting("weights"), f" file {path}: not a .safetensors file or a state dict "
                        f"that torch.load reads with weights_only=True ({type(error).__name__}: "
                        f"{first_line(error)})") from None
    if not isinstance(state, dict):
        raise UserError(Setting("weights"), f" file {path} holds no state dict")
    own = backbone.state_dict()
    prefix = "backbone."  # a HashingNet's keys
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    usable = max(({k: v for k, v in candidate.items() if k in own and own[k].shape == v.shape}
                  for candidate in (state, inner)), key=len)
    if not usable:
        raise UserError(Setting("weights"), f" file {path} has no tensor matching backbone "
                        f"{type(backbone).__name__}")
    backbone.load_state_dict(usable, strict=False)


def _fingerprint(weights: bytes, config: dict) -> str:
    digest = hashlib.sha256(weights)
    digest.update(json.dumps({k: v for k, v in config.items() if k != "fingerprint"}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# Bounds on a config.json that a user may edit, so that a wrong value is one clear error rather than a process
# killed for memory. A catalog's own bound on the code length is the storage layer's (shards.codes.MAX_BITS).
MAX_WIDTH = 65536  # units of the feature and latent layers
MAX_INPUT_SIZE = 2048  # pixels per side: a 2048x2048 batch of 256 is already 3 GB of uint8


def check_model_config(config: dict, where: Path) -> None:
    """Every field of config.json known, of its type and within bounds: the file is what a user can edit, and a
    wrong value (an input size of 100,000) must be one clear error, not a process killed for memory."""
    known = {f.name for f in dataclasses.fields(ModelConfig)} | {"fingerprint"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"{where}: unknown fields {', '.join(map(str, unknown))}")

    def fail(name: str, expected: str) -> None:
        raise UserError(f"{where}: {name} must be {expected}, got {config.get(name)!r}")

    def integer(name: str, low: int, high: int) -> None:
        if type(config.get(name)) is not int or not low <= config[name] <= high:
            fail(name, f"an integer in [{low}, {high}]")

    if not isinstance(config.get("backbone"), str) or not config["backbone"]:
        fail("backbone", "a timm model name")
    integer("bits", 1, MAX_WIDTH)
    integer("input_size", 8, MAX_INPUT_SIZE)
    integer("feature_dim", 0, MAX_WIDTH)
    names = config.get("class_names")
    if not isinstance(names, list) or not 2 <= len(names) <= 1_000_000 or not all(isinstance(n, str) for n in names):
        fail("class_names", "a list of at least two strings")
    for name in ("mean", "std"):
        values = config.get(name, IMAGENET_MEAN)
        if (not isinstance(values, (list, tuple)) or len(values) != 3
                or not all(type(v) in (int, float) and np.isfinite(v) for v in values)
                or name == "std" and min(values) <= 0):
            fail(name, "three finite numbers" + (", all positive" if name == "std" else ""))
    if not isinstance(config.get("mirror_average", False), bool):
        fail("mirror_average", "true or false")
    if not isinstance(config.get("extra", {}), dict):
        fail("extra", "an object")
    if config.get("fingerprint") is not None and not isinstance(config["fingerprint"], str):
        fail("fingerprint", "a string")


def save_model(model: HashingNet, directory: str | os.PathLike) -> str:
    """Write `model.safetensors` + `config.json` (with the fingerprint catalogs record); returns the fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("auxiliary.")}
    atomic_write(weights, lambda p: save_file(state, str(p)))
    config = asdict(model.config)
    config["fingerprint"] = _fingerprint(weights.read_bytes(), config)
    atomic_write(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return config["fingerprint"]


def read_model_config(directory: str | os.PathLike) -> dict:
    """config.json of a model directory, checked for existence and format version."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} is not a latenthash model directory (no config.json)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    version = config.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise UserError(f"{path} has model format version {version}; this latenthash reads up to "
                        f"{FORMAT_VERSION}: upgrade latenthash")
    check_model_config(config, path)
    return config


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> HashingNet:
    """A saved model in eval mode, encoding exactly as when it was saved; `model.fingerprint` is set, recomputed
    from the weights and config actually read, and checked against the stored one: a model changed after it was
    saved would otherwise give its catalogs silently wrong answers."""
    directory = Path(directory)
    stored = read_model_config(directory)
    fingerprint = stored.pop("fingerprint", None)
    weights = directory / "model.safetensors"
    try:
        raw = weights.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read weights {weights}: {error.strerror or error}") from None
    actual = _fingerprint(raw, stored)
    if fingerprint is not None and fingerprint != actual:
        raise UserError(f"{directory}: model.safetensors or config.json changed since the model was saved "
                        f"(fingerprint {actual}, recorded {fingerprint}); restore them or retrain")
    config = ModelConfig(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in stored.items()})
    check_backbone_name(config.backbone)
    model = HashingNet(config, timm.create_model(config.backbone, pretrained=False, num_classes=0))
    try:
        model.load_state_dict(load(raw))
    except Exception as error:
        raise UserError(f"cannot load weights {weights}: {error}") from error
    model.fingerprint = actual
    model = model.to(device).eval()
    if model.mean.device.type == "cpu":  # see `encode`
        model = model.to(memory_format=torch.channels_last)
    return model
