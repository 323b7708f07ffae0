"""How long a run trains: a schedule sized by optimizer steps, not by epochs alone.

Ten epochs of batch 256 are ~1,950 steps on CIFAR-10, but one step an epoch on a folder of 400 photos: ten
steps in all, after which every image got the same code (issue 35). So by default a batch gives an epoch at
least MIN_STEPS_PER_EPOCH steps, and a run takes at least MIN_STEPS steps however many epochs that makes; a
large set keeps the recipe (10 epochs of 256). A number of epochs or a batch size asked for is followed as
asked, except that a batch is never larger than the training set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 10.0
DEFAULT_BATCH_SIZE = 256
# Enough steps for a small folder trained from scratch to give codes that tell its classes apart (evidence:
# benchmarks/RESULTS.md, "Small photo folders (issue 35)"); a large set runs more steps than this anyway.
MIN_STEPS = 1000
MIN_STEPS_PER_EPOCH = 16
SMALLEST_DEFAULT_BATCH = 16  # BatchNorm's statistics need a few images a batch
RECORDS = 25  # a run of more epochs evaluates and checkpoints every few epochs, ~this many times in all


@dataclass(frozen=True)
class Schedule:
    batch_size: int  # images a step, per process
    steps_per_epoch: int
    total_steps: int
    reason: str  # why this many steps of this batch, for the user

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def record_every(self) -> int:
        """Epochs between evaluations and checkpoints: each epoch up to RECORDS epochs. A small set's epoch is a
        step or a few, and evaluating and writing a checkpoint after each would cost more than the training."""
        return math.ceil(self.epochs / RECORDS)

    def describe(self, train_images: int) -> str:
        every = f", recorded every {self.record_every}" if self.record_every > 1 else ""
        return (f"{self.total_steps} steps of batch {self.batch_size} ({self.steps_per_epoch} an epoch over "
                f"{train_images} training images, {self.epochs} epochs{every}): {self.reason}")


def default_batch_size(images_per_process: int) -> int:
    """256, or the largest power of two that leaves an epoch MIN_STEPS_PER_EPOCH steps (at least 16)."""
    fitting = max(1, images_per_process // MIN_STEPS_PER_EPOCH)
    return min(DEFAULT_BATCH_SIZE, max(SMALLEST_DEFAULT_BATCH, 2 ** int(math.log2(fitting))))


def plan_schedule(train_images: int, batch_size: int | None = None, epochs: float | None = None,
                  processes: int = 1) -> Schedule:
    """The batch and step count of a run over `train_images` images; None = the defaults sized for the data."""
    per_process = max(1, train_images // processes)
    batch = default_batch_size(per_process) if batch_size is None else batch_size
    reasons = []
    if batch > per_process:
        given = f"the batch size asked for, {batch}," if batch_size is not None else "the smallest default batch"
        reasons.append(f"batch {per_process}: {given} is more than the {per_process} training images"
                       + (" of a process" if processes > 1 else ""))
        batch = per_process
    elif batch_size is None and batch < DEFAULT_BATCH_SIZE:
        reasons.append(f"batch {batch}, not {DEFAULT_BATCH_SIZE}: {per_process // batch} steps an epoch, not "
                       f"{max(1, per_process // DEFAULT_BATCH_SIZE)}")
    steps_per_epoch = max(1, train_images // (batch * processes))
    if epochs is not None:
        total_steps = max(1, math.ceil(epochs * steps_per_epoch))
        reasons.insert(0, f"{epochs:g} epochs, as asked")
    else:
        by_epochs = math.ceil(DEFAULT_EPOCHS * steps_per_epoch)
        total_steps = max(by_epochs, MIN_STEPS)
        reasons.insert(0, f"{DEFAULT_EPOCHS:g} epochs (the default)" if by_epochs >= MIN_STEPS else
                       f"at least {MIN_STEPS} steps, however many epochs that takes: a small set learns little "
                       f"in {DEFAULT_EPOCHS:g} epochs (a number of epochs asked for sets the length)")
    return Schedule(batch, steps_per_epoch, total_steps, "; ".join(reasons))
