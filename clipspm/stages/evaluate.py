"""Evaluation on fixed test episodes (10,000 by default), and paired comparison of two runs.

Test episodes are drawn once per (split, N, K, M, count, seed) and stored beside the cache, so
every model and every ablation variant is scored on identical episodes, and `compare` can report
the paired difference, whose confidence interval is far tighter than that of two separate means.
A fine-tuned run is scored on the test split re-encoded by its tuned tower, but on the episodes
stored beside the cache it trained from: the same file as every other run of that cache.

A result records how its checkpoint was chosen (`select_on`): on the val split, or on these very
test episodes (train.select_on=test, the released code's protocol), which makes it optimistic.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from clipspm.errors import ClipspmError
from clipspm.stages.episodes import EpisodeIndex, build_episode, fixed_episodes
from clipspm.system import keeps_caller_threads, resolve_device, thread_plan, use_threads

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from clipspm.cache.store import FeatureCache
    from clipspm.stages.runs import RunData

RESULTS_NAME = "results.json"
CHECKPOINTS = ("best", "last")


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, as in the FSAR literature)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()) if values.size else float("nan"), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


@torch.no_grad()
def evaluate_episodes(head: torch.nn.Module, index: EpisodeIndex, data, *, batch: int = 250,
                      progress: Progress | None = None) -> np.ndarray:
    """Per-episode accuracy [E] of `head` on the episodes `index` over `data` (a RunData split)."""
    head.eval()
    accuracies = []
    task = progress.add_task("eval", total=len(index)) if progress is not None else None
    for start in range(0, len(index), batch):
        part = index.slice(start, start + batch)
        episode = build_episode(part, data.features, data.labels, data.class_text, video_text=data.video_text)
        logits = head(episode).logits                                       # [E, N*M, N]
        accuracies.append((logits.argmax(-1) == episode.query_labels).float().mean(-1).cpu())
        if task is not None:
            progress.update(task, advance=len(part))
    return torch.cat(accuracies).numpy()


@dataclass
class EvalResult:
    run_dir: str
    split: str
    ways: int
    shots: int
    queries: int
    episodes: int
    seed: int
    accuracy: float          # mean over episodes, in [0, 1]
    ci95: float              # half-width of the 95% confidence interval
    checkpoint: str
    select_on: str           # the split whose episodes chose the checkpoint: val, or test (optimistic)
    cache: str
    episodes_file: str
    episodes_sha256: str
    seconds: float
    # The head read each query's true label to score it (a released protocol, kept to measure its effect):
    # the accuracy is then not a few-shot accuracy.
    label_leak: bool = False
    video_text: str | None = None   # what stood for each video's description, for methods reading one


@dataclass
class TestRun:
    """A run's head, loaded from a checkpoint, beside the test split it is scored on."""

    cfg: DictConfig
    cache: FeatureCache
    test: RunData
    head: torch.nn.Module


def open_test_run(run_dir: Path, *, checkpoint: str = "best", cache_path: Path | None = None,
                  device: str | None = None, progress: bool = True, console: Console | None = None,
                  root: Path | None = None, pretrained: str | None = None) -> TestRun:
    """Load a run's checkpoint and its test split onto `device`: what scoring and the report's figures need.

    A fine-tuned or imported run is paired with a cache of the test split encoded by its tuned tower
    (`tuned_test_cache`, which `root` and `pretrained` go to).
    """
    from clipspm.cache.store import FeatureCache, find_store
    from clipspm.pipeline.methods import build_head
    from clipspm.stages.checkpoint import load_checkpoint
    from clipspm.stages.runs import check_cache_fits, head_inputs, load_run_config, load_run_data
    from clipspm.system import make_console, resolve_device

    cfg = load_run_config(run_dir)
    device = resolve_device(device)
    if checkpoint not in CHECKPOINTS:
        raise ClipspmError(f"--checkpoint {checkpoint!r}: choose {' or '.join(CHECKPOINTS)}")
    if cfg.get("finetune") is not None and cache_path is None:
        cache_path = tuned_test_cache(run_dir, cfg, console=console or make_console(), checkpoint=checkpoint,
                                      device=str(device), progress=progress, root=root, pretrained=pretrained)
    elif pretrained is not None:
        raise ClipspmError(f"--pretrained names the weights under a tuned tower; {run_dir} is a heads run, scored on "
                           f"the cache it was trained from")
    cache = FeatureCache(find_store(Path(cache_path or cfg.data.cache)))
    check_cache_fits(cache, cfg)
    cache.refuse(cache.check(read_blocks=False))   # the class arrays; load_run_data checks the test blocks it reads
    inputs = head_inputs(cfg, cache, device)
    test = load_run_data(cache, cfg, "test", device, test_view=True, inputs=inputs)
    head = build_head(cfg.model, cfg.loss, test.features.shape[-1], inputs).to(device)
    load_checkpoint(Path(run_dir) / "checkpoints" / checkpoint, heads=head)
    return TestRun(cfg, cache, test, head)


