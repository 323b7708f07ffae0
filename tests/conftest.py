"""Shared fixtures: a small generated image folder and a tiny model trained on it (built once per session)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.build_index import build_index
from engine.synthetic import make_image_folder
from training.train import TrainConfig, train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root, per_class=24, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_model(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    train(TrainConfig(data=str(image_folder), out=str(out), backbone="cifar_convnet_small", bits=16, epochs=8,
                      batch_size=32, lr=8.0, val_split=0.2, tta=False))
    return out


@pytest.fixture(scope="session")
def shop(image_folder, trained_model, tmp_path_factory):
    """A catalog of the test images with product metadata: brand acme on every third image."""
    root = tmp_path_factory.mktemp("shop")
    lines = []
    for n, file in enumerate(sorted(image_folder.rglob("*.png"))):
        lines.append(json.dumps({"path": str(file.relative_to(image_folder)), "sku": f"SKU-{n}",
                                 "title": f"<b>item {n}</b>", "price": 10 + n % 7,
                                 "brand": "acme" if n % 3 == 0 else "other"}))
    lines.append(json.dumps({"path": "no/such.png", "sku": "lost"}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    summary = build_index(image_folder, trained_model, root / "catalog", shards=3, progress=False, workers=0,
                          metadata=root / "items.jsonl")
    assert summary.metadata_unmatched and summary.metadata_unmatched[0]["path"] == "no/such.png"
    return root / "catalog"


@pytest.fixture
def cli_env() -> dict:
    """Environment for running the project's modules in subprocesses."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env
