"""The feature store: one Zarr group (or HDF5 file) per cache, readable without clipspm.

Layout (V train views, view 0 is the test view; rows follow the dataset: train, val, test):

    features          [videos, 1+V, T, C] float16   projected CLIP image embeddings per frame
    frame_indices     [videos, 1+V, T]    int32     source frame of every sampled frame
    crop_offsets      [videos, 1+V, 2]    int16     (top, left) of the crop in the resized frame
    flipped           [videos, 1+V]       bool
    num_source_frames [videos]            int32
    status            [videos]            int8      0 pending, 1 done, 2 failed
    error             [videos]            str       why a video failed ("" otherwise)
    checksums         [blocks, 7]         int64     CRC-32 of each array above, per written block (-1: not yet)
    video_ids, split  [videos]            str       `CLASS/VIDEO` and train|val|test
    labels            [videos]            int32     row in the class arrays
    class_keys, class_texts, class_splits [classes] str
    text_features     [classes, R, C]     float32   every prompt template x every class
    person_boxes      [videos, 1+V, T, 4] float32   caches with person crops only: the person (x1, y1, x2, y2,
                                                    source pixels) each frame was cut around; written with its
                                                    block before the block's status, not checksummed (provenance:
                                                    training never reads it)

Provenance lives in the attribute `clipspm` (a dict in Zarr, a JSON string in HDF5).

Partial writes are safe: per-video arrays are chunked in blocks of `block` videos, a block is
written whole (Zarr's local store writes each chunk to a temporary file and renames it), then its
checksum, then its `status` chunk, so after a kill every block is either recorded as done, with
its checksum, or still pending.

Reads are checked (see checksum.py): `load_split` checks the features and status of every block
it reads against their checksums, `check(read_blocks=False)` looks for lost chunk files without
reading a block, `check()` reads and checks everything, and a damaged cache is refused with a
CacheError naming the blocks, the videos in them, and the extract command that repairs them.

Caches made before checksums were recorded (no `checksums` array) are read unverified, with a
one-line warning: they are not refused, because nothing says they are damaged and re-encoding a
large dataset to find out would cost hours. What can be seen without checksums is still checked
(undecodable chunks, the fill values a lost chunk leaves behind), and the same extract command
records their checksums, re-encoding only blocks that show damage.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import zarr

from clipspm.cache.checksum import (
    BLOCK_ARRAYS,
    CLASS_ARRAYS,
    NO_CHECKSUM,
    TEXT_ARRAY,
    Damage,
    array_checksum,
    block_checksums,
    damage_report,
)
from clipspm.errors import CacheError

PENDING, DONE, FAILED = 0, 1, 2
STORE_NAMES = {"zarr": "features.zarr", "hdf5": "features.h5"}
STAGING_NAME = "staging.zarr"   # where an HDF5 cache is built before its one-shot conversion
META_KEY = "clipspm"
CHECKSUMS = "checksums"
CHECK_BYTES = 256 * 2**20       # `check` reads this much of the features at a time
# Chunks a written block always has: a done video's values differ from the fill value; a chunk
# holding only the fill value is never written by Zarr, so `flipped` and `error` may lack one.
DONE_CHUNKS = ("features", "frame_indices", "crop_offsets", "num_source_frames")
MISMATCH, UNREADABLE = "does not match its checksum", "cannot be read"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    num_videos: int
    views: int
    num_frames: int
    feature_dim: int
    num_classes: int
    num_templates: int
    block: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_videos // self.block)

    def block_rows(self, block: int) -> slice:
        return slice(block * self.block, min((block + 1) * self.block, self.num_videos))


def create_store(path: Path, shape: CacheShape, *, video_ids: list[str], labels: np.ndarray, split: list[str],
                 class_keys: list[str], class_texts: list[str], class_splits: list[str], meta: dict,
                 person_boxes: bool = False) -> None:
    """A new Zarr store with the arrays written once filled (and their checksums recorded) and every video pending
    (`person_boxes`: with the array of person boxes of a person-crop cache)."""
    root = zarr.open_group(str(path), mode="w")
    n, v, t, c, b = shape.num_videos, shape.views, shape.num_frames, shape.feature_dim, shape.block
    root.create_array("features", shape=(n, v, t, c), chunks=(b, v, t, c), dtype="float16", fill_value=0)
    root.create_array("frame_indices", shape=(n, v, t), chunks=(b, v, t), dtype="int32", fill_value=-1)
    root.create_array("crop_offsets", shape=(n, v, 2), chunks=(b, v, 2), dtype="int16", fill_value=-1)
    root.create_array("flipped", shape=(n, v), chunks=(b, v), dtype="bool", fill_value=False)
    root.create_array("num_source_frames", shape=(n,), chunks=(b,), dtype="int32", fill_value=0)
    root.create_array("status", shape=(n,), chunks=(b,), dtype="int8", fill_value=PENDING)
    root.create_array("error", shape=(n,), chunks=(b,), dtype=str)
    if person_boxes:
        root.create_array("person_boxes", shape=(n, v, t, 4), chunks=(b, v, t, 4), dtype="float32",
                          fill_value=np.nan)
    _create_checksums(root, shape.num_blocks)
    classes = {"video_ids": video_ids, "split": split, "labels": np.asarray(labels, dtype="int32"),
               "class_keys": class_keys, "class_texts": class_texts, "class_splits": class_splits}
    for name, values in classes.items():
        root.create_array(name, data=values if CLASS_ARRAYS[name] else _vlen(values))
    root.create_array("text_features", shape=(shape.num_classes, shape.num_templates, c), dtype="float32",
                      fill_value=np.nan)
    checksums = {name: array_checksum(values, CLASS_ARRAYS[name]) for name, values in classes.items()}
    root.attrs[META_KEY] = {**meta, "complete": False, "text_done": False, "block": b, "checksums": checksums,
                            "checksum_columns": list(BLOCK_ARRAYS)}


def _create_checksums(root, num_blocks: int) -> None:
    """One chunk per block, so that writers of different blocks (torchrun ranks) never share a chunk."""
    shape = (num_blocks, len(BLOCK_ARRAYS))
    if isinstance(root, h5py.File):
        root.create_dataset(CHECKSUMS, shape=shape, dtype="int64", fillvalue=NO_CHECKSUM)
    else:
        root.create_array(CHECKSUMS, shape=shape, chunks=(1, shape[1]), dtype="int64", fill_value=NO_CHECKSUM)


def _vlen(values) -> np.ndarray:
    """Variable-length UTF-8 strings: the string type with a Zarr v3 specification."""
    return np.asarray(list(values), dtype=np.dtypes.StringDType())


def convert_to_hdf5(zarr_path: Path, h5_path: Path) -> None:
    """Copy a finished Zarr store into one HDF5 file, atomically (temporary name, then rename)."""
    source = zarr.open_group(str(zarr_path), mode="r")
    partial = h5_path.with_name(h5_path.name + ".partial")
    with h5py.File(partial, "w") as target:
        for name, array in source.arrays():
            if array.dtype.kind in "OUT":
                target.create_dataset(name, data=np.asarray(array[:].tolist(), dtype=object), dtype=h5py.string_dtype())
                continue
            chunks = tuple(min(c, n) for c, n in zip(array.chunks, array.shape))
            if name == CHECKSUMS:
                chunks = None   # a few bytes per block: one contiguous dataset
            dataset = target.create_dataset(name, shape=array.shape, dtype=array.dtype, chunks=chunks)
            step = array.chunks[0] * 64
            for start in range(0, array.shape[0], step):
                dataset[start:start + step] = array[start:start + step]
        target.attrs[META_KEY] = json.dumps(dict(source.attrs[META_KEY]))
    os.replace(partial, h5_path)
    shutil.rmtree(zarr_path)


@dataclass
class SplitFeatures:
    """The usable (status done) videos of one split, in store order."""

    features: np.ndarray    # [n, views, T, C] float16
    labels: np.ndarray      # [n] class rows
    rows: np.ndarray        # [n] rows in the store
    video_ids: list[str]


class FeatureCache:
    """Read access to a finished (or partial) store, Zarr or HDF5. Arrays are read lazily."""

    def __init__(self, store_path: Path, mode: str = "r"):
        self.store_path = Path(store_path)
        self._warned = False
        if self.store_path.suffix == ".h5":
            self.format = "hdf5"
            try:
                self._file = h5py.File(self.store_path, mode)
                self.meta = json.loads(self._file.attrs[META_KEY])
            except (OSError, KeyError, ValueError) as error:
                raise CacheError(f"cannot read HDF5 cache {self.store_path}: {error}. If it is damaged, delete it and "
                                 f"run the extract command that made it again") from None
            self._root = self._file
        else:
            self.format = "zarr"
            self._file = None
            try:
                self._root = zarr.open_group(str(self.store_path), mode=mode)
                self.meta = dict(self._root.attrs[META_KEY])
            except (FileNotFoundError, KeyError, ValueError) as error:
                raise CacheError(f"{self.store_path} is not a clipspm cache: {error}") from None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def array(self, name: str):
        """The named array as stored (zarr.Array or h5py.Dataset): slice it to read."""
        return self._root[name]

    def strings(self, name: str) -> np.ndarray:
        values = self._checked_read(name)
        return np.array([str(value) for value in values], dtype=str) if len(values) else np.zeros(0, str)

    def numbers(self, name: str) -> np.ndarray:
        return self._checked_read(name)

    @property
    def features(self):
        return self.array("features")

    @property
    def status(self) -> np.ndarray:
        return self.numbers("status")

    @property
    def labels(self) -> np.ndarray:
        return self.numbers("labels")

    @property
    def split(self) -> np.ndarray:
        return self.strings("split")

    @property
    def video_ids(self) -> np.ndarray:
        return self.strings("video_ids")

    @property
    def errors(self) -> np.ndarray:
        return self.strings("error")

    @property
    def text_features(self) -> np.ndarray:
        return self.numbers("text_features")

    @property
    def class_keys(self) -> np.ndarray:
        return self.strings("class_keys")

    @property
    def class_texts(self) -> np.ndarray:
        return self.strings("class_texts")

    @property
    def class_splits(self) -> np.ndarray:
        return self.strings("class_splits")

    @property
    def person_boxes(self):
        """[videos, views, T, 4] person boxes of a person-crop cache (slice it to read); None otherwise."""
        return self._root["person_boxes"] if "person_boxes" in self._root else None

    @cached_property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.features.shape)

    @property
    def feature_dim(self) -> int:
        return self.shape[3]

    @property
    def num_frames(self) -> int:
        return self.shape[2]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def block_size(self) -> int:
        """Videos per block: the unit that is written, checksummed and re-encoded."""
        return int(self.meta.get("block") or self.features.chunks[0])

    @property
    def num_blocks(self) -> int:
        return -(-self.shape[0] // self.block_size)

    def block_rows(self, block: int) -> range:
        return range(block * self.block_size, min((block + 1) * self.block_size, self.shape[0]))

    @property
    def has_checksums(self) -> bool:
        """False for a cache made before checksums were recorded."""
        return CHECKSUMS in self._root

    def rows(self, split: str, done_only: bool = True) -> np.ndarray:
        mask = self.split == split
        if done_only:
            mask &= self.status == DONE
        return np.flatnonzero(mask)

    def load_split(self, split: str, views: slice | list[int] = slice(None)) -> SplitFeatures:
        """Features of the done videos of `split`. The blocks that hold the split are read in one
        contiguous range and checked against their checksums on the way (a CRC over bytes already in
        memory); a damaged block raises CacheError naming it and the command that repairs it."""
        in_split = np.flatnonzero(self.split == split)
        if in_split.size == 0:
            return SplitFeatures(np.zeros((0, *self.shape[1:]), "float16"), np.zeros(0, "int64"), in_split, [])
        first, last = in_split.min() // self.block_size, in_split.max() // self.block_size + 1
        arrays, damage = self.read_blocks(first, last, ("features", "status"))
        self.refuse(damage)
        self._warn_if_unverified()
        start = first * self.block_size
        rows = in_split[arrays["status"][in_split - start] == DONE]
        features = arrays["features"][rows - start][:, views]
        return SplitFeatures(features, self.labels[rows].astype("int64"), rows, self.video_ids[rows].tolist())

    def read_blocks(self, first: int, last: int, names: Sequence[str] = tuple(BLOCK_ARRAYS),
                    ) -> tuple[dict[str, np.ndarray] | None, list[Damage]]:
        """Blocks [first, last) of the block arrays `names` (`status` always among them), one read per
        array, and those of the blocks that fail their check. When a read fails, the blocks are read
        one by one to find the culprits, and no arrays come back."""
        rows = slice(first * self.block_size, min(last * self.block_size, self.shape[0]))
        arrays: dict[str, np.ndarray] = {}
        stored = None
        name = ""
        try:
            for name in dict.fromkeys([*names, "status"]):
                arrays[name] = self._read(name, rows)
            if self.has_checksums:
                name = CHECKSUMS
                stored = self._read(CHECKSUMS, slice(first, last))
        except Exception as error:  # a garbled chunk raises whatever its codec raises
            if last - first > 1:
                return None, [item for block in range(first, last)
                              for item in self.read_blocks(block, block + 1, names)[1]]
            return None, [Damage(f"{UNREADABLE} ({name}: {_short(error)})", first, self.block_rows(first))]
        damage = []
        for block in range(first, last):
            local = slice((block - first) * self.block_size, (block - first + 1) * self.block_size)
            reason = self._block_problem({key: values[local] for key, values in arrays.items()},
                                         None if stored is None else stored[block - first])
            if reason:
                damage.append(Damage(reason, block, self.block_rows(block)))
        return arrays, damage

    def check(self, blocks: Iterable[int] | None = None, *, read_blocks: bool = True) -> list[Damage]:
        """Every damaged part: the arrays written once and the text features against their checksums,
        then `blocks` (default: all): (Zarr) each written block must still have its chunk files, and
        it is read and checked against its checksum. With `read_blocks` False no block is read, only
        its chunk files looked for, a file lookup per chunk: the check on opening a cache."""
        damage = self._class_damage()
        blocks = sorted(range(self.num_blocks) if blocks is None else blocks)
        wanted = set(blocks)
        lost = [item for item in self._lost_chunks() if item.block in wanted]
        if not read_blocks:
            return damage + lost
        block_bytes = self.block_size * int(np.prod(self.shape[1:])) * 2
        per_read = max(1, CHECK_BYTES // block_bytes)
        found = {item.block: item for item in lost}
        for run in _runs(blocks, per_read):
            for item in self.read_blocks(run[0], run[-1] + 1)[1]:
                if item.block not in found:
                    found[item.block] = item
                elif item.reason.startswith(UNREADABLE):   # a lost chunk explains all else read in its block
                    found[item.block] = replace(item, reason=f"{found[item.block].reason}; {item.reason}")
        return damage + [found[block] for block in sorted(found)]

    def pending_blocks(self) -> list[int]:
        """Blocks not written yet: every video pending and no checksum. A block whose status or
        checksum cannot be read counts as written (and fails its check)."""
        status = self._by_block("status")
        stored = self._by_block(CHECKSUMS) if self.has_checksums else [np.full(1, NO_CHECKSUM)] * self.num_blocks
        return [block for block, (values, checksums) in enumerate(zip(status, stored))
                if values is not None and checksums is not None and (values == PENDING).all()
                and (checksums == NO_CHECKSUM).all()]

    def refuse(self, damage: Sequence[Damage]) -> None:
        """Raise CacheError naming the damage and the command that repairs it; nothing if there is none."""
        if damage:
            try:
                video_ids = self.video_ids
            except CacheError:
                video_ids = None
            raise CacheError(damage_report(damage, video_ids, str(self.store_path.parent), self.repair_command()))

    def repair_command(self) -> str:
        """The extract command that made this cache: run again, it encodes the damaged blocks anew."""
        args = self.meta.get("extract_args")
        if args is None:
            return "the `clipspm extract` command that made this cache, with the same options"
        return "clipspm extract " + shlex.join([*args, "--cache-dir", str(self.store_path.parent.parent.resolve())])

    def _block_problem(self, arrays: dict[str, np.ndarray], stored: np.ndarray | None) -> str | None:
        """Why one block's arrays (as read) are not what was written, or None. `stored`: its checksums."""
        status = arrays["status"]
        written = not (status == PENDING).all()
        if stored is not None:
            if (stored == NO_CHECKSUM).all():
                if written:
                    return "has no checksums (they are lost)"
                return "is pending in a finished cache (its status and checksums are lost)" if self.complete else None
            columns = self.meta.get("checksum_columns", list(BLOCK_ARRAYS))
            changed = [name for name, values in arrays.items()
                       if array_checksum(values, BLOCK_ARRAYS[name]) != stored[columns.index(name)]]
            return f"{MISMATCH} ({', '.join(changed)})" if changed else None
        # made before checksums: only the fill values a lost chunk leaves behind can show
        if not written:
            return "is pending in a finished cache (its status is lost)" if self.complete else None
        done = status == DONE
        flat = int(done.sum())
        lost = ~arrays["features"][done].reshape(flat, -1).any(1)
        if "frame_indices" in arrays:
            lost |= (arrays["frame_indices"][done].reshape(flat, -1) < 0).any(1)
        return "holds fill values where its videos' data was (a chunk is lost)" if lost.any() else None

    def _class_damage(self) -> list[Damage]:
        recorded = self.meta.get("checksums", {})
        damage = []
        for name, dtype in {**CLASS_ARRAYS, TEXT_ARRAY: "float32"}.items():
            if name not in recorded:
                continue
            try:
                values = self._read(name)
            except Exception as error:
                damage.append(Damage(f"{UNREADABLE} ({_short(error)})", array=name))
                continue
            if array_checksum(values, dtype) != recorded[name]:
                damage.append(Damage(MISMATCH, array=name))
        return damage

    def _lost_chunks(self) -> list[Damage]:
        """Zarr: written blocks whose chunk files are gone (an HDF5 file cannot lose a chunk)."""
        if self.format != "zarr":
            return []
        arrays = {name: self._root[name] for name in ("status", *DONE_CHUNKS, *[CHECKSUMS] * self.has_checksums)}
        damage = []
        for block, status in enumerate(self._by_block("status")):
            rows = self.block_rows(block)
            if status is None:
                damage.append(Damage(f"{UNREADABLE} (status)", block, rows))
                continue
            written = not (status == PENDING).all()
            needed = ["status"] if written or self.complete else []
            needed += [CHECKSUMS] if written and self.has_checksums else []
            needed += list(DONE_CHUNKS) if (status == DONE).any() else []
            lost = [name for name in needed if not self._chunk_exists(arrays[name], block)]
            if lost:
                damage.append(Damage(f"has lost its {', '.join(lost)} chunk{'s' if len(lost) > 1 else ''} "
                                     f"(missing from the store)", block, rows))
        return damage

    def _chunk_exists(self, array: zarr.Array, block: int) -> bool:
        key = array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))
        return os.path.exists(os.path.join(self.store_path, array.basename, key))

    def _by_block(self, name: str) -> list[np.ndarray | None]:
        """A per-video array (or `checksums`) cut into blocks; None for a block that cannot be read."""
        step = 1 if name == CHECKSUMS else self.block_size
        try:
            values = self._read(name)
            return [values[block * step:(block + 1) * step] for block in range(self.num_blocks)]
        except Exception:
            parts = []
            for block in range(self.num_blocks):
                try:
                    parts.append(self._read(name, slice(block * step, (block + 1) * step)))
                except Exception:
                    parts.append(None)
            return parts

    def _read(self, name: str, index: slice = slice(None)) -> np.ndarray:
        array = self._root[name]
        if self.format == "hdf5" and h5py.check_string_dtype(array.dtype):
            return np.asarray(array.asstr()[index], dtype=object)
        return np.asarray(array[index])

    def _checked_read(self, name: str) -> np.ndarray:
        try:
            return self._read(name)
        except KeyError:
            raise CacheError(f"cache {self.store_path.parent} has no array {name!r}; it was not made by "
                             f"`clipspm extract`") from None
        except Exception as error:
            raise CacheError(f"{name} of cache {self.store_path.parent} cannot be read ({_short(error)}). "
                             f"Repair it with: {self.repair_command()}") from None

    def _warn_if_unverified(self) -> None:
        if not self.has_checksums and not self._warned:
            self._warned = True
            log.warning(f"cache {self.store_path.parent} has no checksums (made before they were recorded): its "
                        f"features are read unverified; to record them run {self.repair_command()}")


