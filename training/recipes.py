"""Named training recipes: settings that go together, kept as code (as airbench keeps its `hyp`) so that the
README, `--help` and the benchmarks name a recipe instead of copying its flags. Light: no torch."""
from __future__ import annotations

from typing import Any

from training.config import TrainConfig
from training.errors import UserError

# The settings a recipe sets; everything else keeps TrainConfig's default. What each setting does: TrainConfig's
# comments; the evidence: benchmarks/RESULTS.md, "Why the training defaults are what they are".
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10-48": dict(backbone="cifar_convnet", bits=48, epochs=15.0, batch_size=1024, label_smoothing=0.2,
                       mirror_average=True, aux_weight=1.0, lr=0.4, warmup=0.14, alternating_flip=True,
                       clip_grad_norm=1.0),
}


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings of recipe `name`."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def recipe_config(name: str, data: str, out: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig of recipe `name`, with `overrides` (any TrainConfig field) taking precedence."""
    return TrainConfig(data=data, out=out, **(recipe_settings(name) | overrides))
