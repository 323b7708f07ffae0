"""The training loop behind `python -m training.train`, readable top to bottom: devices, augmentation, the
learning-rate schedule, the loss, the optimizer, checkpoints, then `run` and its steps (prepare, an epoch, a
step, a record, the finish).

It follows airbench94 (Keller Jordan): whole-batch tensor augmentation of in-memory uint8 images, Nesterov SGD
with a triangular learning-rate schedule, BatchNorm biases at a higher rate, and Lookahead weight averaging.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from training.cnnh import cnnh_target_codes
from training.collapse import code_spread
from training.config import (CHECKPOINT, CHECKPOINT_STATE, TRAIN_CONFIG, TrainConfig, read_train_config,
                             save_train_config)
from training.data import Dataset, LabeledImages, load_dataset
from training.errors import Setting, UserError
from training.files import atomic_write, removed_on
from training.model import HashingNet, create_backbone, hashing_net, pick_device, save_model
from training.schedule import Schedule, plan_schedule

# ---------------------------------------------------------------- devices and distributed runs
def has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs that compute in bf16 natively. Elsewhere oneDNN emulates it, many times slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def use_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast by default on GPUs and on CPUs with native bf16; `amp` "on" or "off" decides otherwise.

    bf16 trains as well as fp32 and several times faster where the hardware computes it; where it is emulated
    (AVX2-only CPUs) it is many times slower, so there fp32 stays (benchmarks/RESULTS.md, "Why the training
    defaults are what they are").
    """
    if amp != "auto":
        return amp == "on"
    return device.type == "cuda" or (device.type == "cpu" and has_native_bf16())


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation rather than hand it back to the kernel.

    A CPU training step allocates and frees activations of ~100 MB each; glibc maps blocks that large afresh each
    time, and faulting their pages in again cost 10-27 % of a step (RESULTS.md, issue 16). Process-wide, for the
    rest of the process. Returns whether it took effect (False off glibc, e.g. on macOS).
    """
    if platform.libc_ver()[0] != "glibc":  # Linux with glibc only; macOS and musl answer otherwise
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) under torchrun; (0, 1, device) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return torch.distributed.get_rank(), world_size, device


# ---------------------------------------------------------------- augmentation, schedule, evaluation
def mirrored(index: torch.Tensor, epoch: int, generator: torch.Generator,
             first_epoch: torch.Tensor | None = None) -> torch.Tensor:
    """Which images of a batch (their dataset `index`) to mirror: half at random, or with `first_epoch` (a mask
    over the dataset) airbench's alternating flip, each image mirrored in every other epoch."""
    if first_epoch is not None:
        return first_epoch[index] ^ bool(epoch % 2)
    return torch.rand(len(index), generator=generator, device=index.device) < 0.5


