"""The paper's retrieval metrics, implemented exactly as the authors' evaluation scripts ran them.

Ranking is by Hamming distance, ties broken by database order (a stable sort). For query q and rank j <= K,
P_q(j) = (rel_q(1) + ... + rel_q(j)) / j and AP_q = sum_j P_q(j) rel_q(j) / sum_j rel_q(j): normalised by the
relevant items *found in the top K*, and 0 when there is none. mAP@K is the mean of AP_q over queries.
"""
from __future__ import annotations

from typing import Callable

import faiss
import numpy as np

from shards.codes import pad_codes

CHUNK = 256  # queries per block: bounds memory at CHUNK x database int32 distances


def hamming_matrix(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(nq, nb) int32 Hamming distances of packed codes, computed by Faiss's popcount kernels."""
    bits = queries.shape[1] * 8
    q, db = pad_codes(queries, bits), pad_codes(database, bits)
    out = np.empty((len(q), len(db)), dtype=np.int32)
    faiss.hammings(faiss.swig_ptr(q), faiss.swig_ptr(db), len(q), len(db), q.shape[1], faiss.swig_ptr(out))
    return out


def stable_top_k(distances: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest per row, ties by column order: the first k of a stable sort."""
    n = distances.shape[1]
    keys = distances.astype(np.int64) * n + np.arange(n)  # unique keys; order = (distance, position)
    k = min(k, n)
    part = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), keys.shape)
    order = np.argsort(np.take_along_axis(keys, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def _ap_and_precision(relevant: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP over the ranked relevance matrix (nq, <=top_k), and summed P@k (padded to top_k)."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    found = hits[:, -1] if relevant.shape[1] else np.zeros(len(relevant))
    ap = np.where(found > 0, (hits / ranks * relevant).sum(1) / np.maximum(found, 1), 0.0)
    precision = np.zeros(top_k)
    width = relevant.shape[1]
    precision[:width] = (hits / ranks).sum(0)
    if width < top_k:  # fewer results than k: the missing ones are not relevant
        precision[width:] = hits[:, -1].sum() / np.arange(width + 1, top_k + 1) if width else 0.0
    return ap, precision


def _evaluate(query_labels: np.ndarray, db_labels: np.ndarray, top_k: int, chunk: int,
              rank: Callable[[slice], np.ndarray]) -> tuple[float, np.ndarray]:
    """mAP@top_k and P@k over query blocks; `rank(block)` gives each query's ranked database indices."""
    ap_sum, precision_sum = 0.0, np.zeros(top_k)
    for start in range(0, len(query_labels), chunk):
        block = slice(start, start + chunk)
        relevant = db_labels[rank(block)] == np.asarray(query_labels[block])[:, None]
        ap, precision = _ap_and_precision(relevant, top_k)
        ap_sum += ap.sum()
        precision_sum += precision
    return ap_sum / len(query_labels), precision_sum / len(query_labels)


def retrieval_metrics(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray,
                      db_labels: np.ndarray, top_k: int = 1000) -> tuple[float, np.ndarray]:
    """(mAP@top_k, precision_at_k) by Hamming ranking; precision_at_k[i] is P@(i+1), i < top_k."""
    _check(query_codes, db_codes, query_labels, db_labels)
    return _evaluate(query_labels, db_labels, top_k, CHUNK,
                     lambda block: stable_top_k(hamming_matrix(query_codes[block], db_codes), top_k))


def two_stage_metrics(query_codes: np.ndarray, query_labels: np.ndarray, query_features: np.ndarray,
                      db_codes: np.ndarray, db_labels: np.ndarray, db_features: np.ndarray, pool: int = 1000,
                      top_k: int = 1000) -> tuple[float, np.ndarray]:
    """Like `retrieval_metrics`, ranking each query's Hamming pool (stable) by Euclidean distance (stable)."""
    _check(query_codes, db_codes, query_labels, db_labels)
    db_features = np.asarray(db_features, dtype=np.float32)

    def rank(block: slice) -> np.ndarray:
        candidates = stable_top_k(hamming_matrix(query_codes[block], db_codes), pool)
        gathered = db_features[candidates]
        queries = np.asarray(query_features[block], dtype=np.float32)
        squared = np.einsum("qcd,qcd->qc", gathered, gathered) - 2 * np.einsum("qcd,qd->qc", gathered, queries)
        return np.take_along_axis(candidates, np.argsort(squared, axis=1, kind="stable")[:, :top_k], 1)

    return _evaluate(query_labels, db_labels, top_k, CHUNK // 4, rank)


def precision_recall_by_radius(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray,
                               db_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall of 'everything within Hamming radius r', r = 0..bits (micro-averaged over
    queries; precision counts only queries that retrieve something at that radius)."""
    _check(query_codes, db_codes, query_labels, db_labels)
    bits = query_codes.shape[1] * 8
    retrieved = np.zeros(bits + 1)
    relevant_retrieved = np.zeros(bits + 1)
    precision_sum, precision_count = np.zeros(bits + 1), np.zeros(bits + 1)
    total_relevant = 0
    for start in range(0, len(query_codes), CHUNK):
        block = slice(start, start + CHUNK)
        distances = hamming_matrix(query_codes[block], db_codes)
        relevant = db_labels[None, :] == np.asarray(query_labels[block])[:, None]
        all_counts = np.stack([np.bincount(d, minlength=bits + 1) for d in distances]).cumsum(1)
        rel_counts = np.stack([np.bincount(d[r], minlength=bits + 1) for d, r in zip(distances, relevant)]).cumsum(1)
        total_relevant += relevant.sum()
        retrieved += all_counts.sum(0)
        relevant_retrieved += rel_counts.sum(0)
        has = all_counts > 0
        precision_sum += np.where(has, rel_counts / np.maximum(all_counts, 1), 0).sum(0)
        precision_count += has.sum(0)
    return {"radius": np.arange(bits + 1),
            "precision": precision_sum / np.maximum(precision_count, 1),
            "recall": relevant_retrieved / max(total_relevant, 1)}


def _check(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> None:
    if query_codes.dtype != np.uint8 or db_codes.dtype != np.uint8:
        raise ValueError("codes must be packed uint8 arrays (np.packbits)")
    if query_codes.ndim != 2 or db_codes.ndim != 2 or query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"query and database codes differ in width: {query_codes.shape} vs {db_codes.shape}")
    if len(query_codes) != len(query_labels) or len(db_codes) != len(db_labels):
        raise ValueError("each code needs one label")
    if len(db_codes) == 0 or len(query_codes) == 0:
        raise ValueError("need at least one query and one database item")
