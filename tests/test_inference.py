"""Inference paths (engine/inference.py): each gives eager's answers, the catalog records its path, queries and
/healthz use it, and a path that cannot run here falls back to eager (or, for an existing catalog, is refused)."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from engine.api.app import create_app
from engine.api.service import Service
from engine.build_index import REPORT_FILE, _inference_path, build_index, main as build_index_main
from engine.encode import Encoder, encode_files, load_encoder
from engine.errors import InputError
from engine.inference import PATHS, auto_path, lane_batch, prepare
from engine.query import main as query_main, parse_args as parse_query_args, query_path
from engine.record import EngineRecord, read_record, write_record
from engine.search import Searcher
from shards.errors import CatalogError
from training.images import list_images, load_image
from training.model import load_model

# fp32 paths compute the same sums in another order; bf16 rounds activations to 8 mantissa bits
FEATURE_ERROR = {"fp32": 1e-4, "bf16": 3e-2}
BIT_AGREEMENT = {"fp32": 0.995, "bf16": 0.97}
RUNNING_HERE = [name for name, path in PATHS.items() if path.unavailable("cpu") is None and name != "compile"]


@pytest.fixture(scope="module")
def images(image_folder) -> torch.Tensor:
    return torch.stack([load_image(file, 32) for file in sorted(list_images(image_folder))])


@pytest.fixture(scope="module")
def eager_answers(trained_model, images) -> tuple[np.ndarray, np.ndarray]:
    return Encoder(load_model(trained_model)).encode(images)


def agreement(codes: np.ndarray, reference: np.ndarray) -> float:
    return float((np.unpackbits(codes, axis=1) == np.unpackbits(reference, axis=1)).mean())


def relative_error(features: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(features - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("name", RUNNING_HERE)
def test_every_path_here_gives_eager_answers(name, trained_model, images, eager_answers):
    encoder = Encoder(load_model(trained_model)).using(name)
    assert encoder.inference.name == name
    codes, features = encoder.encode(images)
    precision = PATHS[name].precision
    assert features.dtype == np.float32 and features.shape == eager_answers[1].shape
    assert relative_error(features, eager_answers[1]) < FEATURE_ERROR[precision]
    assert agreement(codes, eager_answers[0]) >= BIT_AGREEMENT[precision]
    single_codes, single_features = encoder.encode(images[:1])  # batch 1, as a query
    assert np.array_equal(single_codes, codes[:1]) or agreement(single_codes, codes[:1]) >= BIT_AGREEMENT[precision]
    assert relative_error(single_features, features[:1]) < FEATURE_ERROR[precision]
    shipped = copy.deepcopy(encoder)  # as Ray ships it: what a runtime built stays behind, the copy builds its own
    assert shipped.inference.name == name and shipped.inference._built is None


def test_a_missing_runtime_falls_back_to_eager_with_one_line(trained_model, monkeypatch, caplog):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "openvino" else find_spec(name, *rest))
    model = load_model(trained_model)
    with caplog.at_level(logging.WARNING, logger="engine.inference"):
        inference = prepare("openvino-bf16", model, "cpu")
    assert inference.name == "eager" and inference.features is None
    assert len(caplog.records) == 1 and "openvino is not installed" in caplog.records[0].getMessage()
    assert auto_path("resnet50", 224, "cpu") == "eager" and auto_path("efficientnet_b0", 224, "cuda") == "eager"
    with pytest.raises(InputError, match="inference path must be one of"):
        prepare("fastest", model, "cpu")


def test_auto_follows_the_measured_table(trained_model):
    bf16_here = PATHS["openvino-bf16"].unavailable("cpu") is None
    assert auto_path("resnet50", 224, "cpu") == ("openvino-bf16" if bf16_here else "eager")
    assert auto_path("resnet18", 64, "cpu") == "eager"  # smaller inputs: not yet (engine/inference.py, AUTO_TABLE)
    assert auto_path("cifar_convnet_small", 224, "cpu") == "eager"  # a family not in the table
    assert Encoder(load_model(trained_model)).using("auto").inference.name == "eager"


def test_build_index_refuses_an_unknown_path_as_a_flag(image_folder, trained_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        build_index_main([str(image_folder), "--model", str(trained_model), "--catalog", str(tmp_path / "c"),
                          "--inference-path", "fastest"])
    assert refused.value.code == 2 and "--inference-path" in capsys.readouterr().err


def test_a_path_that_cannot_run_is_refused_before_any_photo_is_read(image_folder, trained_model, tmp_path,
                                                                    monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "openvino" else find_spec(name, *rest))
    monkeypatch.setattr("engine.build_index._images", lambda *args: pytest.fail("photos listed before the check"))
    with pytest.raises(InputError, match="inference path openvino cannot run here: openvino is not installed"):
        build_index(image_folder, trained_model, tmp_path / "c", progress=False, inference_path="openvino")
    assert not (tmp_path / "c").exists()
    with pytest.raises(InputError, match="runs in this process, not on Ray's actors"):
        _inference_path(tmp_path / "c", None, "openvino-bf16", "cpu", on_ray=True)
    assert _inference_path(tmp_path / "c", None, "auto", "cpu", on_ray=True) == "eager"


def test_the_catalog_records_its_path_and_queries_by_another_find_the_same(image_folder, trained_model, tmp_path):
    name = "openvino" if "openvino" in RUNNING_HERE else "eager"
    catalog = tmp_path / "catalog"
    summary = build_index(image_folder, trained_model, catalog, shards=2, workers=2, progress=False,
                          inference_path=name)  # worker processes: decoding ones beside a runtime's threads
    assert summary.inference_path == name and summary.indexed == len(list_images(image_folder))
    assert read_record(catalog).inference_path == name
    assert json.loads((catalog / REPORT_FILE).read_text())["inference_path"] == name
    other = "eager" if name != "eager" else "onnxruntime"
    with pytest.raises(InputError, match=f"made by inference path {name}"):
        build_index(image_folder, trained_model, catalog, progress=False, inference_path=other)
    queries = torch.stack([load_image(file, 32) for file in sorted(list_images(image_folder))[::6]])
    with Searcher(catalog) as searcher:
        assert searcher.inference_path == name
        recorded = searcher.search_codes(*searcher.encoder.encode(queries), k=10)
        assert searcher.encoder.inference.name == name
        by_eager = searcher.search_codes(*load_encoder(catalog, inference_path="eager").encode(queries), k=10)
    overlap = np.mean([len({r.id for r in a} & {r.id for r in b}) / 10 for a, b in zip(recorded, by_eager)])
    assert overlap >= 0.9
    service = Service(catalog)
    with TestClient(create_app(service)) as client:
        service._warming.join(60)  # loaded and compiled at start, not at the first photo search
        assert service.model_ready
        assert service.searcher.encoder.inference._built is not None
        health = client.get("/healthz").json()
        assert health["inference_path"] == name and health["model_ready"] is True


def test_a_few_query_photos_on_the_command_line_skip_the_runtimes_start_up(image_folder, trained_model, tmp_path,
                                                                          capsys):
    """engine.query encodes a few photos eager, whatever the catalog's path (a runtime's conversion and compile
    would cost the run seconds), and finds the same items as on the catalog's path."""
    if "openvino" not in RUNNING_HERE:
        pytest.skip("openvino is not installed")
    catalog = tmp_path / "catalog"
    build_index(image_folder, trained_model, catalog, shards=2, progress=False, inference_path="openvino")
    photos = []
    for number, file in enumerate(sorted(list_images(image_folder))[::24]):  # new files: not read from the catalog
        photos.append(str(tmp_path / f"query{number}.png"))
        shutil.copy(file, photos[-1])
    assert query_path(parse_query_args(["--catalog", str(catalog), *photos])) == "eager"
    assert query_path(parse_query_args(["--catalog", str(catalog), "--jsonl", "queries.jsonl"])) is None
    assert query_path(parse_query_args(["--catalog", str(catalog), "--inference-path", "openvino", *photos])) \
        == "openvino"
    with Searcher(catalog, inference_path="eager") as searcher:
        assert searcher.inference_path == "eager" and searcher.encoder.inference.name == "eager"
    with pytest.raises(InputError, match="inference path must be one of"):
        Searcher(catalog, inference_path="auto")
    found = []
    for flags in ([], ["--inference-path", "openvino"]):
        assert query_main(["--catalog", str(catalog), "--json", "-k", "10", *flags, *photos]) == 0
        found.append([{r["id"] for r in answer["results"]} for answer in json.loads(capsys.readouterr().out)])
    assert np.mean([len(a & b) / 10 for a, b in zip(*found)]) >= 0.9


