"""Stage one speed: videos/s of `extract` against decoding alone, on the same videos with the same workers.

Run `python benchmarks/extract.py [--quick]`; `run()` returns the measurements. Per video source, model and
worker count:

    decode only   `video_loader`, the DataLoader `extract` reads from (decode, sample, crop in W workers), iterated
    encode only   the encoder on random frames, batched and threaded as `extract` runs it: its bound on extract
    extract       `extract()` into a fresh cache: that loader, then normalisation, the encoder, the Zarr writes

Both rates count the per-video loop, the loader's start included; `ratio` is extract over decode only: what
the pipeline adds to decoding. `call` counts the whole `extract()` call, which also loads the model, encodes
the class prompts and creates the store. Two video sources: `synthetic`, the built-in dataset (128x128, 24-48
frames: far cheaper to decode than any benchmark's videos), and `ucf-like`, generated videos of UCF101's frame
size and mean length (320x240, 175 frames at 25 fps). Rounds are interleaved and the best round of each is
reported. On CUDA, RN50 and ViT-B-16 (random weights: speed only) are measured too, with the GPU utilisation
sampled while the videos are encoded.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python benchmarks/extract.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, describe_device, interleaved, print_table
from clipspm.datasets import load_dataset
from clipspm.pipeline.encoder import load_clip, resolve_precision
from clipspm.stages.extract import DEFAULTS, ExtractOptions, extract, video_loader, view_settings
from clipspm.system import thread_plan, usable_cores

CHEAP_MODEL = "clipspm-tiny-vit"
GPU_MODELS = ("RN50", "ViT-B-16")
SOURCES = ("synthetic", "ucf-like")
UCF_LIKE = (175, 240, 320)    # frames, height, width: UCF101's frame size and mean clip length (7.2 s) at 25 fps
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def run(videos: int = 224, workers: tuple[int, ...] | None = None, models: tuple[str, ...] | None = None,
        sources: tuple[str, ...] = SOURCES, rounds: int = 3, device: str | None = None) -> dict:
    """videos/s of decoding alone and of `extract`, per source, model and worker count, best of `rounds`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = models or ((CHEAP_MODEL, *GPU_MODELS) if device == "cuda" else (CHEAP_MODEL,))
    # the worker counts extract runs with: at most the cores, on the CPU all but the encoder's (clipspm.system)
    workers = sorted({thread_plan(device, count).workers for count in workers or (DEFAULTS.run.workers,)})
    rows = []
    for source in sources:
        where = _synthetic(videos) if source == "synthetic" else _ucf_like(videos)
        dataset = load_dataset(where["dataset"], where["root"], split_dir=where["split_dir"])
        for model in models:
            clip = load_clip(model, "none")
            for num_workers in workers:
                options = ExtractOptions(**where, backbone=model, pretrained="none", workers=num_workers,
                                         device=device, progress=False)
                views = view_settings(options, dataset, clip)
                results = interleaved({"decode": partial(decode_only, dataset, views, options),
                                       "encode": partial(encode_only, clip, views, options),
                                       "extract": partial(extract_once, options)}, rounds)
                decode = max(results["decode"])
                best = max(results["extract"], key=lambda result: result["videos_per_s"])
                rows.append({
                    "videos": f"{len(dataset.videos)} {source}", "model": model, "workers": num_workers,
                    "decode only videos/s": round(decode, 1), "encode only videos/s": round(max(results["encode"]), 1),
                    "extract videos/s": round(best["videos_per_s"], 1),
                    "ratio": round(best["videos_per_s"] / decode, 2), "call videos/s": round(best["call_per_s"], 1),
                    "GPU util %": "-" if best["gpu_util"] is None else round(best["gpu_util"]),
                })
    return {"name": "extract", "device": describe_device(device), "cores": usable_cores(),
            "frames_per_video": DEFAULTS.num_frames * (1 + DEFAULTS.train_views), "rounds": rounds, "rows": rows}


def decode_only(dataset, views, options: ExtractOptions) -> float:
    started = time.perf_counter()
    count = sum(len(batch) for batch in video_loader(dataset, list(range(len(dataset.videos))), views, options))
    return count / (time.perf_counter() - started)


