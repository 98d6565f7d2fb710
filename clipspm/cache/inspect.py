"""`clipspm cache info` and `clipspm cache verify`: what a cache holds, and whether all of it is sound."""

from __future__ import annotations

from collections import Counter

import numpy as np

from clipspm.cache.store import DONE, FAILED, PENDING, FeatureCache
from clipspm.errors import CacheError


def describe(cache: FeatureCache) -> dict:
    """Provenance, shapes, per-split counts and the failures of one cache."""
    status, split = cache.status, cache.split
    per_split = {}
    for name in dict.fromkeys(split.tolist()):
        mask = split == name
        per_split[name] = {"videos": int(mask.sum()), "done": int((status[mask] == DONE).sum()),
                           "failed": int((status[mask] == FAILED).sum()),
                           "pending": int((status[mask] == PENDING).sum()),
                           "classes": int((cache.class_splits == name).sum())}
    failed = np.flatnonzero(status == FAILED)
    errors, ids = cache.errors, cache.video_ids
    return {
        "path": str(cache.store_path),
        "format": cache.format,
        "complete": cache.complete,
        "features": list(cache.shape),
        "text_features": list(cache.array("text_features").shape),
        "splits": per_split,
        "failure_reasons": dict(Counter(_reason_kind(errors[i]) for i in failed).most_common()),
        "failures": [(str(ids[i]), str(errors[i])) for i in failed],
        "meta": cache.meta,
    }


def verify(cache: FeatureCache) -> list[str]:
    """Every problem found, as sentences; an empty list means the cache is sound.

    Checks every block against its checksum (so lost, garbled and changed chunks surface, see
    `FeatureCache.check`), that done videos have finite features and in-range frame indices, that
    failed videos say why, and that counts agree with the provenance summary.
    """
    problems = [f"{item.where} {item.reason}" for item in cache.check()]
    try:
        return problems + _consistency(cache)
    except CacheError as error:   # an array that cannot be read at all (its blocks are named above)
        return problems + [str(error)]


def _consistency(cache: FeatureCache) -> list[str]:
    """What the values must satisfy, whatever the checksums say."""
    problems: list[str] = []
    status = cache.status
    n, views, frames, dim = cache.shape
    meta = cache.meta
    if meta.get("num_frames") != frames or meta.get("feature_dim") != dim:
        problems.append(f"features are [*, *, {frames}, {dim}] but the provenance says T={meta.get('num_frames')}, "
                        f"C={meta.get('feature_dim')}")
    for name in ("labels", "video_ids", "split", "error", "num_source_frames"):
        if cache.array(name).shape[0] != n:
            problems.append(f"{name} has {cache.array(name).shape[0]} rows, features have {n}")
    if not cache.complete:
        problems.append("the extraction did not finish (rerun the same `clipspm extract` command to resume)")
    pending = int((status == PENDING).sum())
    if pending:
        problems.append(f"{pending} videos are still pending")
    summary = meta.get("summary")
    if summary and summary != {"done": int((status == DONE).sum()), "failed": int((status == FAILED).sum()),
                               "total": int(n)}:
        problems.append(f"status counts do not match the recorded summary {summary}")

    step = cache.block_size
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        done = status[rows] == DONE
        features = _read(cache, "features", rows)
        if features is not None:
            finite = np.isfinite(features.astype(np.float32)).reshape(len(features), -1).all(axis=1)
            problems += [f"video {start + i} has NaN or infinite features" for i in np.flatnonzero(done & ~finite)]
        indices, source_frames = _read(cache, "frame_indices", rows), _read(cache, "num_source_frames", rows)
        if indices is not None and source_frames is not None:
            outside = ((indices < 0) | (indices >= source_frames[:, None, None])).reshape(len(indices), -1).any(axis=1)
            problems += [f"video {start + i} has frame indices outside its {source_frames[i]} frames"
                         for i in np.flatnonzero(done & outside)]

    errors = cache.errors
    silent = np.flatnonzero((status == FAILED) & (errors == ""))
    problems += [f"video {i} failed without a recorded reason" for i in silent]
    labels, class_splits, split = cache.labels, cache.class_splits, cache.split
    if labels.size and (labels.min() < 0 or labels.max() >= class_splits.size):
        problems.append(f"labels outside [0, {class_splits.size})")
    else:
        wrong = np.flatnonzero(class_splits[labels] != split)
        problems += [f"video {i} is in split {split[i]} but its class belongs to {class_splits[labels[i]]}"
                     for i in wrong]
    text = cache.text_features
    if text.shape[0] != class_splits.size or text.shape[1] != len(meta.get("templates", [])) or text.shape[2] != dim:
        problems.append(f"text features are {list(text.shape)}, expected "
                        f"[{class_splits.size}, {len(meta.get('templates', []))}, {dim}]")
    if not np.isfinite(text).all():
        problems.append("text features contain NaN (the text encoding did not finish)")
    return problems


def _read(cache: FeatureCache, name: str, rows: slice) -> np.ndarray | None:
    """The rows, or None when a chunk cannot be decoded (`check` has already named its block)."""
    try:
        return np.asarray(cache.array(name)[rows])
    except Exception:  # a damaged chunk raises whatever its codec raises
        return None


def _reason_kind(error: str) -> str:
    """Group failure reasons for the summary: 'too short: 3 frames ...' -> 'too short'."""
    return error.split(":", 1)[0].strip() or "unknown"
