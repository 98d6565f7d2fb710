"""CPU threads: the heads step, the finetune step and OTAM at 1 and 2 torch threads, alone and beside busy processes.

Run `python benchmarks/threads.py [--rounds N] [--competitors N] [--quick]`; `run()` returns the measurements.
What the thread policy of clipspm/system.py rests on. Workloads, each forward + backward on the CPU:

    OTAM           `otam_distance` on [1, 20, 8, 512] queries and [1, 5, 8, 512] prototypes (bidirectional)
    heads step     the heads trainer's loop body (benchmarks/heads.py `trainer_steps`: episodes drawn, the
                   stage's `training_step`, metrics read back), shipped heads config, on 4 5-way 1-shot
                   episodes of random features at C=512 (a quarter of the shipped 16-episode step, at
                   ViT-B/16's width: a round takes seconds, not minutes, on 2 cores)
    finetune step  the finetune stage's `forward_episodes` with the tiny ViT tower (random weights, whole tower
                   trainable, the stage's activation checkpointing) on one 5-way 1-shot 4-query episode of
                   random 8-frame videos, and its backward

Each runs at every thread count, (a) alone and (b) beside `--competitors` busy processes (default: one per
core; each a single-threaded NumPy matrix-product loop, as a decoding worker or a second trainer keeps a
core busy). The competitors start once and are paused (SIGSTOP) for the alone rounds and resumed (SIGCONT)
for the busy ones; rounds interleave every (load, threads) pair, so load from other processes falls on all
alike. Reported: ms per call, best and median over rounds, and the ratios.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/threads.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, print_markdown_table, seconds_per_call
from benchmarks.heads import random_split, trainer_steps
from clipspm.config import load_config, resolve_config
from clipspm.pipeline.encoder import load_clip
from clipspm.pipeline.methods import build_head
from clipspm.pipeline.otam import otam_distance
from clipspm.pipeline.tower import enable_activation_checkpointing, train_mode, unfreeze
from clipspm.stages.episodes import EpisodeSampler, step_generator
from clipspm.stages.finetune import MicroBatch, forward_episodes, training_precision
from clipspm.system import usable_cores

EXTRACT = load_config("extract")
THREADS = (1, 2)
LOADS = ("alone", "busy")
OTAM_DIM, HEADS_DIM, HEADS_EPISODES, TOWER = 512, 512, 4, "clipspm-tiny-vit"
WAYS, SHOTS, QUERIES, OTAM_QUERIES = 5, 1, 4, 20
TARGET_SECONDS = 0.1    # timed work per measurement, alone at one thread
# A busy core: single-threaded matrix products in a loop, memory traffic included (as a decoding worker's).
COMPETITOR = "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = a @ a / 256.0\n"
SINGLE_THREADED = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _otam() -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, OTAM_QUERIES, EXTRACT.num_frames, OTAM_DIM, generator=generator).requires_grad_()
    protos = torch.randn(1, WAYS, EXTRACT.num_frames, OTAM_DIM, generator=generator).requires_grad_()
    return lambda: torch.autograd.grad(otam_distance(query, protos, 0.5).sum(), (query, protos))


def _heads_step() -> Callable[[], None]:
    """The heads trainer's loop body (benchmarks/heads.py `trainer_steps`) on random features."""
    cfg = resolve_config("heads", "synthetic", overrides=[f"train.shots={SHOTS}",
                                                          f"train.episodes_per_step={HEADS_EPISODES}"])
    data = random_split(64, HEADS_DIM, 1 + EXTRACT.train_views, torch.device("cpu"))
    return trainer_steps(cfg, data, torch.device("cpu"))[0]


