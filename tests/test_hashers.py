"""The code makers (LSH, ITQ, ITQ-CCA, KSH), CNNH's stage 1 and the GIST descriptor."""
import math

import numpy as np
import pytest
import torch

from engine.metrics import retrieval_metrics
from training.cnnh import cnnh_target_codes, similarity_objective
from training.errors import UserError
from training.gist import GistConfig, gist
from training import hashers
from training.hashers import (CODE_MAKERS, cca_directions, fit_code_maker, itq_rotation, ksh_bit_objective,
                              label_similarity, load_code_maker, one_hot, save_code_maker)

BITS = 16


@pytest.fixture(scope="module")
def clusters():
    """10 Gaussian classes in 32-d: (train features, train labels, query features, query labels)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 32))

    def draw(n):
        labels = rng.integers(0, 10, n)
        return centres[labels] + 1.2 * rng.standard_normal((n, 32)), labels

    return (*draw(1500), *draw(200))


@pytest.fixture(scope="module")
def fitted(clusters):
    x, y = clusters[:2]
    small_ksh = dict(ksh=dict(anchors=100, samples=500, iterations=30))
    return {m: fit_code_maker(m, x, BITS, y, seed=1, **small_ksh.get(m, {})) for m in CODE_MAKERS}


def map_of(codes_query, labels_query, codes_db, labels_db):
    return retrieval_metrics(codes_query, labels_query, codes_db, labels_db, top_k=100)[0]


@pytest.mark.parametrize("method", list(CODE_MAKERS))
def test_maker_beats_random_codes(method, clusters, fitted):
    x, y, xq, yq = clusters
    rng = np.random.default_rng(5)
    random_db = np.packbits(rng.random((len(x), BITS)) > 0.5, axis=1)
    random_q = np.packbits(rng.random((len(xq), BITS)) > 0.5, axis=1)
    baseline = map_of(random_q, yq, random_db, y)
    maker = fitted[method]
    assert maker.encode(x).shape == (len(x), BITS // 8)
    score = map_of(maker.encode(xq), yq, maker.encode(x), y)
    assert score > baseline + 0.25, (method, score, baseline)


def test_supervised_makers_beat_unsupervised(clusters, fitted):
    x, y, xq, yq = clusters
    scores = {m: map_of(h.encode(xq), yq, h.encode(x), y) for m, h in fitted.items()}
    assert min(scores["itq-cca"], scores["ksh"]) > scores["lsh"], scores


@pytest.mark.parametrize("method", list(CODE_MAKERS))
def test_saved_maker_encodes_identically(method, clusters, fitted, tmp_path):
    x = clusters[0]
    save_code_maker(fitted[method], tmp_path / "maker.safetensors")
    loaded = load_code_maker(tmp_path / "maker.safetensors")
    assert loaded.method == method and loaded.fingerprint == fitted[method].fingerprint
    np.testing.assert_array_equal(loaded.encode(x), fitted[method].encode(x))
    assert b"pickle" not in (tmp_path / "maker.safetensors").read_bytes()[:200]


def test_lsh_bits_are_balanced_in_expectation(clusters):
    x = clusters[0]
    ones = np.mean([np.unpackbits(fit_code_maker("lsh", x, 64, seed=s).encode(x), axis=1).mean() for s in range(10)])
    assert abs(ones - 0.5) < 0.03


def test_itq_quantisation_loss_never_increases(clusters):
    x = clusters[0] - clusters[0].mean(0)
    _, vectors = np.linalg.eigh(x.T @ x)
    projected = x @ vectors[:, -BITS:]
    rotation, losses = itq_rotation(projected, 50, np.random.default_rng(0))
    assert np.all(np.diff(losses) <= 1e-6 * losses[0]) and losses[-1] < losses[0]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(BITS), atol=1e-10)


def test_itq_beats_pca_sign_codes(clusters):
    """ITQ's rotation lowers the quantisation error below plain PCA signs (rotation = identity)."""
    x, _, _, _ = clusters
    maker = fit_code_maker("itq", x, BITS)
    v = (x - x.mean(0)) @ np.linalg.eigh(np.cov(x.T))[1][:, ::-1][:, :BITS]
    pca_loss = ((np.sign(v) - v) ** 2).sum()
    rotated = (x - maker.mean) @ maker.projection
    assert ((np.sign(rotated) - rotated) ** 2).sum() < pca_loss


def test_cca_matches_a_direct_svd_computation(clusters):
    """Canonical directions by the textbook route: SVD of Cxx^-1/2 Cxy Cyy^-1/2."""
    x, y = clusters[0], clusters[1]
    _, ours = cca_directions(x, y, 9, regularization=0)
    xc, yc = x - x.mean(0), one_hot(y)[:, :-1]  # drop one class: the centred one-hot matrix has rank C-1
    yc = yc - yc.mean(0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w ** -0.5) @ v.T

    cxx, cyy, cxy = xc.T @ xc / len(x), yc.T @ yc / len(x), xc.T @ yc / len(x)
    u, correlations, _ = np.linalg.svd(inv_sqrt(cxx) @ cxy @ inv_sqrt(cyy))
    direct = inv_sqrt(cxx) @ u[:, :9] * correlations[:9]
    np.testing.assert_allclose(np.abs(ours), np.abs(direct), rtol=1e-5, atol=1e-8)


