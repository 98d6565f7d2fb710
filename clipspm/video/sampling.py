"""Frame sampling and the spatial view of each sample (SPEC section 1).

`tsn` (the default): a video's frames are split into T equal segments. The test view takes the
middle frame of each segment; a train view takes one uniformly random frame per segment.
`released` (the released CLIP-SPM loader, video_reader.py get_seq): T frames evenly spaced over a
span, int(linspace(start, end, T)); the test view spans frames 1 .. n-2, a train view moves each end
inwards by up to min(5, (n-T)/2) frames at random; a span shorter than T spans the whole video.
Either way the test view takes a centre crop, a train view a random crop and (unless the dataset
forbids it) a random horizontal flip shared by all T frames.

Randomness comes from `(seed, video key)` alone, so a resumed or multi-process extraction draws
exactly the views an uninterrupted single-process run would have drawn. Frame indices are drawn
before crops because the frame size is known only once frames are decoded.
"""

from __future__ import annotations

import hashlib

import numpy as np


def segment_bounds(num_frames: int, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each TSN segment; every segment is non-empty when num_frames >= num_segments."""
    edges = (np.arange(num_segments + 1) * num_frames) // num_segments
    return edges[:-1], edges[1:]


def tsn_test_indices(num_frames: int, num_segments: int) -> np.ndarray:
    """The middle frame of each segment."""
    starts, ends = segment_bounds(num_frames, num_segments)
    return (starts + ends - 1) // 2


def tsn_train_indices(num_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random frame per segment."""
    starts, ends = segment_bounds(num_frames, num_segments)
    return starts + rng.integers(0, ends - starts)


def released_test_indices(num_frames: int, num_segments: int) -> np.ndarray:
    """T frames evenly spaced from the second frame to the second last."""
    return _released_span(num_frames, num_segments, 1, num_frames - 2)


def released_train_indices(num_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """T frames evenly spaced between a start and an end each moved inwards by a random 0..min(5, (n-T)/2)."""
    pad = int(min(5, (num_frames - num_segments) / 2))
    if pad < 1:
        return _released_span(num_frames, num_segments, 0, num_frames - 1)
    start = int(rng.integers(0, pad + 1))
    end = int(rng.integers(num_frames - 1 - pad, num_frames))
    return _released_span(num_frames, num_segments, start, end)


def _released_span(num_frames: int, num_segments: int, start: int, end: int) -> np.ndarray:
    if end - start < num_segments:     # too short a span: the whole video
        start, end = 0, num_frames - 1
    return np.linspace(start, end, num_segments).astype(np.int64)


SAMPLINGS = {"tsn": (tsn_test_indices, tsn_train_indices),
             "released": (released_test_indices, released_train_indices)}


def resized_size(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """Frame size after scaling the shorter side to `shorter_side` (aspect ratio kept)."""
    scale = shorter_side / min(height, width)
    return max(shorter_side, round(height * scale)), max(shorter_side, round(width * scale))


def video_rng(seed: int, video_key: str, *salt: int) -> np.random.Generator:
    """A generator that depends only on the seed, the video and `salt` (e.g. the training step)."""
    digest = hashlib.sha256(video_key.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little"), *salt])


def sample_frame_indices(num_frames: int, rng: np.random.Generator, *, num_segments: int,
                         train_views: int, sampling: str = "tsn") -> np.ndarray:
    """[1 + train_views, T]: the test view's frames, then one random draw per train view (`sampling`: tsn or
    released, see the module docstring)."""
    test_indices, train_indices = SAMPLINGS[sampling]
    views = [test_indices(num_frames, num_segments)]
    views += [train_indices(num_frames, num_segments, rng) for _ in range(train_views)]
    return np.stack(views)


def sample_crops(frame_hw: tuple[int, int], rng: np.random.Generator, *, views: int, shorter_side: int,
                 crop: int, hflip: bool) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Crop offsets [views, 2] and flips [views] in the resized frame: centre for view 0, random after."""
    height, width = resized_size(*frame_hw, shorter_side)
    offsets = [((height - crop) // 2, (width - crop) // 2)]
    flipped = [False]
    for _ in range(views - 1):
        offsets.append((int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))))
        flipped.append(bool(hflip and rng.random() < 0.5))
    return np.asarray(offsets), np.asarray(flipped), (height, width)
