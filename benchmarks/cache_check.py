"""What checking a cache costs: loading a split with and without its block checksums, per store format.

Run `python benchmarks/cache_check.py [--videos N] [--dim C]`; `run()` returns the measurements. The store
is made with the extract stage's writer (random float16 features, which compress as little as real ones; 1+4 views, the
default),
all videos in the train split, then read back, warm in the page cache:

    unchecked      `load_split` as it was before checksums: status and split for the done rows, their
                   features in one slice, labels and video ids
    load_split     `FeatureCache.load_split`: the same, plus the checksums of the blocks read and a CRC-32
                   of their features and status checked against them
    crc only       zlib.crc32 over the split's feature bytes already in memory
    open check     `check(read_blocks=False)`: class arrays against their checksums, (Zarr) chunk files present
    full check     `check()`: every block read and checked, what `extract` and `cache verify` do

Rounds are interleaved and the best round of each is reported, as wall time and as the CPU time of the
process (all its threads: what the work costs, less disturbed by other processes on a shared machine), with
load_split over unchecked as `ratio` of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/cache_check.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, interleaved, print_table
from clipspm.cache.store import DONE, STORE_NAMES, CacheShape, FeatureCache, StoreWriter, convert_to_hdf5, create_store


def make_store(folder: Path, videos: int, views: int, frames: int, dim: int, block: int, fmt: str) -> Path:
    shape = CacheShape(videos, views, frames, dim, num_classes=1, num_templates=1, block=block)
    staging = folder / "staging.zarr"
    create_store(staging, shape, video_ids=[f"c/v{i}" for i in range(videos)], labels=np.zeros(videos),
                 split=["train"] * videos, class_keys=["c"], class_texts=["c"], class_splits=["train"],
                 meta={"num_frames": frames, "feature_dim": dim})
    rng = np.random.default_rng(0)
    with StoreWriter(staging) as writer:
        for b in range(shape.num_blocks):
            rows = shape.block_rows(b)
            n = rows.stop - rows.start
            writer.write_block(rows, features=rng.standard_normal((n, views, frames, dim)).astype("float16"),
                               frame_indices=np.zeros((n, views, frames), "int32"),
                               crop_offsets=np.zeros((n, views, 2), "int16"), flipped=np.zeros((n, views), bool),
                               num_source_frames=np.full(n, frames, "int32"), status=np.full(n, DONE, "int8"),
                               error=[""] * n)
        writer.update_meta(complete=True)
    final = folder / STORE_NAMES[fmt]
    if fmt == "hdf5":
        convert_to_hdf5(staging, final)
    else:
        staging.rename(final)
    return final


def unchecked_load(cache: FeatureCache, split: str) -> tuple:
    rows = cache.rows(split)
    features = np.asarray(cache.features[rows.min():rows.max() + 1])
    return features[rows - rows.min()], cache.labels[rows], cache.video_ids[rows]


def seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(videos: int = 4096, views: int = 5, frames: int = 8, dim: int = 1024, block: int = 16,
        formats: tuple[str, ...] = ("zarr", "hdf5"), rounds: int = 5) -> list[dict]:
    rows = []
    for fmt in formats:
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp), videos, views, frames, dim, block, fmt)
            with FeatureCache(store) as cache:
                features = np.asarray(cache.features[:])
                candidates = {
                    "unchecked": lambda: seconds(lambda: unchecked_load(cache, "train")),
                    "load_split": lambda: seconds(lambda: cache.load_split("train")),
                    "crc only": lambda: seconds(lambda: zlib.crc32(features.view(np.uint8))),
                    "open check": lambda: seconds(lambda: cache.check(read_blocks=False)),
                    "full check": lambda: seconds(lambda: cache.check()),
                }
                results = interleaved(candidates, rounds)
            for clock, index in (("wall", 0), ("cpu", 1)):
                best = {name: min(times[index] for times in timings) for name, timings in results.items()}
                rows.append({"format": fmt, "clock": clock, "MiB": f"{features.nbytes / 2**20:.0f}",
                             **{name: f"{1000 * value:.0f} ms" for name, value in best.items()},
                             "ratio": f"{best['load_split'] / best['unchecked']:.2f}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024, help="feature width C (1024: RN50)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = run(videos=args.videos, dim=args.dim, rounds=args.rounds)
    print_table(f"{args.videos} videos x 5 views x 8 frames x {args.dim} float16, blocks of 16 "
                f"(best of {args.rounds})", rows)
    print(command_line())


if __name__ == "__main__":
    main()
