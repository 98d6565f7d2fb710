"""Checksums of what a cache holds, and how damage found with them is reported.

Every block of videos is written with a CRC-32 of each array the block writes (`BLOCK_ARRAYS`), kept
in `checksums` [blocks, arrays] int64 (-1 until the block is written; the columns are named in the
provenance, `meta["checksum_columns"]`) and written before the block's `status`, so that a block
recorded as done always has its checksums. One per array, so that a reader checks what it reads
and nothing more: training reads `features` and `status`. The arrays written once (video ids,
labels, classes) and the text features have theirs in the provenance (`meta["checksums"]`). A
chunk file that went missing reads back as the fill value and a garbled one either fails to decode
or reads back changed: both no longer match.

CRC-32 (zlib), not a cryptographic hash: it guards against accidents (a lost file, overwritten
bytes), not against someone forging a cache, and it is the cheapest of the stdlib's checksums
(zlib's CRC-32 runs at several GB/s where SHA-256 and BLAKE2b run at 1-2), so checking adds little
to the reading it rides on (benchmarks/cache_check.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# What one block writes, with the dtype the bytes are checksummed in (None: strings).
BLOCK_ARRAYS: dict[str, str | None] = {"features": "float16", "frame_indices": "int32", "crop_offsets": "int16",
                                       "flipped": "bool", "num_source_frames": "int32", "status": "int8",
                                       "error": None}
CLASS_ARRAYS: dict[str, str | None] = {"video_ids": None, "split": None, "labels": "int32", "class_keys": None,
                                       "class_texts": None, "class_splits": None}
TEXT_ARRAY = "text_features"
NO_CHECKSUM = -1


def array_checksum(values, dtype: str | None) -> int:
    """CRC-32 of an array's bytes in `dtype`, or of a list of strings (length-prefixed UTF-8)."""
    if dtype is None:
        encoded = [str(value).encode() for value in values]
        lengths = np.asarray([len(item) for item in encoded], dtype="<i8")
        return zlib.crc32(b"".join(encoded), zlib.crc32(lengths.tobytes()))
    return zlib.crc32(np.ascontiguousarray(values, dtype=dtype).view(np.uint8))


def block_checksums(arrays: Mapping[str, np.ndarray | Sequence[str]]) -> np.ndarray:
    """[len(BLOCK_ARRAYS)] int64: the CRC-32 of each of a block's arrays, -1 for those not given."""
    return np.asarray([array_checksum(arrays[name], dtype) if name in arrays else NO_CHECKSUM
                       for name, dtype in BLOCK_ARRAYS.items()], dtype="int64")


@dataclass(frozen=True)
class Damage:
    """One part of a cache that no longer holds what was written: a block of videos, or an array
    written once (`block` None)."""

    reason: str
    block: int | None = None
    rows: range = range(0)
    array: str | None = None

    @property
    def where(self) -> str:
        if self.block is None:
            return str(self.array)
        return f"block {self.block} (videos {self.rows.start}-{self.rows.stop - 1})"


def damage_report(damage: Sequence[Damage], video_ids: Sequence[str] | None, cache_dir: str, repair: str,
                  shown: int = 10) -> str:
    """What is damaged (each block with the videos in it) and the command that repairs it."""
    blocks = [item for item in damage if item.block is not None]
    videos = sum(len(item.rows) for item in blocks)
    parts = []
    if blocks:
        parts.append(f"{count_of(len(blocks), 'block')}, {count_of(videos, 'video')}")
    arrays = [item.array for item in damage if item.block is None]
    if arrays:
        parts.append(", ".join(arrays))
    lines = [f"cache {cache_dir} is damaged ({'; '.join(parts)}): they no longer hold what was written"]
    for item in damage[:shown]:
        named = ""
        if item.block is not None and video_ids is not None:
            ids = [str(video_ids[row]) for row in item.rows[:3]]
            more = len(item.rows) - len(ids)
            named = ": " + ", ".join(ids) + (f" and {more} more" if more > 0 else "")
        lines.append(f"  {item.where} {item.reason}{named}")
    if len(damage) > shown:
        lines.append(f"  ... and {len(damage) - shown} more")
    lines.append(f"Repair it (only the damaged parts are encoded again) with: {repair}")
    return "\n".join(lines)


def count_of(n: int, noun: str) -> str:
    """`1 block`, `2 blocks`."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