def _finetune_step() -> Callable[[], None]:
    """The finetune stage's forward (tower -> Episode -> episode_step) and backward on one episode."""
    cfg = resolve_config("finetune", "synthetic")
    clip = load_clip(TOWER, "none", torch.device("cpu"))
    tower = clip.model.visual
    unfreeze(tower, "all", 0)
    if cfg.finetune.activation_checkpointing:
        enable_activation_checkpointing(tower)
    train_mode(tower)
    head = build_head(cfg.model, cfg.loss, clip.feature_dim).train()
    labels = torch.arange(WAYS).repeat_interleave(SHOTS + QUERIES)   # one episode's worth of videos
    sampler = EpisodeSampler(labels, WAYS, SHOTS, QUERIES)
    class_text = torch.randn(WAYS, clip.feature_dim)
    size = clip.image_size
    frames = torch.randint(0, 256, (1, len(labels), EXTRACT.num_frames, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    precision = training_precision("auto", torch.device("cpu"))
    steps = itertools.count()

    def step() -> None:
        batch = MicroBatch(0, 0, sampler.sample(1, step_generator(0, next(steps), torch.device("cpu"))))
        forward_episodes(clip, head, batch, frames, labels, class_text, labels.unique(), precision, cfg.loss,
                         1).loss.backward()
        head.zero_grad(set_to_none=True)
        tower.zero_grad(set_to_none=True)
    return step


WORKLOADS: dict[str, Callable[[], Callable[[], None]]] = {
    "OTAM": _otam, "heads step": _heads_step, "finetune step": _finetune_step}


@contextmanager
def competitors(count: int) -> Iterator[Callable[[bool], None]]:
    """`count` busy processes, paused; yields `busy(on)`, which resumes or pauses them. Ended on exit."""
    processes = [subprocess.Popen([sys.executable, "-c", COMPETITOR], env={**os.environ, **SINGLE_THREADED})
                 for _ in range(count)]

    def busy(on: bool) -> None:
        for process in processes:
            process.send_signal(signal.SIGCONT if on else signal.SIGSTOP)
        time.sleep(0.05)   # let the scheduler settle on the new load

    try:
        busy(False)
        yield busy
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)   # a stopped process would not act on SIGTERM until resumed
            process.terminate()
        for process in processes:
            process.wait()


def run(rounds: int = 5, competitor_count: int | None = None, workloads: tuple[str, ...] = tuple(WORKLOADS),
        threads: tuple[int, ...] = THREADS) -> dict:
    """ms per call of each workload for every (load, threads) pair: all rounds, in round order."""
    competitor_count = competitor_count or usable_cores()
    load_before = os.getloadavg()[0]
    before = torch.get_num_threads()
    steps, calls = {}, {}
    try:
        torch.set_num_threads(1)
        for name in workloads:
            steps[name] = WORKLOADS[name]()
            steps[name]()   # first-call costs: allocations, kernel choices
            first = seconds_per_call(steps[name], 1)
            calls[name] = max(1, math.ceil(TARGET_SECONDS / first))
        times = {key: [] for key in itertools.product(workloads, LOADS, threads)}
        with competitors(competitor_count) as busy:
            for _ in range(rounds):
                for load in LOADS:
                    busy(load == "busy")
                    for count in threads:
                        torch.set_num_threads(count)
                        for name in workloads:
                            times[(name, load, count)].append(seconds_per_call(steps[name], calls[name]) * 1e3)
    finally:
        torch.set_num_threads(before)
    return {"name": "threads", "cores": usable_cores(), "competitors": competitor_count, "rounds": rounds,
            "load_average_before": load_before, "calls": calls, "threads": threads, "times_ms": times}


def table(result: dict) -> list[dict]:
    """One row per workload and thread count: best/median ms alone and busy, and the ratios of the medians."""
    times, rows = result["times_ms"], []
    median = {key: statistics.median(values) for key, values in times.items()}
    one = min(result["threads"])
    for name in dict.fromkeys(key[0] for key in times):
        for count in result["threads"]:
            alone, busy = times[(name, "alone", count)], times[(name, "busy", count)]
            rows.append({
                "workload": name, "torch threads": count,
                "alone ms, best / median": f"{min(alone):.1f} / {median[(name, 'alone', count)]:.1f}",
                "busy ms, best / median": f"{min(busy):.1f} / {median[(name, 'busy', count)]:.1f}",
                "busy / alone": f"{median[(name, 'busy', count)] / median[(name, 'alone', count)]:.1f}x",
                f"vs {one} thread, alone": f"{median[(name, 'alone', count)] / median[(name, 'alone', one)]:.2f}x",
                f"vs {one} thread, busy": f"{median[(name, 'busy', count)] / median[(name, 'busy', one)]:.2f}x",
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best and median are reported")
    parser.add_argument("--competitors", type=int, default=None, help="busy processes (default: one per core)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS), help="torch thread counts")
    parser.add_argument("--quick", action="store_true", help="2 rounds (a smoke run)")
    args = parser.parse_args()
    result = run(2 if args.quick else args.rounds, args.competitors, tuple(args.workloads), tuple(args.threads))
    print_markdown_table(
        f"CPU step times at each torch thread count, alone and beside {result['competitors']} busy single-threaded "
        f"process(es), {result['cores']} usable core(s), {result['rounds']} interleaved rounds (ratios of medians); "
        f"load average before the run {result['load_average_before']:.1f}", table(result))
    print(f"command: {command_line()}")


if __name__ == "__main__":
    main()
