"""Every GPU figure the project promises, measured in one run of a few minutes: one JSON, one Markdown table.

Run `python benchmarks/gpu.py` on a CUDA machine (on the lent GPU machine: `bash benchmarks/gpu_run.sh`, which
first installs the carried wheels; README "GPU benchmark"). The script makes its own inputs, and after
every section writes `gpu.json` and `gpu.md` into --out, so a run stopped halfway still leaves what it measured.
`--smoke` runs the same sections on the CPU at toy sizes in seconds (tests/test_gpu_bench.py runs it).

Sections, in the order they run, each in a forked process of its own (its own CUDA context, peak memory and
crash) under a time limit, the whole run under --budget; a section that would not fit is skipped with a note:

    env              GPU model, driver, torch, CUDA, cuDNN, Python, open_clip and decord versions, CPU cores
    heads_rate       episodes/s of the heads stage: training (E=16 per step, 4 queries) and evaluation (250 per
                     forward, 1 query) at C=1024 (RN50) and C=512 (ViT-B/16), 1 and 5 shots, every profile of the
                     clipspm method (benchmarks/heads.py's measurements on random cache-shaped features)
    extract          UCF-size videos (320x240, 175 frames, MPEG-4 part 2 AVI, as UCF101's) written on the machine;
                     RN50 and ViT-B/16 with random weights saved to local files; videos/s of `extract` (autocast)
                     against decoding alone and encoding alone with the same workers, and the GPU utilisation while
                     extracting (benchmarks/extract.py's measurements). The RN50 cache is kept for heads_run
    heads_run        `train_heads` on that cache: the full 20,000-episode 1-shot schedule, validation and checkpoints
                     included, timed end to end; then `evaluate_run` on 10,000 test episodes, cold and again
    finetune         s/episode and peak memory of the finetune step (benchmarks/finetune.py's `measure`), ViT-B/16
                     and RN50, 5-way 5-shot 4 queries, bf16, activation checkpointing off and on, a process each
    launch           the heads training step at C=1024, 1-shot, as the stage runs it (sampling, gather, forward,
                     backward, Adam, metrics read back): eager, replayed from a CUDA graph (train.cuda_graph), and
                     with torch.compile; and how far the graph's weights are from eager's after the same steps
    heads_run_graph  heads_run again with train.cuda_graph=true, when the budget has room for it
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python benchmarks/gpu.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import finetune as finetune_bench
from benchmarks import heads as heads_bench
from benchmarks._timing import command_line, describe_device, seconds_per_call, synchronize
from benchmarks.extract import decode_only, encode_only, extract_once, ucf_like_frames
from clipspm.config import method_data, resolve_config
from clipspm.datasets import load_dataset
from clipspm.pipeline.encoder import load_clip
from clipspm.pipeline.methods import get_method
from clipspm.stages.evaluate import evaluate_run
from clipspm.stages.extract import DEFAULTS as EXTRACT
from clipspm.stages.extract import ExtractOptions, extract, view_settings
from clipspm.stages.heads import train_heads
from clipspm.system import usable_cores

SECTIONS = ("env", "heads_rate", "extract", "heads_run", "finetune", "launch", "heads_run_graph")
SPLITS = ("train", "val", "test")
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    """How much of everything a run measures: sized so that the GPU run ends within its budget."""

    smoke: bool
    threads: int | None                      # torch CPU threads in every section (None: torch's default)
    budget_s: float                          # the whole run; sections that would not fit are skipped
    caps_s: dict[str, float]                 # at most this long per section; it is stopped after
    min_s: dict[str, float]                  # a section starts only with this much of the budget left
    videos: dict[str, tuple[int, int]]       # split -> (classes, videos per class)
    video_size: tuple[int, int, int]         # frames, height, width
    distinct_videos: int                     # the others are copies: decoding costs the same, writing does not
    models: tuple[str, ...]                  # extraction; the first one's cache feeds heads_run
    train_views: int                         # extract: augmented views per video in the caches
    widths: dict[str, int]                   # heads_rate: backbone -> C
    rate_rounds: int                         # heads_rate: best of this many calls
    rate_eval_episodes: int | None           # heads_rate: per eval call (None: benchmarks/heads.py's)
    encode_videos: int                       # extract: videos' worth of frames for encode-only
    run_overrides: tuple[str, ...]           # heads_run: on top of the shipped schedule (none on the GPU)
    test_episodes: int                       # heads_run
    finetune_backbones: tuple[str, ...]
    finetune_shots: int
    finetune_episodes: int                   # timed episodes after a warm-up one (median)
    heads_overrides: tuple[str, ...]         # heads_rate and launch: on top of the shipped heads config
    launch_width: int
    launch_steps: int                        # timed optimiser steps per variant
    launch_check_steps: int                  # steps compared between the graph and eager
    compile_backend: str | None              # torch.compile backend (inductor on CUDA); None: not measured


GPU_PLAN = Plan(
    smoke=False, threads=None, budget_s=390,
    caps_s={"env": 60, "heads_rate": 90, "extract": 130, "heads_run": 240, "finetune": 120, "launch": 150,
            "heads_run_graph": 150},
    min_s={"env": 10, "heads_rate": 20, "extract": 60, "heads_run": 60, "finetune": 40, "launch": 30,
           "heads_run_graph": 60},
    videos={"train": (12, 48), "val": (6, 32), "test": (6, 32)}, video_size=(175, 240, 320), distinct_videos=64,
    models=("RN50", "ViT-B-16"), train_views=EXTRACT.train_views, widths=dict(heads_bench.WIDTHS), rate_rounds=2,
    rate_eval_episodes=None, encode_videos=128, run_overrides=(), test_episodes=10_000,
    finetune_backbones=("ViT-B-16", "RN50"), finetune_shots=5, finetune_episodes=5, heads_overrides=(),
    launch_width=1024, launch_steps=50, launch_check_steps=20, compile_backend="inductor",
)
# Sized for 2 busy CPU cores: the calls of the GPU plan, on fewer and smaller inputs.
SMOKE_PLAN = Plan(
    smoke=True, threads=1, budget_s=300,
    caps_s=dict.fromkeys(SECTIONS, 60.0), min_s=dict.fromkeys(SECTIONS, 1.0),
    videos={"train": (5, 5), "val": (5, 2), "test": (5, 2)}, video_size=(24, 48, 64), distinct_videos=45,
    models=("clipspm-tiny-vit",), train_views=1, widths={"RN50": 32, "ViT-B/16": 16},
    rate_rounds=1, rate_eval_episodes=10, encode_videos=2,
    run_overrides=("train.episodes=8", "train.episodes_per_step=4", "train.val_every=4", "train.val_episodes=10",
                   "train.log_every=4"),
    test_episodes=20, finetune_backbones=("clipspm-tiny-vit",), finetune_shots=1, finetune_episodes=1,
    heads_overrides=("train.episodes_per_step=2",), launch_width=16, launch_steps=1, launch_check_steps=1,
    compile_backend=None,     # tracing the heads alone takes ~20 s on 2 CPU cores
)


# ---- what a section sees, and what it leaves

@dataclass
class Context:
    plan: Plan
    device: str
    work: Path                   # videos, weights, caches, runs: reused by a rerun with the same --work
    deadline: float              # time.monotonic() at which this section is stopped

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Recorder:
    """A section's tables, values and notes, written to its JSON file after every change: a section stopped at its
    time limit keeps what it measured."""

    path: Path
    data: dict = field(default_factory=lambda: {"tables": {}, "values": {}, "notes": []})

    def row(self, table: str, row: dict) -> None:
        self.data["tables"].setdefault(table, []).append(row)
        self._write()

    def set(self, **values) -> None:
        self.data["values"].update(values)
        self._write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self._write()

    def _write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        partial.replace(self.path)


def _timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - started


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- env

def section_env(ctx: Context, rec: Recorder) -> None:
    import platform

    import decord
    import open_clip

    info = {"cuda available": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "open_clip": open_clip.__version__, "decord": decord.__version__, "cpu cores": usable_cores()}
    if torch.device(ctx.device).type == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpu memory GiB": round(properties.total_memory / GIB, 1),
                 "compute capability": f"{properties.major}.{properties.minor}", "driver": _driver_version(),
                 "bf16": torch.cuda.is_bf16_supported()}
    else:
        info["device"] = describe_device("cpu")
    rec.set(**info)


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML bindings: ask nvidia-smi
        import subprocess

        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, check=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"


# ---- heads_rate

def clipspm_profiles() -> list[str | None]:
    """The profiles of the clipspm method's YAML data (`model.profile`), or [None] while it has none."""
    defaults = get_method("clipspm").defaults
    profiles = (method_data(defaults).get("profiles") or {}) if defaults else {}
    return list(profiles) or [None]


