"""Every pair of codes within a Hamming radius, exactly, without comparing every pair with every other.

Multi-index hashing by the pigeonhole principle: split the code's bits into radius + 1 disjoint substrings. Two
codes within `radius` differ in at most `radius` bits, so at least one substring holds none of them: the pair
agrees exactly on that substring. Sorting the codes by one substring puts all codes that agree on it in one run
of equal keys, so comparing (full Hamming distance) only the pairs inside runs, for each substring, misses no pair
within the radius. A pair is kept at the first substring whose keys it shares, so each comes out once.

Cost: the pairs compared are, summed over the substrings, L (L - 1) / 2 for each run of length L. For n uniform
random codes of b bits that is about (radius + 1) n^2 / 2^(b / (radius + 1) + 1); codes clustered around a few
centres make longer runs (the tail of a long run is quadratic), which `PairCount` reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from shards.errors import InvalidArgumentError

CHUNK_PAIRS = 1 << 22  # pairs compared per numpy step: ~100 MiB of temporaries


@dataclass
class PairCount:
    """What a search for close pairs did: codes searched, pairs compared, and the longest run of equal keys (the
    skew)."""

    items: int = 0
    compared: int = 0
    longest_run: int = 0


def substring_keys(padded: np.ndarray, bits: int, parts: int) -> list[np.ndarray]:
    """One uint64 key per code for each of `parts` disjoint, nearly equal bit ranges covering the code's `bits`:
    codes that agree on a range have equal keys (a range wider than 64 bits is folded by XOR, so unequal ranges
    may share a key too: that only costs comparisons)."""
    keys = []
    for columns in np.array_split(np.arange(bits), parts):
        chunk_keys = []
        for start in range(0, len(padded), 1 << 20):  # unpacked bits of a million codes at a time
            unpacked = np.unpackbits(padded[start:start + (1 << 20)], axis=1)[:, columns]
            packed = np.packbits(unpacked, axis=1)
            words = np.zeros((len(packed), -(-packed.shape[1] // 8) * 8), np.uint8)
            words[:, :packed.shape[1]] = packed
            chunk_keys.append(np.bitwise_xor.reduce(words.view(np.uint64), axis=1) if words.shape[1]
                              else np.zeros(len(packed), np.uint64))
        keys.append(np.concatenate(chunk_keys) if chunk_keys else np.zeros(0, np.uint64))
    return keys


def _run_pairs(order: np.ndarray, sorted_keys: np.ndarray, count: PairCount
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of positions (in the codes' order) inside a run of equal keys, CHUNK_PAIRS-sized at most, each
    pair once. Sorted position p pairs with the rest of its run: run_end[p] - p - 1 partners."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, len(sorted_keys)])
    if len(lengths):
        count.longest_run = max(count.longest_run, int(lengths.max()))
    run_end = np.repeat(starts + lengths, lengths)
    partners = run_end - np.arange(len(sorted_keys)) - 1
    before = np.r_[0, np.cumsum(partners)]
    count.compared += int(before[-1])
    position = 0
    while position < len(partners):
        stop = max(int(np.searchsorted(before, before[position] + CHUNK_PAIRS, "right")) - 1, position + 1)
        stop = min(stop, len(partners))
        each = partners[position:stop]
        first = np.repeat(np.arange(position, stop), each)
        offset = np.arange(len(first)) - np.repeat(before[position:stop] - before[position], each)
        yield order[first], order[first + offset + 1]
        position = stop


def close_pairs(padded: np.ndarray, bits: int, radius: int, count: PairCount | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair of rows of `padded` (codes zero-padded to 64-bit words) whose Hamming distance is at most
    `radius`, exactly: chunks of (first row, second row, distance), first < second, each pair once. `count`: where
    to add what the search did."""
    if not 0 <= radius <= bits:
        raise InvalidArgumentError(f"radius must be between 0 and the code length ({bits} bits), got {radius}")
    if padded.ndim != 2 or padded.dtype != np.uint8 or padded.shape[1] % 8:
        raise InvalidArgumentError(f"padded codes must be uint8 rows of whole 64-bit words, got {padded.shape} "
                                   f"{padded.dtype}")
    count = count if count is not None else PairCount()
    count.items += len(padded)
    words = np.ascontiguousarray(padded).view(np.uint64)
    keys = substring_keys(padded, bits, radius + 1)
    for part, key in enumerate(keys):
        order = np.argsort(key, kind="stable")
        for first, second in _run_pairs(order, key[order], count):
            shared_earlier = np.zeros(len(first), bool)
            for earlier in keys[:part]:  # compared (and kept, if close) at that substring already
                shared_earlier |= earlier[first] == earlier[second]
            first, second = first[~shared_earlier], second[~shared_earlier]
            distance = np.bitwise_count(words[first] ^ words[second]).sum(axis=1, dtype=np.int32)
            close = distance <= radius
            low, high = np.minimum(first[close], second[close]), np.maximum(first[close], second[close])
            yield low, high, distance[close]
