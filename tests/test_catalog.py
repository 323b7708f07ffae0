import json
import threading

import numpy as np
import pytest

from shards import (Catalog, CatalogError, CatalogReader, DuplicateIdError, Filter, InvalidArgumentError,
                    StageTimings, catalog_exists, hamming_distances, open_or_create, remove_catalog_files)
from shards.ranking import nearest, prefix_nearest

FEATURE_DIM = 8


def random_items(rng, n, bits, clustered=True):
    """Random ids, codes (clustered around a few centres, so ties are everywhere) and features."""
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    if clustered:
        centres = rng.random((5, bits)) < 0.5
        flips = rng.random((n, bits)) < 0.1
        bits_ = centres[rng.integers(0, 5, n)] ^ flips
    else:
        bits_ = rng.random((n, bits)) < 0.5
    features = rng.standard_normal((n, FEATURE_DIM)).astype(np.float32)
    return ids, np.packbits(bits_, axis=1), features


def brute_force_knn(q, ids, codes, m):
    distances = hamming_distances(q[None], codes)[0]
    order = np.lexsort((ids, distances))[:m]
    return ids[order], distances[order]


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.mark.parametrize("shards", [1, 3, 8])
@pytest.mark.parametrize("bits", [12, 48, 64, 128])
def test_searches_equal_brute_force(tmp_path, rng, shards, bits):
    ids, codes, features = random_items(rng, 1500, bits)
    with Catalog.create(tmp_path / "c", bits, FEATURE_DIM, shards=shards, feature_dtype="float32") as catalog:
        catalog.add(ids[:700], codes[:700], features[:700])
        catalog.add(ids[700:], codes[700:], features[700:])
        queries = np.packbits(rng.random((12, bits)) < 0.5, axis=1)
        queries[:4] = codes[:4]  # exact hits too
        query_features = rng.standard_normal((12, FEATURE_DIM)).astype(np.float32)
        radius = bits // 5
        for q, hits in zip(queries, catalog.coarse(queries, m=60)):
            expected_ids, expected_d = brute_force_knn(q, ids, codes, 60)
            assert np.array_equal(hits.ids, expected_ids) and np.array_equal(hits.hamming, expected_d)
        for q, hits in zip(queries, catalog.coarse(queries, radius=radius)):
            distances = hamming_distances(q[None], codes)[0]
            inside = np.flatnonzero(distances <= radius)
            order = inside[np.lexsort((ids[inside], distances[inside]))]
            assert np.array_equal(hits.ids, ids[order])
        for q, qf, hits in zip(queries, query_features, catalog.search(queries, query_features, k=7, pool=100)):
            pool_ids, pool_d = brute_force_knn(q, ids, codes, 100)
            rows = np.searchsorted(ids, pool_ids, sorter=np.argsort(ids))
            pool_rows = np.argsort(ids)[rows]
            squared = ((features[pool_rows] - qf) ** 2).sum(1)
            order = np.lexsort((pool_ids, squared))[:7]
            assert np.array_equal(hits.ids, pool_ids[order])
            assert np.allclose(hits.distances, np.sqrt(squared[order]), rtol=1e-5)
            assert np.array_equal(hits.hamming, pool_d[order])


@pytest.mark.parametrize("bits", [16, 48, 64])
def test_hash_index_is_exact_within_its_radius(tmp_path, rng, bits):
    ids, codes, features = random_items(rng, 2000, bits)
    with Catalog.create(tmp_path / "c", bits, FEATURE_DIM, shards=3, index="hash", hash_bits=12) as catalog:
        catalog.add(ids, codes, features)
        queries = np.concatenate([codes[:5], np.packbits(rng.random((5, bits)) < 0.5, axis=1)])
        for radius in (0, 2, 5):
            for q, hits in zip(queries, catalog.coarse(queries, radius=radius)):
                distances = hamming_distances(q[None], codes)[0]
                inside = np.flatnonzero(distances <= radius)
                assert np.array_equal(hits.ids, ids[inside[np.lexsort((ids[inside], distances[inside]))]])
        knn = catalog.coarse(queries[:5], m=20)  # approximate, but exact matches are found
        assert all(h.hamming[0] == 0 for h in knn)


