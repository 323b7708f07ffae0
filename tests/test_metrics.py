import numpy as np
import pytest

from engine.metrics import precision_recall_by_radius, retrieval_metrics, stable_top_k, two_stage_metrics


def codes_from_bits(rows):
    return np.packbits(np.array(rows, dtype=bool), axis=1)


def reference(query_codes, query_labels, db_codes, db_labels, k):
    """The protocol written out plainly: stable sort per query, AP over relevant items found in the top k."""
    aps, precision = [], np.zeros(k)
    for q, label in zip(query_codes, query_labels):
        distances = np.unpackbits(q ^ db_codes, axis=1).sum(1)
        ranked = np.argsort(distances, kind="stable")[:k]
        rel = (db_labels[ranked] == label).astype(float)
        hits = np.cumsum(rel)
        p = hits / np.arange(1, len(rel) + 1)
        aps.append((p * rel).sum() / rel.sum() if rel.sum() else 0.0)
        padded = np.concatenate([p, hits[-1] / np.arange(len(rel) + 1, k + 1)])
        precision += padded
    return np.mean(aps), precision / len(query_codes)


def test_hand_computed_ties_broken_by_database_order():
    # db distances to the query: [1, 0, 1, 0]; stable order = items 1, 3, 0, 2.
    query = codes_from_bits([[0, 0, 0, 0, 0, 0, 0, 0]])
    db = codes_from_bits([[1, 0, 0, 0, 0, 0, 0, 0], [0] * 8, [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    db_labels = np.array([1, 0, 1, 1])
    map_at_k, precision = retrieval_metrics(query, np.array([1]), db, db_labels, top_k=3)
    # ranked relevance: item1 (0), item3 (1), item0 (1) -> P(2) = 1/2, P(3) = 2/3; AP = (1/2 + 2/3) / 2
    assert map_at_k == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert precision == pytest.approx([0, 1 / 2, 2 / 3])


def test_no_relevant_item_gives_zero_ap():
    query = codes_from_bits([[1] * 8])
    db = codes_from_bits([[1] * 8, [0] * 8])
    map_at_k, precision = retrieval_metrics(query, np.array([5]), db, np.array([1, 2]), top_k=2)
    assert map_at_k == 0 and not precision.any()


def test_fewer_database_items_than_k():
    query = codes_from_bits([[0] * 8])
    db = codes_from_bits([[0] * 8, [1] * 8])
    map_at_k, precision = retrieval_metrics(query, np.array([0]), db, np.array([0, 1]), top_k=4)
    assert map_at_k == 1.0
    assert precision == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])  # missing results count as not relevant


@pytest.mark.parametrize("bits, k", [(12, 50), (48, 300), (64, 1000)])
def test_matches_brute_force_reference(bits, k):
    rng = np.random.default_rng(bits)
    db_labels = rng.integers(0, 6, 2500)
    centres = rng.random((6, bits)) < 0.5
    noisy = lambda labels: centres[labels] ^ (rng.random((len(labels), bits)) < 0.25)
    db = np.packbits(noisy(db_labels), axis=1)
    query_labels = rng.integers(0, 6, 60)
    queries = np.packbits(noisy(query_labels), axis=1)
    got = retrieval_metrics(queries, query_labels, db, db_labels, top_k=k)
    want = reference(queries, query_labels, db, db_labels, k)
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    assert np.allclose(got[1], want[1])
    assert len(got[1]) == k


def test_stable_top_k_is_a_stable_sort_prefix():
    rng = np.random.default_rng(0)
    distances = rng.integers(0, 4, (5, 300))
    assert np.array_equal(stable_top_k(distances, 40), np.argsort(distances, axis=1, kind="stable")[:, :40])


def test_two_stage_reranks_the_hamming_pool():
    rng = np.random.default_rng(1)
    db = rng.integers(0, 256, (400, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, 400)
    features = rng.standard_normal((400, 4)).astype(np.float32)
    features[:, 0] += labels * 5  # features separate the classes perfectly
    queries, query_features, query_labels = db[:20], features[:20], labels[:20]
    hamming_only, _ = retrieval_metrics(queries, query_labels, db, labels, top_k=50)
    reranked, _ = two_stage_metrics(queries, query_labels, query_features, db, labels, features, pool=400, top_k=50)
    assert reranked > 0.9 > hamming_only


def test_precision_recall_by_radius_is_monotone_in_recall():
    rng = np.random.default_rng(2)
    db = rng.integers(0, 256, (300, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, 300)
    curve = precision_recall_by_radius(db[:30], labels[:30], db, labels)
    assert curve["recall"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve["recall"]) >= 0) and len(curve["radius"]) == 17


def test_rejects_mismatched_codes():
    with pytest.raises(ValueError, match="differ in width"):
        retrieval_metrics(np.zeros((1, 2), np.uint8), [0], np.zeros((3, 3), np.uint8), np.zeros(3))
