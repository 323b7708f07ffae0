"""Code makers: what turns real-valued features into binary codes after the fact (LSH, ITQ, ITQ-CCA and KSH).

They are the baselines of the paper's table, and they give any catalog binary codes without supervised training
(`build-index --codes itq`). Every method fits one `CodeMaker`: an affine projection of the features (or, for
KSH, of their RBF kernel values against anchor points) whose signs are the bits. A code maker is saved as one
safetensors file with its settings in the file's metadata: no pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from training.errors import UserError
from training.files import atomic_write

FORMAT_VERSION = 1
ENCODE_CHUNK = 8192  # rows per step: bounds the kernel matrix of KSH at CHUNK x anchors


@dataclass
class CodeMaker:
    """bits = sign(phi(x) @ projection), phi(x) = x - mean, or RBF(x, anchors) - mean for kernel hashing."""

    method: str
    mean: np.ndarray  # (D,) or, with anchors, (M,): subtracted before projecting
    projection: np.ndarray  # (D or M, bits)
    anchors: np.ndarray | None = None  # (M, D) kernel anchor points (KSH)
    sigma: float = 0.0  # RBF bandwidth (KSH)
    fit_seconds: float = 0.0

    @property
    def bits(self) -> int:
        return self.projection.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.anchors.shape[1] if self.anchors is not None else self.mean.shape[0]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.method.encode())
        for array in (self.mean, self.projection, self.anchors):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def project(self, features: np.ndarray) -> np.ndarray:
        """Real-valued projections (N, bits); their signs are the code."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"the {self.method} code maker expects {self.feature_dim}-d features, got shape "
                             f"{features.shape}")
        out = np.empty((len(features), self.bits), np.float32)
        for start in range(0, len(features), ENCODE_CHUNK):
            chunk = features[start:start + ENCODE_CHUNK]
            if self.anchors is not None:
                chunk = rbf_kernel(chunk, self.anchors, self.sigma)
            out[start:start + ENCODE_CHUNK] = (chunk - self.mean) @ self.projection
        return out

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Packed codes in np.packbits order (bit i = projection i, MSB first), like the latent layer's."""
        return np.packbits(self.project(features) > 0, axis=1)


def rbf_kernel(x: np.ndarray, anchors: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-_squared_distances(x, anchors) / (2 * sigma * sigma)).astype(np.float32)