@pytest.mark.parametrize("shards", [1, 3])
def test_ivf_probing_every_list_equals_brute_force_and_radius_is_exact(tmp_path, rng, shards):
    """IVF is approximate at its default nprobe; probing every list is a full scan, and the merge across shards
    is exact: the same distances as brute force, the same ids wherever the cut-off is not inside a tie."""
    from shards.index import ivf_lists

    ids, codes, features = random_items(rng, 3000, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=shards, index="ivf") as catalog:
        catalog.add(ids, codes, features)
        catalog.coarse(codes[:1], m=1)  # folds the adds into the shards' indices
        lists = max(s.code_index.index.nlist for s in catalog.shards)
        assert lists == ivf_lists(max(len(s) for s in catalog.shards)) > 1
        queries = np.concatenate([codes[:4], np.packbits(rng.random((6, 64)) < 0.5, axis=1)])
        for q, hits in zip(queries, catalog.coarse(queries, m=80, nprobe=lists)):
            expected_ids, expected_d = brute_force_knn(q, ids, codes, 80)
            assert np.array_equal(hits.hamming, expected_d)
            below = expected_d < expected_d[-1]
            assert np.array_equal(hits.ids[below], expected_ids[below])
        for q, hits in zip(queries, catalog.coarse(queries, radius=12)):
            distances = hamming_distances(q[None], codes)[0]
            inside = np.flatnonzero(distances <= 12)
            assert np.array_equal(hits.ids, ids[inside[np.lexsort((ids[inside], distances[inside]))]])
        default = catalog.coarse(codes[:20], m=50)  # default nprobe: approximate, sorted, exact matches found
        assert all(h.hamming[0] == 0 and (np.diff(h.hamming) >= 0).all() for h in default)
        with pytest.raises(CatalogError, match="nprobe"):
            catalog.coarse(codes[:1], m=5, nprobe=0)


def test_a_writer_on_some_shards_takes_only_their_items(tmp_path, rng):
    ids, codes, features = random_items(rng, 300, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=3) as catalog:
        catalog.add(ids[:200], codes[:200], features[:200])
    mine = ids[200:][ids[200:] % 3 == 1]
    with Catalog.open(tmp_path / "c", shard_numbers=[1], writer_may_join=True) as reader, \
            Catalog.open(tmp_path / "c", readonly=False, shard_numbers=[1]) as writer:  # one process: reader, writer
        writer.add(mine, codes[200:][ids[200:] % 3 == 1], features[200:][ids[200:] % 3 == 1])
        with pytest.raises(CatalogError, match=r"belong to shards \[0, 2\], not opened here"):
            writer.add(ids[200:], codes[200:], features[200:])
        with pytest.raises(CatalogError, match="not opened here"):
            writer.delete(ids[:10])
        assert not reader.present(mine).any()
        reader.refresh()
        assert reader.present(mine).all()
    with Catalog.open(tmp_path / "c") as everything:
        assert len(everything) == 200 + len(mine)


def test_a_writers_filtered_search_sees_its_own_writes(tmp_path, rng):
    ids, codes, features = random_items(rng, 60, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=2) as catalog:
        catalog.add(ids[:50], codes[:50], features[:50], [{"label": "a"}] * 50)
        rule = Filter.parse(["b"])
        assert len(catalog.coarse(codes[:1], m=100, filter=rule)[0]) == 0
        catalog.add(ids[50:], codes[50:], features[50:], [{"label": "b"}] * 10)
        assert sorted(catalog.coarse(codes[:1], m=100, filter=rule)[0].ids) == sorted(ids[50:])
        catalog.delete(ids[50:55])
        assert sorted(catalog.coarse(codes[:1], m=100, filter=rule)[0].ids) == sorted(ids[55:])


