"""A catalog's shards served by Ray actors: the read side of `Catalog` for catalogs past one machine.

Each actor (`ShardGroup`) opens a group of shards read-only from the path it is given (a shared filesystem or
the node's own copy) and answers with the same `Catalog` code a single machine runs. The driver (`RayCatalog`)
fans the coarse stage out and merges the answers exactly (`shards.ranking.merge_hits`), then sends each query's
features and pool to the groups that hold the pool's items and merges their nearest by squared distance
(`shards.ranking.nearest`): results equal one machine's, ties included. Every remote call has a timeout; a group
that dies or does not answer is named in the error, or, with `allow_partial`, left out and reported in
`missing_shards`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from shards.catalog import Catalog, Item, Manifest
from shards.errors import CatalogError
from shards.filters import Filter
from shards.ranking import Hits, merge_hits, nearest

TIMEOUT_S = 30.0


class ShardGroup:
    """One actor's shards, opened read-only; the methods are those of `Catalog` the driver needs."""

    def __init__(self, path: str, shards: Sequence[int]):
        self.path, self.shards = path, list(shards)
        self.catalog = Catalog.open(path, readonly=True, threads=1, shards=shards,
                                    writer_may_join=os.access(path, os.W_OK))  # writes: `add`, `delete`

    def count(self) -> int:
        return len(self.catalog)

    def coarse(self, codes: np.ndarray, m: int | None, radius: int | None, within: Filter | None,
               nprobe: int | None) -> list[Hits]:
        return self.catalog.coarse(codes, m=m, radius=radius, within=within, nprobe=nprobe)

    def rerank_squared(self, features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        return self.catalog.rerank_squared(features, candidates, k)

    def get(self, ids: np.ndarray) -> list[Item | None]:
        return self.catalog.get(ids)

    def metadata(self, ids: np.ndarray) -> list[dict | None]:
        return self.catalog.metadata(ids)

    def present(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.present(ids)

    def _writer(self) -> Catalog:
        """A writer on this group's shards alone, for one batch; searches see its commit after `refresh`."""
        return Catalog.open(self.path, readonly=False, threads=1, shards=self.shards)

    def add(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray, metas: list[dict] | None) -> None:
        with self._writer() as writer:
            writer.add(ids, codes, features, metas)

    def delete(self, ids: np.ndarray) -> int:
        with self._writer() as writer:
            return writer.delete(ids)

    def refresh(self) -> int:
        self.catalog.refresh()
        return len(self.catalog)


def connect(address: str) -> None:
    """Join Ray at `address`: `local` starts a private instance on this machine, `auto` or HOST:PORT joins a
    running cluster. A process already connected stays connected."""
    try:
        import ray
    except ImportError:
        raise CatalogError("Ray is not installed: pip install 'latenthash[ray]'") from None
    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise CatalogError(f"cannot join Ray at {address!r}: {error}") from None


class RayCatalog:
    """What `engine.search.Searcher` reads from a catalog, answered by Ray actors that each hold
    `shards_per_actor` shards."""

    def __init__(self, path: str | os.PathLike, address: str = "local", shards_per_actor: int = 1,
                 timeout: float = TIMEOUT_S, allow_partial: bool = False):
        if shards_per_actor < 1:
            raise CatalogError(f"shards_per_actor must be >= 1, got {shards_per_actor}")
        self.path = Path(path).resolve()
        self.manifest = Manifest.read(self.path)
        self.timeout, self.allow_partial = timeout, allow_partial
        self.missing_shards: list[int] = []  # the shards the last query (or read) went without (allow_partial)
        connect(address)
        import ray

        count = self.manifest.shard_count
        self.groups = [list(range(start, min(start + shards_per_actor, count)))
                       for start in range(0, count, shards_per_actor)]
        remote = ray.remote(num_cpus=0)(ShardGroup).options(scheduling_strategy="SPREAD", max_restarts=0)
        self.actors = [remote.remote(str(self.path), group) for group in self.groups]
        self._owner = np.empty(count, np.int64)
        for n, group in enumerate(self.groups):
            self._owner[group] = n
        self._count = sum(self._everyone("count").values())

    @property
    def bits(self) -> int:
        return self.manifest.bits

    def __len__(self) -> int:
        return self._count

    def _call(self, method: str, calls: list[tuple[int, tuple]]) -> dict[int, object]:
        """Run `method(*args)` on each (actor number, args); answers by actor number. Raises, naming the shards,
        for actors that died or did not answer within the timeout (unless allow_partial); a catalog error an
        actor raised is raised here as it is."""
        from ray.exceptions import RayTaskError

        try:
            return self._answers(method, calls)
        except RayTaskError as error:
            if isinstance(error.cause, CatalogError):
                raise error.cause from None
            raise

    def _answers(self, method: str, calls: list[tuple[int, tuple]]) -> dict[int, object]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = {n: getattr(self.actors[n], method).remote(*args) for n, args in calls}
        try:  # the usual case in one call; a failure is sorted out below
            return dict(zip(refs, ray.get(list(refs.values()), timeout=self.timeout)))
        except GetTimeoutError:
            waited = 0.0  # the timeout has passed: only what is ready now counts
        except RayActorError:
            waited = self.timeout
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=waited)
        ready = set(ready)
        answers, failed = {}, [n for n, ref in refs.items() if ref not in ready]
        for n, ref in refs.items():
            if ref in ready:
                try:
                    answers[n] = ray.get(ref)
                except RayActorError:
                    failed.append(n)
        self.missing_shards = sorted(set(self.missing_shards) | {s for n in failed for s in self.groups[n]})
        if failed and not self.allow_partial:
            raise CatalogError(f"{self.path}: shards {self.missing_shards} did not answer within {self.timeout:g} s "
                               "(their Ray actor died or is stuck); pass allow_partial=True for the other shards' "
                               "results")
        return answers

    def _everyone(self, method: str, *args) -> dict[int, object]:
        return self._call(method, [(n, args) for n in range(len(self.actors))])

    def _split(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Positions in `ids` per owning actor."""
        owners = self._owner[ids % self.manifest.shard_count]
        return {int(n): np.flatnonzero(owners == n) for n in np.unique(owners)}

    def coarse(self, query_codes: np.ndarray, m: int | None = None, radius: int | None = None,
               within: Filter | None = None, nprobe: int | None = None) -> list[Hits]:
        """`Catalog.coarse` across the actors: each group's answer, merged exactly. `within`: a filter, which
        each group applies to its own shards' metadata."""
        if within is not None and not isinstance(within, Filter):
            raise CatalogError("within must be a Filter on Ray (a restricted index is one process's)")
        self.missing_shards = []  # a query starts here; its fine stage adds what it misses
        answers = self._everyone("coarse", query_codes, m, radius, within, nprobe)
        per_query = [[(h.hamming, h.ids) for h in hits] for hits in zip(*answers.values())] if answers else [
            [] for _ in range(len(query_codes))]
        return merge_hits(per_query, m)

    def rerank(self, query_features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        """`Catalog.rerank` across the actors: each group ranks the part of each pool it holds; their nearest,
        by squared distance and id, are merged here."""
        query_features = np.asarray(query_features, np.float32)
        parts: dict[int, list[Hits]] = {}
        for q, hits in enumerate(candidates):
            for n, rows in self._split(hits.ids).items():
                parts.setdefault(n, [Hits(np.empty(0, np.int64), np.empty(0, np.int32))
                                     for _ in candidates])[q] = Hits(hits.ids[rows], hits.hamming[rows])
        answers = self._call("rerank_squared", [(n, (query_features, pools, k)) for n, pools in parts.items()])
        results = []
        for q in range(len(candidates)):
            found = [answer[q] for answer in answers.values()]
            ids = np.concatenate([h.ids for h in found]) if found else np.empty(0, np.int64)
            hamming = np.concatenate([h.hamming for h in found]) if found else np.empty(0, np.int32)
            squared = np.concatenate([h.distances for h in found]) if found else np.empty(0, np.float32)
            order = nearest(ids, squared, k)
            results.append(Hits(ids[order], hamming[order], np.sqrt(squared[order])))
        return results

    search = Catalog.search  # the same two stages over this class's coarse and rerank (measured: one fused
    # round trip, each group re-ranking its whole local pool, was slower: 13.5-15.2 ms against 10.1-11.7 ms)

    def _by_owner(self, method: str, ids: Sequence[int] | np.ndarray) -> list:
        ids = np.asarray(ids, np.int64)
        self.missing_shards = []
        found: list = [None] * len(ids)
        split = self._split(ids)
        answers = self._call(method, [(n, (ids[rows],)) for n, rows in split.items()])
        for n, answer in answers.items():
            for row, value in zip(split[n], answer):
                found[row] = value
        return found

    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        return self._by_owner("get", ids)

    def metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict | None]:
        return self._by_owner("metadata", ids)

    def present(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """A mask of the ids the actors' snapshots hold."""
        return np.array(self._by_owner("present", ids), bool)

    def add(self, ids: Sequence[int] | np.ndarray, codes: np.ndarray, features: np.ndarray,
            metas: Sequence[dict] | None = None) -> None:
        """Each group commits its part of the batch to its own shards, one group after another (the catalog
        has one writer at a time). If a group refuses (a duplicate id) or fails, the parts already committed
        are deleted again: all of the batch or none. Searches see it after `refresh`."""
        ids = np.asarray(ids, np.int64)
        codes, features = np.asarray(codes), np.asarray(features)
        split, done = self._split(ids), []
        self.missing_shards = []
        try:
            for n, rows in split.items():
                part = [metas[r] for r in rows] if metas is not None else None
                self._call("add", [(n, (ids[rows], codes[rows], features[rows], part))])
                done.append(n)
        except BaseException:
            if done:
                self._call("delete", [(n, (ids[split[n]],)) for n in done])
            raise

    def delete(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete items through the groups that own them (absent ids are ignored); returns how many were
        removed. Searches see it after `refresh`."""
        ids = np.asarray(ids, np.int64)
        self.missing_shards = []
        split = self._split(ids)
        return sum(self._call("delete", [(n, (ids[rows],))]).get(n, 0) for n, rows in split.items())

    def refresh(self) -> None:
        """See what writers committed since the actors opened their shards."""
        self.missing_shards = []
        self._count = sum(self._everyone("refresh").values())

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