def augment(images: torch.Tensor, translate: int, mirror: torch.Tensor | None,
            generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip of the `mirror` images and random translation (reflect-padded crop) of a whole uint8 batch."""
    if mirror is not None:
        images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)
    if translate:
        n, _, h, w = images.shape
        padded = F.pad(images.float(), (translate,) * 4, mode="reflect").to(images.dtype)
        dx, dy = (torch.randint(0, 2 * translate + 1, (2, n), generator=generator, device=images.device))
        rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch, channel, rows, cols]
    return images


def lr_factor(step: int, total_steps: int, warmup: float) -> float:
    """Triangular schedule: 0.2 -> 1 over the first `warmup` fraction of steps, then down to 0.07."""
    warmup_steps = max(1, int(total_steps * warmup))
    if step < warmup_steps:
        return 0.2 + 0.8 * step / warmup_steps
    return 1.0 - 0.93 * (step - warmup_steps) / max(1, total_steps - warmup_steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, device: torch.device, bf16: bool, tta: bool = False,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy; with `tta`, logits averaged over the image, its mirror and 1-px shifts (airbench)."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        images = data.images[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images).float()
            if tta:
                logits = 0.5 * logits + 0.5 * model(images.flip(-1)).float()
                padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(images.dtype)
                shifted = model(padded[..., :-2, :-2]).float() + model(padded[..., 2:, 2:]).float()
                logits = 0.5 * logits + 0.25 * shifted
        correct += (logits.argmax(1).cpu() == data.labels[start:start + batch_size]).sum().item()
    return correct / max(1, len(data))


def hashing_loss(objective: str, latent: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 target_bits: torch.Tensor | None, label_smoothing: float, auxiliary: torch.Tensor | None = None,
                 aux_weight: float = 0.0) -> torch.Tensor:
    """latent: the paper's cross-entropy on the classes, codes emerge in the latent layer. cnnh: binary
    cross-entropy of each latent unit against stage 1's target bit. cnnh+: both, as CNNH+ adds class outputs.
    `auxiliary` logits (from the features, past the latent layer) add their cross-entropy times `aux_weight`."""
    loss = torch.zeros((), device=logits.device)
    if objective != "cnnh":
        loss = loss + F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if objective != "latent":
        loss = loss + F.binary_cross_entropy_with_logits(latent.float(), target_bits)
    if auxiliary is not None:
        loss = loss + aux_weight * F.cross_entropy(auxiliary.float(), labels, label_smoothing=label_smoothing)
    return loss


SATURATED = 6.0  # |latent pre-activation| past which the sigmoid's slope is under 1% of its peak


def saturated_share(pre_activation: torch.Tensor) -> float:
    """The share of latent units whose sigmoid passes almost no gradient: the sign the codes stopped learning."""
    return (pre_activation.detach().abs() > SATURATED).float().mean().item()


BN_STATISTICS_IMAGES = 5000  # training images BatchNorm's statistics are recomputed on before each evaluation


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, images: torch.Tensor, batch_size: int, bf16: bool = False) -> None:
    """BatchNorm's running statistics as exact averages over `images` (un-augmented, in batches of the
    training size) for the weights as they are now. The running averages training leaves behind (momentum 0.4:
    the last few batches, while the weights move at the peak learning rate) cost up to 22 points of test
    accuracy mid-run (RESULTS.md, issue 16); training itself never reads them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: every batch below counts the same
    model.train()
    for start in range(0, len(images), batch_size):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(images[start:start + batch_size].contiguous(memory_format=torch.channels_last))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def set_train_mode(model: HashingNet, freeze_backbone: bool) -> None:
    """A frozen backbone stays in eval mode: its BatchNorm statistics are part of what it learned."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()


# ---------------------------------------------------------------- optimizer and checkpoints
def make_optimizer(model: HashingNet, config: TrainConfig, batch_size: int) -> torch.optim.SGD:
    """Nesterov SGD at `config.lr` scaled to `batch_size`; the biases of normalisation layers learn
    `norm_bias_lr_scale` x faster (same decay/step)."""
    scale = batch_size / 1024
    lr, decay = config.lr * scale, config.weight_decay
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, norm_types) and m.bias is not None}
    trainable = [p for p in model.parameters() if p.requires_grad]
    biases = [p for p in trainable if id(p) in norm_biases]
    others = [p for p in trainable if id(p) not in norm_biases]
    bias_lr = lr * config.norm_bias_lr_scale
    groups = [dict(params=others, lr=lr, weight_decay=decay, base_lr=lr)]
    if biases:
        groups.append(dict(params=biases, lr=bias_lr, weight_decay=decay / config.norm_bias_lr_scale,
                           base_lr=bias_lr))
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)


def save_checkpoint(out: Path, model: HashingNet, optimizer: torch.optim.Optimizer,
                    lookahead: dict[str, torch.Tensor] | None, epoch: int, step: int, history: list) -> None:
    """Weights, momentum buffers and Lookahead state as safetensors, counters as JSON; both written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
    for key, value in (lookahead or {}).items():
        tensors[f"lookahead.{key}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(out / CHECKPOINT, lambda p: save_file(tensors, str(p)))
    state = dict(epoch=epoch, step=step, history=history)
    atomic_write(out / CHECKPOINT_STATE, lambda p: p.write_text(json.dumps(state)))


# Settings a resumed run may change: where things are and how fast they run, not the schedule, data order or model.
RESUMABLE_CHANGES = frozenset({"data", "out", "resume", "overwrite", "device", "amp", "tta", "keep_collapsed"})


def check_resumed_settings(out: Path, config: TrainConfig) -> None:
    """A resumed run must follow the trajectory the run started on (issue 16): other epochs, lr or seed would
    bend its schedule or batches midway."""
    started = read_train_config(out)
    if started is None:
        return  # load_checkpoint says what is missing
    changed: list[str | Setting] = []
    for name, value in asdict(config).items():
        if name not in RESUMABLE_CHANGES and getattr(started, name) != value:
            changed += [", " if changed else "", Setting(name), f" {getattr(started, name)} (now {value})"]
    if changed:
        raise UserError(f"cannot resume from {out}: it started with ", *changed, "; resume with the settings the "
                        f"run started with ({out / TRAIN_CONFIG})")


def load_checkpoint(out: Path, model: HashingNet, optimizer: torch.optim.Optimizer,
                    lookahead: dict[str, torch.Tensor] | None) -> dict:
    try:
        tensors = load_file(str(out / CHECKPOINT))
        state = json.loads((out / CHECKPOINT_STATE).read_text())
    except (OSError, json.JSONDecodeError, Exception) as error:
        raise UserError(f"cannot resume from {out}: {error}") from error
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as error:  # another backbone, bits or aux_weight than the run started with
        detail = (str(error).splitlines()[1] if "\n" in str(error) else str(error)).strip().rstrip(".")
        raise UserError(f"cannot resume from {out}: its checkpoint does not fit the model these settings make "
                        f"({detail}); resume with the settings the run started with ({out / TRAIN_CONFIG})") \
            from error
    optimizer_state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value.to(device)
    optimizer.load_state_dict(optimizer_state)
    for key in lookahead or {}:
        lookahead[key].copy_(tensors[f"lookahead.{key}"])
    return state


# ---------------------------------------------------------------- the run
def run(config: TrainConfig, dataset: Dataset | None = None) -> dict:
    """Train, checkpointing each recorded epoch; writes the model directory and returns a summary of the run. The
    arguments were checked by `training.train.check_config`. A run refused on the way (its codes collapsed, say)
    leaves nothing in `out` that it made."""
    device = pick_device(config.device)
    rank, world_size, device = init_distributed(device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    out = Path(config.out)
    if config.resume:
        check_resumed_settings(out, config)
    # Before any image is decoded: a bad weights file or pretrained weights offline cost seconds, not a dataset
    backbone = create_backbone(config.backbone, config.pretrained, config.weights)
    if dataset is None:
        dataset = load_dataset(config.data, config.format, config.input_size, config.val_split, config.seed,
                               config.class_names)
    if config.mirror_average and not dataset.mirror_invariant:
        raise UserError(Setting("mirror_average"), ": a horizontal flip changes what these images mean (digits)")
    with removed_on(UserError, out):
        return _train(config, dataset, backbone, out, device, rank, world_size)


@dataclass
class TrainingRun:
    """What every step of a run reads: the model and its optimizer, the data on the device, the schedule."""

    config: TrainConfig
    dataset: Dataset
    out: Path
    model: HashingNet
    trained: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.SGD
    lookahead: dict[str, torch.Tensor] | None
    schedule: Schedule
    images: torch.Tensor  # the training images and labels, on the device
    labels: torch.Tensor
    target_bits: torch.Tensor | None  # cnnh, cnnh+: each training image's target code
    first_epoch_flips: torch.Tensor | None  # alternating flips: the images mirrored in even epochs
    bf16: bool
    rank: int
    world_size: int
    start_epoch: int  # a resumed run's first epoch; steps taken and epochs recorded so far
    step: int
    history: list[dict]

    @property
    def classes_trained(self) -> bool:
        return self.config.objective != "cnnh"  # pure CNNH leaves the classifier untrained

    @property
    def flip(self) -> bool:
        return self.config.flip and self.dataset.mirror_invariant


@dataclass
class Window:
    """Training counts since the last record (a small set's epochs are recorded a few at a time)."""

    start: float = field(default_factory=time.perf_counter)
    seen: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0  # right classes, or with cnnh the share of target bits hit
    saturated: float = 0.0


def _train(config: TrainConfig, dataset: Dataset, backbone: nn.Module, out: Path, device: torch.device, rank: int,
           world_size: int) -> dict:
    """The run itself, on a built backbone and a loaded dataset: what it writes goes into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        report_skipped(dataset.skipped, out)
    job = prepare_run(config, dataset, backbone, out, device, rank, world_size)
    if rank == 0:
        tqdm.write(f"training {job.schedule.describe(len(dataset.train))}")
        save_train_config(config, out)
        # From the checkpoint's history: an epoch logged after the last checkpoint is not counted twice.
        (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in job.history))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    started = time.perf_counter() - (job.history[-1]["elapsed_seconds"] if job.history else 0.0)  # resumed: counts on
    window = Window()
    for epoch in range(job.start_epoch, job.schedule.epochs):
        train_epoch(job, epoch, generator, window)
        if (epoch + 1) % job.schedule.record_every and epoch + 1 < job.schedule.epochs:
            continue
        if not config.freeze_backbone:  # a frozen backbone keeps the statistics it came with
            recompute_batchnorm_statistics(job.model, job.images[:BN_STATISTICS_IMAGES], job.schedule.batch_size,
                                           job.bf16)
        if rank == 0:
            record_epoch(job, epoch, window, started)
        window = Window()
    return finish(job, started)


def prepare_run(config: TrainConfig, dataset: Dataset, backbone: nn.Module, out: Path, device: torch.device,
                rank: int, world_size: int) -> TrainingRun:
    """The hashing network on `backbone`, its optimizer and schedule, and the training data on the device; a
    resumed run's state from its checkpoint."""
    model = hashing_net(backbone, config.backbone, config.bits, dataset.class_names, dataset.train.images.shape[-1])
    model = model.to(device)
    model.config.extra["objective"] = config.objective
    model.config.mirror_average = config.mirror_average
    model.backbone.requires_grad_(not config.freeze_backbone)  # frozen: no backbone graph, ~3x cheaper steps
    if config.aux_weight:
        model.auxiliary = nn.Linear(model.config.feature_dim, len(dataset.class_names), bias=False).to(device)
    target_bits = None
    if config.objective != "latent":
        target_bits = torch.from_numpy(cnnh_target_codes(dataset.train.labels.numpy(), config.bits,
                                                         seed=config.seed)).float().to(device)
    first_epoch_flips = None
    if config.flip and dataset.mirror_invariant and config.alternating_flip:  # fixed by the seed
        seeded = torch.Generator(device=device).manual_seed(config.seed)
        first_epoch_flips = torch.rand(len(dataset.train), generator=seeded, device=device) < 0.5
    images, labels = dataset.train.images.to(device), dataset.train.labels.to(device)
    if hasattr(model.backbone, "init_whitening") and not config.resume and config.weights is None:
        model.backbone.init_whitening(model.normalize(images[:5000]))
    model = model.to(memory_format=torch.channels_last)
    schedule = plan_schedule(len(dataset.train), config.batch_size, config.epochs, world_size)
    optimizer = make_optimizer(model, config, schedule.batch_size)
    lookahead = {k: v.clone() for k, v in model.state_dict().items()} if config.lookahead else None
    saved = load_checkpoint(out, model, optimizer, lookahead) if config.resume else dict(epoch=0, step=0, history=[])
    trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=config.objective == "cnnh") \
        if world_size > 1 else model
    return TrainingRun(config, dataset, out, model, trained, optimizer, lookahead, schedule, images, labels, target_bits,
               first_epoch_flips, use_bf16(config.amp, device), rank, world_size, saved["epoch"], saved["step"],
               saved["history"])


def train_epoch(job: TrainingRun, epoch: int, generator: torch.Generator, window: Window) -> None:
    """One pass over this process's share of the training set (or what is left of the planned steps)."""
    config, schedule, batch_size = job.config, job.schedule, job.schedule.batch_size
    generator.manual_seed(config.seed * 1000 + epoch)  # per-epoch seed: a resumed run sees the same batches
    order = torch.randperm(len(job.images), generator=generator, device=job.images.device)
    order = order[job.rank * batch_size * schedule.steps_per_epoch:][:batch_size * schedule.steps_per_epoch]
    epoch_start, epoch_seen = time.perf_counter(), window.seen
    set_train_mode(job.model, config.freeze_backbone)
    bar = tqdm(range(schedule.steps_per_epoch), desc=f"epoch {epoch + 1}/{schedule.epochs}", disable=job.rank != 0,
               leave=False)
    for batch_index in bar:
        if job.step >= schedule.total_steps:
            break
        index = order[batch_index * batch_size:(batch_index + 1) * batch_size]
        train_step(job, index, epoch, generator, window)
        rate = (window.seen - epoch_seen) * job.world_size / (time.perf_counter() - epoch_start)
        bar.set_postfix(loss=f"{window.loss_sum / window.seen:.3f}", acc=f"{window.correct / window.seen:.3f}",
                        img_s=f"{rate:.0f}")
    if job.lookahead is not None and job.step >= schedule.total_steps:
        _lookahead_update(job.model, job.lookahead, 1.0)  # finish on the averaged weights


def train_step(job: TrainingRun, index: torch.Tensor, epoch: int, generator: torch.Generator, window: Window) -> None:
    """One optimizer step on the training images at `index`, counted in `window`."""
    config, total_steps = job.config, job.schedule.total_steps
    mirror = mirrored(index, epoch, generator, job.first_epoch_flips) if job.flip else None
    images = augment(job.images[index], config.translate, mirror, generator)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = job.labels[index]
    for group in job.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(job.step, total_steps, config.warmup)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=job.bf16):
        latent, logits, auxiliary = job.trained(images, with_latent=True)
    targets = job.target_bits[index] if job.target_bits is not None else None
    loss = hashing_loss(config.objective, latent, logits, labels, targets, config.label_smoothing, auxiliary,
                        config.aux_weight)
    job.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad_norm:
        nn.utils.clip_grad_norm_(job.model.parameters(), config.clip_grad_norm)
    job.optimizer.step()
    job.step += 1
    if job.lookahead is not None and job.step % 5 == 0:
        _lookahead_update(job.model, job.lookahead, 0.95 ** 5 * (job.step / total_steps) ** 3)
    window.seen += len(labels)
    window.loss_sum += loss.item() * len(labels)
    window.saturated += saturated_share(latent) * len(labels)
    if job.classes_trained:
        window.correct += (logits.argmax(1) == labels).sum().item()
    else:  # the fraction of target bits hit
        window.correct += ((latent > 0) == (targets > 0.5)).float().mean(1).sum().item()