def test_ivf_default_nprobe_grows_with_the_pool(rng):
    """A pool of 1,000 in 100k clustered codes spans many lists: the default nprobe follows the pool, so the
    default search finds the exact top-1,000 (tie-aware) where a fixed 16 lists would not."""
    from shards.index import CodeIndex, default_nprobe, index_type

    centres = rng.random((1000, 64)) < 0.5
    bits = centres[rng.integers(0, 1000, 100_000)] ^ (rng.random((100_000, 64)) < 0.08)
    codes, ids = np.packbits(bits, axis=1), np.arange(100_000, dtype=np.int64)
    flat, ivf = CodeIndex(ids, codes, index_type("flat")), CodeIndex(ids, codes, index_type("ivf"))
    queries = codes[rng.choice(100_000, 20, replace=False)]
    exact, _, _ = flat.search_knn(queries, 1000)

    def recall(distances: np.ndarray) -> float:  # returned codes within the exact 1,000th distance
        return float(np.mean(distances <= exact[:, -1:]))

    assert default_nprobe(ivf.index.nlist, 100_000, 1000) > 16
    assert recall(ivf.search_knn(queries, 1000)[0]) >= 0.95 > recall(ivf.search_knn(queries, 1000, nprobe=16)[0])


def test_ivf_index_is_stored_and_keeps_its_training_through_adds(tmp_path, rng):
    ids, codes, features = random_items(rng, 4000, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=1, index="ivf") as catalog:
        catalog.add(ids[:2000], codes[:2000], features[:2000])
        catalog.coarse(codes[:1], m=5)
        trained = faiss_centroids(catalog.shards[0].code_index.index)
        catalog.add(ids[2000:2500], codes[2000:2500], features[2000:2500])  # small growth: same lists
        catalog.coarse(codes[:1], m=5)
        assert np.array_equal(faiss_centroids(catalog.shards[0].code_index.index), trained)
    with Catalog.open(tmp_path / "c") as reopened:
        shard = reopened.shards[0]
        assert shard.index_loaded_from_disk and type(shard.code_index.index).__name__ == "IndexBinaryIVF"
        assert np.array_equal(faiss_centroids(shard.code_index.index), trained)
        assert reopened.coarse(codes[2100:2101], m=1)[0].hamming[0] == 0
    with Catalog.open(tmp_path / "c", readonly=False) as writer:  # past twice the lists: trained again
        writer.add(ids[2500:], codes[2500:], features[2500:])
        writer.coarse(codes[:1], m=5)
        assert len(writer) == 4000 and writer.shards[0].code_index.index.ntotal == 4000


def faiss_centroids(index) -> np.ndarray:
    import faiss

    quantizer = faiss.downcast_IndexBinary(index.quantizer)
    return faiss.vector_to_array(quantizer.xb).copy()


def test_unknown_index_type_names_the_choices(tmp_path):
    with pytest.raises(CatalogError, match="choose one of flat, hash, ivf"):
        Catalog.create(tmp_path / "c", 64, FEATURE_DIM, index="lsh-forest")


def test_float16_features_and_get_iterate(tmp_path, rng):
    ids, codes, features = random_items(rng, 300, 48)
    metas = [{"path": f"/img/{i}.jpg", "label": str(i % 3)} for i in ids]
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=3) as catalog:
        catalog.add(ids, codes, features, metas)
        items = catalog.get(ids[:10].tolist() + [7])
        assert items[-1] is None
        for item, i in zip(items, range(10)):
            assert item.id == ids[i] and np.array_equal(item.code, codes[i]) and item.meta == metas[i]
            assert np.allclose(item.features, features[i], atol=2e-3)
        assert np.allclose(catalog.features(ids[5:8]), features[5:8].astype(np.float16).astype(np.float32))
        assert sorted(item.id for item in catalog) == sorted(ids.tolist())
        assert len(catalog) == 300