def test_encoding_in_workers_or_streams_equals_this_process(image_folder, trained_model, monkeypatch):
    """The CPU pipelines: eager encodes in forked workers, a runtime's path beside decoding workers, a concurrent
    runtime a batch per stream in threads of this process (each call in parts of a graph's fixed batch, the last
    padded); each gives the prefetch pipeline's answers, in order."""
    monkeypatch.setattr("engine.inference.LANE_PIXELS", 3 * 32 * 32)  # 7-image batches in parts of 3, 3 and 1
    files = sorted(list_images(image_folder))
    assert len(files) % 7 == 2  # and the last batch in one part of 2
    for name in RUNNING_HERE:
        encoder = Encoder(load_model(trained_model)).using(name)
        alone = list(encode_files(encoder, files, batch_size=16, workers=0, streams=1))
        alone_codes, alone_features = (np.concatenate([b.codes for b in alone]),
                                       np.concatenate([b.features for b in alone]))
        forked = np.concatenate([b.codes for b in encode_files(encoder, files, batch_size=16, workers=2)])
        assert np.array_equal(alone_codes, forked), name
        if encoder.inference.concurrent:
            in_streams = list(encode_files(encoder, files, batch_size=7, workers=0, streams=2))
            assert [p for b in in_streams for p in b.positions] == list(range(len(files)))
            features = np.concatenate([b.features for b in in_streams])
            assert relative_error(features, alone_features) < FEATURE_ERROR[PATHS[name].precision], name
            assert encoder.inference.in_streams(2, 7) is encoder.inference.in_streams(2, 7)  # compiled once
            assert encoder.inference.in_streams(1, 7) is encoder.inference  # one call at a time: any batch
            stopped = encode_files(encoder, files, batch_size=2, workers=0, streams=2)
            assert next(stopped).positions == [0, 1]
            stopped.close()  # a caller that stops early: the queued batches are dropped, nothing hangs


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_sends_no_telemetry(tmp_path):
    """Outside CI, with no opt-out file in the home folder, OpenVINO's import and converter would send usage events,
    each from a process forked beside our threads (engine/inference.py, _import_openvino)."""
    script = """
import os
forks = []
os.register_at_fork(before=lambda: forks.append(1))
import torch
from engine.encode import Encoder
from training.model import create_backbone, hashing_net
model = hashing_net(create_backbone("cifar_convnet_small"), "cifar_convnet_small", 16, ["a", "b"], 32).eval()
with torch.inference_mode():
    Encoder(model).using("openvino").encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
print(len(forks), os.path.exists(os.path.expanduser("~/intel")))
"""
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("CI", "TF_BUILD", "JENKINS_URL")} | {"HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                         cwd=Path(__file__).parent.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "False"]  # no fork, nothing written to ~/intel


def test_a_lane_runs_a_batch_in_equal_parts_that_fit_its_pixels():
    assert lane_batch(32, 224) == 4 and lane_batch(30, 224) == 4 and lane_batch(5, 224) == 3
    assert lane_batch(32, 32) == 32 and lane_batch(256, 32) == 128 and lane_batch(300, 32) == 150
    assert lane_batch(8, 1024) == 1


def test_a_record_names_a_known_path(tmp_path):
    assert read_record(tmp_path) is None
    write_record(tmp_path, EngineRecord(inference_path="openvino-bf16"))
    assert read_record(tmp_path).inference_path == "openvino-bf16"
    (tmp_path / "engine.json").write_text(json.dumps({"inference_path": "warp"}))
    with pytest.raises(CatalogError, match="inference_path must be one of eager, compile"):
        read_record(tmp_path)


def test_a_code_maker_is_fitted_on_the_features_of_the_catalogs_path(image_folder, trained_model, tmp_path,
                                                                     monkeypatch):
    name = "openvino-bf16" if "openvino-bf16" in RUNNING_HERE else "eager"
    paths_used = []
    encode_files_itself = encode_files

    def watched(encoder, *args, **kwargs):
        paths_used.append(encoder.inference.name)
        return encode_files_itself(encoder, *args, **kwargs)

    monkeypatch.setattr("engine.encode.encode_files", watched)
    build_index(image_folder, trained_model, tmp_path / "c", progress=False, codes="itq", code_bits=16,
                inference_path=name)
    assert paths_used and set(paths_used) == {name}  # fitting, then indexing
    assert read_record(tmp_path / "c").inference_path == name
