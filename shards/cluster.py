"""A catalog's shards served by Ray actors: the read contract (`shards.reader.CatalogReader`) for catalogs past
one machine.

Each actor (`ShardGroup`) opens a group of shards read-only from the path it is given (a shared filesystem or
the node's own copy) and answers with the same `Catalog` code a single machine runs. The driver (`RayCatalog`)
fans the coarse stage out and merges the answers exactly (`shards.ranking.merge_hits`), then sends each query's
features and pool to the groups that hold the pool's items and merges their nearest by squared distance
(`shards.ranking.nearest`): results equal one machine's, ties included. Its two-stage search runs both stages in
one round trip to each actor, built from the same ranking functions. Every remote call has a timeout; a group
that dies or does not answer is named in the error, or, with `allow_partial`, left out and reported in
`missing_shards`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from shards.catalog import Catalog, Item
from shards.codes import padded_bytes
from shards.errors import CatalogError, InvalidArgumentError
from shards.filters import Filter
from shards.manifest import Manifest
from shards.ranking import Hits, merge_hits, nearest, prefix_nearest
from shards.reader import CatalogReader, StageTimings

TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0  # a fresh actor imports numpy and Faiss and opens its shards: slow on a busy node


class ShardGroup:
    """One actor's shards, opened read-only; the methods are those of `Catalog` the driver needs."""

    def __init__(self, path: str, shard_numbers: Sequence[int]):
        self.path, self.shard_numbers = path, list(shard_numbers)
        self.catalog = Catalog.open(path, readonly=True, threads=1, shard_numbers=shard_numbers,
                                    writer_may_join=os.access(path, os.W_OK))  # writes: `add`, `delete`

    def count(self) -> int:
        return len(self.catalog)

    def coarse(self, codes: np.ndarray, m: int | None, radius: int | None, filter: Filter | None,
               nprobe: int | None) -> list[Hits]:
        return self.catalog.coarse(codes, m, radius, filter, nprobe)

    def rerank_squared(self, features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        return self.catalog.rerank_squared(features, candidates, k)

    def search(self, codes: np.ndarray, features: np.ndarray, m: int | None, radius: int | None,
               filter: Filter | None, nprobe: int | None, k: int, eager: int | None
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[Hits]]:
        """Both stages in one round trip: per query, this group's coarse pool as (hamming, ids), and the squared
        distances of the places among its first `eager` that can be among the k nearest of whatever prefix of
        it makes the merged pool (`prefix_nearest`)."""
        pools = self.catalog.coarse(codes, m, radius, filter, nprobe)
        heads = [h.take(slice(eager)) for h in pools]
        leaders = self.catalog.rerank_squared(features, heads, k, choose=prefix_nearest)
        return [(h.hamming, h.ids) for h in pools], leaders

    def get(self, ids: np.ndarray) -> list[Item | None]:
        return self.catalog.get(ids)

    def metadata(self, ids: np.ndarray) -> list[dict | None]:
        return self.catalog.metadata(ids)

    def features(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.features(ids)

    def present(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.present(ids)

    def codes(self, filter: Filter | None) -> tuple[np.ndarray, np.ndarray]:
        return self.catalog.codes(filter)

    def _writer(self) -> Catalog:
        """A writer on this group's shards alone, for one batch; searches see its commit after `refresh`."""
        return Catalog.open(self.path, readonly=False, threads=1, shard_numbers=self.shard_numbers)

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


class RayCatalog(CatalogReader):
    """The read contract answered by Ray actors that each hold `shards_per_actor` shards; writes go to the
    actors that own the items."""

    def __init__(self, path: str | os.PathLike, address: str = "local", shards_per_actor: int = 1,
                 timeout: float = TIMEOUT_S, allow_partial: bool = False):
        if shards_per_actor < 1:
            raise InvalidArgumentError(f"shards_per_actor must be at least 1, got {shards_per_actor}")
        self.path = Path(path).resolve()
        self.manifest = Manifest.read(self.path)
        self.timeout, self.allow_partial = timeout, allow_partial
        self.missing_shards: list[int] = []  # the shards the last query (or read) went without (allow_partial)
        self.reranked_again = 0  # queries whose pool took more from an actor than `search` had it rank
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
        self._counts = self._call("count", [(n, ()) for n in range(len(self.actors))],
                                  max(timeout, START_TIMEOUT_S))  # items per actor, once they have started

    def __len__(self) -> int:
        return sum(self._counts.values())

    def _call(self, method: str, calls: list[tuple[int, tuple]], timeout: float | None = None) -> dict[int, object]:
        """Run `method(*args)` on each (actor number, args); answers by actor number. Raises, naming the shards,
        for actors that died or did not answer within the timeout (default: the catalog's; unless
        allow_partial); a catalog error an actor raised is raised here as it is."""
        from ray.exceptions import RayTaskError

        try:
            return self._answers(method, calls, self.timeout if timeout is None else timeout)
        except RayTaskError as error:
            if isinstance(error.cause, CatalogError):
                raise error.cause from None
            raise

    def _answers(self, method: str, calls: list[tuple[int, tuple]], timeout: float) -> dict[int, object]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = {n: getattr(self.actors[n], method).remote(*args) for n, args in calls}
        try:  # the usual case in one call; a failure is sorted out below
            return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout)))
        except GetTimeoutError:
            waited = 0.0  # the timeout has passed: only what is ready now counts
        except RayActorError:
            waited = timeout
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
            raise CatalogError(f"{self.path}: shards {self.missing_shards} did not answer within {timeout:g} s "
                               "(their Ray actor died or is stuck); pass allow_partial=True for the other shards' "
                               "results")
        return answers

    def _everyone(self, method: str, *args) -> dict[int, object]:
        return self._call(method, [(n, args) for n in range(len(self.actors))])

    def _owners(self, ids: np.ndarray) -> np.ndarray:
        """The actor that holds each id."""
        return self._owner[ids % self.manifest.shard_count]

    def _split(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Positions in `ids` per owning actor."""
        owners = self._owners(ids)
        return {int(n): np.flatnonzero(owners == n) for n in np.unique(owners)}

    def _start_query(self, filter: Filter | None) -> None:
        if filter is not None and not isinstance(filter, Filter):
            raise InvalidArgumentError(f"filter must be a shards.filters.Filter, got {type(filter).__name__}")
        self.missing_shards = []  # a query starts here; its fine stage adds what it misses

    def coarse(self, query_codes: np.ndarray, m: int | None = None, radius: int | None = None,
               filter: Filter | None = None, nprobe: int | None = None) -> list[Hits]:
        """`Catalog.coarse` across the actors: each group's answer, merged exactly; each group applies `filter`
        to its own shards' metadata."""
        self._start_query(filter)
        answers = self._everyone("coarse", query_codes, m, radius, filter, nprobe)
        return merge_hits(_by_query([[(h.hamming, h.ids) for h in hits] for hits in answers.values()],
                                     len(query_codes)), m)

    def rerank(self, query_features: np.ndarray, candidates: list[Hits], k: int) -> list[Hits]:
        """`Catalog.rerank` across the actors: each group ranks the part of each pool it holds; their nearest,
        by squared distance and id, are merged here."""
        query_features = np.asarray(query_features, np.float32)
        parts: dict[int, list[Hits]] = {}
        for q, hits in enumerate(candidates):
            for n, rows in self._split(hits.ids).items():
                parts.setdefault(n, [Hits(np.empty(0, np.int64), np.empty(0, np.int32))
                                     for _ in candidates])[q] = hits.take(rows)
        answers = self._call("rerank_squared", [(n, (query_features, pools, k)) for n, pools in parts.items()])
        return [_nearest_of([answer[q] for answer in answers.values()], k) for q in range(len(candidates))]

    def _eager(self, n: int, m: int | None) -> int | None:
        """How much of its coarse pool actor n ranks in `search`: its expected share of a merged pool of m
        (its fraction of the items) plus four binomial standard deviations and a margin. A query whose pool
        takes more from it than that (~1 in 30,000 queries on evenly filled shards; more under a filter that
        picks items unevenly) has its fine stage run again, exactly, by `rerank`."""
        total = len(self)
        if m is None or total == 0:
            return None  # a radius search keeps every item in range: the whole pool is the share
        share = self._counts.get(n, 0) / total
        return min(m, int(np.ceil(m * share + 4 * np.sqrt(m * share * (1 - share)))) + 16)

    def _both_stages(self, query_codes: np.ndarray, query_features: np.ndarray, k: int, pool: int | None,
                     radius: int | None, nprobe: int | None, filter: Filter | None,
                     timings: StageTimings) -> list[Hits]:
        """Both stages in one round trip to each actor (`ShardGroup.search`): each answers with its coarse pool
        and the distances of the few items of its likely share that can rank; the pools merge exactly and the k
        nearest are taken among the merged pool's items. Results equal `coarse` then `rerank`."""
        start = time.perf_counter()
        self._start_query(filter)
        query_features = np.asarray(query_features, np.float32)
        eager = {n: self._eager(n, pool) for n in range(len(self.actors))}
        answers = self._call("search", [(n, (query_codes, query_features, pool, radius, filter, nprobe, k, eager[n]))
                                        for n in eager])
        pools = merge_hits(_by_query([parts for parts, _ in answers.values()], len(query_codes)), pool)
        results: list[Hits | None] = []
        for q, merged in enumerate(pools):
            taken = np.bincount(self._owners(merged.ids), minlength=len(self.actors))
            if any(e is not None and taken[n] > e for n, e in eager.items()):
                results.append(None)  # the fine stage again, below
                continue
            found = [leaders[q] for _, leaders in answers.values()]
            results.append(_nearest_of([h.take(np.isin(h.ids, merged.ids)) for h in found], k))
        again = [q for q, hits in enumerate(results) if hits is None]
        self.reranked_again += len(again)
        if again:
            for q, hits in zip(again, self.rerank(query_features[again], [pools[q] for q in again], k)):
                results[q] = hits
        timings.remote += time.perf_counter() - start
        return results

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

    def features(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self._by_owner("features", ids)  # each actor's answer comes back one row per id
        return np.array(rows, np.float32).reshape(len(rows), self.manifest.feature_dim)

    def codes(self, filter: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every group's ids and codes (8 bytes an item at up to 64 bits), merged in id order."""
        self._start_query(filter)
        answers = list(self._everyone("codes", filter).values())
        ids = np.concatenate([a[0] for a in answers]) if answers else np.empty(0, np.int64)
        codes = np.concatenate([a[1] for a in answers]) if answers else np.empty((0, padded_bytes(self.bits)), np.uint8)
        order = np.argsort(ids, kind="stable")
        return ids[order], codes[order]

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
        self._counts = self._everyone("refresh")

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _by_query(answers: list[list], n_queries: int) -> list[list]:
    """Each actor's per-query answers regrouped as each query's list of answers."""
    return [list(parts) for parts in zip(*answers)] if answers else [[] for _ in range(n_queries)]


def _nearest_of(found: list[Hits], k: int) -> Hits:
    """The k nearest of the groups' squared-distance answers for one query, ties by id, with distances."""
    ids = np.concatenate([h.ids for h in found]) if found else np.empty(0, np.int64)
    hamming = np.concatenate([h.hamming for h in found]) if found else np.empty(0, np.int32)
    squared = np.concatenate([h.distances for h in found]) if found else np.empty(0, np.float32)
    order = nearest(ids, squared, k)
    return Hits(ids[order], hamming[order], np.sqrt(squared[order]))
