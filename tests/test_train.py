import ast
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training
from engine.metrics import retrieval_metrics
from engine.synthetic import make_image_folder
from training.cnnh import cnnh_target_codes
from training.config import (CHECKPOINT, CHECKPOINT_STATE, TRAIN_CONFIG, TrainConfig, read_train_config,
                             save_train_config)
from training.data import load_dataset
from training.errors import UserError
from training.files import atomic_write
from training.loop import evaluate, lr_factor, mirrored, recompute_batchnorm_statistics, use_bf16
from training.model import load_model
from training.recipes import recipe_config
from training.train import flag_worded, parse_args, train


def test_training_lowers_loss_and_beats_chance(trained_model):
    history = [json.loads(line) for line in (trained_model / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 8
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.6  # ten classes: chance is 0.1
    assert (trained_model / "model.safetensors").is_file() and (trained_model / "config.json").is_file()


def test_saved_model_reproduces_validation_accuracy(trained_model, image_folder):
    model = load_model(trained_model)
    data = load_dataset(image_folder, val_split=0.2, seed=0)
    history = [json.loads(line) for line in (trained_model / "metrics.jsonl").read_text().splitlines()]
    assert evaluate(model, data.test, torch.device("cpu"), bf16=False) == pytest.approx(history[-1]["val_acc"])


def test_frozen_backbone_trains_another_code_length(trained_model, image_folder, tmp_path):
    """--freeze-backbone: a new latent layer and classifier learn on the trained backbone, which stays as it was
    (BatchNorm statistics included)."""
    out = tmp_path / "bits8"
    summary = train(TrainConfig(data=str(image_folder), out=str(out), backbone="cifar_convnet_small", bits=8,
                                epochs=4, batch_size=32, lr=8.0, val_split=0.2, tta=False,
                                weights=str(trained_model), freeze_backbone=True, mirror_average=True))
    assert summary["val_acc"] > 0.6
    before, after = load_file(str(trained_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    backbone = [key for key in after if key.startswith("backbone.")]
    assert backbone and all(torch.equal(before[key], after[key]) for key in backbone)
    assert after["latent.weight"].shape == (8, before["latent.weight"].shape[1])
    images = load_dataset(image_folder, val_split=0.2, seed=0).test.images
    model = load_model(out)  # --mirror-average is kept with the model: its codes cannot see a flip
    assert model.config.mirror_average
    assert np.array_equal(model.encode(images)[0], model.encode(images.flip(-1))[0])


def test_mirror_average_is_refused_where_a_flip_changes_the_meaning(tmp_path, image_folder):
    digits = dataclasses.replace(load_dataset(image_folder, val_split=0.2, seed=0), mirror_invariant=False)
    with pytest.raises(UserError, match="mirror_average"):
        train(TrainConfig(data=str(image_folder), out=str(tmp_path / "m"), backbone="cifar_convnet_small",
                          mirror_average=True), dataset=digits)


@pytest.mark.parametrize("extra", [[], ["--aux-weight", "1", "--alternating-flip", "--warmup", "0.14",
                                         "--clip-grad-norm", "1"]],
                         ids=["paper", "training-aids"])
def test_killed_run_resumes_to_the_same_model(extra, tmp_path, image_folder, cli_env):
    """With --aux-weight the auxiliary classifier is in the checkpoint (a resumed run needs it) but not the model;
    with --alternating-flip a resumed run mirrors the images the uninterrupted one did."""
    args = ["--data", str(image_folder), "--backbone", "cifar_convnet_small", "--bits", "12", "--batch-size", "32",
            "--epochs", "6", "--no-tta", "--val-split", "0.2", *extra]
    full = tmp_path / "full"
    assert _run(args + ["--out", str(full)], cli_env).returncode == 0
    part = tmp_path / "part"
    process = subprocess.Popen([sys.executable, "-m", "training.train", *args, "--out", str(part)], env=cli_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        state = part / "checkpoint.json"
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads((part / "checkpoint.json").read_text())["epoch"]
    assert killed_at < 6, "the run finished before it could be killed"
    momentum = {k: v for k, v in load_file(str(part / CHECKPOINT)).items() if k.startswith("optimizer.")}
    assert momentum and all(v.abs().sum() > 0 for v in momentum.values())
    result = _run(args + ["--out", str(part), "--resume"], cli_env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    elapsed = [r["elapsed_seconds"] for r in records]
    assert elapsed == sorted(elapsed), "a resumed run's elapsed time carries on from the checkpoint"
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and not any(key.startswith("auxiliary.") for key in a)
    assert ("model.auxiliary.weight" in load_file(str(part / CHECKPOINT))) == bool(extra)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    uninterrupted = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    for ours, theirs in zip(records, uninterrupted):  # the same schedule and batches: the same trajectory
        assert ours["step"] == theirs["step"] and ours["val_acc"] == pytest.approx(theirs["val_acc"], abs=1e-6)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


@pytest.mark.parametrize("flags, named", [(["--bits", "12"], "--bits 16 (now 12)"),
                                          (["--aux-weight", "1"], "--aux-weight 0.0 (now 1.0)"),
                                          (["--warmup", "0.14"], "--warmup 0.23 (now 0.14)")])
def test_resuming_with_other_flags_is_a_clear_error(flags, named, trained_model, image_folder, tmp_path, cli_env):
    """Another schedule or model than the run started with would bend its trajectory midway."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (CHECKPOINT, CHECKPOINT_STATE, TRAIN_CONFIG):
        shutil.copy(trained_model / name, out / name)
    started_with = ["--backbone", "cifar_convnet_small", "--bits", "16", "--epochs", "8", "--batch-size", "32",
                    "--lr", "8", "--val-split", "0.2"]  # the trained_model fixture's run
    result = _run(["--data", str(image_folder), "--out", str(out), *started_with, "--resume", *flags], cli_env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "resume with the settings the run started with" in result.stderr and named in result.stderr
    assert result.stderr.count("(now") == 1, result.stderr


def test_a_recorded_config_reads_back_across_versions(tmp_path):
    """Resume and the benchmarks read what a run recorded, also a run from an older or newer version."""
    assert read_train_config(tmp_path) is None
    config = TrainConfig(data="images", out=str(tmp_path), bits=12, lr=0.4, alternating_flip=True)
    save_train_config(config, tmp_path)
    assert read_train_config(tmp_path) == config
    recorded = dataclasses.asdict(config)
    del recorded["alternating_flip"]  # a setting its version lacked: the default it then ran with
    recorded["retired_setting"] = 1
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps(recorded))
    assert read_train_config(tmp_path) == dataclasses.replace(config, alternating_flip=False)
    (tmp_path / TRAIN_CONFIG).write_text('{"bits": 12')  # cut short by a crash
    assert read_train_config(tmp_path) is None


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    index, first_epoch = torch.arange(1000), torch.rand(1000) < 0.5
    generator = torch.Generator().manual_seed(0)
    epochs = [mirrored(index, epoch, generator, first_epoch) for epoch in range(3)]
    assert torch.equal(epochs[0], first_epoch) and torch.equal(epochs[1], ~first_epoch)
    assert torch.equal(epochs[2], epochs[0])
    assert 400 < mirrored(index, 0, generator).sum() < 600  # without the mask: half of the batch at random


def test_learning_rate_climbs_to_its_peak_over_the_warmup_fraction_then_falls():
    factors = [lr_factor(step, 100, warmup=0.14) for step in range(100)]
    assert factors[0] == pytest.approx(0.2) and max(factors) == factors[14] == 1.0
    assert factors[:15] == sorted(factors[:15]) and factors[14:] == sorted(factors[14:], reverse=True)
    assert lr_factor(100, 100, warmup=0.14) == pytest.approx(0.07)  # where the last step would go next


def test_default_recipe_loss_falls_every_epoch(tmp_path):
    """A guard against the recipe diverging early (issue 16): with every default (learning rate, momentum,
    Lookahead, BatchNorm settings), the training loss must fall epoch over epoch through warm-up and peak."""
    make_image_folder(tmp_path / "data", per_class=40, size=32, seed=0)
    summary = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "model"),
                                backbone="cifar_convnet_small", bits=16, epochs=5, batch_size=64, tta=False,
                                val_split=0.2))
    losses = [epoch["train_loss"] for epoch in summary["history"]]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    saturated = [epoch["latent_saturated"] for epoch in summary["history"]]
    assert max(saturated) < 0.05, saturated  # the sigmoid latent layer keeps learning


def test_gradient_clipping_bounds_every_step(tmp_path):
    """--clip-grad-norm scales each step's gradients down to the norm given: at a vanishing norm no step moves
    the weights, so the loss stays where it started while the same run without the cap learns."""
    make_image_folder(tmp_path / "data", per_class=20, size=32, seed=0, classes=("circle", "square"))
    losses = {}
    for clip in (0.0, 1e-12):
        summary = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / f"clip{clip}"),
                                    backbone="cifar_convnet_small", bits=8, epochs=6, batch_size=16, tta=False,
                                    val_split=0.2, clip_grad_norm=clip, keep_collapsed=True))  # codes: not here
        losses[clip] = [epoch["train_loss"] for epoch in summary["history"]]
    assert max(abs(loss - losses[1e-12][0]) for loss in losses[1e-12]) < 0.01, losses  # measured: 0.002
    assert losses[0.0][0] - losses[0.0][-1] > 0.02, losses  # measured: 0.047


@pytest.mark.parametrize("capabilities, expected", [({}, False), ({"avx2": True}, False),
                                                    ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)])
def test_bf16_is_chosen_by_itself_on_gpus_and_on_cpus_with_native_bf16(monkeypatch, capabilities, expected):
    """On an AVX2-only CPU bf16 is emulated and many times slower, so the safe fp32 path stays there (issue 16)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert use_bf16("auto", torch.device("cpu")) is expected
    assert use_bf16("auto", torch.device("cuda"))
    assert use_bf16("on", torch.device("cpu")) and not use_bf16("off", torch.device("cuda"))


FAULT_PROBE = """
import resource, torch
from training.loop import keep_freed_memory
def page_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MB, written and freed, like a training step's activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = page_faults()
kept = keep_freed_memory()
page_faults()  # the heap grows once
print(default, kept, page_faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_activations_are_reused_without_faulting_their_pages_in(cli_env):
    """What makes CPU training steps 10-27 % faster (issue 16): once kept, a freed 64 MB block comes back as is."""
    result = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, env=cli_env,
                            timeout=120, check=True)
    default, kept, after = result.stdout.split()
    assert kept == "True"
    assert int(default) > 5 * 1000 and int(after) < int(default) / 100, result.stdout


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "training.train", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data"], "does not exist"),
    (["--backbone", "resnet81"], "did you mean"),
    (["--bits", "0"], "at least 1"),
    (["--aux-weight", "-1"], "0 or more"),
    (["--warmup", "1"], "--warmup must be in (0, 1)"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be 0 or more"),
    (["--weights", "/nonexistent.pth"], "cannot read --weights"),
    (["--resume"], "no checkpoint"),
    (["--freeze-backbone"], "needs a trained backbone"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, image_folder, cli_env):
    full = ["--data", str(image_folder), "--out", str(tmp_path / "m"), "--epochs", "1"] + args
    result = _run(full, cli_env)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_trains_and_bad_images_do_not_stop_it(tmp_path, cli_env):
    make_image_folder(tmp_path / "d", per_class=8, classes=("circle", "square"))
    (tmp_path / "d" / "circle" / "zero.png").write_bytes(b"")
    result = _run(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--epochs", "1", "--bits", "8",
                   "--backbone", "cifar_convnet_small", "--batch-size", "8"], cli_env)
    assert result.returncode == 0, result.stderr
    assert load_model(tmp_path / "m").config.bits == 8


@pytest.mark.parametrize("objective", ["cnnh", "cnnh+"])
def test_cnnh_objectives_learn_the_stage_one_codes(objective, tmp_path, image_folder):
    """Stage 2 of CNNH: the latent units learn the target codes (and, for cnnh+, the classes too)."""
    out = tmp_path / objective
    summary = train(TrainConfig(data=str(image_folder), out=str(out), backbone="cifar_convnet_small", bits=16,
                                epochs=6, batch_size=32, lr=8.0, val_split=0.2, tta=False, objective=objective))
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_acc"] > 0.75  # cnnh: the fraction of target bits hit; cnnh+: class accuracy
    assert (history[-1]["val_acc"] is None) == (objective == "cnnh")
    model = load_model(out)
    assert model.config.extra["objective"] == objective
    data = load_dataset(image_folder, val_split=0.2, seed=0)
    with torch.no_grad():
        train_codes, _ = model.encode(data.train.images)
        test_codes, _ = model.encode(data.test.images)
    targets = cnnh_target_codes(data.train.labels.numpy(), 16)
    assert (np.unpackbits(train_codes, axis=1) == targets).mean() > 0.8  # bit agreement; chance is 0.5
    score, _ = retrieval_metrics(test_codes, data.test.labels.numpy(), train_codes, data.train.labels.numpy(), 20)
    assert score > 0.4  # ten classes: random codes score about 0.1


def test_batchnorm_statistics_are_recomputed_as_exact_averages():
    """Before an evaluation the running statistics are the plain average over the given images (not what
    momentum 0.4 kept of the last batches); the layer's momentum is restored and the model left in eval mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.4))
    model[1].running_mean.fill_(5.0)
    images = torch.randn(96, 3, 6, 6) * torch.linspace(0.5, 3, 96).view(-1, 1, 1, 1)  # batches that differ
    recompute_batchnorm_statistics(model, images, batch_size=32)
    with torch.no_grad():
        outputs = model[0](images)
    batch_vars = torch.stack([outputs[i:i + 32].var(dim=(0, 2, 3)) for i in (0, 32, 64)])  # unbiased, per batch
    torch.testing.assert_close(model[1].running_mean, outputs.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, batch_vars.mean(0), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.4 and not model.training


README_48_BIT_FLAGS = ("--backbone cifar_convnet --bits 48 --epochs 15 --batch-size 1024 --label-smoothing 0.2 "
                       "--mirror-average --aux-weight 1 --lr 0.4 --warmup 0.14 --alternating-flip "
                       "--clip-grad-norm 1").split()  # README's headline command, as it was written out


def test_the_cifar10_48_recipe_is_readmes_command_and_flags_override_it():
    where = ["--data", "d", "--out", "o"]
    assert parse_args(["--recipe", "cifar10-48", *where]) == parse_args([*where, *README_48_BIT_FLAGS])
    assert parse_args(["--recipe", "cifar10-48", *where]) == recipe_config("cifar10-48", "d", "o")
    changed = parse_args([*where, "--lr", "0.5", "--recipe", "cifar10-48", "--no-mirror-average", "--bits", "12"])
    assert (changed.lr, changed.mirror_average, changed.bits, changed.epochs) == (0.5, False, 12, 15.0)
    assert recipe_config("cifar10-48", "d", "o", lr=0.5).lr == 0.5
    assert parse_args(where) == TrainConfig(data="d", out="o")  # no recipe: TrainConfig's defaults
    with pytest.raises(UserError, match="unknown recipe 'cifar10-64'; choose one of cifar10-48"):
        recipe_config("cifar10-64", "d", "o")


def test_messages_name_arguments_and_the_command_line_names_its_flags(tmp_path):
    """A Python caller reads the argument's name, a command-line user the flag."""
    with pytest.raises(UserError) as raised:
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "m"), bits=0))
    assert str(raised.value) == "bits must be at least 1, got 0"
    assert flag_worded(raised.value) == "--bits must be at least 1, got 0"
    with pytest.raises(UserError) as raised:
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "m"), resume=True))
    assert str(raised.value).startswith("resume: no checkpoint in ")
    assert isinstance(raised.value, ValueError)  # `except ValueError` catches every layer's bad input


def test_no_training_library_message_names_a_command_line_flag():
    """Flags belong to the command line (training/train.py, training/cli.py); the libraries name arguments."""
    flagged = []
    for path in sorted(Path(training.__file__).parent.glob("*.py")):
        if path.name in ("train.py", "cli.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
        flagged += [f"{path.name}:{node.lineno}: {node.value}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and re.search(r"--[a-z]", node.value)]
    assert not flagged, flagged


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    """A power cut after the rename must not leave an empty file (or the old name pointing nowhere)."""
    synced = []
    fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.fstat(descriptor).st_ino)
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "summary.json"
    atomic_write(target, lambda p: p.write_text("{}"))
    assert target.read_text() == "{}" and list(tmp_path.iterdir()) == [target]
    assert synced == [target.stat().st_ino, tmp_path.stat().st_ino]