class StoreWriter(FeatureCache):
    """Writes into an existing store, Zarr or HDF5: a fresh one, one being resumed, a finished one
    being repaired. Only one process may write an HDF5 file."""

    def __init__(self, path: Path):
        super().__init__(Path(path), mode="r+")
        if self.format == "zarr":
            for leftover in self.store_path.rglob("*.partial"):  # temp files of writes a kill interrupted
                leftover.unlink(missing_ok=True)

    def update_meta(self, **values) -> None:
        self.meta = {**self.meta, **values}
        self._root.attrs[META_KEY] = json.dumps(self.meta) if self.format == "hdf5" else self.meta

    def write_text(self, text_features: np.ndarray) -> None:
        values = text_features.astype("float32")
        self._root[TEXT_ARRAY][:] = values
        self.update_meta(text_done=True, checksums={**self.meta.get("checksums", {}),
                                                    TEXT_ARRAY: array_checksum(values, "float32")})

    def write_classes(self, **arrays) -> None:
        """Rewrite arrays written once (`CLASS_ARRAYS`: video_ids=[...], labels=[...]) with their checksums."""
        checksums = dict(self.meta.get("checksums", {}))
        for name, values in arrays.items():
            dtype = CLASS_ARRAYS[name]
            self._root[name][:] = np.asarray(values, dtype=dtype) if dtype else self._stored_strings(values)
            checksums[name] = array_checksum(values, dtype)
        self.update_meta(checksums=checksums)

    def write_block(self, rows: slice, *, features: np.ndarray, frame_indices: np.ndarray,
                    crop_offsets: np.ndarray, flipped: np.ndarray, num_source_frames: np.ndarray,
                    status: np.ndarray, error: list[str], person_boxes: np.ndarray | None = None) -> None:
        """One block of videos, then its checksum, then its `status`: a kill leaves the block pending."""
        if person_boxes is not None:
            self._root["person_boxes"][rows] = person_boxes
        given = dict(features=features, frame_indices=frame_indices, crop_offsets=crop_offsets, flipped=flipped,
                     num_source_frames=num_source_frames, status=status, error=error)
        values = {name: np.asarray(given[name], dtype=dtype) if dtype else list(given[name])
                  for name, dtype in BLOCK_ARRAYS.items()}
        for name, dtype in BLOCK_ARRAYS.items():
            if name != "status":
                self._root[name][rows] = values[name] if dtype else self._stored_strings(values[name])
        self._root[CHECKSUMS][rows.start // self.block_size] = block_checksums(values)
        self._root["status"][rows] = values["status"]

    def record_checksums(self, blocks: Iterable[int]) -> int:
        """For a cache made before checksums: add the `checksums` array and the checksums of the
        arrays written once, then record those of `blocks` that show no damage as they read now.
        Returns how many."""
        found = {}
        for block in blocks:
            arrays, damage = self.read_blocks(block, block + 1)
            if arrays is not None and not damage:
                found[block] = block_checksums(arrays)
        if not self.has_checksums:
            _create_checksums(self._root, self.num_blocks)
        for block, checksum in found.items():
            self._root[CHECKSUMS][block] = checksum
        checksums = {name: array_checksum(self._read(name), dtype) for name, dtype in CLASS_ARRAYS.items()}
        if self.meta.get("text_done"):
            checksums[TEXT_ARRAY] = array_checksum(self._read(TEXT_ARRAY), "float32")
        self.update_meta(checksums=checksums, checksum_columns=list(BLOCK_ARRAYS))
        return len(found)

    def _stored_strings(self, values) -> np.ndarray:
        return np.asarray(list(values), dtype=object) if self.format == "hdf5" else _vlen(values)


def _runs(blocks: list[int], longest: int) -> list[list[int]]:
    """Sorted block numbers as runs of consecutive blocks, each at most `longest` long."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and runs[-1][-1] == block - 1 and len(runs[-1]) < longest:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def find_store(path: Path) -> Path:
    """The store inside a cache directory, or `path` itself when it is a store."""
    path = Path(path)
    if path.suffix in {".zarr", ".h5"} and path.exists():
        return path
    for name in STORE_NAMES.values():
        if (path / name).exists():
            return path / name
    if (path / STAGING_NAME).exists():
        raise CacheError(f"{path} holds an unfinished extraction ({STAGING_NAME}); rerun the same "
                         f"`clipspm extract` command to finish it")
    raise CacheError(f"no feature cache at {path} (expected {' or '.join(STORE_NAMES.values())} inside it); "
                     f"make one with `clipspm extract`")
