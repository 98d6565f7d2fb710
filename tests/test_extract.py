"""Stage one: what a user relies on when extracting a feature cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import decord
import h5py
import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

import clipspm.cache
from clipspm.cache.inspect import describe, verify
from clipspm.errors import WeightsUnavailableError
from clipspm.pipeline.encoder import load_clip
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.video.sampling import tsn_test_indices, video_rng
from clipspm.video.views import ViewSettings, load_views
from tests.conftest import TINY_MODEL, run_cli

BROKEN = {"test_class_0/empty": "zero-length", "test_class_0/garbage": "cannot decode",
          "test_class_0/truncated": "cannot decode", "test_class_0/short": "too short"}


def options(root: Path, cache_root: Path, weights: Path, **overrides) -> ExtractOptions:
    base = dict(dataset="custom", root=root, backbone=TINY_MODEL, pretrained=str(weights), cache_root=cache_root,
                workers=0, progress=False, train_views=2, block=4)
    return ExtractOptions(**{**base, **overrides})


@pytest.fixture(scope="module")
def extracted(video_root, tiny_weights, tmp_path_factory):
    return extract(options(video_root, tmp_path_factory.mktemp("caches"), tiny_weights))


def source_path(root: Path, video_id: str) -> Path:
    cls, name = video_id.split("/")
    split = cls.split("_")[0]
    matches = [p for p in (root / split / cls).iterdir() if p.stem == name]
    assert len(matches) == 1
    return matches[0]


def decode_independently(path: Path, indices: np.ndarray) -> np.ndarray:
    if path.is_dir():
        files = sorted(path.iterdir())
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in indices])
    return decord.VideoReader(str(path)).get_batch(indices.tolist()).asnumpy()


def test_cached_features_equal_encode_image_on_the_same_frames(extracted, video_root, tiny_weights):
    clip = load_clip(TINY_MODEL, str(tiny_weights))
    with clipspm.cache.open(extracted.path) as cache:
        meta, ids, status = cache.meta, cache.video_ids, cache.status
        checked_kinds = set()
        for row in np.flatnonzero(status == clipspm.cache.DONE):
            path = source_path(video_root, ids[row])
            kind = "frames" if path.is_dir() else path.suffix
            if kind in checked_kinds:
                continue
            checked_kinds.add(kind)
            indices = cache.array("frame_indices")[row]
            offsets = cache.array("crop_offsets")[row]
            flipped = cache.array("flipped")[row]
            n = int(cache.array("num_source_frames")[row])
            np.testing.assert_array_equal(indices[0], tsn_test_indices(n, 8))
            crop, side = meta["crop"]["size"], meta["crop"]["resize_shorter_side"]
            for view in range(indices.shape[0]):
                frames = torch.from_numpy(decode_independently(path, indices[view])).permute(0, 3, 1, 2)
                h, w = frames.shape[-2:]
                size = [side, round(w * side / h)] if h <= w else [round(h * side / w), side]
                frames = tvf.resize(frames, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
                top, left = offsets[view]
                frames = frames[..., top:top + crop, left:left + crop]
                if flipped[view]:
                    frames = frames.flip(-1)
                x = (frames.float() / 255 - torch.tensor(meta["normalize"]["mean"]).view(3, 1, 1)) / torch.tensor(
                    meta["normalize"]["std"]).view(3, 1, 1)
                with torch.no_grad():
                    expected = clip.model.encode_image(x).numpy()
                np.testing.assert_allclose(cache.features[row, view].astype(np.float32), expected,
                                           rtol=2e-3, atol=2e-3)
    assert checked_kinds == {".mp4", ".avi", "frames"}


def test_train_views_alone_equal_those_loaded_with_the_test_view(video_root):
    """The finetune stage decodes only its train view; it must be the view extraction would cut."""
    path = source_path(video_root, "train_class_0/video0")
    settings = ViewSettings(num_segments=8, train_views=2, shorter_side=128, crop=112, hflip=True)
    both = load_views(path, settings, video_rng(3, "train_class_0/video0", 5))
    alone = load_views(path, settings, video_rng(3, "train_class_0/video0", 5), test_view=False)
    assert alone.frames.shape[0] == 2
    torch.testing.assert_close(alone.frames, both.frames[1:], rtol=0, atol=0)
    np.testing.assert_array_equal(alone.frame_indices, both.frame_indices[1:])
    np.testing.assert_array_equal(alone.crop_offsets, both.crop_offsets[1:])


def test_broken_videos_are_recorded_with_reason_and_skipped(extracted):
    assert extracted.failed == len(BROKEN)
    assert extracted.done == extracted.total - len(BROKEN)
    reasons = dict(extracted.failures)
    for video, reason in BROKEN.items():
        assert reasons[video].startswith(reason), reasons[video]
    with clipspm.cache.open(extracted.path) as cache:
        info = describe(cache)
    assert info["splits"]["test"]["failed"] == len(BROKEN)
    assert info["failure_reasons"]["too short"] == 1


def test_plain_zarr_reads_the_store_with_provenance(extracted):
    root = zarr.open_group(str(extracted.store), mode="r")
    features = root["features"][:]
    assert features.dtype == np.float16 and features.shape[1:] == (3, 8, 64)
    assert root["text_features"].shape == (15, 16, 64)
    assert set(root["split"][:].tolist()) == {"train", "val", "test"}
    meta = root.attrs["clipspm"]
    for key in ["model", "pretrained", "weight_sha256", "open_clip_version", "num_frames", "sampling", "crop",
                "templates", "split_hash", "clipspm_version", "normalize"]:
        assert key in meta, key
    assert meta["model"] == TINY_MODEL and meta["num_frames"] == 8 and len(meta["templates"]) == 16
    assert meta["complete"] is True


def test_hdf5_store_holds_the_same_numbers_and_h5py_reads_it(extracted, video_root, tiny_weights):
    result = extract(options(video_root, extracted.path.parent, tiny_weights, format="hdf5"))
    assert result.store.suffix == ".h5" and result.path == extracted.path
    root = zarr.open_group(str(extracted.store), mode="r")
    with h5py.File(result.store, "r") as h5:
        for name in ["features", "frame_indices", "crop_offsets", "flipped", "status", "labels", "text_features",
                     "num_source_frames"]:
            np.testing.assert_array_equal(h5[name][:], root[name][:], err_msg=name)
        for name in ["video_ids", "split", "error", "class_texts"]:
            assert h5[name].asstr()[:].tolist() == root[name][:].tolist(), name
        assert '"weight_sha256"' in h5.attrs["clipspm"]
    assert not (extracted.path / "staging.zarr").exists()


def test_same_command_reuses_the_cache_and_other_settings_make_a_new_one(extracted, video_root, tiny_weights):
    again = extract(options(video_root, extracted.path.parent, tiny_weights))
    assert again.reused and again.encoded_now == 0 and again.path == extracted.path
    other = options(video_root, extracted.path.parent, tiny_weights, train_views=1, splits=("val",))
    assert clipspm.cache.cache_path is not None
    fresh = extract(other)
    assert not fresh.reused and fresh.path != extracted.path
    assert fresh.total == 10


def test_more_workers_than_cores_are_lowered_to_leave_the_encoder_a_core(video_root, tiny_weights, tmp_path,
                                                                          monkeypatch, capsys):
    import clipspm.stages.extract as stage

    used = []
    monkeypatch.setenv("CLIPSPM_THREADS", "2")
    monkeypatch.setattr(stage, "_encode_blocks", lambda writer, mine, dataset, clip, views, opts, *rest:
                        used.append((opts.workers, torch.get_num_threads())) or 0)
    extract(options(video_root, tmp_path, tiny_weights, workers=3, splits=("val",), device="cpu"))   # none encoded
    assert used == [(1, 1)], "on the CPU: one decoding worker, one encoder thread"
    assert "--workers 3 lowered to 1: 1 torch thread(s) + 1 decoding worker(s) on 2 core(s)" in capsys.readouterr().err


def test_verify_passes_on_a_sound_cache_and_names_damage(extracted, tmp_path):
    with clipspm.cache.open(extracted.path) as cache:
        assert verify(cache) == []
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(extracted.store, damaged)
    root = zarr.open_group(str(damaged), mode="r+")
    row = int(np.flatnonzero(root["status"][:] == clipspm.cache.DONE)[0])
    features = root["features"][row]
    features[0, 0, 0] = np.nan
    root["features"][row] = features
    max((p for p in (damaged / "frame_indices" / "c").rglob("*") if p.is_file()), key=lambda p: p.parts).write_bytes(
        b"not a chunk")
    last_chunk = max((p for p in (damaged / "features" / "c").rglob("*") if p.is_file()), key=lambda p: p.parts)
    last_chunk.unlink()
    with clipspm.cache.open(damaged) as cache:
        problems = verify(cache)
    assert any(f"video {row} has NaN" in p for p in problems), problems
    assert any("cannot be read" in p for p in problems), problems
    assert any("missing from the store" in p for p in problems), problems


def test_offline_hub_tag_fails_fast_and_says_how_to_pass_a_file(monkeypatch):
    from clipspm.pipeline import encoder

    monkeypatch.setattr(encoder, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(encoder, "cached_weight_file", lambda cfg: None)
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--pretrained /path/to"):
        load_clip("RN50", "openai")
    assert time.perf_counter() - started < 10


def test_missing_weight_file_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip(TINY_MODEL, "/nonexistent/tiny.safetensors")


def test_extract_resumes_after_kill(video_root, tiny_weights, tmp_path):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    args = ["extract", "--dataset", "custom", "--root", str(video_root), "--backbone", TINY_MODEL,
            "--pretrained", str(tiny_weights), "--train-views", "2", "--workers", "1", "--block", "1",
            "--batch-frames", "24", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "clipspm", *args, "--cache-dir", str(killed_root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        status_chunks = list(killed_root.glob("*/features.zarr/status/c/*"))
        if len(status_chunks) >= 3 or process.poll() is not None:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    store = next(killed_root.glob("*/features.zarr"))
    done_before = int((zarr.open_group(str(store), mode="r")["status"][:] != 0).sum())
    assert 0 < done_before < 34, "the kill should land mid-run"

    resumed = extract(options(video_root, killed_root, tiny_weights, workers=1, block=1, batch_frames=24))
    assert resumed.resumed and resumed.encoded_now == 34 - done_before
    clean = extract(options(video_root, clean_root, tiny_weights, block=1))
    a, b = zarr.open_group(str(resumed.store), mode="r"), zarr.open_group(str(clean.store), mode="r")
    for name in ["status", "frame_indices", "crop_offsets", "flipped", "num_source_frames", "labels"]:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a["error"][:].tolist() == b["error"][:].tolist()
    np.testing.assert_allclose(a["features"][:].astype(np.float32), b["features"][:].astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_cli_exit_status_says_whether_videos_failed(video_root, tiny_weights, tmp_path):
    common = ["extract", "--dataset", "custom", "--root", str(video_root), "--backbone", TINY_MODEL,
              "--pretrained", str(tiny_weights), "--train-views", "0", "--workers", "0", "--no-progress",
              "--cache-dir", str(tmp_path)]
    clean = run_cli(*common, "--splits", "train,val", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert "20 done, 0 failed" in clean.stdout
    with_broken = run_cli(*common, "--splits", "test", cwd=tmp_path)
    assert with_broken.returncode == 1
    assert "4 videos failed" in with_broken.stdout and "too short" in with_broken.stdout
    again = run_cli(*common, "--splits", "train,val", cwd=tmp_path)
    assert again.returncode == 0 and "reusing cache" in again.stderr


def test_cli_missing_root_is_a_clear_error(tmp_path):
    result = run_cli("extract", "--dataset", "hmdb51", "--root", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--root" in result.stderr and "Traceback" not in result.stderr


def test_torchrun_two_processes_make_one_cache_equal_to_one_process(video_root, tiny_weights, tmp_path):
    args = ["--dataset", "custom", "--root", str(video_root), "--backbone", TINY_MODEL, "--pretrained",
            str(tiny_weights), "--train-views", "1", "--workers", "0", "--block", "2", "--device", "cpu",
            "--no-progress", "--splits", "train,test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "clipspm", "extract", *args,
                          "--cache-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    single = extract(options(video_root, tmp_path / "one", tiny_weights, train_views=1, block=2,
                             splits=("train", "test")))
    two = zarr.open_group(str(next((tmp_path / "two").glob("*/features.zarr"))), mode="r")
    one = zarr.open_group(str(single.store), mode="r")
    assert two.attrs["clipspm"]["complete"]
    for name in ["status", "frame_indices", "crop_offsets", "labels"]:
        np.testing.assert_array_equal(two[name][:], one[name][:], err_msg=name)
    np.testing.assert_allclose(two["features"][:].astype(np.float32), one["features"][:].astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_cli_datasets_lists_split_sizes():
    from typer.testing import CliRunner

    from clipspm.cli import app

    result = CliRunner().invoke(app, ["datasets"], terminal_width=200)
    assert result.exit_code == 0
    assert "hmdb51" in result.output and "4280 / 31" in result.output and "synthetic" in result.output


def test_cli_cache_info_and_verify(extracted):
    from typer.testing import CliRunner

    from clipspm.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info", str(extracted.path)], terminal_width=200)
    assert info.exit_code == 0, info.output
    assert TINY_MODEL in info.output and "too short" in info.output
    verified = runner.invoke(app, ["cache", "verify", str(extracted.path)])
    assert verified.exit_code == 0 and "verified" in verified.output
    missing = runner.invoke(app, ["cache", "info", str(extracted.path.parent / "nothing")])
    assert missing.exit_code != 0
