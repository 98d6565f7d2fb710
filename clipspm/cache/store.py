"""The feature store: one Zarr group (or HDF5 file) per cache, readable without clipspm.

Layout (V train views, view 0 is the test view; rows follow the dataset: train, val, test):

    features          [videos, 1+V, T, C] float16   projected CLIP image embeddings per frame
    frame_indices     [videos, 1+V, T]    int32     source frame of every sampled frame
    crop_offsets      [videos, 1+V, 2]    int16     (top, left) of the crop in the resized frame
    flipped           [videos, 1+V]       bool
    num_source_frames [videos]            int32
    status            [videos]            int8      0 pending, 1 done, 2 failed
    error             [videos]            str       why a video failed ("" otherwise)
    video_ids, split  [videos]            str       `CLASS/VIDEO` and train|val|test
    labels            [videos]            int32     row in the class arrays
    class_keys, class_texts, class_splits [classes] str
    text_features     [classes, R, C]     float32   every prompt template x every class

Provenance lives in the attribute `clipspm` (a dict in Zarr, a JSON string in HDF5).

Partial writes are safe: per-video arrays are chunked in blocks of `block` videos, a block is
written whole (Zarr's local store writes each chunk to a temporary file and renames it) and its
`status` chunk last, so after a kill every block is either recorded as done or still pending.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import zarr

from clipspm.errors import CacheError

PENDING, DONE, FAILED = 0, 1, 2
STORE_NAMES = {"zarr": "features.zarr", "hdf5": "features.h5"}
STAGING_NAME = "staging.zarr"   # where an HDF5 cache is built before its one-shot conversion
META_KEY = "clipspm"


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
                 class_keys: list[str], class_texts: list[str], class_splits: list[str], meta: dict) -> StoreWriter:
    """A new Zarr store with the static arrays filled and every video pending."""
    root = zarr.open_group(str(path), mode="w")
    n, v, t, c, b = shape.num_videos, shape.views, shape.num_frames, shape.feature_dim, shape.block
    root.create_array("features", shape=(n, v, t, c), chunks=(b, v, t, c), dtype="float16", fill_value=0)
    root.create_array("frame_indices", shape=(n, v, t), chunks=(b, v, t), dtype="int32", fill_value=-1)
    root.create_array("crop_offsets", shape=(n, v, 2), chunks=(b, v, 2), dtype="int16", fill_value=-1)
    root.create_array("flipped", shape=(n, v), chunks=(b, v), dtype="bool", fill_value=False)
    root.create_array("num_source_frames", shape=(n,), chunks=(b,), dtype="int32", fill_value=0)
    root.create_array("status", shape=(n,), chunks=(b,), dtype="int8", fill_value=PENDING)
    root.create_array("error", shape=(n,), chunks=(b,), dtype=str)
    for name, values in [("video_ids", video_ids), ("split", split), ("class_keys", class_keys),
                         ("class_texts", class_texts), ("class_splits", class_splits)]:
        root.create_array(name, data=_vlen(values))
    root.create_array("labels", data=np.asarray(labels, dtype="int32"))
    root.create_array("text_features", shape=(shape.num_classes, shape.num_templates, c), dtype="float32",
                      fill_value=np.nan)
    root.attrs[META_KEY] = {**meta, "complete": False, "text_done": False}
    return StoreWriter(path)


class StoreWriter:
    """Block writes into an existing Zarr store (a fresh one or one being resumed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.root = zarr.open_group(str(self.path), mode="r+")
        for leftover in self.path.rglob("*.partial"):  # temp files of writes a kill interrupted
            leftover.unlink(missing_ok=True)

    @property
    def meta(self) -> dict:
        return dict(self.root.attrs[META_KEY])

    def update_meta(self, **values) -> None:
        self.root.attrs[META_KEY] = {**self.meta, **values}

    def status(self) -> np.ndarray:
        return self.root["status"][:]

    def pending_blocks(self, block: int) -> list[int]:
        pending = np.flatnonzero(self.status() == PENDING)
        return sorted(set((pending // block).tolist()))

    def write_text(self, text_features: np.ndarray) -> None:
        self.root["text_features"][:] = text_features.astype("float32")
        self.update_meta(text_done=True)

    def write_block(self, rows: slice, *, features: np.ndarray, frame_indices: np.ndarray,
                    crop_offsets: np.ndarray, flipped: np.ndarray, num_source_frames: np.ndarray,
                    status: np.ndarray, error: list[str]) -> None:
        """One block of videos; `status` goes last so that a kill leaves the block pending."""
        self.root["features"][rows] = features.astype("float16")
        self.root["frame_indices"][rows] = frame_indices
        self.root["crop_offsets"][rows] = crop_offsets
        self.root["flipped"][rows] = flipped
        self.root["num_source_frames"][rows] = num_source_frames
        self.root["error"][rows] = _vlen(error)
        self.root["status"][rows] = status


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
            dataset = target.create_dataset(name, shape=array.shape, dtype=array.dtype, chunks=chunks)
            step = chunks[0] * 64
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

    def __init__(self, store_path: Path):
        self.store_path = Path(store_path)
        if self.store_path.suffix == ".h5":
            self.format = "hdf5"
            try:
                self._file = h5py.File(self.store_path, "r")
            except OSError as error:
                raise CacheError(f"cannot read HDF5 cache {self.store_path}: {error}") from None
            self._root = self._file
            self.meta = json.loads(self._file.attrs[META_KEY])
        else:
            self.format = "zarr"
            self._file = None
            try:
                self._root = zarr.open_group(str(self.store_path), mode="r")
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
        array = self._root[name]
        values = array.asstr()[:] if self.format == "hdf5" else array[:]
        return np.array([str(value) for value in values], dtype=str) if len(values) else np.zeros(0, str)

    def numbers(self, name: str) -> np.ndarray:
        return np.asarray(self._root[name][:])

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

    def rows(self, split: str, done_only: bool = True) -> np.ndarray:
        mask = self.split == split
        if done_only:
            mask &= self.status == DONE
        return np.flatnonzero(mask)

    def load_split(self, split: str, views: slice | list[int] = slice(None)) -> SplitFeatures:
        """Features of the done videos of `split`, read in one contiguous range."""
        rows = self.rows(split)
        if rows.size == 0:
            return SplitFeatures(np.zeros((0, *self.shape[1:]), "float16"), np.zeros(0, "int64"), rows, [])
        block = np.asarray(self.features[rows.min():rows.max() + 1])
        features = block[rows - rows.min()][:, views]
        return SplitFeatures(features, self.labels[rows].astype("int64"), rows, self.video_ids[rows].tolist())


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
