"""Train a hashing network: `python -m training.train --data PATH --out MODEL_DIR`.

With `--objective cnnh` or `cnnh+` the same loop trains the CNNH baselines (Xia et al., AAAI 2014) instead:
the latent units learn stage 1's target codes (training/cnnh.py), alone or beside the class cross-entropy.

The loop follows airbench94 (Keller Jordan): whole-batch tensor augmentation of in-memory uint8 images,
Nesterov SGD with a triangular learning-rate schedule, BatchNorm biases at a higher rate, and Lookahead
weight averaging. The loss is the paper's plain cross-entropy; label smoothing is an option, off by default.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from training.config import CHECKPOINT, FORMATS, OBJECTIVES, TrainConfig
from training.cli import program_name, run_cli
from training.errors import UserError
from training.schedule import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, MIN_STEPS, MIN_STEPS_PER_EPOCH

def check_config(config: TrainConfig) -> None:
    """Every argument that can be checked without data, checked before any image is decoded or any folder is
    made: a mistake costs a second, not a decoded dataset and an empty model folder."""
    from training.model import MAX_BITS, MAX_INPUT_SIZE, check_backbone_name

    for name, value, low in (("bits", config.bits, 1), ("batch-size", config.batch_size, 1),
                             ("input-size", config.input_size, 8)):
        if value is not None and value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if config.input_size > MAX_INPUT_SIZE:
        raise UserError(f"--input-size must be at most {MAX_INPUT_SIZE}, got {config.input_size}")
    if config.bits > MAX_BITS:
        raise UserError(f"--bits must be at most {MAX_BITS}, got {config.bits}")
    for name, value in (("aux-weight", config.aux_weight), ("clip-grad-norm", config.clip_grad_norm)):  # 0: off
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} must be 0 or more, got {value}")
    if config.aux_weight and config.freeze_backbone:
        raise UserError("--aux-weight trains the backbone faster; with --freeze-backbone it would change nothing")
    for name, value in (("epochs", config.epochs), ("lr", config.lr),
                        ("norm-bias-lr-scale", config.norm_bias_lr_scale)):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise UserError(f"--{name} must be a positive number, got {value}")
    if not 0 < config.warmup < 1:
        raise UserError(f"--warmup must be in (0, 1), got {config.warmup}")
    if not 0 <= config.val_split < 1:
        raise UserError(f"--val-split must be in [0, 1), got {config.val_split}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not '{config.objective}'")
    if config.format not in FORMATS:
        raise UserError(f"unknown --format '{config.format}'; choose one of {', '.join(FORMATS)}")
    if config.freeze_backbone and config.weights is None and not config.pretrained:
        raise UserError("--freeze-backbone needs a trained backbone: give --weights (or --pretrained)")
    if not Path(config.data).exists():
        raise UserError(f"data path {config.data} does not exist")
    out = Path(config.out)
    if config.resume and not (out / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint in {out}")
    if config.resume and config.overwrite:
        raise UserError("--resume continues the model in --out, --overwrite replaces it: give one")
    if not config.resume and not config.overwrite and any((out / f).exists() for f in ("config.json", CHECKPOINT)):
        raise UserError(f"{out} already holds a model; catalogs built from it would stop matching. Give another "
                        "--out, --resume to continue it, or --overwrite to replace it")
    check_backbone_name(config.backbone)


def train(config: TrainConfig, dataset=None) -> dict:
    """Check the arguments, then train (training.loop.run); returns a summary of the run."""
    check_config(config)
    from training.loop import run

    return run(config, dataset)


# ---------------------------------------------------------------- command line
EXAMPLES = """examples:
  python -m training.train --data ../shared/data/cifar-10-batches-py --out models/cifar48 --epochs 15 \
--batch-size 1024 --label-smoothing 0.2 --mirror-average --aux-weight 1 --lr 0.4 --warmup 0.14 --alternating-flip \
--clip-grad-norm 1
  python -m training.train --data photos/ --out models/photos --backbone resnet18 --input-size 64 --epochs 20
  python -m training.train --data photos/ --out models/photos --backbone resnet50 --pretrained --input-size 224
  python -m training.train --data ../shared/data/mnist --out models/mnist --bits 12 --resume
  python -m training.train --data fashion/ --out models/fashion --class-names t-shirt,trouser,pullover,dress,coat,\
sandal,shirt,sneaker,bag,boot
  python -m training.train --data DIR --out models/cifar12 --bits 12 --weights models/cifar48 --freeze-backbone
  torchrun --nproc-per-node 4 -m training.train --data DIR --out MODEL_DIR --device cuda
