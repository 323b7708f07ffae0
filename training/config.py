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
    # Peak learning rate of the mean loss at batch size 1024, scaled linearly with batch size. airbench's 1.5
    # saturates the sigmoid latent layer at the peak and the loss climbs; at 0.75 a run in five still takes a
    # loss spike near the peak (32 runs on an H200); at 0.6 (10 runs) and 0.5 (6) none did (RESULTS.md, issue 16).
    lr: float = 0.6
    # Fraction of the steps over which the learning rate climbs to its peak. README's 48-bit recipe uses 0.14 (the
    # peak in epoch 2, not 4) with lr 0.4: no rise at the peak in 11 bf16 runs (one later spike: clip_grad_norm); at
    # lr 0.5 the short climb took away one seed's rise at the peak in bf16, but an fp32 run spiked in epoch 5
    # (RESULTS.md, issue 16).
    warmup: float = 0.23
    momentum: float = 0.85
    # Largest global gradient norm of a step (0: no limit). README's recipe uses 1: without it, one bf16 run in five
    # (seed 3, epoch 7) spiked as the backbone's gradient norm grew 0.9 -> 4.4 in four steps; the same batches
    # with a cap of 1 do not spike (1.5 leaves a bump), and the norm's median is ~0.8. With the cap the loss fell
    # every epoch in 4 bf16 seeds of 4 and in fp32 (RESULTS.md, issue 16).
    clip_grad_norm: float = 0.0
    weight_decay: float = 1.5e-3  # per-step decay at batch 1024 divided by lr, scaled like lr
    norm_bias_lr_scale: float = 64.0
    label_smoothing: float = 0.0
    # Weight of an auxiliary loss: the cross-entropy of airbench's linear classifier on the backbone's features
    # (training only, never saved), a gradient for the backbone that does not pass the sigmoid layer. 0 is the
    # paper's loss; README's 48-bit recipe uses 1 with lr 0.4 (+0.8 points at 8 epochs and lr 0.5; at lr 0.6 one
    # 12-epoch run of two spiked; at 0.5, one 14-epoch run of five rose 0.018 at the peak; RESULTS.md, issue 16).
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
