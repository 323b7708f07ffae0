"""CNNH stage 1 (Xia et al., AAAI 2014): target codes H whose inner products match the label similarity.

Stage 1 minimises ||K S - H H^T||_F^2 over H in [-1, 1]^(n x K), with S_ij = 1 for the same label and -1
otherwise; stage 2 (`training.train --objective cnnh|cnnh+`) trains a network to predict sign(H).
Xia et al. ran coordinate descent on the dense n x n matrix, which limited them to a 5,000-image subset.
With labels as the only similarity, S = 2 Y Y^T - 1 (Y one-hot) has rank <= C + 1, so the objective and its
gradient cost O(n K (K + C)) without ever forming S; projected gradient descent on the same relaxed objective
then handles the whole training set.
"""
from __future__ import annotations

import numpy as np

from training.hashers import one_hot


def similarity_objective(codes: np.ndarray, labels_one_hot: np.ndarray, bits: int) -> tuple[float, np.ndarray]:
    """||bits * S - H H^T||_F^2 / n^2 and its gradient, from the low-rank form of S."""
    n = len(codes)
    gram = codes.T @ codes  # K x K
    per_class = labels_one_hot.T @ codes  # C x K
    total = codes.sum(0)  # K
    # trace(H^T S H) = 2 ||Y^T H||^2 - ||1^T H||^2 and ||S||^2 = n^2 (every entry is +-1).
    value = bits * bits * n * n - 2 * bits * (2 * (per_class ** 2).sum() - total @ total) + (gram ** 2).sum()
    s_times_h = 2 * labels_one_hot @ per_class - total  # S H, n x K
    gradient = 4 * codes @ gram - 4 * bits * s_times_h
    return float(value) / (n * n), gradient / (n * n)


def cnnh_target_codes(labels: np.ndarray, bits: int, iterations: int = 300, seed: int = 0,
                      history: list[float] | None = None) -> np.ndarray:
    """(n, bits) uint8 target bits for stage 2; `history`, if given, receives the objective per iteration."""
    y = one_hot(np.asarray(labels))
    rng = np.random.default_rng(seed)
    codes = rng.uniform(-1, 1, size=(len(y), bits))
    value, gradient = similarity_objective(codes, y, bits)
    step = 1.0
    for _ in range(iterations):
        while True:  # backtracking on the projected step
            candidate = np.clip(codes - step * gradient, -1, 1)
            candidate_value, candidate_gradient = similarity_objective(candidate, y, bits)
            if candidate_value <= value - 1e-4 / step * ((candidate - codes) ** 2).sum() or step < 1e-12:
                break
            step /= 2
        if candidate_value > value:
            break
        converged = value - candidate_value < 1e-9 * value
        codes, value, gradient = candidate, candidate_value, candidate_gradient
        step *= 2
        if history is not None:
            history.append(value)
        if converged:
            break
    return (codes > 0).astype(np.uint8)
