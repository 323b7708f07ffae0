"""On Ray: shards served by actors answer exactly as the in-process catalog does, and build-index on an actor pool
makes the catalog a local build makes (one local Ray instance for the whole module, 2 CPUs, shut down at the
end)."""
import shutil
import time

import h5py
import numpy as np
import pytest

from engine.build_index import build_index
from engine.export import export_catalog
from engine.synthetic import make_image_folder
from shards import Catalog, CatalogError, CatalogReader, DuplicateIdError, Filter, StageTimings

ray = pytest.importorskip("ray")

from shards.cluster import RayCatalog  # noqa: E402
from test_catalog import FEATURE_DIM, random_items  # noqa: E402
from test_engine import kill_mid_build_and_rerun  # noqa: E402


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
            catalog.add(ids, codes, features, [{"path": f"/x/{i}.png", "label": str(i % 3),
                                                "metadata": {"brand": "acme" if i % 5 else "other"}} for i in ids])
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
                assert same_hits(remote.search(queries, query_features, k=5, radius=radius),
                                 local.search(queries, query_features, k=5, radius=radius))
            for rule in (Filter.parse(["1"]), Filter.parse(["0", "2"], ["brand:other"]), Filter.parse(["9"])):
                assert same_hits(remote.search(queries, query_features, k=5, pool=40, filter=rule),
                                 local.search(queries, query_features, k=5, pool=40, filter=rule))
                assert same_hits(remote.coarse(queries, radius=8, filter=rule),
                                 local.coarse(queries, radius=8, filter=rule))
            some = ids[[5, 17, 900]].tolist() + [123]
            assert [i and i.id for i in remote.get(some)] == [i and i.id for i in local.get(some)]
            assert remote.metadata(some) == local.metadata(some)
            assert isinstance(remote, CatalogReader) and np.array_equal(remote.present(some), local.present(some))
            assert np.array_equal(remote.features(ids[[5, 17, 900]]), local.features(ids[[5, 17, 900]]))
            timings = StageTimings()  # one round trip: both stages timed together
            remote.search(queries, query_features, k=5, timings=timings)
            assert timings.remote > 0 and timings.coarse == timings.rerank == 0
            before = remote.reranked_again
            remote._eager = lambda n, m: None if m is None else 1  # each pool takes more: the fine stage again
            assert same_hits(remote.search(queries, query_features, k=10, pool=300),
                             local.search(queries, query_features, k=10, pool=300))
            assert remote.reranked_again == before + len(queries)
        finally:
            remote.close()


def test_a_dead_actor_is_named_within_the_timeout(local_ray, catalogs):
    paths, _, queries, query_features = catalogs
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
        found = remote.search(queries, query_features, k=5, pool=20)  # both stages: the fine one keeps the list
        assert remote.missing_shards == [2, 3] and all(len(h) == 5 and (h.ids % 4 < 2).all() for h in found)
    finally:
        remote.close()


def test_writes_go_to_the_owning_actors_and_show_after_refresh(local_ray, catalogs, tmp_path):
    """Adds and deletes through RayCatalog land in the owning groups' shards, all of a batch or none; searches
    see them after refresh, equal to a local catalog given the same writes."""
    paths, ids, queries, query_features = catalogs
    shutil.copytree(paths[4], tmp_path / "ray")
    shutil.copytree(paths[4], tmp_path / "local")
    new_ids, new_codes, new_features = random_items(np.random.default_rng(11), 60, 48)
    metas = [{"path": f"/new/{i}.png", "label": "1"} for i in new_ids]
    remote = RayCatalog(tmp_path / "ray", "local", 2, timeout=60)
    try:
        with pytest.raises(DuplicateIdError):  # the last group refuses: the groups before it are undone
            remote.add(np.append(new_ids, ids[ids % 4 == 3][0]), np.vstack([new_codes, new_codes[:1]]),
                       np.vstack([new_features, new_features[:1]]), metas + [metas[0]])
        remote.add(new_ids, new_codes, new_features, metas)
        assert len(remote) == 1200 and not remote.present(new_ids[:1])[0]  # not before refresh
        remote.refresh()
        assert len(remote) == 1260 and remote.present(new_ids).all()
        assert remote.delete(np.append(new_ids[:7], ids[:3])) == 10 and len(remote) == 1260
        remote.refresh()
        with Catalog.open(tmp_path / "local", readonly=False) as local:
            local.add(new_ids, new_codes, new_features, metas)
            local.delete(np.append(new_ids[:7], ids[:3]))
        with Catalog.open(tmp_path / "local") as local:
            assert len(remote) == len(local) == 1250
            both = np.concatenate([queries, new_codes[7:10]])
            both_features = np.concatenate([query_features, new_features[7:10]])
            assert same_hits(remote.search(both, both_features, k=8, pool=50),
                             local.search(both, both_features, k=8, pool=50))
    finally:
        remote.close()
    with Catalog.open(tmp_path / "ray") as written, Catalog.open(tmp_path / "local") as local:
        assert sorted(i.id for i in written) == sorted(i.id for i in local)  # what the actors committed


