"""Packed binary codes: padding for Faiss, and the brute-force Hamming reference everything is checked against."""
from __future__ import annotations

import numpy as np

WORD_BITS = 64
MAX_BITS, MAX_FEATURE_DIM = 4096, 65536  # bounds on what a catalog stores, checked wherever one is described


def code_bytes(bits: int) -> int:
    return (bits + 7) // 8


def padded_bytes(bits: int) -> int:
    """Bytes per code inside a Faiss index: whole 64-bit words, which take Faiss's fast popcount path
    (48-bit codes are ~4x slower unpadded). Zero padding leaves every Hamming distance unchanged."""
    return -(-bits // WORD_BITS) * WORD_BITS // 8


def pad_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    width = padded_bytes(bits)
    if codes.shape[1] == width:
        return codes
    padded = np.zeros((len(codes), width), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return padded


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(nq, nb) int32 Hamming distances of packed codes, in plain numpy (XOR + byte popcount table)."""
    out = np.zeros((len(queries), len(database)), dtype=np.int32)
    for byte in range(queries.shape[1]):
        out += _POPCOUNT[queries[:, byte, None] ^ database[None, :, byte]]
    return out