@keeps_caller_threads
def evaluate_run(run_dir: Path, *, episodes: int | None = None, queries: int | None = None,
                 checkpoint: str = "best", cache_path: Path | None = None, device: str | None = None,
                 progress: bool = True, console: Console | None = None, root: Path | None = None,
                 pretrained: str | None = None) -> EvalResult:
    """Score a run's checkpoint on the stored test episodes; write results.json and per-episode accuracies.

    `episodes` and `queries` (None: the run's eval settings) must be at least 1. results.json names the cache
    and the episodes file by absolute path, whichever stage made the run. `root` and `pretrained`: see
    `tuned_test_cache`.
    """
    from clipspm.stages.runs import eval_episodes_file
    from clipspm.system import make_console

    for option, value in (("--episodes", episodes), ("--queries", queries)):
        if value is not None and value < 1:
            raise ClipspmError(f"{option} must be at least 1, got {value}")
    console = console or make_console()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    device = str(resolve_device(device))
    console.print(f"eval on {device}: {use_threads(device).describe()}")
    loaded = open_test_run(run_dir, checkpoint=checkpoint, cache_path=cache_path, device=device, progress=progress,
                           console=console, root=root, pretrained=pretrained)
    cfg, cache, test, head = loaded.cfg, loaded.cache, loaded.test, loaded.head
    episodes = cfg.eval.episodes if episodes is None else episodes
    queries = cfg.eval.queries if queries is None else queries
    # A fine-tuned run's test cache holds the same videos as the cache it trained from, beside which its episodes
    # are stored; an imported run trained from none of ours: beside its tuned test cache.
    trained_on = cfg.data.cache if cfg.get("finetune") is not None else None
    file = eval_episodes_file(Path(trained_on) if trained_on else cache.store_path.parent, cfg, episodes=episodes,
                              queries=queries)
    index, digest = fixed_episodes(file, test.labels, test.video_ids, ways=cfg.train.ways, shots=cfg.train.shots,
                                   queries=queries, episodes=episodes, seed=cfg.eval.seed)
    with Progress(console=console, disable=not progress) as bar:
        accuracy = evaluate_episodes(head, index, test, batch=cfg.eval.batch, progress=bar)
    mean, ci = mean_ci(accuracy)
    from clipspm.pipeline.methods import get_method
    from clipspm.stages.runs import describe_video_text

    result = EvalResult(run_dir=str(run_dir), split="test", ways=cfg.train.ways, shots=cfg.train.shots,
                        queries=queries, episodes=len(index), seed=cfg.eval.seed, accuracy=mean, ci95=ci,
                        checkpoint=checkpoint, select_on=cfg.train.select_on,
                        cache=str(cache.store_path.parent.resolve()), episodes_file=str(file),
                        episodes_sha256=digest, seconds=time.perf_counter() - started,
                        label_leak=bool(getattr(head, "reads_query_labels", False)),
                        video_text=describe_video_text(cfg) if "video_text" in get_method(cfg.model.kind).needs
                        else None)
    np.save(run_dir / accuracy_file_name(digest), accuracy.astype(np.float32))
    (run_dir / RESULTS_NAME).write_text(json.dumps(asdict(result), indent=1))
    return result


def tuned_test_cache(run_dir: Path, cfg: DictConfig, *, console: Console, checkpoint: str = "best",
                     device: str | None = None, progress: bool = True, root: Path | None = None,
                     pretrained: str | None = None) -> Path:
    """The cache of the test split encoded with the run's tuned tower: extracted once, then found again
    by its address (the settings include the tuned weights' hash). Returns its directory.

    Everything but the tower is extracted as the tower's training saw it: for a finetune run, as the cache
    it trained from (its provenance); for an imported run, which has no such cache, as its config says
    (data.backbone, pretrained, num_frames, seed, normalize, sampling, class_names). `pretrained` replaces
    the base weights under the tuned tower, whose text tower gives the class texts (a released checkpoint
    holds no text tower: `openai` for OpenAI CLIP, or its local file); `root` the dataset root.
    """
    from clipspm.stages.checkpoint import tuned_visual_weights
    from clipspm.stages.extract import ExtractOptions, extract

    weights = tuned_visual_weights(run_dir, checkpoint)
    source = tower_source(cfg)
    if pretrained is not None:
        source["pretrained"] = pretrained
    if root is not None or cfg.data.root:
        source["root"] = root or cfg.data.root
    console.print(f"test features of the tuned tower ({weights})")
    workers = thread_plan(resolve_device(device), cfg.finetune.workers).workers   # finetune's, within the cores
    result = extract(ExtractOptions(
        dataset=cfg.data.dataset, split_dir=cfg.data.split_dir, splits=("test",), weights=weights, train_views=0,
        cache_root=Path(cfg.data.cache_dir), workers=workers, device=device, progress=progress, **source))
    return result.path