def section_heads_rate(ctx: Context, rec: Recorder) -> None:
    device = torch.device(ctx.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # as the heads trainer does
    shipped = resolve_config("heads", "synthetic", overrides=list(ctx.plan.heads_overrides))
    rec.set(episodes_per_step=shipped.train.episodes_per_step, train_queries=shipped.train.queries,
            eval_batch=shipped.eval.batch, eval_queries=shipped.eval.queries)
    for profile in clipspm_profiles():
        for backbone, width in ctx.plan.widths.items():
            train = heads_bench.random_split(heads_bench.CLASSES["train"], width, 1 + ctx.plan.train_views, device)
            test = heads_bench.random_split(heads_bench.CLASSES["test"], width, 1, device)
            for shots in heads_bench.SHOTS:
                if ctx.left() < 10:
                    rec.note(f"profile {profile}, C={width}, {shots}-shot: not measured, the section's time ran out")
                    continue
                cfg = resolve_config("heads", "synthetic", overrides=[f"train.shots={shots}", *ctx.plan.heads_overrides,
                                                                      *_profile_override(profile)])
                train_rate = heads_bench.train_rate(cfg, train, device)
                eval_rate = heads_bench.eval_rate(cfg, test, device, ctx.plan.rate_eval_episodes)
                rounds = range(ctx.plan.rate_rounds)
                rec.row("episodes/s", {"profile": profile or "-", "backbone": backbone, "C": width, "shots": shots,
                                       "train episodes/s": round(max(train_rate() for _ in rounds), 1),
                                       "eval episodes/s": round(max(eval_rate() for _ in rounds), 1)})
            del train, test
            _free(ctx.device)


def _profile_override(profile: str | None) -> list[str]:
    return [f"model.profile={profile}"] if profile else []


# ---- inputs on the machine: videos, weights, the RN50 cache

def ensure_videos(ctx: Context) -> dict:
    """The UCF-size videos as a `custom` dataset (CLASS/VIDEO.avi and split lists); written once per --work."""
    plan = ctx.plan
    frames, height, width = plan.video_size
    root = ctx.work / f"videos-{sum(c * v for c, v in plan.videos.values())}-{width}x{height}x{frames}"
    lists = root / "splits"
    if not (lists / "testlist.txt").exists():   # written last: a killed writing is finished by the next run
        keys = {split: [f"{split}_class_{c:02d}/video_{v:03d}" for c in range(classes) for v in range(per_class)]
                for split, (classes, per_class) in plan.videos.items()}
        paths = [root / f"{key}.avi" for split in SPLITS for key in keys[split]]
        distinct = [(path, seed, plan.video_size) for seed, path in enumerate(paths[:plan.distinct_videos])
                    if not path.exists()]
        if distinct:
            fork = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max(1, usable_cores()), mp_context=fork) as pool:
                list(pool.map(_write_video_job, distinct))
        for number, path in enumerate(paths[plan.distinct_videos:], plan.distinct_videos):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[number % plan.distinct_videos], path)
        lists.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            (lists / f"{split}list.txt").write_text("".join(f"{key}\n" for key in keys[split]))
    return {"dataset": "custom", "root": root, "split_dir": lists}