def test_delete_then_search_never_returns_deleted(tmp_path, rng):
    ids, codes, features = random_items(rng, 800, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=3) as catalog:
        catalog.add(ids, codes, features)
        gone = ids[::3]
        assert catalog.delete(np.concatenate([gone, [123456789]])) == len(gone)
        keep = np.setdiff1d(np.arange(800), np.arange(0, 800, 3))
        for q in codes[:10]:
            hits = catalog.coarse(q[None], m=50)[0]
            assert not np.isin(hits.ids, gone).any()
            assert np.array_equal(hits.ids, brute_force_knn(q, ids[keep], codes[keep], 50)[0])
        assert len(catalog) == len(keep)
    with Catalog.open(tmp_path / "c") as reopened:
        assert len(reopened) == len(keep)
        assert not np.isin(reopened.coarse(codes[:3], m=100)[0].ids, gone).any()


def test_everything_persists_across_reopen(tmp_path, rng):
    ids, codes, features = random_items(rng, 500, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=2, model_fingerprint="abc") as catalog:
        catalog.add(ids, codes, features, [{"n": int(i)} for i in ids])
        before = catalog.search(codes[:5], features[:5], k=5)
    with Catalog.open(tmp_path / "c", model_fingerprint="abc") as reopened:
        assert all(s.index_loaded_from_disk for s in reopened.shards)
        after = reopened.search(codes[:5], features[:5], k=5)
        assert all(np.array_equal(a.ids, b.ids) for a, b in zip(before, after))
        assert reopened.get([ids[0]])[0].meta == {"n": int(ids[0])}
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["bits"] == 48 and manifest["shard_count"] == 2 and manifest["model_fingerprint"] == "abc"


def test_stale_or_damaged_stored_index_is_rebuilt(tmp_path, rng):
    ids, codes, features = random_items(rng, 400, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=1) as catalog:
        catalog.add(ids, codes, features)
    shard = Catalog.open(tmp_path / "c", readonly=False)
    with shard.shards[0].env.begin(write=True) as txn:
        txn.put(b"index", b"garbage", db=shard.shards[0]._info)
    shard.shards[0].flush = lambda: None  # close without re-storing a good index
    shard.close()
    with Catalog.open(tmp_path / "c") as reopened:
        assert not reopened.shards[0].index_loaded_from_disk
        assert np.array_equal(reopened.coarse(codes[:1], m=10)[0].ids, brute_force_knn(codes[0], ids, codes, 10)[0])


def test_reader_keeps_its_snapshot_until_refresh(tmp_path, rng):
    ids, codes, features = random_items(rng, 600, 48)
    writer = Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=2)
    writer.add(ids[:300], codes[:300], features[:300])
    writer.flush()
    reader = Catalog.open(tmp_path / "c")
    writer.add(ids[300:], codes[300:], features[300:])
    writer.delete(ids[:10])
    assert len(reader) == 300
    hits = reader.search(codes[:20], features[:20], k=5, pool=50)  # features of deleted ids still readable
    assert all(len(h) == 5 for h in hits)
    assert np.array_equal(reader.coarse(codes[:1], m=300)[0].ids, brute_force_knn(codes[0], ids[:300], codes[:300], 300)[0])
    reader.refresh()
    assert len(reader) == 590
    writer.close()
    reader.close()


def test_concurrent_readers_during_writes(tmp_path, rng):
    ids, codes, features = random_items(rng, 3000, 64)
    writer = Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=3)
    writer.add(ids[:500], codes[:500], features[:500])
    writer.flush()
    errors = []

    def read():
        try:
            for _ in range(15):
                with Catalog.open(tmp_path / "c") as reader:
                    n = len(reader)
                    assert n % 500 == 0
                    for hits in reader.search(codes[:5], features[:5], k=5):
                        assert len(hits) == 5
        except Exception as error:  # reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(500, 3000, 500):
        writer.add(ids[start:start + 500], codes[start:start + 500], features[start:start + 500])
    for t in threads:
        t.join()
    writer.close()
    assert not errors, errors