"""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog=program_name("training.train"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig(data="", out="")
    parser.add_argument("--data", required=True, help="image directory (one subfolder per class), CIFAR-10 "
                        "python batches directory, or MNIST IDX directory")
    parser.add_argument("--out", required=True, help="model directory to write (weights, config, checkpoints)")
    parser.add_argument("--format", choices=FORMATS, default=defaults.format)
    parser.add_argument("--class-names", type=lambda text: [n.strip() for n in text.split(",")], metavar="A,B,...",
                        help="names of the classes of CIFAR-10 / MNIST-format data, in label order (default: a "
                        "classes.txt beside the data, else CIFAR-10's names or the digits)")
    parser.add_argument("--backbone", default=defaults.backbone, help="any timm model name (default %(default)s)")
    parser.add_argument("--bits", type=int, default=defaults.bits, help="code length K (default %(default)s)")
    parser.add_argument("--input-size", type=int, default=defaults.input_size,
                        help="image side in pixels for folders (default %(default)s)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs,
                        help=f"passes over the training set; fractions allowed (default {DEFAULT_EPOCHS:g}, or as "
                        f"many as make {MIN_STEPS} steps on a small set)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"images a step (default {DEFAULT_BATCH_SIZE}, or smaller on a small set, for at least "
                        f"{MIN_STEPS_PER_EPOCH} steps an epoch)")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="peak learning rate at batch 1024, scaled with --batch-size (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, metavar="FRACTION",
                        help="fraction of the training steps over which the learning rate climbs to its peak "
                        "(default %(default)s)")
    parser.add_argument("--norm-bias-lr-scale", type=float, default=defaults.norm_bias_lr_scale,
                        help="normalisation layers' biases learn this many times faster than --lr (airbench; "
                        "default %(default)s)")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="(default %(default)s)")
    parser.add_argument("--clip-grad-norm", type=float, default=defaults.clip_grad_norm, metavar="NORM",
                        help="scale each step's gradients down to this global norm when larger (default 0: off)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default %(default)s)")
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                        help="0 = the paper's plain cross-entropy (default)")
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight, metavar="W",
                        help="add W x the cross-entropy of a linear classifier on the backbone's features (training "
                        "only, not saved): the backbone learns faster than through the sigmoid layer alone "
                        "(default 0: the paper's loss)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                        help="latent = the paper's cross-entropy (default); cnnh/cnnh+ = the CNNH baselines")
    parser.add_argument("--translate", type=int, default=defaults.translate, help="max random shift, pixels")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips")
    parser.add_argument("--alternating-flip", action="store_true",
                        help="mirror each image in every other epoch (airbench), not half of each batch at random")
    parser.add_argument("--no-lookahead", dest="lookahead", action="store_false")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="skip the final flip/shift TTA score")
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default=defaults.amp, choices=("auto", "on", "off"),
                        help="bf16 autocast; auto = on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), off "
                             "elsewhere (emulated bf16 is many times slower)")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's hub weights (needs internet)")
    parser.add_argument("--weights", help="local .safetensors/.pth file to load into the backbone, or a latenthash "
                        "model directory (its backbone)")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train only the latent layer and classifier (with --weights): another code length "
                        "on a trained backbone in minutes")
    parser.add_argument("--mirror-average", action="store_true",
                        help="the model encodes each image and its mirror and averages the features: flip-invariant "
                        "codes (fewer wrong bits) at twice the cost of building and querying a catalog")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--keep-collapsed", action="store_true",
                        help="save the model even when its codes cannot tell the classes apart (fewer distinct codes "
                        "on the validation images than classes); without it such a run fails and leaves nothing")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--val-split", type=float, default=defaults.val_split,
                        help="held-out fraction for folders without a test/ split (default %(default)s)")
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)

    def body() -> int:
        summary = train(config)
        accuracy = ""
        if summary.get("val_acc") is not None:
            tta = f" ({summary['val_acc_tta']:.4f} with TTA)" if "val_acc_tta" in summary else ""
            accuracy = f", val acc {summary['val_acc']:.4f}{tta}"
        codes = summary["codes"]
        print(f"done in {summary['seconds']:.0f}s: {summary['steps']} steps of batch {summary['batch_size']} "
              f"({summary['schedule']}){accuracy}; {codes['distinct']} distinct code(s) among {codes['images']} "
              f"{codes['images_from']} images; model in {config.out}")
        return 0

    return run_cli(body, interrupted="interrupted: re-run with --resume to continue from the last finished epoch")


if __name__ == "__main__":
    sys.exit(main())
