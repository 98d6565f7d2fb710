"""Stage two: train the CLIP-SPM heads episodically from the feature cache.

Nothing here decodes a video or runs the encoder. The features of the train and val splits are
loaded once onto the device; each optimiser step samples `episodes_per_step` episodes as index
tensors, gathers one augmented train view per video, and runs them through the heads as one
batch (the paper's 16-episode gradient accumulation as a single step: the same gradient).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from clipspm.cache.store import FeatureCache
from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import episode_step
from clipspm.pipeline.model import build_head
from clipspm.stages.checkpoint import load_checkpoint, save_checkpoint
from clipspm.stages.episodes import EpisodeSampler, build_episode, episode_file_name, fixed_episodes, step_generator
from clipspm.stages.evaluate import evaluate_episodes, mean_ci
from clipspm.stages.runs import RunData, load_run_data, metrics_path, open_run_cache, prepare_run_dir


@dataclass
class TrainResult:
    run_dir: Path
    episodes: int
    best_val: float
    best_episode: int
    seconds: float
    trained: bool        # False for parameter-free heads (ProtoNet, plain OTAM): nothing to learn


def train_heads(cfg: DictConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
                device: str | None = None, console: Console | None = None) -> TrainResult:
    """Train (or resume) a heads run described by the resolved config `cfg` into `run_dir`."""
    console = console or Console(stderr=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    cache = open_run_cache(cfg, run_dir, resume=resume, console=console)
    prepare_run_dir(run_dir, cfg, resume=resume)
    train, val = load_run_data(cache, cfg, "train", device), load_run_data(cache, cfg, "val", device, test_view=True)
    t = cfg.train
    torch.manual_seed(t.seed)  # the initial weights, like everything after, follow from the seed
    head = build_head(cfg.model, cfg.loss, train.features.shape[-1]).to(device)
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=t.lr, weight_decay=t.weight_decay) if parameters else None
    val_index, _ = fixed_episodes(
        cache.store_path.parent / "episodes" / episode_file_name("val", t.ways, t.shots, t.val_queries,
                                                                 t.val_episodes, t.seed),
        val.labels, val.video_ids, ways=t.ways, shots=t.shots, queries=t.val_queries, episodes=t.val_episodes,
        seed=t.seed)

    def validate() -> float:
        return float(evaluate_episodes(head, val_index, val, batch=cfg.eval.batch).mean())

    if optimizer is None:  # ProtoNet / plain OTAM: evaluate only, keep a checkpoint so `eval` works alike
        score = validate()
        state = {"episode": 0, "best_val": score, "best_episode": 0, "trained": False}
        save_checkpoint(run_dir / "checkpoints" / "last", heads=head, state=state)
        save_checkpoint(run_dir / "checkpoints" / "best", heads=head, state=state)
        _log(run_dir, {"episode": 0, "val_acc": score})
        console.print(f"{cfg.model.kind} has no trainable parameters: nothing to train (val accuracy {score:.2%})")
        return TrainResult(run_dir, 0, score, 0, time.perf_counter() - started, trained=False)

    per_step = t.episodes_per_step
    total_steps = -(-t.episodes // per_step)
    val_steps = max(1, t.val_every // per_step)
    step, best_val, best_episode = 0, -1.0, 0
    if resume:
        state = load_checkpoint(run_dir / "checkpoints" / "last", heads=head, optimizer=optimizer)
        step, best_val, best_episode = state["step"], state["best_val"], state["best_episode"]
        _truncate_metrics(run_dir, state["episode"])
        console.print(f"resuming {run_dir} at episode {state['episode']}")
    sampler = EpisodeSampler(train.labels, t.ways, t.shots, t.queries)
    base_classes = train.labels.unique()
    columns = [TextColumn("[bold]heads[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
               TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%} val {task.fields[val]:.1%}"),
               TextColumn("{task.fields[rate]:.0f} ep/s"), TimeRemainingColumn()]
    window: list[dict] = []
    tick = time.perf_counter()
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("heads", total=total_steps * per_step, completed=step * per_step, loss=0.0, acc=0.0,
                            val=max(best_val, 0.0), rate=0.0)
        while step < total_steps:
            # ---- one optimiser step: E episodes drawn from (seed, step), one train view per video
            generator = step_generator(t.seed, step, device)
            torch.manual_seed(t.seed * 1_000_003 + step)  # dropout: also a pure function of the step
            index = sampler.sample(per_step, generator)
            views = train.random_views(index, generator)
            episode = build_episode(index, train.features, train.labels, train.class_text, views, base_classes)
            head.train()
            result = episode_step(head, episode, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            step += 1
            window.append(result.metrics)

            # ---- logging, validation, checkpoints
            episode_count = step * per_step
            if step % max(1, t.log_every // per_step) == 0 or step == total_steps:
                now = time.perf_counter()
                rate = len(window) * per_step / max(now - tick, 1e-9)
                averaged = {key: float(np.mean([m[key] for m in window])) for key in window[0]}
                _log(run_dir, {"episode": episode_count, **averaged, "episodes_per_s": rate})
                bar.update(task, loss=averaged["loss"], acc=averaged["accuracy"], rate=rate)
                window, tick = [], now
            if step % val_steps == 0 or step == total_steps:
                score = validate()
                _log(run_dir, {"episode": episode_count, "val_acc": score})
                state = {"step": step, "episode": episode_count, "trained": True}
                if score > best_val:
                    best_val, best_episode = score, episode_count
                    save_checkpoint(run_dir / "checkpoints" / "best", heads=head,
                                    state={**state, "best_val": best_val, "best_episode": best_episode})
                save_checkpoint(run_dir / "checkpoints" / "last", heads=head, optimizer=optimizer,
                                state={**state, "best_val": best_val, "best_episode": best_episode})
                bar.update(task, val=best_val)
                tick = time.perf_counter()  # validation time is not training throughput
            bar.update(task, completed=episode_count)
    return TrainResult(run_dir, total_steps * per_step, best_val, best_episode, time.perf_counter() - started,
                       trained=True)


def _log(run_dir: Path, record: dict) -> None:
    with open(metrics_path(run_dir), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, episode: int) -> None:
    """Drop records written after the checkpoint being resumed: they will be written again."""
    path = metrics_path(run_dir)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["episode"] <= episode]
        path.write_text("".join(line + "\n" for line in kept))