def _write_video_job(job: tuple[Path, int, tuple[int, int, int]]) -> None:
    path, seed, size = job
    write_avi(path, ucf_like_frames(seed, size))


def write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """uint8 RGB frames [n, H, W, 3] -> MPEG-4 part 2 in AVI, the codec of UCF101's files.

    With OpenCV where it is installed (the GPU machine's image has it, not PyAV), else with PyAV through the
    project's writer. Written under a temporary name, then renamed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import cv2
    except ImportError:
        from clipspm.datasets.synthetic import write_video

        write_video(path, frames, fps, codec="mpeg4")
        return
    cv2.setNumThreads(1)
    partial = path.with_name(f".{path.stem}.partial.avi")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"XVID"), fps, (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MPEG-4 AVI files here ({partial})")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))   # OpenCV takes BGR
    writer.release()
    os.replace(partial, path)


def ensure_weights(ctx: Context, model: str) -> Path:
    """Random weights of `model` saved to a local file, passed to `extract` as a user passes real ones."""
    path = ctx.work / "weights" / f"{model}-random-seed0.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        state = load_clip(model, "none", seed=0).model.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({key: value.detach().clone().contiguous() for key, value in state.items()}, str(partial))
        partial.replace(path)
    return path


def extract_options(ctx: Context, model: str, workers: int) -> ExtractOptions:
    return ExtractOptions(**ensure_videos(ctx), backbone=model, pretrained=str(ensure_weights(ctx, model)),
                          train_views=ctx.plan.train_views, workers=workers, device=ctx.device, progress=False,
                          cache_root=ctx.work / "caches")


def extract_workers(plan: Plan) -> list[int]:
    """The most decoding workers the machine's cores allow beside the encoder's process, then the default (4)."""
    cores = usable_cores()
    most = 1 if plan.smoke else max(1, cores - 2)
    return list(dict.fromkeys([most, min(EXTRACT.run.workers, cores)]))[: 1 if plan.smoke else 2]


def rn50_cache(ctx: Context) -> Path:
    """The cache of the RN50-like tower: the one the extract section kept (found by its address), else made now."""
    return extract(extract_options(ctx, ctx.plan.models[0], extract_workers(ctx.plan)[0])).path


# ---- extract

def section_extract(ctx: Context, rec: Recorder) -> None:
    plan = ctx.plan
    where = ensure_videos(ctx)
    dataset = load_dataset(where["dataset"], where["root"], split_dir=where["split_dir"])
    first = next(video for video in dataset.videos if video.path is not None)
    from clipspm.video.decode import open_video

    distinct = min(plan.distinct_videos, len(dataset.videos))
    rec.set(videos=f"{len(dataset.videos)} ({'all' if distinct == len(dataset.videos) else distinct} distinct)",
            video=f"{plan.video_size[2]}x{plan.video_size[1]}, {plan.video_size[0]} "
            f"frames, MPEG-4 part 2 AVI", decoder=open_video(first.path).backend,
            frames_per_video=EXTRACT.num_frames * (1 + plan.train_views))
    decode_rates: dict[tuple, float] = {}
    clips = {}
    # Most workers first, for every model: the rows with the default (fewer) workers come when time is left.
    for w, workers in enumerate(extract_workers(plan)):
        for m, model in enumerate(plan.models):
            if (m or w) and ctx.left() < 40:
                rec.note(f"{model} with {workers} workers: not measured, the section's time ran out")
                continue
            rec.set(in_progress=f"{model}, {workers} workers")
            if model not in clips:
                clips[model] = load_clip(model, str(ensure_weights(ctx, model)), ctx.device)
            options = extract_options(ctx, model, workers)
            views = view_settings(options, dataset, clips[model])
            if (views, workers) not in decode_rates:
                decode_rates[(views, workers)] = decode_only(dataset, views, options)
            decode = decode_rates[(views, workers)]
            encode = encode_only(clips[model], views, options, videos=plan.encode_videos)
            measured = extract_once(options, keep=options.cache_root if (m, w) == (0, 0) else None)
            if measured["cache"] is not None:
                rec.set(cache=str(measured["cache"]))
            rate = measured["videos_per_s"]
            rec.row("videos/s", {
                "model": model, "workers": workers, "decode only videos/s": round(decode, 1),
                "encode only videos/s": round(encode, 1), "extract videos/s": round(rate, 1),
                "extract / min(decode, encode)": round(rate / min(decode, encode), 2),
                "GPU util %": "-" if measured["gpu_util"] is None else round(measured["gpu_util"]),
                "call videos/s": round(measured["call_per_s"], 1)})
    rec.set(in_progress=None)


# ---- heads_run, heads_run_graph

def section_heads_run(ctx: Context, rec: Recorder, graph: bool = False) -> None:
    cache = rn50_cache(ctx)
    overrides = [f"data.cache={cache}", "train.shots=1", *ctx.plan.run_overrides]
    if graph:
        overrides.append("train.cuda_graph=true")
    cfg = resolve_config("heads", "custom", overrides=overrides)
    t = cfg.train
    run_dir = ctx.work / "runs" / ("heads-graph" if graph else "heads")
    shutil.rmtree(run_dir, ignore_errors=True)
    rec.set(cache=str(cache), episodes=t.episodes, episodes_per_step=t.episodes_per_step,
            validation=f"every {t.val_every} episodes, {t.val_episodes} episodes", cuda_graph=t.cuda_graph,
            in_progress="training")
    result, seconds = _timed(lambda: train_heads(cfg, run_dir, progress=False, device=ctx.device), ctx.device)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loop = [record["episodes_per_s"] for record in records if "episodes_per_s" in record]
    rec.row("train", {"C": cache_width(cache), "shots": t.shots, "episodes": result.episodes,
                      "wall s (end to end)": round(seconds, 1),
                      "episodes/s (end to end)": round(result.episodes / seconds, 1),
                      "episodes/s (training loop, median of logs)": round(float(np.median(loop)), 1) if loop else "-",
                      "best val accuracy": round(result.best_val, 4)})
    rec.set(train_s=seconds, in_progress=None if graph else "evaluation")
    if graph:
        return
    for attempt in ("cold: draws and stores the episodes", "warm: reads them back"):
        evaluated, seconds = _timed(lambda: evaluate_run(run_dir, episodes=ctx.plan.test_episodes, progress=False,
                                                         device=ctx.device), ctx.device)
        rec.row("eval", {"call": attempt, "episodes": evaluated.episodes, "wall s": round(seconds, 2),
                         "episodes/s": round(evaluated.episodes / seconds, 1),
                         "accuracy": round(evaluated.accuracy, 4)})
        if attempt.startswith("cold"):
            rec.set(eval_s=seconds)
    rec.set(in_progress=None)


def cache_width(cache: Path) -> int:
    from clipspm.cache.store import FeatureCache, find_store

    with FeatureCache(find_store(cache)) as opened:
        return int(opened.meta["feature_dim"])


# ---- finetune

def section_finetune(ctx: Context, rec: Recorder) -> None:
    shots = ctx.plan.finetune_shots
    for backbone in ctx.plan.finetune_backbones:
        for checkpointing in (False, True):
            if ctx.left() < 15:
                rec.note(f"{backbone}, checkpointing {'on' if checkpointing else 'off'}: not measured, the section's "
                         f"time ran out")
                continue
            # A process of its own: its peak memory is its own (benchmarks/finetune.py does the same).
            try:
                measured = in_child(finetune_bench.measure, backbone, shots, checkpointing, ctx.device,
                                    ctx.plan.finetune_episodes, torch.get_num_threads(), timeout=ctx.left() - 5)
            except (ChildFailed, TimeoutError) as error:
                rec.note(f"{backbone}, checkpointing {'on' if checkpointing else 'off'}: {error}")
                continue
            peak = measured["peak_mib"]
            rec.row("step", {"backbone": backbone, "shots": shots, "queries": finetune_bench.QUERIES,
                             "precision": "bf16" if torch.device(ctx.device).type == "cuda" else "fp32",
                             "checkpointing": "on" if checkpointing else "off",
                             "s/episode": "OOM" if measured["seconds"] is None else round(measured["seconds"], 3),
                             "peak MiB": "OOM" if peak is None else round(peak),
                             "peak GiB": "OOM" if peak is None else round(peak / 1024, 2)})


# ---- launch

def section_launch(ctx: Context, rec: Recorder) -> None:
    plan, device = ctx.plan, torch.device(ctx.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = resolve_config("heads", "synthetic", overrides=["train.shots=1", *plan.heads_overrides])
    data = heads_bench.random_split(heads_bench.CLASSES["train"], plan.launch_width, 1 + plan.train_views, device)
    rec.set(C=plan.launch_width, shots=1, episodes_per_step=cfg.train.episodes_per_step,
            graph="CUDA graph replay" if cuda else "CUDA only: the CPU runs the step eagerly, as the stage does")
    variants = {"eager": {}, "cuda graph": {"graph": True}}
    if plan.compile_backend:
        variants[f"torch.compile ({plan.compile_backend})"] = {"compile": plan.compile_backend}
    else:
        rec.note("torch.compile: not measured in --smoke (compiling takes longer than the whole smoke run)")
    eager_rate = None
    for name, options in variants.items():
        if ctx.left() < 20:
            rec.note(f"{name}: not measured, the section's time ran out")
            continue
        rec.set(in_progress=name)
        setup, seconds = _step_seconds(cfg, data, device, plan.launch_steps, **options)
        rate = cfg.train.episodes_per_step / seconds
        eager_rate = eager_rate or rate
        rec.row("training step", {"variant": name, "first 4 steps s": round(setup, 2),
                                  "ms/step": round(seconds * 1e3, 2), "episodes/s": round(rate, 1),
                                  "vs eager": round(rate / eager_rate, 2)})
        _free(ctx.device)
        if name == "cuda graph":
            rec.set(in_progress="graph against eager")
            _graph_against_eager(ctx, rec, cfg, data)
    rec.set(in_progress=None)


def _step_seconds(cfg, data, device: torch.device, steps: int, **options) -> tuple[float, float]:
    """Seconds of the first 4 steps (where graph capture and compilation happen), then per step (best of 2 x
    `steps`)."""
    drive, _ = heads_bench.trainer_steps(cfg, data, device, **options)
    _, setup = _timed(lambda: [drive() for _ in range(4)], str(device))
    return setup, min(seconds_per_call(drive, steps, device) for _ in range(2))


def _graph_against_eager(ctx: Context, rec: Recorder, cfg, data) -> None:
    """The same steps from the same weights, replayed from the graph and run eagerly (with the capturable Adam the
    graph needs, and with the default one): how far apart the weights and losses end."""
    device = torch.device(ctx.device)
    steps = ctx.plan.launch_check_steps
    runs = {"graph": heads_bench.trainer_steps(cfg, data, device, graph=True, seed=1),
            "eager": heads_bench.trainer_steps(cfg, data, device, seed=1)}
    if device.type == "cuda":   # Adam's capturable form exists on CUDA only
        runs["eager, capturable Adam"] = heads_bench.trainer_steps(cfg, data, device, capturable=True, seed=1)
    losses = {name: [drive()["loss"] for _ in range(steps)] for name, (drive, _) in runs.items()}
    graph_weights = dict(runs["graph"][1].named_parameters())
    for name, (_, head) in runs.items():
        if name == "graph":
            continue
        weights = dict(head.named_parameters())
        rec.row("graph against eager", {
            "compared with": name, "steps": steps,
            "max abs weight difference": max(float((weights[key] - value).abs().max())
                                           for key, value in graph_weights.items()),
            "max abs weight": max(float(value.abs().max()) for value in weights.values()),
            "max abs loss difference": max(abs(a - b) for a, b in zip(losses["graph"], losses[name]))})


# ---- running the sections

SECTION_FUNCTIONS: dict[str, Callable[[Context, Recorder], None]] = {
    "env": section_env, "heads_rate": section_heads_rate, "extract": section_extract,
    "heads_run": section_heads_run, "finetune": section_finetune, "launch": section_launch,
    "heads_run_graph": lambda ctx, rec: section_heads_run(ctx, rec, graph=True),
}


class NoCudaDevice(Exception):
    """The machine has no CUDA device, and this is not a --smoke run."""


class ChildFailed(Exception):
    """The forked process raised (the message ends with its traceback's last lines) or died."""


def in_child(fn: Callable, *args, timeout: float, own_group: bool = False):
    """`fn(*args)` in a forked process, stopped after `timeout` seconds (TimeoutError); its return value, or
    ChildFailed. With `own_group` the process leads a process group, all of which (DataLoader workers, compiler
    workers) is stopped with it."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(writer, fn, args, own_group), daemon=False)
    process.start()
    writer.close()
    try:
        if not reader.poll(max(0.0, timeout)):
            raise TimeoutError(f"stopped after {timeout:.0f} s")
        try:
            ok, value = reader.recv()
        except EOFError:
            process.join(10)
            raise ChildFailed(f"the process died (exit code {process.exitcode})") from None
        if not ok:
            raise ChildFailed(value)
        return value
    finally:
        _stop(process, own_group)
        reader.close()


def _child_main(writer, fn: Callable, args: tuple, own_group: bool) -> None:
    if own_group:
        os.setpgrp()
    try:
        writer.send((True, fn(*args)))
    except BaseException as error:  # everything goes back to the parent, which reports it and goes on
        lines = traceback.format_exc().strip().splitlines()
        writer.send((False, f"{type(error).__name__}: {error} | " + " / ".join(line.strip() for line in lines[-6:])))
    finally:
        writer.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)   # no atexit handlers of the parent's modules, no CUDA teardown races


def _stop(process, own_group: bool) -> None:
    """The process and, with `own_group`, whatever it left running in its group."""
    try:
        if own_group:
            os.killpg(process.pid, signal.SIGKILL)
        elif process.is_alive():
            process.kill()
    except ProcessLookupError:
        pass
    process.join(10)


def _run_section(name: str, ctx: Context, path: Path) -> None:
    if ctx.plan.threads:
        torch.set_num_threads(ctx.plan.threads)
    SECTION_FUNCTIONS[name](ctx, Recorder(path))


def run(plan: Plan, out: Path, work: Path, sections: tuple[str, ...], device: str) -> dict:
    """Run `sections` in order under the plan's budget; gpu.json and gpu.md in `out` after each. Returns the JSON."""
    started = time.monotonic()
    end = started + plan.budget_s
    out.mkdir(parents=True, exist_ok=True)
    (work / "sections").mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "benchmarks/gpu.py", "command": command_line(), "smoke": plan.smoke,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": plan.budget_s,
              "sections": {}}
    for name in sections:
        left = end - time.monotonic()
        if left < plan.min_s[name]:
            result["sections"][name] = {"status": "skipped", "note": f"{left:.0f} s of the budget left, the section "
                                        f"needs at least {plan.min_s[name]:.0f} s"}
            _write(result, out, started)
            continue
        timeout = min(plan.caps_s[name], left)
        path = work / "sections" / f"{name}.json"
        path.unlink(missing_ok=True)
        print(f"[{time.monotonic() - started:6.1f} s] {name} (at most {timeout:.0f} s)", flush=True)
        ctx = Context(plan, device, work, time.monotonic() + timeout)
        section_started = time.monotonic()
        try:
            in_child(_run_section, name, ctx, path, timeout=timeout, own_group=True)
            status, note = "done", None
        except TimeoutError as error:
            status, note = "timed out", str(error)
        except ChildFailed as error:
            status, note = "failed", str(error)
        data = json.loads(path.read_text()) if path.exists() else {"tables": {}, "values": {}, "notes": []}
        if note:
            data["notes"].append(note)
        result["sections"][name] = {"status": status, "seconds": round(time.monotonic() - section_started, 1), **data}
        if name == "env":
            result["environment"] = data["values"]
            if not plan.smoke and not data["values"].get("cuda available"):
                result["sections"][name] = {"status": "failed", "note": "no CUDA device"}
                _write(result, out, started)
                raise NoCudaDevice("no CUDA device here: run this on a GPU machine, or pass --smoke for the CPU "
                                   "smoke run")
        print(f"[{time.monotonic() - started:6.1f} s] {name}: {status}" + (f" ({note})" if note else ""), flush=True)
        _write(result, out, started)
    return result


