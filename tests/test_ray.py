"""Shards served by Ray actors answer exactly as the in-process catalog does (one local Ray instance for the
whole module, 2 CPUs, shut down at the end)."""
import time

import numpy as np
import pytest

from shards import Catalog, CatalogError

ray = pytest.importorskip("ray")

from shards.cluster import RayCatalog  # noqa: E402
from test_catalog import FEATURE_DIM, random_items  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """Catalogs of 1, 3 and 4 shards over the same clustered items (ties everywhere)."""
    rng = np.random.default_rng(7)
    ids, codes, features = random_items(rng, 1200, 48)
    made = {}
    for shards in (1, 3, 4):
        path = tmp_path_factory.mktemp(f"ray{shards}") / "c"
        with Catalog.create(path, 48, FEATURE_DIM, shards=shards) as catalog:
            catalog.add(ids, codes, features, [{"path": f"/x/{i}.png", "label": str(i % 3)} for i in ids])
        made[shards] = path
    queries = np.concatenate([codes[:3], np.packbits(rng.random((3, 48)) < 0.5, axis=1)])
    return made, ids, queries, rng.standard_normal((6, FEATURE_DIM)).astype(np.float32)


def same_hits(a, b) -> bool:
    return all(np.array_equal(x.ids, y.ids) and np.array_equal(x.hamming, y.hamming)
               and (x.distances is None) == (y.distances is None)
               and (x.distances is None or np.allclose(x.distances, y.distances, rtol=1e-6)) for x, y in zip(a, b))


@pytest.mark.parametrize("shards, per_actor", [(1, 1), (3, 1), (4, 3), (4, 2)])
def test_distributed_search_equals_local(local_ray, catalogs, shards, per_actor):
    paths, ids, queries, query_features = catalogs
    with Catalog.open(paths[shards]) as local:
        remote = RayCatalog(paths[shards], "local", per_actor, timeout=60)
        try:
            assert len(remote) == len(local) == 1200
            for k, pool in ((1, 1), (5, 37), (10, 300)):
                assert same_hits(remote.search(queries, query_features, k=k, pool=pool),
                                 local.search(queries, query_features, k=k, pool=pool))
            for radius in (0, 6, 12):
                assert same_hits(remote.coarse(queries, radius=radius), local.coarse(queries, radius=radius))
            some = ids[[5, 17, 900]].tolist() + [123]
            assert [i and i.id for i in remote.get(some)] == [i and i.id for i in local.get(some)]
            assert remote.metadata(some) == local.metadata(some)
        finally:
            remote.close()


def test_a_dead_actor_is_named_within_the_timeout(local_ray, catalogs):
    paths, _, queries, _ = catalogs
    remote = RayCatalog(paths[4], "local", 2, timeout=5)
    try:
        ray.kill(remote.actors[1])
        start = time.monotonic()
        with pytest.raises(CatalogError, match=r"shards \[2, 3\] did not answer"):
            remote.coarse(queries, m=10)
        assert time.monotonic() - start < 10
        remote.allow_partial = True
        partial = remote.coarse(queries, m=10)
        assert remote.missing_shards == [2, 3]
        assert all((h.ids % 4 < 2).all() for h in partial)
    finally:
        remote.close()