def test_bad_inputs_raise_clear_errors(tmp_path, rng):
    ids, codes, features = random_items(rng, 10, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=2, model_fingerprint="m1") as catalog:
        with pytest.raises(CatalogError, match=r"shape \(n, 6\) for 48-bit"):
            catalog.add(ids, codes[:, :5], features)
        with pytest.raises(CatalogError, match="features must have shape"):
            catalog.add(ids, codes, features[:, :4])
        catalog.add(ids[:5], codes[:5], features[:5])
        with pytest.raises(DuplicateIdError, match="already in the catalog"):
            catalog.add(ids[3:], codes[3:], features[3:])
        assert len(catalog) == 5  # nothing of the refused batch was written
        with pytest.raises(DuplicateIdError, match="twice"):
            catalog.add(ids[[6, 6]], codes[:2], features[:2])
        with pytest.raises(CatalogError, match="query codes"):
            catalog.coarse(codes[:, :2], m=3)
        with pytest.raises(CatalogError, match="another process is writing"):
            Catalog.open(tmp_path / "c", readonly=False)
    with pytest.raises(CatalogError, match="made by model m1"):
        Catalog.open(tmp_path / "c", model_fingerprint="m2")
    with pytest.raises(CatalogError, match="already exists"):
        Catalog.create(tmp_path / "c", 48, FEATURE_DIM)


def test_missing_or_corrupted_manifest(tmp_path, rng):
    with pytest.raises(CatalogError, match="manifest.json: missing"):
        Catalog.open(tmp_path)
    Catalog.create(tmp_path / "c", 16, FEATURE_DIM).close()
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CatalogError, match="manifest.json: corrupted"):
        Catalog.open(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"bits": 16, "feature_dim": 8, "format_version": 9,
                                                               "format": "latenthash-catalog"}))
    with pytest.raises(CatalogError, match="newer"):
        Catalog.open(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"bits": 16, "feature_dim": 8, "format_version": 1,
                                                               "format": "latenthash-catalog"}))
    with pytest.raises(CatalogError, match="older latenthash; rebuild"):
        Catalog.open(tmp_path / "c")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_features_across_feature_blocks(tmp_path, rng, dtype):
    """Rows land in 7-item blocks: batches that start and end mid-block, deletes leaving holes, a rebuilt index,
    the writer's and a reader's read paths, and the two-stage search on top of them."""
    ids, codes, features = random_items(rng, 400, 48)
    stored = features.astype(dtype).astype(np.float32)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=2, feature_dtype=dtype, block_items=7) as catalog:
        for a, b in [(0, 1), (1, 6), (6, 19), (19, 40), (40, 300)]:
            catalog.add(ids[a:b], codes[a:b], features[a:b])
        gone = ids[5:200:4]
        catalog.delete(gone)
        catalog.add(ids[300:], codes[300:], features[300:])
        keep = ~np.isin(ids, gone)
        assert np.array_equal(catalog.features(ids[keep]), stored[keep])
        with pytest.raises(CatalogError, match="not in the catalog"):
            catalog.features(gone[:2])
    with Catalog.open(tmp_path / "c") as reader:
        assert reader.manifest.block_items == 7
        assert np.array_equal(reader.features(ids[keep][::-1]), stored[keep][::-1])
        assert {item.id: item.features.tolist() for item in reader} == {
            int(i): f.tolist() for i, f in zip(ids[keep], stored[keep])}
        queries = rng.standard_normal((4, FEATURE_DIM)).astype(np.float32)
        for qc, qf, hits in zip(codes[:4], queries, reader.search(codes[:4], queries, k=5, pool=60)):
            pool = np.isin(ids, brute_force_knn(qc, ids[keep], codes[keep], 60)[0])
            squared = ((stored[pool] - qf) ** 2).sum(1)
            assert np.array_equal(hits.ids, ids[pool][np.lexsort((ids[pool], squared))][:5])
    shard = Catalog.open(tmp_path / "c", readonly=False)
    with shard.shards[0].env.begin(write=True) as txn:
        txn.delete(b"index_generation", db=shard.shards[0]._info)  # force a rebuild from the items
        block = txn.get((0).to_bytes(8, "big"), db=shard.shards[0]._blocks)
        txn.put((0).to_bytes(8, "big"), block[:len(block) // 2], db=shard.shards[0]._blocks)  # damage block 0
    shard.shards[0].flush = lambda: None
    shard.close()
    with Catalog.open(tmp_path / "c") as reader:
        assert not reader.shards[0].index_loaded_from_disk and len(reader) == keep.sum()
        with pytest.raises(CatalogError, match="feature blocks are damaged"):
            reader.features([int(i) for i in ids[keep] if i % 2 == 0])


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "delete"])
def test_damaged_lmdb_file_is_reported_not_crashed(tmp_path, rng, damage):
    ids, codes, features = random_items(rng, 3000, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=1) as catalog:
        catalog.add(ids, codes, features)
    data = tmp_path / "c" / "shard-0000" / "data.mdb"
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 3])
    elif damage == "garbage_header":
        data.write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes() + raw[8192:])
    else:
        data.unlink()
    with pytest.raises(CatalogError, match="data.mdb"):
        Catalog.open(tmp_path / "c")