def tower_source(cfg: DictConfig) -> dict:
    """ExtractOptions fields (root, backbone, pretrained, num_frames, seed, normalize, sampling, class_names) of
    the features a run's tower was trained on: from the provenance of the cache it trained from, or, for an
    imported run (no data.cache), from its config."""
    from clipspm.cache.store import FeatureCache, find_store
    from clipspm.stages.extract import DEFAULTS, PREPARATION
    from clipspm.stages.runs import backbone_of, prepared_settings

    data = cfg.data
    if data.cache:
        with FeatureCache(find_store(Path(data.cache))) as cache:
            meta = cache.meta
        return {"root": meta["dataset_root"], "backbone": meta["model"], "pretrained": meta["pretrained"],
                "num_frames": meta["num_frames"], "seed": meta["settings"]["seed"],
                **prepared_settings(meta["settings"])}
    return {"root": data.root, "backbone": backbone_of(cfg), "pretrained": data.pretrained,
            "num_frames": data.num_frames or DEFAULTS.num_frames, "seed": data.seed,
            **{name: data[name] or DEFAULTS[name] for name in PREPARATION}}


def accuracy_file_name(episodes_sha256: str) -> str:
    return f"episode_accuracy-{episodes_sha256[:12]}.npy"


def finished_result(run_dir: Path, *, episodes: int, queries: int, seed: int) -> dict | None:
    """The run's results.json if it scored these test episodes after its training last wrote; else None."""
    path, metrics = Path(run_dir) / RESULTS_NAME, Path(run_dir) / "metrics.jsonl"
    if not path.is_file() or (metrics.exists() and path.stat().st_mtime < metrics.stat().st_mtime):
        return None
    result = json.loads(path.read_text())
    same = (result["episodes"], result["queries"], result["seed"]) == (episodes, queries, seed)
    return result if same and result["checkpoint"] == "best" else None


def read_result(run_dir: Path) -> tuple[dict, np.ndarray]:
    """A run's results.json and its per-episode accuracies; a missing or damaged one asks for `clipspm eval`."""
    path = Path(run_dir) / RESULTS_NAME
    again = f"run `clipspm eval {run_dir}` (again)"
    if not path.is_file():
        raise ClipspmError(f"{run_dir} has no {RESULTS_NAME}; run `clipspm eval {run_dir}` first")
    try:
        result = json.loads(path.read_text())
        accuracy = Path(run_dir) / accuracy_file_name(result["episodes_sha256"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ClipspmError(f"{path} is damaged ({type(error).__name__}: {error}); {again}") from None
    try:
        return result, np.load(accuracy, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ClipspmError(f"the per-episode accuracies {accuracy} of {run_dir} cannot be read ({error}); "
                           f"{again}") from None


@dataclass
class Comparison:
    run_a: str
    run_b: str
    accuracy_a: float
    accuracy_b: float
    difference: float        # a - b, mean over the shared episodes
    ci95: float              # half-width of the CI of the paired difference
    episodes: int
    select_on_a: str         # the split that chose each run's checkpoint (val, or test: optimistic)
    select_on_b: str

    @property
    def significant(self) -> bool:
        return abs(self.difference) > self.ci95


def compare_runs(run_a: Path, run_b: Path) -> Comparison:
    """Paired difference of two runs evaluated on the same stored episodes."""
    result_a, acc_a = read_result(run_a)
    result_b, acc_b = read_result(run_b)
    if result_a["episodes_sha256"] != result_b["episodes_sha256"]:
        raise ClipspmError(f"{run_a} and {run_b} were evaluated on different episodes "
                           f"({result_a['episodes_file']} vs {result_b['episodes_file']}); evaluate both with the "
                           f"same --episodes and --queries on the same cache")
    difference, ci = mean_ci(acc_a.astype(np.float64) - acc_b.astype(np.float64))
    return Comparison(str(run_a), str(run_b), float(acc_a.mean()), float(acc_b.mean()), difference, ci, acc_a.size,
                      selected_on(result_a), selected_on(result_b))


def selected_on(result: dict) -> str:
    """The split that chose a result's checkpoint; results written before the field existed were selected on val."""
    return result.get("select_on", "val")