def record_epoch(job: TrainingRun, epoch: int, window: Window, started: float) -> None:
    """Evaluate, log and checkpoint after `epoch` (process 0 only)."""
    train_seconds = time.perf_counter() - window.start
    seen = max(1, window.seen)
    device = job.images.device
    has_validation = job.dataset.test is not None and job.classes_trained
    val_acc = evaluate(job.model, job.dataset.test, device, job.bf16) if has_validation else None
    record = dict(epoch=epoch + 1, step=job.step, train_loss=window.loss_sum / seen, train_acc=window.correct / seen,
                  val_acc=val_acc, latent_saturated=window.saturated / seen,
                  epoch_seconds=round(train_seconds, 2),  # since the last record (schedule.record_every)
                  images_per_second=round(window.seen * job.world_size / train_seconds, 1),
                  elapsed_seconds=round(time.perf_counter() - started, 2))
    job.history.append(record)
    if record["latent_saturated"] > 0.25:
        tqdm.write(f"warning: {record['latent_saturated']:.0%} of the latent layer's outputs are saturated (the "
                   "sigmoid's slope below 1% of its peak): the codes have stopped learning; lower the learning rate")
    with open(job.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    val_text = f"val acc {val_acc:.4f}" if val_acc is not None else \
        "no validation set" if job.classes_trained else "no class outputs (cnnh)"
    tqdm.write(f"epoch {epoch + 1}/{job.schedule.epochs}: loss {record['train_loss']:.4f}, train "
               f"{'acc' if job.classes_trained else 'target-bit acc'} {record['train_acc']:.4f}, {val_text}, "
               f"{record['images_per_second']:.0f} img/s")
    save_checkpoint(job.out, job.model, job.optimizer, job.lookahead, epoch + 1, job.step, job.history)


def finish(job: TrainingRun, started: float) -> dict:
    """The summary of the run; process 0 scores the codes, saves the model and writes summary.json."""
    dataset, config, schedule = job.dataset, job.config, job.schedule
    summary = dict(epochs=schedule.epochs, steps=job.step, batch_size=schedule.batch_size, schedule=schedule.reason,
                   seconds=round(time.perf_counter() - started, 1), history=job.history)
    if job.rank == 0:
        if dataset.test is not None and job.classes_trained:
            summary["val_acc"] = job.history[-1]["val_acc"] if job.history else None
            if config.tta:
                summary["val_acc_tta"] = evaluate(job.model, dataset.test, job.images.device, job.bf16,
                                                  tta=dataset.mirror_invariant)
        summary["codes"] = check_codes(job.model, dataset, config.keep_collapsed)
        summary["fingerprint"] = save_model(job.model, job.out)
        (job.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if job.world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


CODE_CHECK_IMAGES = 1000  # held-out images whose codes are counted after training


@torch.no_grad()
def check_codes(model: HashingNet, dataset: Dataset, keep_collapsed: bool, batch_size: int = 250) -> dict:
    """Distinct codes and stuck bits of the validation images (training images without them), as the summary
    records them. Codes that cannot tell the classes apart (issue 35: ten steps gave 400 photos one code) refuse
    the model unless it is kept on purpose."""
    held_out = dataset.test is not None
    data = dataset.test if held_out else dataset.train
    images = data.images[:CODE_CHECK_IMAGES]
    codes = np.concatenate([model.eval().encode(images[start:start + batch_size])[0]
                            for start in range(0, len(images), batch_size)])
    spread = code_spread(codes, model.config.bits, data.labels[:CODE_CHECK_IMAGES].numpy())
    where = "validation images" if held_out else "training images (no validation set)"
    if spread.collapsed:
        text = f"the codes cannot tell the classes apart: {spread.describe()} ({where})"
        if not keep_collapsed:
            raise UserError(f"{text}. Train longer (", Setting("epochs"), "), start from trained weights (",
                            Setting("pretrained"), " or ", Setting("weights"), "), or keep the model anyway with ",
                            Setting("keep_collapsed"))
        tqdm.write(f"warning: {text}; kept, as asked")
    elif spread.mostly_stuck:
        tqdm.write(f"note: {spread.stuck_bits} of {spread.bits} bits are the same on all {spread.images} {where}: "
                   "they tell no images apart; a shorter code would do, or longer training")
    return dict(asdict(spread), images_from="validation" if held_out else "training")


SKIPPED_FILE = "skipped-files.json"


def report_skipped(skipped: list[dict], out: Path) -> None:
    """Images that did not decode are named (the first few) and listed in full in the model folder."""
    (out / SKIPPED_FILE).unlink(missing_ok=True)
    if not skipped:
        return
    atomic_write(out / SKIPPED_FILE, lambda p: p.write_text(json.dumps(skipped, indent=2) + "\n"))
    names = ", ".join(Path(s["path"]).name for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    tqdm.write(f"skipped {len(skipped)} images that did not decode ({names}); all are listed in "
               f"{out / SKIPPED_FILE}")


@torch.no_grad()
def _lookahead_update(model: nn.Module, averaged: dict[str, torch.Tensor], decay: float) -> None:
    """Lookahead: pull the averaged weights towards the live ones, then restart from the average."""
    for key, live in model.state_dict().items():
        if live.dtype.is_floating_point:
            averaged[key].lerp_(live, 1 - decay)
            live.copy_(averaged[key])