def test_map_size_grows_as_needed(tmp_path, rng, monkeypatch):
    monkeypatch.setattr("shards.records.INITIAL_MAP_SIZE", 1 << 20)
    ids, codes, features = random_items(rng, 20_000, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=1) as catalog:
        catalog.add(ids, codes, features)
        assert catalog.shards[0].env.info()["map_size"] > 1 << 20
    with Catalog.open(tmp_path / "c") as reopened:
        assert len(reopened) == 20_000


@pytest.mark.parametrize("shards", [1, 3])
def test_reopened_catalog_still_breaks_ties_by_id(tmp_path, rng, shards):
    ids, codes, features = random_items(rng, 5000, 64)
    with Catalog.create(tmp_path / "c", 64, FEATURE_DIM, shards=shards) as catalog:
        catalog.add(ids, codes, features)
    with Catalog.open(tmp_path / "c") as reopened:  # indices deserialized from LMDB, not built
        assert all(s.index_loaded_from_disk and s.code_index.index.use_heap is False for s in reopened.shards)
        for q in codes[:8]:
            hits = reopened.coarse(q[None], m=700)[0]
            assert np.array_equal(hits.ids, brute_force_knn(q, ids, codes, 700)[0])


def test_prefix_nearest_holds_the_nearest_of_every_prefix(rng):
    """A shard group ranks only these places of its pool (`RayCatalog.search`): whatever prefix of the pool makes
    the merged pool, its k nearest must be among them, ties by id included; and they must be few."""
    for n, k in ((1, 1), (7, 10), (300, 1), (550, 10), (1000, 25)):
        ids = rng.permutation(10 * n)[:n].astype(np.int64)
        squared = rng.integers(0, 40, n).astype(np.float32)  # many ties
        kept = prefix_nearest(ids, squared, k)
        assert np.array_equal(kept, np.unique(kept))
        for prefix in range(1, n + 1):
            best = nearest(ids[:prefix], squared[:prefix], k)
            assert np.isin(best, kept).all()
        ties_free = rng.permutation(n).astype(np.float32)
        assert len(prefix_nearest(ids, ties_free, k)) <= min(n, k * (2 + 2 * np.log2(max(n / k, 1))))


def test_a_callers_bad_arguments_are_value_errors(tmp_path, rng):
    """One way to catch bad input: every refused argument is an InvalidArgumentError, a CatalogError and a
    ValueError, with the value in its message."""
    ids, codes, features = random_items(rng, 50, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shard_count=2) as catalog:
        catalog.add(ids, codes, features)
        refusals = [(lambda: catalog.search(codes[:1], k=0), "k must be at least 1, got 0"),
                    (lambda: catalog.search(codes[:1], radius=49), "got 49"),
                    (lambda: catalog.coarse(codes[:1], m=5, nprobe=0), "nprobe must be >= 1, got 0"),
                    (lambda: catalog.coarse(codes[:, :2], m=5), r"shape \(n, 6\)"),
                    (lambda: catalog.rerank(features[:2], catalog.coarse(codes[:1], m=5), 3), r"shape \(1, 8\)"),
                    (lambda: catalog.add(ids[:1], codes[:1], features[:1]), "already in the catalog"),
                    (lambda: catalog.features([2**41]), "not in the catalog"),
                    (lambda: Filter.parse(where=["brand"]), "field:value, got 'brand'")]
        for refuse, message in refusals:
            with pytest.raises(ValueError, match=message) as caught:
                refuse()
            assert isinstance(caught.value, InvalidArgumentError)
    with pytest.raises(ValueError, match="bits must be an integer in"):
        Catalog.create(tmp_path / "d", 0, FEATURE_DIM)


