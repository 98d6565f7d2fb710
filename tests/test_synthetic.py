"""The built-in synthetic dataset: deterministic, real video files, few-shot ready, resumable."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from clipspm.datasets.synthetic import (
    CLASSES_BY_KEY,
    DEFAULT_VIDEOS_PER_CLASS,
    MARKER_FILE,
    SYNTHETIC_CLASSES,
    draw_video_params,
    ensure_synthetic,
    plan_dataset,
    render_video,
    write_video,
)
from clipspm.errors import DatasetError

SMALL = {"videos_per_class": 1, "size": 64, "progress": False}


def decode_av(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def dataset_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "data", seed=0, **SMALL)


def test_synthetic_is_deterministic_by_seed(small: Path, tmp_path: Path) -> None:
    again = ensure_synthetic(tmp_path / "again", seed=0, workers=1, **SMALL)  # serial vs the pool
    other = ensure_synthetic(tmp_path / "other", seed=1, **SMALL)
    assert dataset_files(again) == dataset_files(small)
    key = (small / "splits" / "testlist.txt").read_text().split()[0]
    assert np.array_equal(decode_av(again / f"{key}.mp4"), decode_av(small / f"{key}.mp4"))
    first, changed = decode_av(small / f"{key}.mp4"), decode_av(other / f"{key}.mp4")
    assert first.shape != changed.shape or not np.array_equal(first, changed)


def test_splits_have_disjoint_classes_and_enough_videos_for_5way_5shot_4query(small: Path) -> None:
    per_class = Counter(v.class_key for v in plan_dataset(0, DEFAULT_VIDEOS_PER_CLASS))
    classes = {split: {c.key for c in SYNTHETIC_CLASSES if c.split == split} for split in ("train", "val", "test")}
    assert not classes["train"] & classes["val"] and not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]
    assert len(classes["train"]) > len(classes["val"]) >= 5 and len(classes["test"]) >= 5
    assert min(per_class.values()) >= 5 + 4
    for split, keys in classes.items():  # the files written agree with the class table
        lines = (small / "splits" / f"{split}list.txt").read_text().split()
        assert {line.split("/")[0] for line in lines} == keys
        assert all((small / f"{line}.mp4").is_file() for line in lines)
    assert json.loads((small / "classes.json").read_text()) == {c.key: c.text for c in SYNTHETIC_CLASSES}
    assert json.loads((small / MARKER_FILE).read_text())["complete"] is True


def test_class_keys_are_folder_names_and_texts_are_english() -> None:
    for c in SYNTHETIC_CLASSES:
        assert c.key.replace("_", "").isalnum() and c.key == c.key.lower()
        assert "_" not in c.text and c.text == c.text.lower()


def test_videos_are_real_decodable_files(small: Path) -> None:
    for video in plan_dataset(0, 1)[::7]:
        path = small / f"{video.key}.mp4"
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        by_av = decode_av(path)
        by_decord = decord.VideoReader(str(path)).get_batch(list(range(video.params.num_frames))).asnumpy()
        rendered = render_video(CLASSES_BY_KEY[video.class_key], video.params, size=64)
        assert by_av.shape == by_decord.shape == rendered.shape == (video.params.num_frames, 64, 64, 3)
        assert np.abs(by_av.astype(int) - rendered).mean() < 4  # lossy, but the same pictures


def test_lookalike_pairs_differ_only_in_motion() -> None:
    params = draw_video_params(np.random.default_rng(3))
    for a, b in (("rotate_clockwise", "rotate_counterclockwise"), ("orbit_clockwise", "orbit_counterclockwise")):
        one, two = (render_video(CLASSES_BY_KEY[k], params, size=64) for k in (a, b))
        assert np.array_equal(one[0], two[0])
        assert np.abs(one[-params.num_frames // 3].astype(int) - two[-params.num_frames // 3]).mean() > 1


def test_val_and_test_hold_pairs_that_only_motion_direction_tells_apart() -> None:
    for split in ("val", "test"):
        motions = Counter(c.motion for c in SYNTHETIC_CLASSES if c.split == split)
        assert sum(n >= 2 for n in motions.values()) >= 2, split


def test_clockwise_turns_clockwise_on_screen() -> None:
    params = dataclasses.replace(draw_video_params(np.random.default_rng(0)), num_frames=11, angle=0.0,
                                 speed=1.0, jitter_x=0.0, jitter_y=0.0, noise_amplitude=0)
    # rotate: 300 degrees over the video, so frame 3 (t = 0.3) is a quarter turn from "dot up".
    frame = render_video(CLASSES_BY_KEY["rotate_clockwise"], params, size=64)[3].astype(int)
    ys, xs = np.nonzero(frame.min(axis=-1) > 200)  # the white dot
    assert xs.mean() > 32 + 4 and abs(ys.mean() - 32) < 4


def test_resumes_partial_generation(small: Path, tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "data", seed=0, **SMALL)
    (root / MARKER_FILE).unlink()
    videos = sorted(root.rglob("*.mp4"))
    for path in videos[:3]:
        path.unlink()
    videos[3].write_bytes(videos[3].read_bytes()[:500])  # a damaged file under the final name
    videos[4].with_name(f".{videos[4].stem}.partial.mp4").write_bytes(b"half")  # a killed writer
    ensure_synthetic(root, seed=0, **SMALL)
    assert {k: v for k, v in dataset_files(root).items() if ".partial" not in k} == dataset_files(small)


def test_resumes_after_kill(small: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    script = (f"from pathlib import Path; from clipspm.datasets.synthetic import ensure_synthetic; "
              f"ensure_synthetic(Path({str(root)!r}), seed=0, workers=1, **{SMALL!r})")
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while len(list(root.rglob("*.mp4"))) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not json.loads((root / MARKER_FILE).read_text())["complete"]
    ensure_synthetic(root, seed=0, **SMALL)
    assert {k: v for k, v in dataset_files(root).items() if ".partial" not in k} == dataset_files(small)


def test_resume_replaces_videos_of_another_generation(small: Path, tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "data", seed=1, **SMALL)
    (root / MARKER_FILE).unlink()
    ensure_synthetic(root, seed=0, **SMALL)
    assert dataset_files(root) == dataset_files(small)


def test_refuses_root_with_other_parameters(small: Path) -> None:
    with pytest.raises(DatasetError, match="other parameters.*delete"):
        ensure_synthetic(small, seed=1, **SMALL)
    with pytest.raises(DatasetError, match="videos_per_class=1"):
        ensure_synthetic(small, seed=0, videos_per_class=2, size=64, progress=False)


def test_refuses_folder_that_is_not_a_synthetic_dataset(tmp_path: Path) -> None:
    (tmp_path / "holiday.mp4").write_bytes(b"not ours")
    with pytest.raises(DatasetError, match="not part of a synthetic dataset"):
        ensure_synthetic(tmp_path, seed=0, **SMALL)


def test_reuses_a_complete_dataset_without_touching_it(small: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in small.rglob("*")}
    ensure_synthetic(small, seed=0, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == stamps


@pytest.mark.parametrize(("name", "codec", "decoded_codec"),
                         [("clip.mp4", "libx264", "h264"), ("clip.avi", "mpeg4", "mpeg4")])
def test_write_video_mp4_and_avi(tmp_path: Path, name: str, codec: str, decoded_codec: str) -> None:
    yy, xx = np.mgrid[0:48, 0:64]
    frames = np.stack([np.stack([(xx * 4 + 6 * i) % 256, yy * 5, np.full_like(xx, 128)], -1)
                       for i in range(10)]).astype(np.uint8)  # a gradient sliding to the right
    path = tmp_path / "out" / name
    write_video(path, frames, fps=25, codec=codec)
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left behind
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == decoded_codec
    decoded = decode_av(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 8
    assert len(decord.VideoReader(str(path))) == len(frames)


def test_write_video_refuses_odd_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
