"""Stage two: train the CLIP-SPM heads episodically from the feature cache.

Nothing here decodes a video or runs the encoder. The features of the train split and of the split
that selects the best checkpoint (val; test with train.select_on=test, the released code's protocol)
are loaded once onto the device; each optimiser step samples `episodes_per_step` episodes as index
tensors, gathers one augmented train view per video, and runs them through the heads as one
batch (the paper's 16-episode gradient accumulation as a single step: the same gradient).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console

from clipspm.pipeline.episode import episode_loss, metric_values
from clipspm.pipeline.methods import build_head
from clipspm.stages.checkpoint import load_checkpoint, read_state, save_checkpoint
from clipspm.stages.cuda_graph import GraphedStep
from clipspm.stages.episodes import EpisodeIndex, EpisodeSampler, build_episode, step_generator
from clipspm.stages.evaluate import evaluate_episodes
from clipspm.stages.runs import (
    MetricsWindow,
    RunData,
    RunLog,
    TrainResult,
    check_run_dir,
    head_inputs,
    load_run_data,
    open_run_cache,
    prepare_run_dir,
    save_validation,
    selection_episodes,
    selection_key,
    training_progress,
)
from clipspm.system import keeps_caller_threads, make_console, resolve_device, use_threads


@keeps_caller_threads
def train_heads(cfg: DictConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
                device: str | None = None, console: Console | None = None) -> TrainResult:
    """Train (or resume) a heads run described by the resolved config `cfg` into `run_dir`.

    `resume` continues from the last checkpoint; a run directory without one is started afresh. Nothing is
    written into the run directory before the cache, the data, the head and the episodes are ready.
    """
    console = console or make_console()
    resume = check_run_dir(run_dir, "heads", resume=resume)
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    console.print(f"heads on {device}: {use_threads(device).describe()}")
    started = time.perf_counter()
    cache = open_run_cache(cfg, run_dir, resume=resume, console=console)
    inputs = head_inputs(cfg, cache, device)   # what the method needs beside the cache (a text tower)
    t = cfg.train
    train = load_run_data(cache, cfg, "train", device, inputs=inputs)
    held_out = load_run_data(cache, cfg, t.select_on, device, test_view=True, inputs=inputs)   # picks the best
    torch.manual_seed(t.seed)  # the initial weights, like everything after, follow from the seed
    head = build_head(cfg.model, cfg.loss, train.features.shape[-1], inputs).to(device)
    parameters = [p for p in head.parameters() if p.requires_grad]
    graphed = t.cuda_graph and device.type == "cuda"    # the CPU always runs the step eagerly
    optimizer = (torch.optim.Adam(parameters, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  capturable=graphed) if parameters else None)
    sampler = EpisodeSampler(train.labels, t.ways, t.shots, t.queries) if optimizer is not None else None
    held_out_index = selection_episodes(cache, cfg, held_out.labels, held_out.video_ids)
    prepare_run_dir(run_dir, cfg, resume=resume)

    def validate() -> float:
        return float(evaluate_episodes(head, held_out_index, held_out, batch=cfg.eval.batch).mean())

    if optimizer is None:  # ProtoNet / plain OTAM: evaluate only, keep a checkpoint so `eval` works alike
        if resume:
            score = read_state(run_dir / "checkpoints" / "last")["best_val"]
            return TrainResult(run_dir, 0, score, 0, time.perf_counter() - started, trained=False)
        score = validate()
        state = {"episode": 0, "best_val": score, "best_episode": 0, "trained": False}
        save_checkpoint(run_dir / "checkpoints" / "last", heads=head, state=state)
        save_checkpoint(run_dir / "checkpoints" / "best", heads=head, state=state)
        with RunLog(run_dir) as log:
            log.write({"episode": 0, selection_key(t.select_on): score})
        console.print(f"{cfg.model.kind} has no trainable parameters: nothing to train ({t.select_on} accuracy "
                      f"{score:.2%})")
        return TrainResult(run_dir, 0, score, 0, time.perf_counter() - started, trained=False)

    per_step = t.episodes_per_step
    total_steps = -(-t.episodes // per_step)
    val_steps, log_steps = max(1, t.val_every // per_step), max(1, t.log_every // per_step)
    step, best, resumed_at = 0, (-1.0, 0), None
    if resume:
        state = load_checkpoint(run_dir / "checkpoints" / "last", heads=head, optimizer=optimizer)
        step, best, resumed_at = state["step"], (state["best_val"], state["best_episode"]), state["episode"]
        console.print(f"resuming {run_dir} at episode {state['episode']}")
    train_step = training_step(head, optimizer, train, train.labels.unique(), cfg.loss, t.shots, t.queries, per_step)
    if graphed:
        train_step = GraphedStep(train_step)
    window = MetricsWindow()
    with RunLog(run_dir, resumed_at) as log, training_progress("heads", console, progress) as bar:
        task = bar.add_task("heads", total=total_steps * per_step, completed=step * per_step, loss=None, acc=None,
                            val=best[0] if best[0] >= 0 else None, rate=None)
        while step < total_steps:
            # ---- one optimiser step: E episodes drawn from (seed, step), one train view per video
            generator = step_generator(t.seed, step, device)
            torch.manual_seed(t.seed * 1_000_003 + step)  # dropout: also a pure function of the step
            index = sampler.sample(per_step, generator)
            metrics = train_step(index.support, index.query, index.classes, train.random_views(index, generator))
            step += 1
            window.add(metric_values(metrics))

            # ---- logging, validation, checkpoints
            episode_count = step * per_step
            if step % log_steps == 0 or step == total_steps:
                averaged = window.write(log, episode_count, per_step)
                bar.update(task, loss=averaged["loss"], acc=averaged["accuracy"], rate=averaged["episodes_per_s"])
            if step % val_steps == 0 or step == total_steps:
                best = save_validation(run_dir, validate(), log=log, split=t.select_on, step=step,
                                       episode=episode_count, best=best, heads=head, optimizer=optimizer)
                bar.update(task, val=best[0])
                window.restart_clock()
            bar.update(task, completed=episode_count)
    return TrainResult(run_dir, total_steps * per_step, best[0], best[1], time.perf_counter() - started,
                       trained=True)


def training_step(head: torch.nn.Module, optimizer: torch.optim.Optimizer, data: RunData, base_classes: torch.Tensor,
                  loss_cfg: DictConfig, shots: int, queries: int, episodes_per_step: int):
    """The optimiser step of the heads stage as a function of index tensors: (support [E, N*K], query [E, N*M],
    classes [E, N] rows of `data`, views [E, N*(K+M)] or None) -> the step's metrics as scalar tensors.

    Nothing in it reads back from the device, so `GraphedStep` can capture it (train.cuda_graph).
    """
    def step(support: torch.Tensor, query: torch.Tensor, classes: torch.Tensor,
             views: torch.Tensor | None) -> dict[str, torch.Tensor]:
        index = EpisodeIndex(support, query, classes, shots, queries)
        episode = build_episode(index, data.features, data.labels, data.class_text, views, base_classes,
                                data.video_text)
        head.train()
        loss, _, metrics = episode_loss(head, episode, loss_cfg, episodes_per_step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return metrics

    return step