def test_every_caller_searches_through_one_contract_with_timed_stages(tmp_path, rng):
    ids, codes, features = random_items(rng, 400, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shard_count=3) as catalog:
        catalog.add(ids, codes, features)
    with Catalog.open(tmp_path / "c") as catalog:
        assert isinstance(catalog, CatalogReader)
        timings = StageTimings()
        hits = catalog.search(codes[:4], features[:4], k=5, pool=50, timings=timings)
        assert timings.coarse > 0 and timings.rerank > 0 and timings.remote == 0
        by_hand = catalog.rerank(features[:4], catalog.coarse(codes[:4], m=50), 5)
        assert all(np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances)
                   for a, b in zip(hits, by_hand))
        hamming_only = StageTimings()
        first = catalog.search(codes[:4], k=5, pool=50, timings=hamming_only)
        assert hamming_only.rerank == 0 and all(h.distances is None and len(h) == 5 for h in first)


def test_open_or_create_checks_the_layout_once_and_the_files_stay_behind_the_api(tmp_path, rng):
    ids, codes, features = random_items(rng, 30, 48)
    path = tmp_path / "c"
    assert not catalog_exists(path)
    with open_or_create(path, 48, FEATURE_DIM, shard_count=2, model_fingerprint="m1") as catalog:
        catalog.add(ids, codes, features)
    assert catalog_exists(path)
    with open_or_create(path, 48, FEATURE_DIM) as catalog:
        assert len(catalog) == 30 and catalog.manifest.shard_count == 2
    with pytest.raises(InvalidArgumentError, match="holds 48-bit codes with 8-d features, not 64-bit codes"):
        open_or_create(path, 64, FEATURE_DIM)
    with pytest.raises(CatalogError, match="made by model m1"):
        open_or_create(path, 48, FEATURE_DIM, model_fingerprint="m2")
    (path / "engine.json").write_text("{}")  # a file of the engine's: not the storage layer's to remove
    remove_catalog_files(path)
    assert not catalog_exists(path) and sorted(p.name for p in path.iterdir()) == ["engine.json"]


def test_the_former_keyword_names_still_open_a_shard_subset(tmp_path, rng):
    """README's `Catalog.open(..., shards=[...])` and `Catalog.create(..., shards=N)` keep working."""
    ids, codes, features = random_items(rng, 60, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shards=3) as catalog:
        catalog.add(ids, codes, features)
    with Catalog.open(tmp_path / "c", shards=[1]) as one, Catalog.open(tmp_path / "c", shard_numbers=[1]) as same:
        assert len(one) == len(same) == int((ids % 3 == 1).sum())


def test_rebuild_indices_stores_every_shards_index_again(tmp_path, rng):
    ids, codes, features = random_items(rng, 200, 48)
    with Catalog.create(tmp_path / "c", 48, FEATURE_DIM, shard_count=2) as catalog:
        catalog.add(ids, codes, features)
    with Catalog.open(tmp_path / "c", readonly=False) as writer:
        for shard in writer.shards:
            with shard.env.begin(write=True) as txn:
                txn.put(b"index", b"garbage", db=shard._info)
            shard.flush = lambda: None  # close without re-storing a good index
    with Catalog.open(tmp_path / "c", readonly=False) as writer:
        assert not any(s.index_loaded_from_disk for s in writer.shards)
        writer.rebuild_indices()
    with Catalog.open(tmp_path / "c") as reader:
        assert all(s.index_loaded_from_disk for s in reader.shards) and not list(reader.verify())
    with Catalog.open(tmp_path / "c") as reader, pytest.raises(CatalogError, match="opened read-only"):
        reader.rebuild_indices()
