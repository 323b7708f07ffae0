"""What a training run is told: the settings of `python -m training.train`, as one dataclass, and the names
the loop and the command line share. Light on purpose: the command line reads it before importing torch."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
TRAIN_CONFIG = "train_config.json"  # the flags a run started with
OBJECTIVES = ("latent", "cnnh", "cnnh+")
FORMATS = ("auto", "folder", "cifar10", "mnist")


@dataclass
class TrainConfig:
    data: str
    out: str
    format: str = "auto"
    class_names: list[str] | None = None  # names of CIFAR-10 / MNIST-format classes (default: classes.txt, digits)
    backbone: str = "cifar_convnet"
    bits: int = 48
    input_size: int = 32
    epochs: float | None = None  # None: 10, or as many as make training.schedule.MIN_STEPS steps on a small set
    batch_size: int | None = None  # None: 256, or smaller on a small set (training.schedule)
    # Peak learning rate of the mean loss at batch size 1024, scaled linearly with batch size: one number across
    # batch sizes. Below airbench's 1.5 because a higher peak saturates the sigmoid latent layer and the loss
    # climbs. The evidence for each default: benchmarks/RESULTS.md, "Why the training defaults are what they are".
    lr: float = 0.6
    # Fraction of the steps over which the learning rate climbs to its peak: a climb lets BatchNorm's statistics
    # and the latent layer settle before the largest steps.
    warmup: float = 0.23
    momentum: float = 0.85
    # Largest global gradient norm of a step (0: no limit): a cap on the rare step whose gradient grows several-fold
    # within a few steps and starts a loss spike, small enough to leave ordinary steps alone.
    clip_grad_norm: float = 0.0
    weight_decay: float = 1.5e-3  # per-step decay at batch 1024 divided by lr, scaled like lr
    norm_bias_lr_scale: float = 64.0  # airbench: normalisation biases learn faster than the weights they shift
    label_smoothing: float = 0.0  # 0: the paper's plain cross-entropy
    # Weight of an auxiliary loss: the cross-entropy of airbench's linear classifier on the backbone's features
    # (training only, never saved). It gives the backbone a gradient that does not pass the sigmoid layer, which
    # passes little once saturated. 0 is the paper's loss.
    aux_weight: float = 0.0
    objective: str = "latent"  # latent (the paper), cnnh or cnnh+ (baselines)
    translate: int = 2
    flip: bool = True
    alternating_flip: bool = False  # airbench: each image mirrored in every other epoch rather than at random
    lookahead: bool = True
    tta: bool = True
    device: str = "auto"
    amp: str = "auto"
    pretrained: bool = False
    weights: str | None = None
    freeze_backbone: bool = False  # train only the latent layer and classifier on a trained backbone
    mirror_average: bool = False  # the saved model encodes an image and its mirror (ModelConfig.mirror_average)
    resume: bool = False
    overwrite: bool = False  # replace a model already in `out`
    keep_collapsed: bool = False  # save a model whose codes cannot tell the classes apart (training.collapse)
    seed: int = 0
    val_split: float = 0.1


def save_train_config(config: TrainConfig, out: Path) -> None:
    """What --resume holds a run to and what the benchmarks read back."""
    (out / TRAIN_CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")


def read_train_config(out: Path) -> TrainConfig | None:
    """The settings the run in `out` started with, None when it recorded none; settings this version does not
    know (a run from another version) are left out, ones it lacks take their defaults."""
    try:
        recorded = json.loads((out / TRAIN_CONFIG).read_text())
        known = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{name: value for name, value in recorded.items() if name in known})
    except (OSError, json.JSONDecodeError, TypeError, AttributeError):
        return None
