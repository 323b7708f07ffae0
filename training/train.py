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
from training.errors import Setting, UserError
from training.recipes import RECIPES, recipe_settings
from training.schedule import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, MIN_STEPS, MIN_STEPS_PER_EPOCH

def check_config(config: TrainConfig) -> None:
    """Every argument that can be checked without data, checked before any image is decoded or any folder is
    made: a mistake costs a second, not a decoded dataset and an empty model folder."""
    from training.model import MAX_INPUT_SIZE, check_backbone_name

    _check_ranges(config, MAX_INPUT_SIZE)
    if config.aux_weight and config.freeze_backbone:
        raise UserError(Setting("aux_weight"), " trains the backbone faster; with ", Setting("freeze_backbone"),
                        " it would change nothing")
    if config.objective not in OBJECTIVES:
        raise UserError(Setting("objective"), f" must be one of {', '.join(OBJECTIVES)}, not '{config.objective}'")
    if config.format not in FORMATS:
        raise UserError("unknown ", Setting("format"), f" '{config.format}'; choose one of {', '.join(FORMATS)}")
    if config.freeze_backbone and config.weights is None and not config.pretrained:
        raise UserError(Setting("freeze_backbone"), " needs a trained backbone: give ", Setting("weights"), " (or ",
                        Setting("pretrained"), ")")
    if not Path(config.data).exists():
        raise UserError(f"data path {config.data} does not exist")
    _check_out(config)
    check_backbone_name(config.backbone)


def _check_ranges(config: TrainConfig, max_input_size: int) -> None:
    """Each number within what the run can use. (The code length's upper bound is the catalog's, checked when one
    is built: the model itself takes any number of bits.)"""
    for name, low in (("bits", 1), ("batch_size", 1), ("input_size", 8)):
        value = getattr(config, name)
        if value is not None and value < low:
            raise UserError(Setting(name), f" must be at least {low}, got {value}")
    if config.input_size > max_input_size:
        raise UserError(Setting("input_size"), f" must be at most {max_input_size}, got {config.input_size}")
    for name in ("aux_weight", "clip_grad_norm"):  # 0: off
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(Setting(name), f" must be 0 or more, got {value}")
    for name in ("epochs", "lr", "norm_bias_lr_scale"):
        value = getattr(config, name)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise UserError(Setting(name), f" must be a positive number, got {value}")
    for name, zero_allowed in (("warmup", False), ("val_split", True), ("label_smoothing", True)):
        value = getattr(config, name)
        if not (0 <= value < 1 if zero_allowed else 0 < value < 1):
            raise UserError(Setting(name), f" must be in {'[' if zero_allowed else '('}0, 1), got {value}")


def _check_out(config: TrainConfig) -> None:
    """A run continues the model in `out` only with `resume`, and replaces it only with `overwrite`."""
    out = Path(config.out)
    if config.resume and not (out / CHECKPOINT).is_file():
        raise UserError(Setting("resume"), f": no checkpoint in {out}")
    if config.resume and config.overwrite:
        raise UserError(Setting("resume"), " continues the model in ", Setting("out"), ", ", Setting("overwrite"),
                        " replaces it: give one")
    if not config.resume and not config.overwrite and any((out / f).exists() for f in ("config.json", CHECKPOINT)):
        raise UserError(f"{out} already holds a model; catalogs built from it would stop matching. Give another ",
                        Setting("out"), ", ", Setting("resume"), " to continue it, or ", Setting("overwrite"),
                        " to replace it")


def train(config: TrainConfig, dataset=None) -> dict:
    """Check the arguments, then train (training.loop.run); returns a summary of the run."""
    check_config(config)
    from training.loop import run

    return run(config, dataset)


# ---------------------------------------------------------------- command line
EXAMPLES = """examples:
  python -m training.train --recipe cifar10-48 --data ../shared/data/cifar-10-batches-py --out models/cifar48
  python -m training.train --recipe cifar10-48 --data DIR --out models/cifar48-s1 --seed 1 --epochs 10
  python -m training.train --data photos/ --out models/photos --backbone resnet18 --input-size 64 --epochs 20
  python -m training.train --data photos/ --out models/photos --backbone resnet50 --pretrained --input-size 224
  python -m training.train --data ../shared/data/mnist --out models/mnist --bits 12 --resume
  python -m training.train --data fashion/ --out models/fashion --class-names t-shirt,trouser,pullover,dress,coat,\
sandal,shirt,sneaker,bag,boot
  python -m training.train --data DIR --out models/cifar12 --bits 12 --weights models/cifar48 --freeze-backbone
  torchrun --nproc-per-node 4 -m training.train --data DIR --out MODEL_DIR --device cuda
"""


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig setting."""
    return "--" + name.replace("_", "-")


def setting_flags(settings: dict) -> list[str]:
    """Settings as the flags that give them: `--mirror-average`, `--lr 0.4`."""
    words = []
    for name, value in settings.items():
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            words += [flag(name), f"{value:g}" if isinstance(value, float) else str(value)]
    return words


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The settings of a command line: a --recipe's, then each flag given over them."""
    recipe = argparse.ArgumentParser(prog=program_name("training.train"), add_help=False)
    recipe.add_argument("--recipe", choices=RECIPES)
    name = recipe.parse_known_args(argv)[0].recipe
    parser = argparse.ArgumentParser(prog=program_name("training.train"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig(data="", out="")
    parser.add_argument("--recipe", choices=RECIPES, help="start from named settings; flags given override them. "
                        + "; ".join(f"{key} = {' '.join(setting_flags(RECIPES[key]))}" for key in RECIPES))
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
    parser.add_argument("--alternating-flip", action=argparse.BooleanOptionalAction, default=defaults.alternating_flip,
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
    parser.add_argument("--mirror-average", action=argparse.BooleanOptionalAction, default=defaults.mirror_average,
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
    if name is not None:
        parser.set_defaults(**recipe_settings(name))
    settings = vars(parser.parse_args(argv))
    del settings["recipe"]  # what it stands for is in the settings
    return TrainConfig(**settings)


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

    return run_cli(body, interrupted="interrupted: re-run with --resume to continue from the last finished epoch",
                   describe=flag_worded)


def flag_worded(error: Exception) -> str:
    """An error's message with the settings it names called by their flags."""
    return error.worded(flag) if isinstance(error, UserError) else str(error)


if __name__ == "__main__":
    sys.exit(main())