def encode_only(clip, views, options: ExtractOptions, videos: int = 32) -> float:
    """videos/s of the encoder alone on random frames of a video's size, batched as `extract` batches them, with
    the threads `extract` gives it (clipspm.system's thread policy: on the CPU the cores its workers leave)."""
    frames_per_video = views.views * views.num_segments
    batch = max(1, options.batch_frames // frames_per_video) * frames_per_video
    calls = -(-videos * frames_per_video // batch)
    frames = torch.randint(0, 256, (batch, 3, views.crop, views.crop), dtype=torch.uint8)
    precision = resolve_precision(options.precision, clip.device)
    before = torch.get_num_threads()
    torch.set_num_threads(thread_plan(clip.device, options.workers).threads)
    try:
        with torch.inference_mode():
            clip.encode_frames(frames, precision)          # warm-up
            started = time.perf_counter()
            for _ in range(calls):
                clip.encode_frames(frames, precision)
            if clip.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    return calls * batch / frames_per_video / seconds


def extract_once(options: ExtractOptions, keep: Path | None = None) -> dict:
    """`extract()` into a fresh cache root, with the GPU utilisation sampled; the cache is then deleted, or moved
    into the folder `keep` (its path is returned as "cache")."""
    cache_root = Path(tempfile.mkdtemp(prefix="clipspm-bench-"))
    kept = None
    try:
        with GpuUtilisation(options.device) as utilisation:
            result = extract(ExtractOptions(**{**vars(options), "cache_root": cache_root}))
        if keep is not None:
            kept = keep / result.path.name
            shutil.rmtree(kept, ignore_errors=True)
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(result.path, kept)
    finally:
        shutil.rmtree(cache_root)
    return {"videos_per_s": result.encoded_now / result.encode_seconds,
            "call_per_s": result.encoded_now / result.seconds,
            "gpu_util": utilisation.mean(last_seconds=result.encode_seconds), "cache": kept}


# ---- video sources: ExtractOptions fields naming the dataset

def _synthetic(videos: int) -> dict:
    """The built-in synthetic dataset with at least `videos` videos (whole classes)."""
    from clipspm.datasets.synthetic import SYNTHETIC_CLASSES, ensure_synthetic  # PyAV: imported where it writes

    per_class = -(-videos // len(SYNTHETIC_CLASSES))
    root = ensure_synthetic(DATA_DIR / f"benchmark-synthetic-{per_class}", seed=0, videos_per_class=per_class,
                            progress=False)
    return {"dataset": "synthetic", "root": root, "split_dir": None}


def _ucf_like(videos: int) -> dict:
    """`videos` generated videos of UCF101's size and length as a custom dataset (CLASS/VIDEO.mp4, a test list)."""
    root = DATA_DIR / f"benchmark-ucf-like-{videos}"
    keys = [f"class_{i % 8}/video_{i:04d}" for i in range(videos)]
    test_list = root / "splits" / "testlist.txt"
    if not test_list.exists():   # written last: a killed generation is finished on the next run
        missing = [(root / f"{key}.mp4", i) for i, key in enumerate(keys) if not (root / f"{key}.mp4").exists()]
        if missing:
            with ProcessPoolExecutor(usable_cores()) as pool:
                list(pool.map(_write_ucf_like, *zip(*missing)))
        test_list.parent.mkdir(parents=True, exist_ok=True)
        test_list.write_text("".join(f"{key}\n" for key in keys))
    return {"dataset": "custom", "root": root, "split_dir": root / "splits"}


def _write_ucf_like(path: Path, seed: int) -> None:
    from clipspm.datasets.synthetic import write_video  # PyAV: imported where it writes

    write_video(path, ucf_like_frames(seed))


def ucf_like_frames(seed: int, size: tuple[int, int, int] = UCF_LIKE) -> np.ndarray:
    """uint8 [frames, height, width, 3], UCF101's size by default: a colour gradient panning right, a bar sweeping
    across it, and some pixel noise."""
    num_frames, height, width = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, rng.integers(0, 256))], -1)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = np.roll(background, 3 * t, axis=1)
        bar = (5 * t + 37 * seed) % width
        frame[:, max(0, bar - 20):bar + 20] = rng.integers(0, 256, 3)
        frames[t] = np.clip(frame + rng.integers(-4, 5, frame.shape), 0, 255)
    return frames


# ---- GPU utilisation

class GpuUtilisation:
    """Samples the GPU utilisation (%) every 0.2 s in a thread; `mean` over the last seconds of the block."""

    def __init__(self, device: str):
        self.read = _utilisation_reader(torch.device(device)) if torch.device(device).type == "cuda" else None
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuUtilisation:
        if self.read is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.read is not None:
            self.thread.join()
        self.end = time.perf_counter()

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append((time.perf_counter(), self.read()))

    def mean(self, last_seconds: float) -> float | None:
        """The encoding loop ends the `extract()` call: its samples are those of its last seconds."""
        values = [value for at, value in self.samples if at >= self.end - last_seconds]
        return sum(values) / len(values) if values else None


def _utilisation_reader(device: torch.device) -> Callable[[], float] | None:
    """torch.cuda.utilization (needs pynvml), else nvidia-smi, else nothing."""
    try:
        torch.cuda.utilization(device)
        return lambda: float(torch.cuda.utilization(device))
    except ModuleNotFoundError:
        if shutil.which("nvidia-smi") is None:
            return None
    query = ["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    return lambda: float(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="56 videos per source, 2 rounds (a smoke run)")
    parser.add_argument("--videos", type=int, default=224, help="videos per source (synthetic: whole classes)")
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader workers; several values: one row each "
                        "(default: the extract default, at most the cores)")
    parser.add_argument("--models", nargs="+", help=f"open_clip models, random weights (default: {CHEAP_MODEL}; "
                        f"on CUDA also {', '.join(GPU_MODELS)})")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES), help="video sources")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.rounds = 56, 2
    result = run(args.videos, tuple(args.workers or ()), tuple(args.models or ()), tuple(args.sources), args.rounds,
                 args.device)
    print_table(f"Stage one: videos/s, {result['frames_per_video']} frames per video, {result['device']}, "
                f"{result['cores']} cores, best of {result['rounds']} interleaved rounds", result["rows"])
    print(f"command: {command_line()}")


if __name__ == "__main__":
    main()
