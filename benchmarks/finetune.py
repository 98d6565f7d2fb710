"""Stage three speed and memory: seconds per training episode and the peak memory of the step.

Run `python benchmarks/finetune.py [--episodes N] [--threads N]`; `run()` returns the measurements. On CUDA it
measures RN50 and ViT-B-16 (random weights: speed and memory only), on the CPU the tiny towers
(clipspm-tiny-rn, clipspm-tiny-vit), each at 1 and 5 shots, with and without activation
checkpointing: 5-way episodes with 4 queries per class, T=8, one episode per forward
(finetune.micro_episodes=1), the whole tower trainable, precision `auto` (bf16 on CUDA).

Timed is the stage's own step, `forward_episodes` (tower -> Episode -> `episode_step`) and its
backward: the median over episodes after a warm-up one, robust to load from other processes.
Frames are random uint8 already on the device: decoding runs in DataLoader workers beside the step
and is measured by benchmarks/extract.py. The optimiser step, once per 16 episodes, is left out.
Every configuration runs in a fresh process, so that its peak memory is its own: on CUDA the peak
allocated by torch, on the CPU the growth of the process's peak resident memory over what the
loaded model and frames already took.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/finetune.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, describe_device, print_table, seconds_per_call, synchronize
from clipspm.config import resolve_config
from clipspm.pipeline.encoder import load_clip
from clipspm.pipeline.methods import build_head
from clipspm.pipeline.tower import enable_activation_checkpointing, train_mode, unfreeze
from clipspm.stages.episodes import EpisodeSampler, step_generator
from clipspm.stages.finetune import MicroBatch, forward_episodes, training_precision

WAYS, QUERIES, FRAMES = 5, 4, 8
BACKBONES = {"cuda": ("RN50", "ViT-B-16"), "cpu": ("clipspm-tiny-rn", "clipspm-tiny-vit")}


def measure(backbone: str, shots: int, checkpointing: bool, device: str, episodes: int, threads: int) -> dict:
    """One configuration, in the calling process: seconds per episode and peak memory (MiB)."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    clip = load_clip(backbone, "none", device)
    tower = clip.model.visual
    unfreeze(tower, "all", 0)
    if checkpointing:
        enable_activation_checkpointing(tower)
    cfg = resolve_config("finetune", "synthetic")
    head = build_head(cfg.model, cfg.loss, clip.feature_dim).to(device)
    labels = torch.arange(WAYS).repeat_interleave(shots + QUERIES)   # one episode's worth of videos
    sampler = EpisodeSampler(labels, WAYS, shots, QUERIES)
    class_text = torch.randn(WAYS, clip.feature_dim, device=device)
    size = clip.image_size
    frames = torch.randint(0, 256, (1, len(labels), FRAMES, 3, size, size), dtype=torch.uint8, device=device)
    precision = training_precision("auto", device)
    train_mode(tower)
    head.train()
    step = iter(range(episodes + 1))

    def episode() -> None:
        batch = MicroBatch(0, 0, sampler.sample(1, step_generator(0, next(step), torch.device("cpu"))))
        result = forward_episodes(clip, head, batch, frames, labels, class_text, labels.to(device).unique(),
                                  precision, cfg.loss, 1)
        result.loss.backward()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        episode()   # warm-up: kernels chosen, gradient buffers allocated
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(seconds_per_call(episode, 1, device) for _ in range(episodes))
    except torch.cuda.OutOfMemoryError:
        return {"seconds": None, "peak_mib": None}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10   # ru_maxrss is in KiB
    return {"seconds": seconds, "peak_mib": peak}


def run(device: str | None = None, episodes: int = 5, threads: int = 1) -> dict:
    """Every backbone x shots x checkpointing on `device` (default: CUDA when available).

    `threads` torch CPU threads: one by default, so that a busy machine's thread-pool contention
    does not swamp the differences between configurations of the tiny towers.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads)
    rows = []
    fresh = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    with fresh as pool:
        for backbone in BACKBONES[torch.device(device).type]:
            for shots in (1, 5):
                for checkpointing in (False, True):
                    result = pool.submit(measure, backbone, shots, checkpointing, device, episodes, threads).result()
                    rows.append({"backbone": backbone, "shots": shots, "queries": QUERIES,
                                 "checkpointing": "on" if checkpointing else "off",
                                 "frames/episode": WAYS * (shots + QUERIES) * FRAMES,
                                 "s/episode": "OOM" if result["seconds"] is None else round(result["seconds"], 3),
                                 "peak MiB": "OOM" if result["peak_mib"] is None else round(result["peak_mib"])})
    return {"name": "finetune", "device": describe_device(device), "episodes": episodes, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--episodes", type=int, default=5, help="timed episodes per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    result = run(args.device, args.episodes, args.threads)
    print(f"$ {command_line()}")
    print_table(f"finetune step, {WAYS}-way, {QUERIES} queries per class, T={FRAMES}, 1 episode per forward, "
                f"whole tower trainable, median of {result['episodes']} episodes after a warm-up; "
                f"device: {result['device']}", result["rows"])


if __name__ == "__main__":
    main()
