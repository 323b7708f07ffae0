"""benchmarks/seed_spread.py: the verdict "loss falls every epoch" and the per-variant summary it prints."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from seed_spread import first_rise, recipe_flags, report  # noqa: E402

# Train losses recorded on an H200 at lr 0.75 (benchmarks/results/seed_spread_h200_lr0.75.json): bf16 seeds 1, 3.
SPIKED = [1.984, 1.478, 1.297, 1.219, 1.461, 1.209, 1.158, 1.118, 1.085, 1.048, 1.014, 0.988]
FALLING = [1.980, 1.472, 1.287, 1.251, 1.188, 1.150, 1.117, 1.089, 1.049, 1.017, 0.986, 0.962]


def test_first_rise_names_the_epoch_and_the_losses():
    assert first_rise(SPIKED) == "5: 1.219 -> 1.461"
    assert first_rise(FALLING) == ""
    assert first_rise([1.0, 1.0]) == "2: 1.000 -> 1.000"  # flat is not falling
    assert first_rise([2.0]) == ""


def test_report_summarises_each_variant(tmp_path):
    runs = {("base", 1): (SPIKED, 0.9155, 0.9230), ("base", 2): (FALLING, 0.9271, 0.9336),
            ("low", 1): (FALLING, 0.9275, 0.9321)}
    for (variant, seed), (losses, map_, tta) in runs.items():
        run = tmp_path / variant / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "score.json").write_text(json.dumps(dict(
            losses=losses, loss_rise=first_rise(losses), val_acc=tta - 0.01, val_acc_tta=tta, map=map_,
            two_stage_map=map_ + 0.002, train_seconds=10.0, encode_seconds=1.0, device="test")))
    (tmp_path / "stopped" / "seed1").mkdir(parents=True)  # a run stopped at the deadline has no score
    text = report(tmp_path)
    assert "| base | 1 | no: epoch 5: 1.219 -> 1.461 |" in text
    assert "| base | 2 | 1 of 2 | 0.9213 (0.9155-0.9271) |" in text
    assert "| low | 1 | 1 of 1 | 0.9275 (0.9275-0.9275) |" in text
    rows = json.loads((tmp_path / "seed_spread.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [("base", 1), ("base", 2), ("low", 1)]


def test_report_without_tta(tmp_path):
    """A recipe with --no-tta records no TTA accuracy: the table says '-' instead of failing."""
    run = tmp_path / "notta" / "seed1"
    run.mkdir(parents=True)
    (run / "score.json").write_text(json.dumps(dict(
        losses=FALLING, loss_rise="", val_acc=0.92, val_acc_tta=None, map=0.925, two_stage_map=0.927,
        train_seconds=10.0, encode_seconds=1.0, device="test")))
    text = report(tmp_path)
    assert "| notta | 1 | yes | 0.9200 (-) | 0.9250 (0.9270) | 10 |" in text
    assert "| notta | 1 | 1 of 1 | 0.9250 (0.9250-0.9250) | - |" in text


def test_the_default_recipe_is_training_s_named_recipe():
    """Each run gets `--recipe cifar10-48` (README's command, training/recipes.py), not a copy of its flags; flags
    given as one argument still work."""
    assert recipe_flags("cifar10-48") == ["--recipe", "cifar10-48"]
    assert recipe_flags("--bits 12 --lr 0.4") == ["--bits", "12", "--lr", "0.4"]
    with pytest.raises(argparse.ArgumentTypeError, match="neither a recipe"):
        recipe_flags("cifar10-4")
