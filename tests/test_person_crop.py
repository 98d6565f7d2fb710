"""Person crops at extraction (MCDP-FSAR's VFAM): the crop geometry against hand computations, the
one-person rule with resampling inside a segment, what the cache records, and a torchvision detector
loaded from a local file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from clipspm.cache.store import FeatureCache
from clipspm.errors import CacheError
from clipspm.pipeline.encoder import file_sha256, state_dict_sha256
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.finetune import cached_clip
from clipspm.video.person import PersonCropper, PersonCropSettings, candidate_frames, crop_window
from tests.conftest import TINY_MODEL, moving_bar_frames, run_cli

SETTINGS = PersonCropSettings(score=0.25, tries=8, height=240, width=320, extend_right=60, extend_down=30, label=1)
FRAMES, HEIGHT, WIDTH = 24, 96, 128


def bar_x(t: int, seed: int) -> int:
    """First column of the bar in frame t of moving_bar_frames(seed=seed)."""
    return (t * 7 + seed * 13) % (WIDTH - 8)


class BarDetector(nn.Module):
    """A known-box detector: one 'person' (x, 30, x + 8, 50) at the bar's first column x (where the red
    channel is 255), and a non-person box; on frames where x is odd it reports a second person."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        out = []
        for image in images:
            x = float(torch.nonzero(image[0, 0] == 1.0)[0, 0])
            boxes, labels = [[x, 30.0, x + 8, 50.0], [0.0, 0.0, 10.0, 10.0]], [1, 3]
            if int(x) % 2:
                boxes.append([x, 60.0, x + 8, 90.0])
                labels.append(1)
            out.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                        "scores": torch.full((len(labels),), 0.9)})
        return out


def frame_folder_dataset(root: Path, seeds: dict[str, int]) -> Path:
    """Class folders of one lossless frame-folder video each (PNG: the bar's pixels stay exact)."""
    for name, seed in seeds.items():
        folder = root / name / "video"
        folder.mkdir(parents=True)
        for t, frame in enumerate(moving_bar_frames(FRAMES, HEIGHT, WIDTH, seed=seed)):
            Image.fromarray(frame).save(folder / f"img_{t + 1:05d}.png")
    return root


# ---- geometry

@pytest.mark.parametrize("box,window", [
    # extended to (14, 30, 82, 80): 68 x 50, wider than 4:3 -> a 68 x 51 window centred at (48, 55)
    ((14.0, 30.0, 22.0, 50.0), (29, 14, 51, 68)),
    # the same at x = 98: the window would end at 166 > 128, moved left to start at 128 - 68 = 60
    ((98.0, 30.0, 106.0, 50.0), (29, 60, 51, 68)),
    # extended to (100, 80, 180, 125): 80 x 60 window centred at (140, 102.5), moved to (48, 36)
    ((100.0, 80.0, 120.0, 95.0), (36, 48, 60, 80)),
    # extended to (10, 10, 80, 90): taller than 4:3 -> 106.67 x 80 centred at (45, 50); left -8.3 moved to 0
    ((10.0, 10.0, 20.0, 60.0), (10, 0, 80, 106)),
    # extended to 180 x 120 -> a 180 x 135 window, larger than the 128 x 96 frame: cut to the frame
    ((0.0, 0.0, 120.0, 90.0), (0, 0, 96, 128)),
])
def test_crop_window_matches_the_hand_computation(box, window):
    assert crop_window(box, (HEIGHT, WIDTH), SETTINGS) == window


def test_a_box_of_the_crop_size_is_its_own_window():
    # 260 x 210 extended by (60, 30) is exactly 320 x 240
    assert crop_window((100.0, 50.0, 360.0, 260.0), (480, 640), SETTINGS) == (50, 100, 240, 320)


def test_candidates_are_the_sampled_frame_then_the_nearest_of_its_segment():
    assert candidate_frames(4, 3, 9, 8) == [4, 5, 3, 6, 7, 8]
    assert candidate_frames(3, 3, 9, 3) == [3, 4, 5]
    assert candidate_frames(8, 3, 9, 2) == [8, 7]


def test_a_crop_is_the_window_resized_to_320_by_240():
    frame = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    cropper = PersonCropper(BarDetector(), SETTINGS)
    crop = cropper.crop(frame, np.array([14.0, 30.0, 22.0, 50.0]))
    expected = tvf.resize(torch.from_numpy(frame[29:80, 14:82]).permute(2, 0, 1), [240, 320],
                          interpolation=InterpolationMode.BILINEAR, antialias=True).permute(1, 2, 0).numpy()
    assert crop.shape == (240, 320, 3) and np.array_equal(crop, expected)


# ---- extraction

def person_options(root: Path, cache_root: Path, **kwargs) -> ExtractOptions:
    return ExtractOptions(dataset="custom", root=root, backbone=TINY_MODEL, pretrained="none", cache_root=cache_root,
                          workers=0, progress=False, **kwargs)