def test_ksh_surrogate_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    kernel, labels = rng.standard_normal((40, 12)), rng.integers(0, 3, 40)
    residual, weights = 8 * label_similarity(labels), rng.standard_normal(12) * 0.3
    _, gradient = ksh_bit_objective(kernel, residual, weights)
    eps = 1e-6
    numeric = [(ksh_bit_objective(kernel, residual, weights + eps * e)[0]
                - ksh_bit_objective(kernel, residual, weights - eps * e)[0]) / (2 * eps) for e in np.eye(12)]
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-6)


def test_ksh_codes_fit_the_label_similarity_better_than_lsh(clusters, fitted):
    """KSH minimises ||bits S - H H^T||, i.e. maximises trace(H^T S H): the code inner products' agreement
    with the label similarity, on held-out data far above random hyperplanes' and below the bound."""
    x, y = clusters[2], clusters[3]
    similarity = label_similarity(y)

    def agreement(maker):
        h = np.where(maker.project(x) > 0, 1.0, -1.0)
        return np.trace(h.T @ similarity @ h) / len(x) ** 2

    assert 2 * agreement(fitted["lsh"]) < agreement(fitted["ksh"]) <= BITS
    target, ksh_codes = BITS * similarity, np.where(fitted["ksh"].project(x) > 0, 1.0, -1.0)
    lsh_codes = np.where(fitted["lsh"].project(x) > 0, 1.0, -1.0)
    assert np.linalg.norm(target - ksh_codes @ ksh_codes.T) < np.linalg.norm(target - lsh_codes @ lsh_codes.T)


def test_makers_refuse_bad_input(clusters):
    x, y = clusters[0], clusters[1]
    with pytest.raises(UserError, match="supervised"):
        fit_code_maker("ksh", x, 8)
    with pytest.raises(UserError, match="at most the feature dimension"):
        fit_code_maker("itq", x, 64)
    with pytest.raises(UserError, match="unknown code maker"):
        fit_code_maker("sh", x, 8, y)
    with pytest.raises(UserError, match="bits must be at least 1, got 0"):
        fit_code_maker("lsh", x, 0)


def test_features_of_another_width_are_a_programming_error_not_bad_input(clusters):
    """Features of the wrong width come from the caller's code, not from a user: a plain ValueError."""
    maker = fit_code_maker("lsh", clusters[0], 8)
    with pytest.raises(ValueError, match="expects 32-d") as raised:
        maker.encode(clusters[0][:, :5])
    assert not isinstance(raised.value, UserError)


def test_the_old_names_still_work(clusters, tmp_path):
    """README's example (fit_hasher, save_hasher, load_hasher) keeps working for a release."""
    assert (hashers.HASHERS, hashers.FeatureHasher) == (CODE_MAKERS, hashers.CodeMaker)
    maker = hashers.fit_hasher("itq", clusters[0], 8)
    hashers.save_hasher(maker, tmp_path / "itq8.safetensors")
    loaded = hashers.load_hasher(tmp_path / "itq8.safetensors")
    assert np.array_equal(loaded.encode(clusters[0]), maker.encode(clusters[0]))


# ---------------------------------------------------------------- CNNH stage 1
def test_cnnh_objective_and_gradient_match_the_dense_formula():
    rng = np.random.default_rng(0)
    labels, codes, bits = rng.integers(0, 4, 30), rng.uniform(-1, 1, (30, 6)), 6
    dense = bits * label_similarity(labels) - codes @ codes.T
    value, gradient = similarity_objective(codes, one_hot(labels), bits)
    assert value == pytest.approx((dense ** 2).sum() / 30 ** 2)
    np.testing.assert_allclose(gradient, -4 * dense @ codes / 30 ** 2, rtol=1e-10, atol=1e-12)


def test_cnnh_targets_decrease_the_objective_and_separate_classes():
    labels = np.random.default_rng(1).integers(0, 5, 600)
    history = []
    targets = cnnh_target_codes(labels, 24, history=history)
    assert targets.shape == (600, 24) and set(np.unique(targets)) <= {0, 1}
    assert np.all(np.diff(history) <= 0) and history[-1] < 0.8 * history[0]
    signs = targets * 2.0 - 1
    same = label_similarity(labels) > 0
    agreement = signs @ signs.T / 24
    assert agreement[same].mean() > 0.9 and agreement[~same].mean() < 0.1


# ---------------------------------------------------------------- GIST
def grating(frequency: float, angle: float, size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = 127 + 100 * torch.cos(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)))
    return wave.expand(3, size, size)


def test_gist_shape_and_batch_independence():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    one_batch = gist(images)
    assert one_batch.shape == (10, GistConfig().dim) == (10, 512) and np.all(one_batch >= 0)
    np.testing.assert_allclose(gist(images, batch_size=3), one_batch, rtol=1e-5, atol=1e-6)
    assert gist(torch.nn.functional.interpolate(images.float(), size=64)).shape == (10, 512)  # resized first


def test_gist_orientation_channels_respond_to_matching_gratings():
    """Validation: a grating at each filter's orientation and centre frequency excites that filter most
    among the scale's orientations (and, for the three finer scales, that scale most)."""
    for scale in range(4):
        for j in range(8):
            energy = gist(grating(0.3 / 1.85 ** scale, -math.pi * j / 8)[None])[0]
            per_filter = energy.reshape(32, 16).mean(1).reshape(4, 8)
            assert per_filter[scale].argmax() == j
            if scale < 3:
                assert per_filter.max(1).argmax() == scale
