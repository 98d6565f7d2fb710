"""Person crops at extraction (MCDP-FSAR's VFAM): every sampled frame cut around the one person in it.

The released preprocessing (github sjkjsandy/MCDP-FSAR, datasets/utils/gen_3s_video_by_mot.py) runs a
person detector on every frame and keeps only frames that show exactly one person, each cut around
that person (`crop_window`, its numbers in configs/extract.yaml `person_crop:`). Here the detector is
a torchvision detection model (or any module with their interface: a list of float images [3, H, W]
in [0, 1] in, a list of {"boxes" [k, 4] x1 y1 x2 y2, "labels" [k], "scores" [k]} out), and a sampled
frame where the rule fails is replaced by the nearest frame of the same TSN segment where it holds
(`candidate_frames`). A video with a segment where no tried frame holds it fails, with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from clipspm.errors import ClipspmError
from clipspm.video.decode import FrameSource, VideoReadError, read_frames
from clipspm.video.sampling import segment_bounds

# torchvision detection models that can be built without downloading anything (weights=None,
# weights_backbone=None) and then loaded from a local file; all predict the 91 COCO categories.
DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
             "fcos_resnet50_fpn")


@dataclass(frozen=True)
class PersonCropSettings:
    """The rule and the geometry of a person crop (defaults: configs/extract.yaml `person_crop:`)."""

    score: float          # a detection counts as a person from this score on
    tries: int            # frames of a segment tried, nearest first, before the video fails
    height: int           # size of every crop
    width: int
    extend_right: int     # the person box is extended this far right and down before the window is fit
    extend_down: int
    label: int            # the detector's category id of a person (COCO: 1)


def crop_window(box: tuple[float, float, float, float], frame_hw: tuple[int, int], settings: PersonCropSettings
                ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop around a person box (x1, y1, x2, y2) in a frame [H, W].

    The box, extended right and down, is centred in the smallest window of the crop's aspect ratio that
    holds it; the window is moved, not shrunk, to lie in the frame, then cut to the frame where it is
    larger (there the released slice would wrap around to the frame's far edge). Pixels truncated to int.
    """
    height, width = frame_hw
    x1, y1, x2, y2 = box
    x2, y2 = x2 + settings.extend_right, y2 + settings.extend_down
    w, h = x2 - x1, y2 - y1
    aspect = settings.width / settings.height
    window_w, window_h = (w, w / aspect) if w / h > aspect else (h * aspect, h)
    left = _inside(x1 + w / 2 - window_w / 2, window_w, width)
    top = _inside(y1 + h / 2 - window_h / 2, window_h, height)
    left, top, window_w, window_h = int(left), int(top), int(window_w), int(window_h)
    cut_left, cut_top = max(left, 0), max(top, 0)
    return cut_top, cut_left, min(top + window_h, height) - cut_top, min(left + window_w, width) - cut_left


def _inside(start: float, size: float, limit: int) -> float:
    """The window's start moved so that [start, start + size) lies in [0, limit) where it fits."""
    if start < 0:
        return 0.0
    if start + size > limit:
        return limit - size
    return start


def candidate_frames(sampled: int, start: int, end: int, tries: int) -> list[int]:
    """Frames of the segment [start, end) to try, the sampled one first, then the nearest: s, s+1, s-1, s+2, ..."""
    order = [sampled]
    for step in range(1, end - start):
        order += [frame for frame in (sampled + step, sampled - step) if start <= frame < end]
    return order[:tries]


class PersonCropper:
    """Runs the detector on decoded frames and cuts the frames where exactly one person shows."""

    def __init__(self, detector: nn.Module, settings: PersonCropSettings, device: torch.device | str = "cpu"):
        self.detector = detector.to(device).eval().requires_grad_(False)
        self.settings, self.device = settings, torch.device(device)

    @torch.inference_mode()
    def persons(self, frames: np.ndarray) -> list[np.ndarray]:
        """The person boxes [k, 4] (x1, y1, x2, y2) of each frame of uint8 [n, H, W, 3]."""
        images = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        found = []
        for output in self.detector(list(images)):
            person = (output["labels"] == self.settings.label) & (output["scores"] >= self.settings.score)
            found.append(output["boxes"][person].float().cpu().numpy())
        return found

    def crop(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> the crop around `box`, resized to uint8 [height, width, 3]."""
        top, left, height, width = crop_window(tuple(box.tolist()), frame.shape[:2], self.settings)
        window = torch.from_numpy(frame[top:top + height, left:left + width]).permute(2, 0, 1)
        if (height, width) != (self.settings.height, self.settings.width):
            window = tvf.resize(window, [self.settings.height, self.settings.width],
                                interpolation=InterpolationMode.BILINEAR, antialias=True)
        return window.permute(1, 2, 0).numpy()

    def frames(self, source: FrameSource, indices: np.ndarray, num_segments: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For sampled frames `indices` [views, T]: the crops uint8 [views, T, height, width, 3], the frames
        used [views, T] (each the nearest of its segment showing exactly one person) and their person
        boxes [views, T, 4]. Frames are decoded and detected a round of candidates at a time."""
        starts, ends = segment_bounds(source.num_frames, num_segments)
        candidates = {(v, t): candidate_frames(int(indices[v, t]), int(starts[t]), int(ends[t]), self.settings.tries)
                      for v, t in np.ndindex(indices.shape)}
        chosen, boxes = np.full(indices.shape, -1, "int64"), np.full((*indices.shape, 4), math.nan, "float32")
        crops = np.zeros((*indices.shape, self.settings.height, self.settings.width, 3), "uint8")
        seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}          # frame -> (pixels, person boxes)
        for round_ in range(self.settings.tries):
            wanted = sorted({c[round_] for key, c in candidates.items() if chosen[key] < 0 and round_ < len(c)}
                            - set(seen))
            if wanted:
                decoded = read_frames(source, np.asarray(wanted))
                seen.update(zip(wanted, zip(decoded, self.persons(decoded))))
            for key, options in candidates.items():
                if chosen[key] >= 0 or round_ >= len(options):
                    continue
                pixels, persons = seen[options[round_]]
                if len(persons) == 1:
                    chosen[key], boxes[key], crops[key] = options[round_], persons[0], self.crop(pixels, persons[0])
        failed = [(v, t) for v, t in np.ndindex(indices.shape) if chosen[v, t] < 0]
        if failed:
            v, t = failed[0]
            raise VideoReadError(f"no frame shows exactly one person (score >= {self.settings.score}) among the "
                                 f"{len(candidates[v, t])} tried in segment {t} of view {v}"
                                 + (f" and {len(failed) - 1} more segments" if len(failed) > 1 else ""))
        return crops, chosen.astype(indices.dtype), boxes


def build_detector(name: str, weights: Path) -> nn.Module:
    """A torchvision detection model built without downloads and loaded from the local file `weights`
    (a state dict: .pth/.pt via torch.load with weights_only, or .safetensors)."""
    from torchvision.models import detection

    if name not in DETECTORS:
        raise ClipspmError(f"unknown person detector {name!r}; use one of {', '.join(DETECTORS)}")
    weights = Path(weights)
    if not weights.is_file():
        raise ClipspmError(f"--detector-weights {weights} is not a file; download the torchvision weights of {name} "
                           f"on a machine with internet and pass the file")
    model = getattr(detection, name)(weights=None, weights_backbone=None)
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # a wrong file can fail in many ways; all mean the same to the user
        reason = (str(error).strip() or type(error).__name__).splitlines()[0][:300]
        raise ClipspmError(f"--detector-weights {weights} is not a state dict of {name}: {reason}") from None
    return model
