"""Shared fixtures: the tests make their own videos, weights and caches (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_MODEL = "clipspm-tiny-vit"


def moving_bar_frames(num_frames: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A bright bar sweeping across a noisy background: every frame differs, so sampling errors show."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 60, (num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        x = (t * 7 + seed * 13) % (width - 8)
        frames[t, :, x:x + 8] = (255, 200 - 3 * t % 200, 40)
    return frames


def make_video_dataset(root: Path) -> Path:
    """A `custom` dataset: train/val/test class folders with .mp4, .avi and frame-folder videos.

    The test split also holds one video of each broken kind: zero-length, garbage bytes,
    truncated mp4, and too short for T=8.
    """
    from PIL import Image

    from clipspm.datasets.synthetic import write_video

    for s, split in enumerate(("train", "val", "test")):
        for c in range(5):
            for v in range(2):
                seed = 100 * s + 10 * c + v
                frames = moving_bar_frames(20 + 3 * v + c, seed=seed)
                folder = root / split / f"{split}_class_{c}"
                if v == 0:
                    write_video(folder / f"video{v}.mp4", frames)
                elif c % 2:
                    write_video(folder / f"video{v}.avi", frames, codec="mpeg4")
                else:
                    (folder / f"video{v}").mkdir(parents=True)
                    for t, frame in enumerate(frames):
                        Image.fromarray(frame).save(folder / f"video{v}" / f"img_{t + 1:05d}.png")
    broken = root / "test" / "test_class_0"
    (broken / "empty.mp4").write_bytes(b"")
    (broken / "garbage.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    good = (broken / "video0.mp4").read_bytes()
    (broken / "truncated.mp4").write_bytes(good[: len(good) // 2])
    write_video(broken / "short.mp4", moving_bar_frames(4))
    return root


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    return make_video_dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Random weights of the tiny model saved to a local file, as a user passes real ones."""
    from safetensors.torch import save_file

    from clipspm.pipeline.encoder import load_clip

    model = load_clip(TINY_MODEL, "none", seed=123).model
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# A user's own suite file: parameter-free OTAM at two temperatures (runs in seconds, no training).
OTAM_SUITE_YAML = """
title: OTAM soft-min temperature
columns: [lambda]
curve: lambda
reference: lam0.5
variants:
  - {name: lam0.1, columns: {lambda: 0.1}, set: [model.kind=otam, model.otam_lambda=0.1]}
  - {name: lam0.5, columns: {lambda: 0.5}, set: [model.kind=otam, model.otam_lambda=0.5]}
"""


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """`clipspm ARGS` in a fresh process (what a user types), returning the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clipspm", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def kill_when_written(args: list[str], path: Path, *, cwd: Path | None = None, env: dict | None = None,
                      timeout: float = 240) -> None:
    """Run `clipspm ARGS` and SIGKILL it as soon as `path` exists (or it ends, or `timeout` passes)."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen([sys.executable, "-m", "clipspm", *args], cwd=cwd, env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists() and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def kill_after_first_checkpoint(args: list[str], run_dir: Path, *, cwd: Path | None = None,
                                env: dict | None = None, timeout: float = 180) -> int:
    """Run `clipspm ARGS` training into `run_dir`, SIGKILL it as soon as its first checkpoint is
    written, and return the episode that checkpoint holds."""
    import json

    state = run_dir / "checkpoints" / "last" / "state.json"
    kill_when_written(args, state, cwd=cwd, env=env, timeout=timeout)
    return json.loads(state.read_text())["episode"]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """A small synthetic dataset (9 videos per class) extracted with the tiny random-weights model."""
    from clipspm.datasets.synthetic import ensure_synthetic
    from clipspm.stages.extract import ExtractOptions, extract

    work = tmp_path_factory.mktemp("synthetic")
    root = ensure_synthetic(work / "data", seed=0, videos_per_class=9, progress=False)
    result = extract(ExtractOptions(dataset="synthetic", root=root, cache_root=work / "caches", train_views=2,
                                    workers=0, progress=False))
    return result.path


def heads_config(cache: Path, *overrides: str):
    """The shipped heads config on `cache`, with a short schedule for tests."""
    from clipspm.config import resolve_config

    return resolve_config("heads", "synthetic", overrides=[f"data.cache={cache}", "train.episodes=320",
                                                           "train.val_every=160", "train.val_episodes=100",
                                                           "train.log_every=32", *overrides])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread beats two contending ones, all the more on a busy machine
    (`pytestmark = pytest.mark.usefixtures("one_torch_thread")` in a module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
