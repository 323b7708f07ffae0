import json

import numpy as np
import pytest
import timm
import torch

from training.errors import UserError
from training.model import create_model, load_model, save_model


@pytest.mark.parametrize("backbone", ["cifar_convnet_small", "cifar_convnet", "resnet18", "mobilenetv3_small_050"])
@pytest.mark.parametrize("bits", [12, 48, 64, 128])
def test_codes_are_packed_sigmoid_thresholds(backbone, bits):
    model = create_model(backbone, bits, ["a", "b", "c"], input_size=32).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    codes, features = model.encode(images)
    assert codes.dtype == np.uint8 and codes.shape == (5, (bits + 7) // 8)
    assert features.shape == (5, model.config.feature_dim) and features.dtype == np.float32
    with torch.no_grad():
        sigmoid = torch.sigmoid(model.latent(model.features(images))).numpy()
        logits = model(images)
    assert logits.shape == (5, 3)
    expected_bits = sigmoid > 0.5
    assert np.array_equal(np.unpackbits(codes, axis=1)[:, :bits], expected_bits)
    assert not np.unpackbits(codes, axis=1)[:, bits:].any()  # padding bits are zero
    assert np.allclose(features, model.features(images).detach().numpy(), atol=1e-5)


def test_latent_layer_initialised_as_in_the_paper():
    model = create_model("cifar_convnet_small", 48, ["a", "b"])
    assert torch.all(model.latent.bias == 1.0)
    assert abs(model.latent.weight.std().item() - 0.005) < 0.001


def test_cifar_backbone_is_in_timms_registry():
    assert "cifar_convnet" in timm.list_models("cifar*")
    net = timm.create_model("cifar_convnet", num_classes=0)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, net.num_features)


def test_save_load_round_trip_encodes_identically(tmp_path):
    model = create_model("cifar_convnet_small", 48, ["a", "b", "c"]).eval()
    with torch.no_grad():  # move away from the initialisation so that codes vary
        model.latent.bias.normal_()
    fingerprint = save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.fingerprint == fingerprint and not loaded.training
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a, fa = model.encode(images)
    b, fb = loaded.encode(images)
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("backbone", "bits", "class_names", "input_size", "mean", "std", "feature_dim", "format_version"):
        assert key in config


def test_mirror_average_makes_codes_and_features_flip_invariant(tmp_path):
    model = create_model("cifar_convnet_small", 16, ["a", "b"]).eval()
    with torch.no_grad():
        model.latent.bias.normal_()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    plain = save_model(model, tmp_path / "plain")
    model.config.mirror_average = True
    assert save_model(model, tmp_path / "mirror") != plain  # catalogs see a different encoder
    loaded = load_model(tmp_path / "mirror")
    codes, features = loaded.encode(images)
    mirrored_codes, mirrored_features = loaded.encode(images.flip(-1))
    assert np.array_equal(codes, mirrored_codes) and np.array_equal(features, mirrored_features)
    assert not np.array_equal(load_model(tmp_path / "plain").encode(images)[1], features)


def test_fingerprint_changes_with_weights(tmp_path):
    model = create_model("cifar_convnet_small", 16, ["a", "b"])
    first = save_model(model, tmp_path / "a")
    with torch.no_grad():
        model.classifier.bias.add_(1)
    assert save_model(model, tmp_path / "b") != first


def test_local_weights_file_loads_into_backbone(tmp_path):
    source = timm.create_model("cifar_convnet_small", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = create_model("cifar_convnet_small", 16, ["a", "b"], weights=tmp_path / "w.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_a_latenthash_model_gives_its_backbone_to_another_bit_length(tmp_path):
    trained = create_model("cifar_convnet_small", 48, ["a", "b", "c"])
    with torch.no_grad():
        for value in trained.backbone.parameters():
            value.add_(0.5)
    save_model(trained, tmp_path / "m48")
    model = create_model("cifar_convnet_small", 12, ["a", "b"], weights=tmp_path / "m48")
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.latent.weight.shape == (12, trained.latent.weight.shape[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="resnet81"), "did you mean"),
    (dict(bits=0), "at least 1"),
    (dict(class_names=["only"]), "two classes"),
])
def test_bad_model_arguments(kwargs, message):
    arguments = dict(backbone="cifar_convnet_small", bits=16, class_names=["a", "b"]) | kwargs
    with pytest.raises(UserError, match=message):
        create_model(**arguments)


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read weights file"):
        create_model("cifar_convnet_small", 16, ["a", "b"], weights=bad)


def test_newer_model_format_is_refused(tmp_path):
    save_model(create_model("cifar_convnet_small", 16, ["a", "b"]), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="format version 99"):
        load_model(tmp_path)
