"""What a loaded dataset is: its classes, its videos and where each video lies on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassEntry:
    key: str    # folder/class key as in the split file: 'brush_hair', 'BlowingCandles', 'train24'
    text: str   # the class name that goes into the prompt templates: 'brush hair'
    split: str  # 'train' | 'val' | 'test'


@dataclass(frozen=True)
class VideoEntry:
    key: str           # 'CLASS/VIDEO' exactly as in the split file
    class_key: str
    split: str
    path: Path | None  # a video file, or a folder of extracted frames; None if nothing on disk matches
    problem: str | None = None  # when path is None: why, naming what was looked for


@dataclass
class Dataset:
    name: str
    root: Path
    classes: list[ClassEntry]  # train, then val, then test; first-appearance order within a split
    videos: list[VideoEntry]   # train, val, test; split-file line order within a split
    split_hash: str            # sha256 of the split definition (split files and class texts)
    hflip: bool                # False where left/right is part of the label (SSv2, synthetic)
    default_backbone: str
    default_pretrained: str

    def class_index(self) -> dict[str, int]:
        """Class key -> row in `classes`; the same whichever splits were loaded."""
        return {entry.key: row for row, entry in enumerate(self.classes)}

    def classes_in(self, split: str) -> list[ClassEntry]:
        return [entry for entry in self.classes if entry.split == split]

    def videos_in(self, split: str) -> list[VideoEntry]:
        return [video for video in self.videos if video.split == split]

    def missing(self) -> list[VideoEntry]:
        """Videos with nothing on disk; extract records each one as a per-video failure."""
        return [video for video in self.videos if video.path is None]


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `clipspm datasets`; sizes are None where they depend on the data (custom, synthetic)."""

    name: str
    description: str
    videos: dict[str, int] | None   # split -> number of videos
    classes: dict[str, int] | None  # split -> number of classes