def test_extraction_cuts_frames_around_the_one_person_and_records_the_boxes(tmp_path):
    root = frame_folder_dataset(tmp_path / "videos", {"class_a": 0})
    detector = BarDetector()
    result = extract(person_options(root, tmp_path / "caches", train_views=2, person_crop="bar-detector",
                                    person_detector=detector))
    assert result.done == 1 and "-person-" in result.path.name
    with FeatureCache(result.store) as cache:
        frames = cache.numbers("frame_indices")[0]                         # [3 views, 8]
        boxes = np.asarray(cache.person_boxes[0])                         # [3 views, 8, 4]
        meta = cache.meta
    # Test view: the middle frames 1, 4, 7, ... of the 3-frame segments; the bar is at 7t (mod 120), odd on
    # odd t, where the detector sees two people: those are replaced by the next frame of their segment.
    assert frames[0].tolist() == [2, 4, 8, 10, 14, 16, 20, 22]
    xs = [14, 28, 56, 70, 98, 112, 20, 34]                                # 7t mod 120 of those frames
    assert boxes[0].tolist() == [[x, 30, x + 8, 50] for x in xs]
    for view in range(3):                                                 # train views obey the same rule
        for t, frame in enumerate(frames[view]):
            assert 3 * t <= frame < 3 * t + 3 and bar_x(int(frame), 0) % 2 == 0
            assert boxes[view, t, 0] == bar_x(int(frame), 0)
    recorded = meta["settings"]["person_crop"]
    assert recorded["detector"] == "bar-detector" and recorded["detector_sha256"] == state_dict_sha256(detector)
    assert (recorded["height"], recorded["width"], recorded["score"]) == (240, 320, 0.25)

    plain = extract(person_options(root, tmp_path / "caches"))
    assert plain.path != result.path and "-person-" not in plain.path.name
    with FeatureCache(plain.store) as cache:
        assert cache.person_boxes is None and "person_crop" not in cache.meta["settings"]
    with FeatureCache(result.store) as cache, pytest.raises(CacheError, match="person-cropped"):
        cached_clip(cache, torch.device("cpu"))                          # finetune would decode uncropped frames


def test_a_video_whose_segment_never_shows_one_person_fails_with_the_reason(tmp_path):
    root = frame_folder_dataset(tmp_path / "videos", {"class_a": 0})
    result = extract(person_options(root, tmp_path / "caches", train_views=0, person_crop="bar-detector",
                                    person_detector=BarDetector(), person_tries=1))
    assert result.failed == 1
    assert "no frame shows exactly one person (score >= 0.25) among the 1 tried in segment 0 of view 0 and 3 more" \
        in result.failures[0][1]


def test_extraction_runs_a_torchvision_detector_from_a_local_file(tmp_path):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    root = frame_folder_dataset(tmp_path / "videos", {"class_a": 0, "class_b": 1})
    weights = tmp_path / "detector.pth"
    torch.save(fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).state_dict(), weights)
    extracted = run_cli("extract", "--dataset", "custom", "--root", str(root), "--backbone", TINY_MODEL,
                        "--pretrained", "none", "--train-views", "0", "--workers", "0", "--person-tries", "2",
                        "--person-crop", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector-weights", str(weights),
                        "--cache-dir", str(tmp_path / "caches"), "--no-progress", cwd=tmp_path)
    assert extracted.returncode in (0, 1), extracted.stderr[-2000:]   # 1: videos failed the one-person rule
    store = next((tmp_path / "caches").glob("custom-*-person-*/features.zarr"))
    with FeatureCache(store) as cache:
        recorded = cache.meta["settings"]["person_crop"]
        assert recorded["detector"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
        assert recorded["detector_sha256"] == file_sha256(weights)
        assert cache.meta["person_crop"]["detector_weights"] == str(weights.resolve())
        boxes, status, errors = np.asarray(cache.person_boxes), cache.status, cache.errors
    for row in range(2):                       # random weights: whatever it finds, the rule was applied
        if status[row] == 1:
            assert np.isfinite(boxes[row]).all()
        else:
            assert "exactly one person" in errors[row]


def test_person_crop_options_are_checked_before_anything_runs(tmp_path):
    root = frame_folder_dataset(tmp_path / "videos", {"class_a": 0})
    common = ["extract", "--dataset", "custom", "--root", str(root), "--backbone", TINY_MODEL, "--pretrained", "none",
              "--cache-dir", str(tmp_path / "caches"), "--no-progress"]
    no_weights = run_cli(*common, "--person-crop", "fasterrcnn_resnet50_fpn", cwd=tmp_path)
    assert no_weights.returncode == 2 and "needs --detector-weights" in " ".join(no_weights.stderr.split())
    (tmp_path / "w.pth").write_bytes(b"")
    unknown = run_cli(*common, "--person-crop", "yolo11", "--detector-weights", str(tmp_path / "w.pth"), cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown person detector 'yolo11'" in " ".join(unknown.stderr.split())
    broken = run_cli(*common, "--person-crop", "fcos_resnet50_fpn", "--detector-weights", str(tmp_path / "w.pth"),
                     cwd=tmp_path)
    assert broken.returncode == 2 and "is not a state dict of fcos_resnet50_fpn" in " ".join(broken.stderr.split())