def exported(catalog, file) -> dict[str, np.ndarray]:
    """A catalog's items through engine.export, in id order."""
    export_catalog(catalog, file, progress=False)
    with h5py.File(file) as f:
        order = np.argsort(f["ids"][:])
        return {name: f[name][:][order] for name in ("ids", "codes", "features", "labels", "paths", "metadata")}


def test_distributed_build_equals_local_build(local_ray, image_folder, trained_model, tmp_path):
    """Ray Data's actors (one per CPU) encode the same batches as a local build's worker: the same ids, codes,
    labels and paths, features equal within float16 rounding, the same bad file reported."""
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    (images / "ring" / "broken.png").write_bytes(b"not a png")
    local = build_index(images, trained_model, tmp_path / "local", shards=3, batch_size=16, workers=1,
                        progress=False)
    remote = build_index(images, trained_model, tmp_path / "ray", shards=3, batch_size=16, ray="local",
                         progress=False)
    assert remote.indexed == local.indexed == remote.found - 1 and remote.failures == local.failures
    assert [f["path"] for f in remote.failures] == [str(images / "ring" / "broken.png")]
    a, b = exported(tmp_path / "local", tmp_path / "a.h5"), exported(tmp_path / "ray", tmp_path / "b.h5")
    for name in ("ids", "codes", "labels", "paths", "metadata"):
        assert np.array_equal(a[name], b[name]), name
    np.testing.assert_allclose(a["features"].astype(np.float32), b["features"].astype(np.float32), rtol=1e-3)
    again = build_index(images, trained_model, tmp_path / "ray", ray="local", progress=False)
    assert again.unchanged == remote.indexed and again.indexed == 0 and again.failed == 1  # the bad file again


def test_ray_build_killed_mid_way_resumes_with_every_image_once(local_ray, trained_model, tmp_path, cli_env):
    """A build-index driver joined to a running Ray instance (HOST:PORT), SIGKILLed mid-build: the rerun commits
    the rest, and every image is in the catalog exactly once."""
    files = make_image_folder(tmp_path / "images", per_class=150, size=32, seed=5)
    kill_mid_build_and_rerun(["-m", "engine.build_index", tmp_path / "images", "--model", trained_model, "--catalog",
                              tmp_path / "c", "--batch-size", "8", "--workers", "1", "--ray",
                              ray.get_runtime_context().gcs_address], tmp_path / "c", files, cli_env, 100_000)


def test_service_on_ray_writes_through_the_actors(local_ray, image_folder, trained_model, tmp_path):
    """`engine.serve --ray`: an upload is committed by the owning group's actor and found by a filtered search
    at once (the service refreshes after each write); a delete likewise."""
    from fastapi.testclient import TestClient

    from engine.api.app import create_app
    from engine.api.service import Service

    build_index(image_folder, trained_model, tmp_path / "c", shards=3, progress=False, workers=0)
    service = Service(tmp_path / "c", ray="local", shards_per_actor=2)
    try:
        client = TestClient(create_app(service))
        before = client.get("/healthz").json()["items"]
        photo = (image_folder / "ring").iterdir().__next__().read_bytes()
        added = client.post("/items", files={"image": ("x.png", photo + b"\0", "image/png")}, data={"label": "new"})
        assert added.status_code == 200, added.text
        new = added.json()["id"]
        found = client.get("/search", params={"id": new, "k": 3, "label": "new"}).json()["results"]
        assert [r["id"] for r in found] == [new] and client.get("/healthz").json()["items"] == before + 1
        assert client.delete(f"/items/{new}").status_code == 200
        assert client.get("/healthz").json()["items"] == before and client.delete(f"/items/{new}").status_code == 404
    finally:
        service.close()
