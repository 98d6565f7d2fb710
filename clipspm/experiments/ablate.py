"""`clipspm ablate`: every variant of a suite, at every K, trained and scored from one feature cache.

The cache is resolved once (extracted only when no cache of these settings exists) and written
into the settings every variant shares, so every run trains from it and is scored on the same
test episodes stored beside it: the report can then pair each variant with the full model.
Each (variant, K) is an independent train + eval of its own run directory, which makes the suite
resumable (finished runs are skipped, half-trained ones continue from their last checkpoint) and
lets several devices share the work: one worker process per device, each pinned to it and given its
share of the CPU cores.

The stage is the suite's: `heads` (default) trains each variant's heads on the cached features;
`finetune` trains heads and visual tower end to end as the paper's ablation rows were, validating
on frames re-encoded in memory and scored on the test split encoded by each run's tuned tower
(`evaluate.tuned_test_cache`), still on the episodes stored beside the one training cache.

Layout: `RUNS/ablate-{dataset}-{backbone}-{suite}[-ft][-select-test]/` with `suite.yaml`, one run per
`{variant}-{K}shot/`, and the report (`report.md`, `report.csv`, `figures/`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import TYPE_CHECKING, TextIO

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clipspm.config import resolve_config
from clipspm.errors import ClipspmError, JobFailedError
from clipspm.experiments.suites import (
    Suite,
    SuiteSettings,
    Variant,
    load_suite,
    read_suite_dir,
    run_dir_of,
    suite_dir_name,
    variant_config,
    write_suite_dir,
)
from clipspm.stages.checkpoint import checkpoint_dir
from clipspm.stages.evaluate import evaluate_run, finished_result
from clipspm.stages.finetune import train_finetune
from clipspm.stages.heads import train_heads
from clipspm.stages.runs import CONFIG_NAME, load_run_config, open_run_cache
from clipspm.system import THREADS_VARIABLE, make_console, resolve_device, trainer_share

if TYPE_CHECKING:
    from clipspm.experiments.report import ReportResult


@dataclass
class AblateOptions:
    """A suite run. None takes the shipped default (the dataset's backbone, schedule, eval protocol)."""

    suite: str                                 # shipped suite name or suite YAML path
    dataset: str = "synthetic"
    stage: str = "heads"                       # heads (from the cache) or finetune (end to end, as the paper)
    select_on: str | None = None               # train.select_on of every variant: val (None: the default) or test
    backbone: str | None = None
    pretrained: str | None = None
    root: Path | None = None
    shots: tuple[int, ...] = (1, 3, 5)
    episodes: int | None = None                # training episodes of every variant
    eval_episodes: int | None = None
    eval_queries: int | None = None
    overrides: tuple[str, ...] = ()            # --set for every variant, before the variant's own
    parallel: str = "auto"                     # "auto" (one worker per device) or a number
    devices: tuple[str, ...] | None = None     # None: every visible GPU, else the CPU
    cache_dir: Path = Path("caches")
    runs_dir: Path = Path("runs")
    progress: bool = True


@dataclass
class JobOutcome:
    """What became of one (variant, K) run in this invocation."""

    variant: str
    shots: int
    run_dir: str
    status: str                # reused (finished before), trained, resumed (continued from its last checkpoint),
                               # no training (a parameter-free baseline: scored only)
    accuracy: float
    ci95: float
    train_seconds: float
    eval_seconds: float
    seconds: float = 0.0       # wall clock of the job


@dataclass
class AblateResult:
    suite_dir: Path
    outcomes: list[JobOutcome]
    report: ReportResult
    devices: list[str]
    cache_seconds: float       # resolving the cache, extracting it when missing
    worker_start_seconds: float  # summed over worker processes: start until ready (0 when run in-process)
    report_seconds: float
    seconds: float             # the whole suite, wall clock


def run_ablation(options: AblateOptions, console: Console | None = None) -> AblateResult:
    """Run (or resume) a suite and write its report; see the module docstring for what is reused."""
    console = console or make_console()
    started = time.perf_counter()
    suite = load_suite(options.suite)
    devices = plan_devices(options.parallel, options.devices)
    shots = sorted(set(options.shots))
    if not shots or min(shots) < 1:
        raise ClipspmError(f"--shots needs K values of at least 1, got {list(options.shots)}")

    overrides = _shared_overrides(options, suite)
    base = resolve_config(options.stage, options.dataset, overrides=overrides)
    cache = open_run_cache(base, options.runs_dir, resume=False, console=console)   # the suite's one cache
    settings = SuiteSettings(dataset=options.dataset, backbone=cache.meta["model"], cache=base.data.cache,
                             shots=shots, overrides=[*overrides, f"data.cache={base.data.cache}"],
                             eval_episodes=base.eval.episodes, eval_queries=base.eval.queries,
                             eval_seed=base.eval.seed, stage=options.stage, select_on=base.train.select_on)
    suite_dir = Path(options.runs_dir) / suite_dir_name(options.dataset, settings.backbone, suite, settings.stage,
                                                        settings.select_on)
    jobs = [(variant, k) for variant in suite.variants for k in shots]
    for variant, k in jobs:   # every config is built (and every override checked) before anything trains
        _check_same_training(run_dir_of(suite_dir, variant, k), variant_config(settings, variant, k))
    write_suite_dir(suite_dir, suite, settings)
    cache_seconds = time.perf_counter() - started
    console.print(f"suite {suite.name} ({settings.stage} stage): {len(suite.variants)} variants x K in {shots} on "
                  f"{cache.store_path.parent}, {len(devices)} worker(s) on {', '.join(devices)} -> {suite_dir}")

    worker_start = 0.0
    if len(devices) == 1:
        outcomes = _run_in_process(suite_dir, jobs, devices[0], options.progress, console)
    else:
        outcomes, worker_start = _run_in_workers(suite_dir, jobs, devices, settings.stage, console)

    # imported here: worker processes, which import this module, never load the plotting stack
    from clipspm.experiments.report import write_report

    report_started = time.perf_counter()
    report = write_report(suite_dir, device=devices[0], console=console)
    now = time.perf_counter()
    return AblateResult(suite_dir, outcomes, report, devices, cache_seconds, worker_start, now - report_started,
                        now - started)


def _shared_overrides(options: AblateOptions, suite: Suite) -> list[str]:
    """The command line's options as `--set` items, then the suite's `set`, then the user's own --set."""
    items = [f"data.dataset={options.dataset}", f"data.cache_dir={options.cache_dir}"]
    for key, value in [("data.backbone", options.backbone), ("data.pretrained", options.pretrained),
                       ("data.root", Path(options.root).resolve() if options.root else None),
                       ("train.episodes", options.episodes), ("train.select_on", options.select_on),
                       ("eval.episodes", options.eval_episodes), ("eval.queries", options.eval_queries)]:
        if value is not None:
            items.append(f"{key}={value}")
    return [*items, *suite.overrides, *options.overrides]


def plan_devices(parallel: str | int, devices: tuple[str, ...] | None) -> list[str]:
    """The devices of the workers: `parallel` of them ("auto": all), from `devices` or the visible GPUs."""
    for device in devices or ():
        resolve_device(device, option="--devices")
    available = list(devices or ()) or [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    if str(parallel) == "auto":
        return available
    try:
        count = int(parallel)
    except ValueError:
        raise ClipspmError(f"--parallel takes auto or a number, got {parallel!r}") from None
    if count < 1:
        raise ClipspmError(f"--parallel must be at least 1, got {count}")
    if count > len(available):
        raise ClipspmError(f"--parallel {count} needs {count} devices, found {len(available)} ({', '.join(available)})"
                           f"; name them with --devices, e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu")
    return available[:count]


def _check_same_training(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to reuse or resume a run trained with other settings: its numbers are not this variant's."""
    if not (run_dir / CONFIG_NAME).exists():
        return
    saved = _flatten(OmegaConf.to_container(load_run_config(run_dir), resolve=True))
    wanted = _flatten(OmegaConf.to_container(cfg, resolve=True))
    keys = [key for key in wanted if key.split(".")[0] in ("model", "loss", "train", "finetune")
            or key == "data.cache"]
    changed = [f"{key}: {saved.get(key)!r} -> {wanted[key]!r}" for key in keys if saved.get(key) != wanted[key]]
    if changed:
        raise ClipspmError(f"{run_dir} was trained with other settings ({'; '.join(changed)}); pass another "
                           f"--runs-dir, or delete that run to train the variant again")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_job(suite_dir: Path, variant_name: str, shots: int, *, device: str | None = None, progress: bool = False,
            console: Console | None = None) -> JobOutcome:
    """Bring one (variant, K) run of a suite to a scored state: skip it if finished, else train (or resume) and
    evaluate it. What a worker process runs; the sequential suite calls it in-process."""
    console = console or make_console()
    started = time.perf_counter()
    suite, settings = read_suite_dir(suite_dir)
    variant = suite.variant(variant_name)
    run_dir = run_dir_of(suite_dir, variant, shots)
    cfg = variant_config(settings, variant, shots)
    console.rule(f"{suite.name}: {variant.label}, {shots}-shot ({run_dir})")
    done = finished_result(run_dir, episodes=settings.eval_episodes, queries=settings.eval_queries,
                           seed=settings.eval_seed)
    if done is not None:
        console.print(f"finished before: {100 * done['accuracy']:.2f} ± {100 * done['ci95']:.2f} %, nothing to do")
        return JobOutcome(variant.name, shots, str(run_dir), "reused", done["accuracy"], done["ci95"], 0.0, 0.0,
                          time.perf_counter() - started)
    resume = checkpoint_dir(run_dir / "checkpoints" / "last") is not None
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)   # killed before its first checkpoint: only a config and a few log lines to lose
    train = train_finetune if settings.stage == "finetune" else train_heads
    trained = train(cfg, run_dir, resume=resume, progress=progress, device=device, console=console)
    scored = evaluate_run(run_dir, episodes=settings.eval_episodes, queries=settings.eval_queries, device=device,
                          progress=progress, console=console)
    status = "resumed" if resume else "trained" if trained.trained else "no training"
    return JobOutcome(variant.name, shots, str(run_dir), status, scored.accuracy,
                      scored.ci95, trained.seconds, scored.seconds, time.perf_counter() - started)


def _run_in_process(suite_dir: Path, jobs: list[tuple[Variant, int]], device: str, progress: bool,
                    console: Console) -> list[JobOutcome]:
    """The jobs one after another in this process; a failed run is reported once every other run is done."""
    outcomes, failures = [], []
    for variant, shots in jobs:
        try:
            outcomes.append(run_job(suite_dir, variant.name, shots, device=device, progress=progress,
                                    console=console))
        except ClipspmError as error:
            failures.append(f"{variant.name} {shots}-shot: {error}")
            console.print(f"[red]{variant.label}, {shots}-shot failed:[/red] {error}")
    _raise_unfinished(len(jobs), len(outcomes), failures)
    return outcomes


def _raise_unfinished(jobs: int, finished: int, failures: list[str]) -> None:
    if finished < jobs:
        raise JobFailedError(f"{jobs - finished} of {jobs} runs did not finish (rerun the same command to resume "
                           f"them; finished runs are kept):\n" + "\n".join(failures))


def _run_in_workers(suite_dir: Path, jobs: list[tuple[Variant, int]], devices: list[str], stage: str,
                    console: Console) -> tuple[list[JobOutcome], float]:
    """One worker process per device, each fed the next job as soon as it is free; the outcomes in job order and
    the workers' summed start-up time. A failed run is reported once every other run is done."""
    pending: Queue[tuple[int, tuple[Variant, int]]] = Queue()
    for position, job in enumerate(jobs):
        pending.put((position, job))
    outcomes: dict[int, JobOutcome] = {}
    failures: list[str] = []
    starts: list[float] = []
    cores = worker_cores(devices, stage)

    def serve(slot: int, device: str) -> None:
        try:
            worker = _Worker(suite_dir, slot, device, cores[slot])
        except ClipspmError as error:
            failures.append(str(error))
            return
        starts.append(worker.start_seconds)
        try:
            while worker.alive:
                try:
                    position, (variant, shots) = pending.get_nowait()
                except Empty:
                    return
                try:
                    outcome = outcomes[position] = worker.run(variant, shots)
                except ClipspmError as error:
                    failures.append(str(error))
                    continue
                console.print(f"{variant.label}, {shots}-shot on {device}: {outcome.status}, "
                              f"{100 * outcome.accuracy:.2f} ± {100 * outcome.ci95:.2f} % ({outcome.seconds:.0f} s)")
        finally:
            worker.close()

    with ThreadPoolExecutor(len(devices)) as pool:
        for future in [pool.submit(serve, slot, device) for slot, device in enumerate(devices)]:
            future.result()
    _raise_unfinished(len(jobs), len(outcomes), failures)
    return [outcomes[position] for position in range(len(jobs))], sum(starts)


def worker_cores(devices: list[str], stage: str, cores: int | None = None) -> list[int | None]:
    """The cores each worker may keep busy ($CLIPSPM_THREADS) out of `cores` (None: this process's budget); None
    leaves a worker the default. In the heads stage the CPU workers split the cores and a GPU worker keeps one to
    feed its device; in the finetune stage every worker also decodes its frames on the CPU, so all get an equal
    share."""
    if stage == "finetune":
        return [trainer_share(len(devices), 0, cores)] * len(devices)
    share = trainer_share(devices.count("cpu"), len(devices) - devices.count("cpu"), cores)
    return [share if device == "cpu" else None for device in devices]


class _Worker:
    """A `python -m clipspm ablate-worker` process pinned to one device: a job per stdin line, a JSON line back.

    It imports torch and the stages once and then runs job after job, so a suite of many short runs does not
    pay a process start per run. Its log (progress, errors) goes to SUITE_DIR/workers/. `cores` is the share
    of the CPU it may keep busy ($CLIPSPM_THREADS), None to leave it the default.
    """

    def __init__(self, suite_dir: Path, slot: int, device: str, cores: int | None):
        env = dict(os.environ)
        if device.startswith("cuda:"):   # the worker sees one GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"], argument = device.split(":", 1)[1], "cuda"
        elif device == "cpu":
            env["CUDA_VISIBLE_DEVICES"], argument = "", "cpu"
        else:
            argument = device
        if cores is not None:
            env[THREADS_VARIABLE] = env["OMP_NUM_THREADS"] = str(cores)   # its share of the cores
        self.device = device
        self.log = suite_dir / "workers" / f"{slot}-{device.replace(':', '')}.log"
        self.log.parent.mkdir(exist_ok=True)
        started = time.perf_counter()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "clipspm", "ablate-worker", str(suite_dir),
                                             "--device", argument], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, text=True, env=env)
        self._reply()   # "ready": the imports are done
        self.start_seconds = time.perf_counter() - started

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, variant: Variant, shots: int) -> JobOutcome:
        started = time.perf_counter()
        try:
            self.process.stdin.write(f"{variant.name} {shots}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass   # the worker is gone: reading its reply says why
        reply = self._reply()
        if "error" in reply:
            raise ClipspmError(f"{variant.name} {shots}-shot on {self.device}: {reply['error']}")
        return JobOutcome(**{**reply, "seconds": time.perf_counter() - started})

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text().strip()[-1500:]
            raise ClipspmError(f"the worker on {self.device} stopped (exit {self.process.returncode}); "
                               f"end of {self.log}:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        """End of input: the worker finishes its loop and exits."""
        self.process.stdin.close()
        self.process.wait()


def serve_jobs(suite_dir: Path, device: str | None, requests: TextIO, replies: TextIO) -> None:
    """The worker side: `VARIANT K` per request line, the JobOutcome (or {"error": ...}) as one JSON reply line.

    Anything the stages print goes to stderr (the worker's log), so stdout carries only replies.
    """
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        name, shots = line.split()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                reply = asdict(run_job(suite_dir, name, int(shots), device=device))
        except ClipspmError as error:
            reply = {"error": str(error)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
