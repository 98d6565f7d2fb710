"""Frame sources: a video file (decord, with PyAV as fallback) or a folder of extracted frames.

A video that cannot be used raises `VideoReadError`; the extract stage records its reason and
moves on, so one bad file never stops a run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class VideoReadError(Exception):
    """This video cannot be used; `str(error)` is the reason recorded in the cache."""


class FrameSource(Protocol):
    backend: str
    num_frames: int

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at `indices` (sorted, unique) as uint8 [n, H, W, 3] RGB."""


def open_video(path: Path) -> FrameSource:
    """The frame source for a video file or a frame folder; raises VideoReadError if unusable."""
    path = Path(path)
    if path.is_dir():
        return FrameFolder(path)
    if not path.is_file():
        raise VideoReadError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise VideoReadError("zero-length file")
    try:
        return DecordSource(path)
    except VideoReadError as decord_error:
        try:
            return PyAVSource(path)
        except VideoReadError as pyav_error:
            raise VideoReadError(f"cannot decode: decord: {decord_error}; PyAV: {pyav_error}") from None


def read_frames(source: FrameSource, indices: np.ndarray) -> np.ndarray:
    """`source.read(indices)`, retried with PyAV when decord fails mid-file (damaged streams)."""
    try:
        return source.read(indices)
    except VideoReadError:
        if not isinstance(source, DecordSource):
            raise
        return PyAVSource(source.path).read(indices)


class DecordSource:
    backend = "decord"

    def __init__(self, path: Path):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.path = path
        try:
            self._reader = decord.VideoReader(str(path), num_threads=1)
            self.num_frames = len(self._reader)
        except Exception as error:  # decord raises bare RuntimeError/DECORDError for any bad input
            raise VideoReadError(_first_line(error)) from None

    def read(self, indices: np.ndarray) -> np.ndarray:
        try:
            return self._reader.get_batch(np.asarray(indices).tolist()).asnumpy()
        except Exception as error:
            raise VideoReadError(_first_line(error)) from None


class PyAVSource:
    """Sequential decoding: slower than decord's seeking but it accepts more damaged files."""

    backend = "pyav"

    def __init__(self, path: Path):
        import av

        av.logging.set_level(av.logging.PANIC)
        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoReadError("no video stream")
                stream = container.streams.video[0]
                self.num_frames = stream.frames or sum(1 for _ in container.decode(stream))
        except VideoReadError:
            raise
        except Exception as error:
            raise VideoReadError(_first_line(error)) from None
        if self.num_frames == 0:
            raise VideoReadError("no decodable frames")

    def read(self, indices: np.ndarray) -> np.ndarray:
        import av

        wanted = {int(i): n for n, i in enumerate(indices)}
        frames: list[np.ndarray | None] = [None] * len(indices)
        last = max(wanted)
        try:
            with av.open(str(self.path)) as container:
                for position, frame in enumerate(container.decode(video=0)):
                    if position in wanted:
                        frames[wanted[position]] = frame.to_ndarray(format="rgb24")
                    if position >= last:
                        break
        except Exception as error:
            raise VideoReadError(_first_line(error)) from None
        missing = sum(frame is None for frame in frames)
        if missing:
            raise VideoReadError(f"truncated: {missing} of the requested frames lie past the decodable end")
        return np.stack(frames)


class FrameFolder:
    """`VIDEO/img_00001.jpg ...` as written by the CLIP-MEI / TRX preprocessing scripts."""

    backend = "frames"

    def __init__(self, path: Path):
        self.path = path
        self._files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        self.num_frames = len(self._files)
        if self.num_frames == 0:
            raise VideoReadError(f"frame folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def read(self, indices: np.ndarray) -> np.ndarray:
        from PIL import Image

        frames = []
        for index in indices:
            try:
                with Image.open(self._files[int(index)]) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except Exception as error:
                raise VideoReadError(f"{self._files[int(index)].name}: {_first_line(error)}") from None
        if len({frame.shape for frame in frames}) > 1:
            raise VideoReadError("frames of different sizes in one folder")
        return np.stack(frames)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