def _squared_distances(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(1, keepdims=True) - 2 * x @ anchors.T + (anchors * anchors).sum(1)
    return np.maximum(squared, 0)


# ---------------------------------------------------------------- the makers
def fit_lsh(features: np.ndarray, labels: np.ndarray | None, bits: int, rng: np.random.Generator) -> CodeMaker:
    """Random hyperplanes through the mean (Charikar's sign-random-projection LSH)."""
    mean = features.mean(0)
    return CodeMaker("lsh", mean, rng.standard_normal((features.shape[1], bits)))


def pca(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, D x dims principal directions, largest variance first)."""
    mean = features.mean(0)
    centred = features - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(features))
    return mean, vectors[:, ::-1][:, :dims]


def itq_rotation(projected: np.ndarray, iterations: int, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Gong & Lazebnik's alternation: B = sign(V R), then R = the orthogonal Procrustes solution for B ~ V R.

    Returns R and the quantisation loss ||B - V R||^2 after each iteration (it never increases).
    """
    bits = projected.shape[1]
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    losses = []
    for _ in range(iterations):
        codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(projected.T @ codes)
        rotation = u @ vt  # maximises trace(B^T V R) over orthogonal R
        losses.append(float(((codes - projected @ rotation) ** 2).sum()))
    return rotation, losses


def _check_dims(method: str, features: np.ndarray, bits: int) -> None:
    if bits > features.shape[1]:
        raise UserError(f"{method} projects to at most the feature dimension: {bits} bits > "
                        f"{features.shape[1]}-d features")


def fit_itq(features: np.ndarray, labels: np.ndarray | None, bits: int, rng: np.random.Generator,
            iterations: int = 50) -> CodeMaker:
    """Iterative quantisation: PCA to `bits` dimensions, then the rotation with the least quantisation error."""
    _check_dims("itq", features, bits)
    mean, directions = pca(features, bits)
    rotation, _ = itq_rotation((features - mean) @ directions, iterations, rng)
    return CodeMaker("itq", mean, directions @ rotation)


def one_hot(labels: np.ndarray) -> np.ndarray:
    classes, index = np.unique(labels, return_inverse=True)
    return np.eye(len(classes))[index]


def cca_directions(features: np.ndarray, labels: np.ndarray, dims: int,
                   regularization: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(mean, D x dims) CCA directions of the features against one-hot labels, scaled by their canonical
    correlations as Gong & Lazebnik do (directions past the C-1 informative ones get ~0 weight)."""
    mean = features.mean(0)
    x = features - mean
    y = one_hot(labels)
    y = y - y.mean(0)
    n = len(x)
    cxx = x.T @ x / n
    cxx += regularization * np.trace(cxx) / len(cxx) * np.eye(len(cxx))
    cyy = y.T @ y / n + regularization * np.eye(y.shape[1])
    cxy = x.T @ y / n
    # Generalised eigenproblem  Cxy Cyy^-1 Cyx w = rho^2 Cxx w, made symmetric with Cxx = L L^T.
    lower = np.linalg.cholesky(cxx)
    lower_inv = np.linalg.inv(lower)
    a = lower_inv @ cxy @ np.linalg.solve(cyy, cxy.T) @ lower_inv.T
    values, vectors = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(values)[::-1][:dims]
    directions = lower_inv.T @ vectors[:, order]
    return mean, directions * np.sqrt(np.clip(values[order], 0, None))


def fit_itq_cca(features: np.ndarray, labels: np.ndarray | None, bits: int, rng: np.random.Generator,
                iterations: int = 50) -> CodeMaker:
    """Supervised ITQ: CCA against the labels in place of PCA, then the ITQ rotation."""
    _require_labels("itq-cca", labels)
    _check_dims("itq-cca", features, bits)
    mean, directions = cca_directions(features, labels, bits)
    rotation, _ = itq_rotation((features - mean) @ directions, iterations, rng)
    return CodeMaker("itq-cca", mean, directions @ rotation)


def _require_labels(method: str, labels: np.ndarray | None) -> None:
    if labels is None:
        raise UserError(f"{method} is supervised: it needs labels (a folder per class)")
    if len(np.unique(labels)) < 2:
        raise UserError(f"{method} needs at least two classes")


def label_similarity(labels: np.ndarray) -> np.ndarray:
    """S_ij = 1 for the same label, -1 otherwise."""
    return np.where(labels[:, None] == labels[None, :], 1.0, -1.0)


def ksh_bit_objective(kernel: np.ndarray, residual: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """KSH's smooth surrogate for one bit, -phi(K a)^T R phi(K a) with phi = tanh(x/2), and its gradient."""
    response = np.tanh(kernel @ weights / 2)
    pulled = residual @ response
    value = -float(response @ pulled)
    gradient = -kernel.T @ (pulled * (1 - response * response))
    return value, gradient


def fit_ksh(features: np.ndarray, labels: np.ndarray | None, bits: int, rng: np.random.Generator,
            anchors: int = 300, samples: int = 2000, iterations: int = 100) -> CodeMaker:
    """Kernel-based supervised hashing (Liu et al., CVPR 2012), greedily bit by bit.

    On `samples` labeled points with RBF kernel features against `anchors` points, bit k maximises
    h^T R h (h = sign(K a_k)) for the residual R = bits * S - sum of the earlier bits' h h^T: a spectral
    start (generalised eigenvector), then gradient descent on the tanh surrogate; the better of the two wins.
    """
    _require_labels("ksh", labels)
    picked = rng.choice(len(features), size=min(samples, len(features)), replace=False)
    x, y = features[picked], labels[picked]
    anchor_points = features[rng.choice(len(features), size=min(anchors, len(features)), replace=False)]
    sigma = _mean_distance(x, anchor_points)  # the RBF bandwidth: the mean sample-to-anchor distance
    kernel = rbf_kernel(x.astype(np.float32), anchor_points.astype(np.float32), sigma).astype(np.float64)
    kernel_mean = kernel.mean(0)
    kernel = kernel - kernel_mean
    residual = bits * label_similarity(y)
    gram = kernel.T @ kernel
    gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
    lower_inv = np.linalg.inv(np.linalg.cholesky(gram))
    projection = np.empty((kernel.shape[1], bits))
    for bit in range(bits):
        # Spectral start: K^T R K a = lambda K^T K a, scaled so that ||K a||^2 = samples.
        a = lower_inv @ kernel.T @ residual @ kernel @ lower_inv.T
        _, vectors = np.linalg.eigh((a + a.T) / 2)
        start = lower_inv.T @ vectors[:, -1]
        start *= np.sqrt(len(kernel)) / max(np.linalg.norm(kernel @ start), 1e-12)
        weights = _gradient_descent(lambda w: ksh_bit_objective(kernel, residual, w), start, iterations)
        best = max((start, weights), key=lambda w: _discrete_gain(kernel @ w, residual))
        projection[:, bit] = best
        h = np.where(kernel @ best >= 0, 1.0, -1.0)
        residual -= np.outer(h, h)
    return CodeMaker("ksh", kernel_mean.astype(np.float32), projection, anchors=anchor_points, sigma=sigma)


def _mean_distance(x: np.ndarray, anchors: np.ndarray) -> float:
    return float(np.sqrt(_squared_distances(x, anchors)).mean())


def _discrete_gain(response: np.ndarray, residual: np.ndarray) -> float:
    h = np.where(response >= 0, 1.0, -1.0)
    return float(h @ residual @ h)


def _gradient_descent(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], start: np.ndarray,
                      iterations: int) -> np.ndarray:
    """Gradient descent with a backtracking (Armijo) step: no step size to tune per problem."""
    weights = start.copy()
    value, gradient = objective(weights)
    step = 1.0 / max(np.linalg.norm(gradient), 1e-12)
    for _ in range(iterations):
        while True:
            candidate = weights - step * gradient
            candidate_value, candidate_gradient = objective(candidate)
            if candidate_value <= value - 1e-4 * step * float(gradient @ gradient) or step < 1e-12:
                break
            step /= 2
        if candidate_value > value:
            break
        improvement = value - candidate_value
        weights, value, gradient = candidate, candidate_value, candidate_gradient
        step *= 2
        if improvement < 1e-9 * abs(value):
            break
    return weights


# ---------------------------------------------------------------- registry, fit, save, load
CODE_MAKERS: dict[str, Callable[..., CodeMaker]] = {
    "lsh": fit_lsh,
    "itq": fit_itq,
    "itq-cca": fit_itq_cca,
    "ksh": fit_ksh,
}
SUPERVISED = ("itq-cca", "ksh")


def fit_code_maker(method: str, features: np.ndarray, bits: int, labels: np.ndarray | None = None,
                   seed: int = 0, **options) -> CodeMaker:
    """Fit one of CODE_MAKERS on (N, D) features; `labels` for the supervised methods; `options` go to the
    method (e.g. `anchors`, `samples` of KSH, `iterations` of ITQ)."""
    if method not in CODE_MAKERS:
        raise UserError(f"unknown code maker '{method}'; choose from {', '.join(CODE_MAKERS)}")
    if bits < 1:
        raise UserError(f"bits must be at least 1, got {bits}")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UserError(f"need at least two feature vectors to fit {method}, got shape {features.shape}")
    labels = None if labels is None else np.asarray(labels)
    start = time.perf_counter()
    maker = CODE_MAKERS[method](features, labels, bits, np.random.default_rng(seed), **options)
    maker.mean = np.ascontiguousarray(maker.mean, dtype=np.float32)
    maker.projection = np.ascontiguousarray(maker.projection, dtype=np.float32)
    if maker.anchors is not None:
        maker.anchors = np.ascontiguousarray(maker.anchors, dtype=np.float32)
    maker.fit_seconds = time.perf_counter() - start
    return maker


def save_code_maker(maker: CodeMaker, path: str | os.PathLike) -> None:
    """One safetensors file: the arrays, and the method and settings in its metadata."""
    tensors = {"mean": maker.mean, "projection": maker.projection}
    if maker.anchors is not None:
        tensors["anchors"] = maker.anchors
    metadata = dict(method=maker.method, sigma=repr(maker.sigma), fit_seconds=repr(maker.fit_seconds),
                    format_version=str(FORMAT_VERSION))
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def load_code_maker(path: str | os.PathLike) -> CodeMaker:
    """A code maker as `save_code_maker` wrote it."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # any unreadable file: one line for the user
        raise UserError(f"cannot read code maker {path}: {error}") from error
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION or "method" not in metadata:
        raise UserError(f"{path} is not a code maker this latenthash can read: {json.dumps(metadata)}")
    return CodeMaker(metadata["method"], tensors["mean"], tensors["projection"], tensors.get("anchors"),
                     float(metadata.get("sigma", 0.0)), float(metadata.get("fit_seconds", 0.0)))


# The names before "code maker" was the one word, importable for one more release (README's example used them).
FeatureHasher, HASHERS = CodeMaker, CODE_MAKERS
fit_hasher, save_hasher, load_hasher = fit_code_maker, save_code_maker, load_code_maker
