"""Exact filters on labels and product metadata: the items a filtered search may return.

A filter is `label` (any of the given labels) and `where` (every `field:value` pair equal to the item's metadata).
Filtering is exact: the coarse stage scans only the items that pass (`HammingStage.restrict`), so a filtered search
returns the top k among them, as a brute force over the filtered subset would, never a short page.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from shards.errors import InvalidArgumentError


def stored_label(meta: dict | None) -> str | None:
    """An item's label as text (an imported catalog may hold bare class numbers)."""
    label = (meta or {}).get("label")
    return None if label is None else str(label)


def field_text(value: object) -> str:
    """How a metadata value is matched: strings as they are, anything else as JSON (12.5, true, null)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class Filter:
    labels: tuple[str, ...] = ()
    where: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, labels: Sequence[str] = (), where: Sequence[str] = ()) -> "Filter":
        """From `label` values and `field:value` strings (a value may itself hold ':')."""
        pairs = []
        for condition in where:
            field, colon, value = condition.partition(":")
            if not colon or not field:
                raise InvalidArgumentError(f"where must look like field:value, got {condition!r}")
            pairs.append((field, value))
        return cls(tuple(sorted(set(labels))), tuple(sorted(set(pairs))))

    def __bool__(self) -> bool:
        return bool(self.labels or self.where)


class FilterIndex:
    """label -> ids and (field, value) -> ids of one catalog snapshot, built in one pass over its metadata."""

    def __init__(self, items: Iterable[tuple[int, dict | None]]):
        by_label: dict[str, list[int]] = defaultdict(list)
        by_field: dict[tuple[str, str], list[int]] = defaultdict(list)
        for item, meta in items:
            label = stored_label(meta)
            if label is not None:
                by_label[label].append(item)
            product = (meta or {}).get("metadata")
            if isinstance(product, dict):
                for field, value in product.items():
                    by_field[(field, field_text(value))].append(item)
        self.by_label = {k: np.unique(np.array(v, np.int64)) for k, v in by_label.items()}
        self.by_field = {k: np.unique(np.array(v, np.int64)) for k, v in by_field.items()}

    def allowed(self, filter: Filter) -> np.ndarray:
        """Sorted ids of the items that pass `filter` (which must not be empty)."""
        empty = np.empty(0, np.int64)
        sets = []
        if filter.labels:
            sets.append(np.unique(np.concatenate([self.by_label.get(label, empty) for label in filter.labels])))
        sets += [self.by_field.get(pair, empty) for pair in filter.where]
        allowed = sets[0]
        for other in sets[1:]:
            allowed = np.intersect1d(allowed, other, assume_unique=True)
        return allowed
