"""Which pages of an LMDB data file its B-trees use, read from the file itself (never through LMDB's map).

A data file may end before its last page number: LMDB records the highest page it allocated, and a page freed
again in the same transaction is never written (a crash right after such a commit leaves the file short). That
is valid, and only a walk of the trees can tell it from a file that was cut short: LMDB itself would abort or
fault on a used page past the end. This walk reads pages with pread and checks every offset, so damage gives an
answer, not a crash. Layout: LMDB 0.9 on a 64-bit little-endian machine (what py-lmdb bundles).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

PAGE_HEADER = 16
NODE_HEADER = 8
BRANCH, LEAF, OVERFLOW, LEAF2 = 0x01, 0x02, 0x04, 0x20
BIGDATA, SUBDATA = 0x01, 0x02
INVALID_PAGE = 2**64 - 1
MAGIC = 0xBEEFC0DE
DB_RECORD = struct.Struct("<IHHQQQQQ")  # pad (page size in the free DB), flags, depth, 3 page counts, entries, root
META = struct.Struct("<II8xQ")  # magic, version, (address), map size
MAX_DEPTH = 64


class DamagedFile(Exception):
    """The file's pages do not form valid B-trees."""


def _roots_of_newest_meta(fd: int) -> tuple[int, list[int], int]:
    """(page size, [free DB root, main DB root], last page) from the meta page with the higher transaction id."""
    best = None
    page_size = 4096
    for number in (0, 1):
        page = os.pread(fd, 4096, number * page_size)
        magic, _, _ = META.unpack_from(page, PAGE_HEADER)
        if magic != MAGIC:
            continue
        free, main = DB_RECORD.unpack_from(page, PAGE_HEADER + 24), DB_RECORD.unpack_from(page, PAGE_HEADER + 72)
        last_page, txnid = struct.unpack_from("<QQ", page, PAGE_HEADER + 120)
        if best is None or txnid > best[0]:
            best = (txnid, free[0], [free[7], main[7]], last_page)
        page_size = free[0] or page_size
    if best is None or best[1] < 4096 or best[1] & (best[1] - 1):
        raise DamagedFile("no valid meta page")
    return best[1], best[2], best[3]


def used_pages_beyond(data_file: str | os.PathLike, file_bytes: int) -> list[int]:
    """Page numbers that the trees use (branch, leaf and overflow pages) at or past `file_bytes`: empty for a
    short-but-valid file. Raises DamagedFile if the pages inside the file are not valid trees."""
    fd = os.open(Path(data_file), os.O_RDONLY)
    try:
        psize, roots, last_page = _roots_of_newest_meta(fd)
        file_pages = file_bytes // psize
        beyond: list[int] = []
        seen: set[int] = set()

        def visit(number: int, depth: int) -> None:
            if number == INVALID_PAGE:
                return
            if number < 2 or number > last_page or number in seen or depth > MAX_DEPTH:
                raise DamagedFile(f"page {number} is out of range or reached twice")
            seen.add(number)
            if number >= file_pages:
                beyond.append(number)
                return
            page = os.pread(fd, psize, number * psize)
            flags, lower, upper = struct.unpack_from("<HHH", page, 10)
            if lower < PAGE_HEADER or lower > upper or upper > psize or flags & LEAF2:
                raise DamagedFile(f"page {number} has a bad header")
            for slot in range((lower - PAGE_HEADER) // 2):
                offset = struct.unpack_from("<H", page, PAGE_HEADER + 2 * slot)[0]
                if offset < upper or offset + NODE_HEADER > psize:
                    raise DamagedFile(f"page {number} has a node outside the page")
                low, high, node_flags, key_size = struct.unpack_from("<HHHH", page, offset)
                data = offset + NODE_HEADER + key_size
                if flags & BRANCH:
                    visit(low | high << 16 | node_flags << 32, depth + 1)
                elif not flags & LEAF:
                    raise DamagedFile(f"page {number} is neither a branch nor a leaf")
                elif node_flags & BIGDATA:
                    first = struct.unpack_from("<Q", page, data)[0]
                    count = -(-(PAGE_HEADER + (low | high << 16)) // psize)
                    if first < 2 or first + count - 1 > last_page:
                        raise DamagedFile(f"page {number} points to overflow pages out of range")
                    beyond.extend(p for p in range(max(first, file_pages), first + count))
                elif node_flags & SUBDATA:
                    if data + DB_RECORD.size > psize:
                        raise DamagedFile(f"page {number} has a truncated database record")
                    visit(DB_RECORD.unpack_from(page, data)[7], depth + 1)

        for root in roots:
            visit(root, 0)
        return beyond
    except (struct.error, OSError) as error:
        raise DamagedFile(str(error)) from error
    finally:
        os.close(fd)
