"""A newcomer's first hour (issue 14): moved catalogs that still answer, models that are not overwritten,
visible skipped images, no debris from refused runs, fast help, plain wording, an informative result page."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.api.service import Service
from engine.build_index import build_index
from engine.export import export_catalog, import_hdf5
from engine.search import Searcher
from engine.synthetic import make_image_folder
from training.config import TrainConfig
from training.data import load_dataset
from engine.errors import InputError
from training.errors import UserError
from training.gist import gist
from training.train import check_config, flag_worded, train
from tests.test_data import write_cifar10, write_idx

CLIS = ["engine.build_index", "engine.query", "engine.export", "engine.verify", "engine.demo", "engine.serve",
        "engine.duplicates", "training.train"]


def cli(module, args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("codes", ["latent", "itq"])
def test_an_exported_catalog_answers_exactly_as_the_original(codes, image_folder, trained_model, tmp_path, cli_env):
    original = tmp_path / "original"
    build_index(image_folder, trained_model, original, shards=2, progress=False, workers=0, codes=codes,
                code_bits=32 if codes == "itq" else None)
    h5 = tmp_path / "c.h5"
    export_catalog(original, h5, progress=False)
    import_hdf5(h5, tmp_path / "bare", progress=False)
    import_hdf5(h5, tmp_path / "copy", progress=False, model_dir=trained_model)
    queries = make_image_folder(tmp_path / "q", per_class=1, seed=5, start=500)[:4]
    with Searcher(original) as a, Searcher(tmp_path / "copy") as b:
        assert [[(r.id, r.hamming, r.distance) for r in rs] for rs in a.search(queries, k=5)] == \
            [[(r.id, r.hamming, r.distance) for r in rs] for rs in b.search(queries, k=5)]
    some_id = next(iter(Searcher(tmp_path / "bare").catalog)).id
    result = cli("engine.query", ["--catalog", tmp_path / "bare", "--id", some_id], cli_env)  # needs no model
    bare = Service(tmp_path / "bare", read_only=True)
    bare.close()  # after its start's warm-up, which finds no model to load
    assert not bare.model_ready
    assert result.returncode == 0, result.stderr
    result = cli("engine.query", ["--catalog", tmp_path / "bare", queries[0]], cli_env)
    assert result.returncode == 2 and "pass --model MODEL_DIR" in result.stderr and "backbone" in result.stderr
    result = cli("engine.query", ["--catalog", tmp_path / "bare", "--model", trained_model, queries[0]], cli_env)
    assert result.returncode == 0, result.stderr


def test_import_refuses_a_model_that_did_not_make_the_codes(built_model_pair, tmp_path):
    catalog, other_model = built_model_pair
    export_catalog(catalog, tmp_path / "c.h5", progress=False)
    with pytest.raises(InputError, match="did not make the codes"):
        import_hdf5(tmp_path / "c.h5", tmp_path / "copy", progress=False, model_dir=other_model)
    assert not (tmp_path / "copy").exists()


@pytest.fixture(scope="module")
def built_model_pair(image_folder, trained_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    build_index(image_folder, trained_model, root / "catalog", shards=2, progress=False, workers=0)
    other = root / "other-model"
    train(TrainConfig(data=str(image_folder), out=str(other), backbone="cifar_convnet_small", bits=16, epochs=0.2,
                      batch_size=32, val_split=0.2, tta=False, seed=1, keep_collapsed=True))
    return root / "catalog", other


def test_training_never_overwrites_a_model_silently(trained_model, image_folder, tmp_path):
    config = TrainConfig(data=str(image_folder), out=str(trained_model), bits=16)
    with pytest.raises(UserError, match="already holds a model.*resume.*overwrite") as refused:
        check_config(config)
    assert "--out, --resume to continue it, or --overwrite" in flag_worded(refused.value)  # at the command line
    check_config(TrainConfig(data=str(image_folder), out=str(trained_model), bits=16, overwrite=True))


@pytest.mark.parametrize("change, message", [(dict(bits=0), "--bits must be at least 1"),
                                             (dict(backbone="resnet5O"), "unknown backbone 'resnet5O'"),
                                             (dict(epochs=-1), "--epochs must be a positive number")])
def test_refused_training_runs_leave_nothing_behind(image_folder, tmp_path, cli_env, change, message):
    out = tmp_path / "model"
    args = ["--data", image_folder, "--out", out]
    for key, value in change.items():
        args += [f"--{key.replace('_', '-')}", value]
    result = cli("training.train", args, cli_env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_skipped_training_images_are_named_and_listed(tmp_path, cli_env):
    make_image_folder(tmp_path / "data", per_class=6, classes=("circle", "square"))
    (tmp_path / "data" / "circle" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "model"
    result = cli("training.train", ["--data", tmp_path / "data", "--out", out, "--backbone", "cifar_convnet_small",
                                    "--bits", "8", "--epochs", "1", "--batch-size", "4", "--no-tta",
                                    "--keep-collapsed"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 images that did not decode (broken.png)" in result.stdout + result.stderr
    listed = json.loads((out / "skipped-files.json").read_text())
    assert [os.path.basename(s["path"]) for s in listed] == ["broken.png"] and listed[0]["error"]


@pytest.mark.parametrize("module", CLIS)
def test_help_loads_no_heavy_module(module, cli_env):
    """--help answers from argparse alone: torch, timm, Faiss and h5py are imported where they are used."""
    probe = ("import runpy, sys\nsys.argv = ['x', '--help']\ntry:\n    runpy.run_module(%r, run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'timm', 'faiss', 'h5py') if m in "
             "sys.modules))" % module)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_usage_names_the_program_that_was_run(cli_env, tmp_path, built_model_pair):
    assert cli("engine.query", ["--help"], cli_env).stdout.startswith("usage: python -m engine.query")
    script = os.path.join(os.path.dirname(sys.executable), "build-index")
    if os.path.exists(script):  # installed console scripts (pip install -e .)
        result = subprocess.run([script, "--help"], capture_output=True, text=True, env=cli_env, timeout=60)
        assert result.stdout.startswith("usage: build-index")
    assert "(default 10, or as many as make 1000 steps on a small set)" in " ".join(
        cli("training.train", ["--help"], cli_env).stdout.split())
    catalog, _ = built_model_pair
    result = cli("engine.query", ["--catalog", catalog, tmp_path], cli_env)
    assert result.returncode == 2 and "a folder; give image files" in result.stderr
    result = cli("engine.build_index", [tmp_path, "--model", "m", "--catalog", tmp_path / "c", "--shards", "0"],
                 cli_env)
    assert result.returncode == 2 and "argument --shards: must be at least 1, got 0" in result.stderr


def test_class_names_for_mnist_format_data(tmp_path):
    rng = np.random.default_rng(0)
    for images, labels in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                           ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        write_idx(tmp_path / images, rng.integers(0, 256, (20, 28, 28)), compress=False)
        write_idx(tmp_path / labels, np.arange(20) % 10, compress=False)
    assert load_dataset(tmp_path).class_names == [str(d) for d in range(10)]
    fashion = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    (tmp_path / "classes.txt").write_text("\n".join(fashion) + "\n")
    assert load_dataset(tmp_path).class_names == fashion
    assert load_dataset(tmp_path, class_names=list("abcdefghij")).class_names == list("abcdefghij")
    with pytest.raises(UserError, match="3 class names given, .* has 10 classes"):
        load_dataset(tmp_path, class_names=["a", "b", "c"])
    write_cifar10(tmp_path / "cifar")
    assert load_dataset(tmp_path / "cifar").class_names[0] == "airplane"


def test_result_page_has_a_legend_and_marks_other_labels(built_model_pair, image_folder, tmp_path, cli_env):
    catalog, _ = built_model_pair
    query = make_image_folder(tmp_path / "q", per_class=1, seed=11, start=900, classes=("ring",))[0]
    page = tmp_path / "r.html"
    result = cli("engine.query", ["--catalog", catalog, "-k", "30", "--html", page, query], cli_env)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "Hamming distance between the binary codes" in text and "label ring" in text
    others = sum(row.split()[3] != "ring" for row in result.stdout.splitlines()[2:])
    assert others >= 6  # 24 rings in the catalog, 30 results
    assert text.count('<figure class="other"') == others


def test_pretrained_without_internet_fails_fast_and_leaves_nothing(image_folder, tmp_path, cli_env):
    """Offline, huggingface_hub retried each file for ~50 s and printed 22 lines; the run left an empty --out.
    The hub here is a closed port and the cache empty, which is what no internet looks like on any machine."""
    env = dict(cli_env, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "model"
    started = time.perf_counter()
    result = cli("training.train", ["--data", image_folder, "--out", out, "--backbone", "resnet18", "--pretrained"],
                 env, timeout=120)
    assert time.perf_counter() - started < 20, "retried the hub"
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "resnet18's weights are not in the local cache and http://127.0.0.1:9 cannot be reached" in result.stderr
    assert not out.exists()


def test_weights_that_are_not_a_state_dict_are_one_line_and_leave_nothing(image_folder, tmp_path, cli_env):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    out = tmp_path / "model"
    result = cli("training.train", ["--data", image_folder, "--out", out, "--backbone", "cifar_convnet_small",
                                    "--weights", tmp_path / "notes.pth"], cli_env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot read --weights file" in result.stderr and "not a .safetensors file" in result.stderr
    assert not out.exists()


def test_readmes_gist_example_takes_numpy_images():
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    descriptors = gist(images)
    assert descriptors.shape == (3, 512)
    np.testing.assert_array_equal(descriptors, gist(torch.from_numpy(images)))
