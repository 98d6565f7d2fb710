"""The views of one video as uint8 crops, and the torch Dataset that decodes them in workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from clipspm.video.decode import VideoReadError, open_video, read_frames
from clipspm.video.sampling import sample_crops, sample_frame_indices, video_rng

if TYPE_CHECKING:
    from clipspm.video.person import PersonCropper


@dataclass(frozen=True)
class ViewSettings:
    num_segments: int   # T
    train_views: int    # V; view 0 is the test view
    shorter_side: int   # resize target of the shorter side (256 for a 224 crop)
    crop: int           # the encoder's input size
    hflip: bool         # random horizontal flips allowed in train views
    sampling: str = "tsn"   # which frames: tsn | released (clipspm/video/sampling.py)

    @property
    def views(self) -> int:
        return 1 + self.train_views


@dataclass
class VideoViews:
    frames: torch.Tensor         # [views, T, 3, crop, crop] uint8 (views: those loaded)
    frame_indices: np.ndarray    # [views, T]
    crop_offsets: np.ndarray     # [views, 2] (top, left)
    flipped: np.ndarray          # [views] bool
    num_frames: int              # frames in the source video
    backend: str                 # which decoder read it
    person_boxes: np.ndarray | None = None   # [views, T, 4] the person each frame was cut around (person crops)


def load_views(path: Path, settings: ViewSettings, rng: np.random.Generator, *, test_view: bool = True,
               person: PersonCropper | None = None) -> VideoViews:
    """Decode the sampled frames of one video once and cut every view from them.

    `test_view=False` leaves view 0 out (and does not decode its frames): the train views are the same
    as with it, since the test view draws nothing from `rng`. With `person`, each sampled frame is first
    replaced by its crop around the one person in it (clipspm/video/person.py); the views are cut from
    those crops as from the frames of a video of the crops' size.
    """
    source = open_video(path)
    if source.num_frames < settings.num_segments:
        raise VideoReadError(f"too short: {source.num_frames} frames, T={settings.num_segments} needs at least "
                             f"{settings.num_segments}")
    indices = sample_frame_indices(source.num_frames, rng, num_segments=settings.num_segments,
                                   train_views=settings.train_views, sampling=settings.sampling)
    kept = slice(0 if test_view else 1, None)
    indices = indices[kept]
    boxes = None
    if person is None:
        unique, positions = np.unique(indices, return_inverse=True)
        decoded = read_frames(source, unique)                               # [U, H, W, 3]
        picks = positions.reshape(indices.shape)
    else:
        decoded, indices, boxes = person.frames(source, indices, settings.num_segments)
        decoded = decoded.reshape(-1, *decoded.shape[2:])                  # [views*T, h, w, 3]
        picks = np.arange(indices.size).reshape(indices.shape)
    offsets, flipped, resized_hw = sample_crops(decoded.shape[1:3], rng, views=settings.views,
                                                shorter_side=settings.shorter_side, crop=settings.crop,
                                                hflip=settings.hflip)
    offsets, flipped = offsets[kept], flipped[kept]
    frames = torch.from_numpy(decoded).permute(0, 3, 1, 2)                  # [U, 3, H, W]
    if tuple(frames.shape[-2:]) != resized_hw:
        frames = tvf.resize(frames, list(resized_hw), interpolation=InterpolationMode.BICUBIC, antialias=True)
    views = []
    for view, (top, left) in enumerate(offsets):
        clip = frames[picks[view], :, top:top + settings.crop, left:left + settings.crop]
        views.append(clip.flip(-1) if flipped[view] else clip)
    return VideoViews(torch.stack(views).contiguous(), indices, offsets, flipped, source.num_frames, source.backend,
                      boxes)


@dataclass
class VideoItem:
    """What a worker hands back for one video: its views, or the reason it has none."""

    row: int
    views: VideoViews | None
    error: str | None


class VideoViewsDataset(Dataset):
    """Videos `(row, key, path or None, problem)` -> VideoItem; never raises for a bad video."""

    def __init__(self, videos: list[tuple[int, str, Path | None, str | None]], settings: ViewSettings, seed: int,
                 person: PersonCropper | None = None):
        self.videos = videos
        self.settings = settings
        self.seed = seed
        self.person = person

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> VideoItem:
        row, key, path, problem = self.videos[index]
        if path is None:
            return VideoItem(row, None, problem or "no file")
        try:
            return VideoItem(row, load_views(path, self.settings, video_rng(self.seed, key), person=self.person), None)
        except VideoReadError as error:
            return VideoItem(row, None, str(error))
        except Exception as error:  # a decoder bug on one file must not end a run over thousands
            return VideoItem(row, None, f"unexpected {type(error).__name__}: {error}")


def collate_items(items: list[VideoItem]) -> list[VideoItem]:
    return items