def _write(result: dict, out: Path, started: float) -> None:
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["targets"] = targets(result)
    for name, text in (("gpu.json", json.dumps(result, indent=1, default=str)), ("gpu.md", markdown(result))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


# ---- targets and the Markdown report

def targets(result: dict) -> list[dict]:
    """The issue's targets against what was measured; `met` is None where the figure is missing or was measured on
    a shortened schedule (--smoke)."""
    sections = result["sections"]

    def value(section: str, key: str):
        return sections.get(section, {}).get("values", {}).get(key)

    rows = []
    episodes, train_s = value("heads_run", "episodes"), value("heads_run", "train_s")
    width = next((row["C"] for row in sections.get("heads_run", {}).get("tables", {}).get("train", [])), 1024)
    full = episodes == 20_000 and width == 1024
    rows.append({"figure": f"{episodes or 20_000} heads training episodes, C={width}, 1-shot, end to end",
                 "target": "<= 120 s (stretch 30 s)", "measured": _seconds(train_s),
                 "met": None if train_s is None or not full else train_s <= 120})
    eval_s = value("heads_run", "eval_s")
    tests = next((row["episodes"] for row in sections.get("heads_run", {}).get("tables", {}).get("eval", [])), None)
    rows.append({"figure": f"{tests or 10_000} test episodes (evaluate_run, cold)", "target": "<= 30 s",
                 "measured": _seconds(eval_s), "met": None if eval_s is None or tests != 10_000 else eval_s <= 30})
    finetune_rows = sections.get("finetune", {}).get("tables", {}).get("step", [])
    for row in finetune_rows:
        if "vit" in row["backbone"].lower():
            peak, applies = row["peak GiB"], row["backbone"] == "ViT-B-16" and row["shots"] == 5
            rows.append({"figure": f"fine-tuning {row['backbone']} peak memory, 5-way {row['shots']}-shot "
                                   f"{row['queries']} queries, {row['precision']}, "
                                   f"checkpointing {row['checkpointing']}",
                         "target": "<= 24 GiB", "measured": f"{peak} GiB",
                         "met": None if peak == "OOM" or not applies else peak <= 24})
    for row in sections.get("extract", {}).get("tables", {}).get("videos/s", []):
        ratio = row["extract / min(decode, encode)"]
        rows.append({"figure": f"extract {row['model']}, workers={row['workers']}: extract / min(decode, encode)",
                     "target": ">= 0.8", "measured": f"{ratio} ({row['extract videos/s']} videos/s)",
                     "met": None if result["smoke"] else ratio >= 0.8})
    return rows


def _seconds(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1f} s"


TITLES = {
    "env": "Machine",
    "heads_rate": "Heads stage episodes/s on random cache-shaped features",
    "extract": "Extraction (RN50 and ViT-B/16 with random weights from local files, autocast) against decoding "
               "alone and encoding alone, same videos and workers",
    "heads_run": "Heads stage end to end on the extracted RN50 cache (validation and checkpoints included), then "
                 "the test episodes",
    "finetune": "Fine-tuning step, whole tower trainable, 1 episode per forward (median after a warm-up)",
    "launch": "Launch overhead: the heads training step at the RN50 width, 1-shot, as the stage runs it",
    "heads_run_graph": "Heads stage end to end with train.cuda_graph=true",
}


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = ["# GPU benchmark" + (" (--smoke: CPU, toy sizes; the figures test the script, not the targets)"
                                  if result["smoke"] else ""), "",
             f"`{result['command']}`, started {result['started']}, {result['elapsed_s']} s of a "
             f"{result['budget_s']:.0f} s budget.", ""]
    if env:
        lines += [", ".join(f"{key}: {value}" for key, value in env.items()), ""]
    lines += ["## Targets", "", *_table([{**row, "met": {True: "yes", False: "**no**", None: "-"}[row["met"]]}
                                         for row in result["targets"]]), ""]
    missing = []
    for name, section in result["sections"].items():
        if name == "env":
            continue
        lines += [f"## {name}: {TITLES[name]}", "", f"{section['status']}" +
                  (f", {section['seconds']} s" if "seconds" in section else ""), ""]
        values = {key: value for key, value in section.get("values", {}).items()
                  if key not in ("train_s", "eval_s") and value is not None}
        if values:
            lines += [", ".join(f"{key}: {_plain(value)}" for key, value in values.items()), ""]
        for table, rows in section.get("tables", {}).items():
            lines += [f"{table}:", "", *_table(rows), ""]
        for note in section.get("notes", []) + ([section["note"]] if "note" in section else []):
            lines += [f"- {note}"]
        if section["status"] != "done":
            missing.append(f"{name} ({section['status']})")
        lines.append("")
    if missing:
        lines += ["## Not measured in this run", "", *[f"- {item}" for item in missing], ""]
    return "\n".join(lines)


def _plain(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_plain(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.2e}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(_plain(row.get(column, "")) for column in columns) + " |" for row in rows]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-bench-out"),
                        help="where gpu.json and gpu.md go (default: $OUT, else gpu-bench-out)")
    parser.add_argument("--work", type=Path, help="videos, weights, caches and runs; a rerun with the same folder "
                        "reuses the inputs (default: a folder under the system's temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="the same sections on the CPU at toy sizes (seconds)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="SECTION",
                        help=f"which sections to run, always in this order: {' '.join(SECTIONS)} (env runs anyway)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 390; --smoke 300)")
    args = parser.parse_args()
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.exit(2, f"unknown section {unknown[0]!r}; choose among {', '.join(SECTIONS)}\n")
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.budget:
        plan = replace(plan, budget_s=args.budget)
    sections = ("env", *[name for name in SECTIONS if name in args.sections and name != "env"])
    work = args.work or Path(tempfile.gettempdir()) / ("clipspm-gpu-smoke" if args.smoke else "clipspm-gpu-bench")
    try:
        result = run(plan, args.out, work, sections, "cpu" if args.smoke else "cuda")
    except NoCudaDevice as error:
        parser.exit(2, f"{error}\n")
    print((args.out / "gpu.md").read_text())
    sys.exit(0 if all(section["status"] == "done" for section in result["sections"].values()) else 1)


if __name__ == "__main__":
    main()
