"""A stranger's small photo folder (issue 35): enough steps to learn, and a model whose codes cannot tell the
classes apart is named, not saved silently."""
import json
import subprocess
import sys

import numpy as np
import pytest

from engine import build_index as build_index_cli
from engine.build_index import REPORT_FILE, build_index
from engine.synthetic import make_image_folder
from training import schedule
from training.collapse import CodeSpread, code_spread
from training.config import TrainConfig
from training.errors import UserError
from training.schedule import MIN_STEPS, plan_schedule
from training.train import train


def test_four_hundred_photos_get_enough_steps_of_a_batch_they_can_fill():
    """README's command on 400 photos (360 after the validation split) took one step of 256 an epoch, ten in all,
    dropping 104 images each epoch."""
    small = plan_schedule(360)
    assert small.total_steps >= MIN_STEPS and small.steps_per_epoch >= 16
    assert 360 - small.steps_per_epoch * small.batch_size < small.batch_size  # no more than a batch left out
    assert "at least 1000 steps" in small.reason and "batch 16, not 256" in small.reason
    cifar = plan_schedule(50000)  # a large set keeps the recipe: 10 epochs of 256
    assert (cifar.batch_size, cifar.total_steps, cifar.epochs) == (256, 1950, 10)
    assert cifar.reason == "10 epochs (the default)"
    given = plan_schedule(360, batch_size=32, epochs=5)  # what the user asks for is what runs
    assert (given.batch_size, given.total_steps) == (32, 55)
    too_big = plan_schedule(100, batch_size=1024, epochs=3)
    assert too_big.batch_size == 100 and "batch size asked for, 1024, is more than the 100 training images" in too_big.reason
    assert plan_schedule(2 * 360, processes=2).batch_size == small.batch_size  # per process under torchrun


def test_many_short_epochs_are_recorded_a_few_at_a_time():
    tiny = plan_schedule(36)  # 2 steps an epoch: 500 epochs
    assert tiny.epochs == 500 and tiny.record_every == 20
    assert plan_schedule(50000).record_every == 1


def test_a_small_folder_trains_for_the_planned_steps(tmp_path, monkeypatch):
    """The defaults (no --epochs, no --batch-size) on 40 images: the loop runs the planned steps, not 10 steps of
    one batch, and records each few epochs. MIN_STEPS and RECORDS are lowered to keep the test short."""
    monkeypatch.setattr(schedule, "MIN_STEPS", 30)
    monkeypatch.setattr(schedule, "RECORDS", 5)
    make_image_folder(tmp_path / "data", per_class=10, classes=("circle", "square", "triangle", "cross"))
    summary = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "model"),
                                backbone="cifar_convnet_small", bits=16, tta=False, keep_collapsed=True))
    assert (summary["steps"], summary["batch_size"]) == (30, 16)  # 36 training images: 2 steps an epoch
    assert "at least 30 steps" in summary["schedule"]
    records = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [3, 6, 9, 12, 15] and records[-1]["step"] == 30


def test_code_spread_counts_distinct_codes_and_stuck_bits():
    codes = np.packbits(np.array([[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 1], [1, 0, 0, 1]], dtype=np.uint8), axis=1)
    spread = code_spread(codes, 4, ["a", "b", "c", "c"])
    assert (spread.distinct, spread.classes, spread.stuck_bits, spread.bit_ones) == (2, 3, 3, [1, 0, 0.5, 1])
    assert spread.collapsed  # three classes, two codes: two of the classes share one
    assert not code_spread(codes, 4, ["a", "b", "a", "b"]).collapsed
    assert code_spread(codes[:1].repeat(5, 0), 4).collapsed  # unlabeled: one code for all
    assert code_spread(codes, 4, ["a", None, "a", "b"]).classes is None
    assert "2 distinct codes among 4 images of 3 classes, 3 of 4 bits" in spread.describe()


def _untrained(folder, out, **options) -> dict:
    """A run whose steps cannot move the weights (gradients clipped to nothing): the latent layer keeps its
    initial state, every unit on, so every image gets the same code, as ten steps left 400 photos."""
    return train(TrainConfig(data=str(folder), out=str(out), backbone="cifar_convnet_small", bits=16, epochs=1,
                             batch_size=32, tta=False, val_split=0.2, clip_grad_norm=1e-12, **options))


def test_training_refuses_collapsed_codes_and_leaves_nothing(image_folder, tmp_path):
    with pytest.raises(UserError, match=r"cannot tell the classes apart: 1 distinct code among 48 images of 10 "
                                        r"classes, 16 of 16 bits .*pretrained.*keep_collapsed"):
        _untrained(image_folder, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        _untrained(image_folder, kept)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]  # a folder that was there keeps only what it had
    summary = _untrained(image_folder, kept, keep_collapsed=True)
    assert summary["codes"]["distinct"] == 1 and summary["codes"]["images_from"] == "validation"
    assert (kept / "model.safetensors").is_file()


def test_collapsed_training_is_one_line_and_a_non_zero_exit(image_folder, tmp_path, cli_env):
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "training.train", "--data", str(image_folder), "--out", str(out),
                             "--backbone", "cifar_convnet_small", "--bits", "16", "--epochs", "1", "--batch-size",
                             "32", "--clip-grad-norm", "1e-12", "--no-tta"], capture_output=True, text=True,
                            env=cli_env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 distinct code among" in errors[0] and "--keep-collapsed" in errors[0]
    assert not out.exists()


def test_build_index_reports_codes_that_tell_nothing_apart(image_folder, trained_model, tmp_path, capsys):
    model = tmp_path / "collapsed"
    _untrained(image_folder, model, keep_collapsed=True)
    assert build_index_cli.main([str(image_folder), "--model", str(model), "--catalog", str(tmp_path / "c"),
                                 "--shards", "1", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: the codes cannot tell these images apart (1 distinct code among 240 images of 10 classes" in err
    report = json.loads((tmp_path / "c" / REPORT_FILE).read_text())
    assert report["codes"]["distinct"] == 1 and report["codes"]["stuck_bits"] == 16
    good = build_index(image_folder, trained_model, tmp_path / "good", shards=1, workers=0, progress=False)
    assert good.codes["distinct"] >= 10 and not CodeSpread(**good.codes).collapsed
