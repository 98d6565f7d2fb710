"""Stage three: train the heads together with the CLIP visual tower, on frames decoded on the fly.

    train videos -> DataLoader workers (episodes drawn from (seed, step); one augmented train view
    per video from (seed, video, step, episode)) -> visual tower (autocast, activation
    checkpointing, BatchNorm statistics frozen) -> [E, videos, T, C] -> Episode -> `episode_step`,
    the very loss of the heads stage

An optimiser step is `train.episodes_per_step` episodes, forwarded `finetune.micro_episodes` at a
time with gradients accumulated. Under torchrun the micro-batches of a step are shared out across
ranks and the gradients summed over ranks: each episode's loss is scaled by 1/episodes_per_step
wherever it is computed, so K processes take the step one process would (up to float summation
order). Every random choice is a pure function of (seed, step, episode): that is what makes a
resumed run and a K-process run equal to the uninterrupted single-process one.

Validation re-encodes the val split's test views with the current tower (eval mode, no
gradients: one forward per val video, no backward) and scores the heads stage's fixed val episodes
on those features, in memory (with train.select_on=test: the test split and the stored test
episodes `eval` scores, the released code's protocol). Writing a val cache per validation would
cost the same encoding plus disk traffic and leave a cache nobody reuses. Test evaluation, run
once per finished run, does go through a cache: `evaluate.tuned_test_cache` extracts the test
split with the tuned tower.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from clipspm.cache.store import FeatureCache
from clipspm.datasets import Dataset as VideoDataset
from clipspm.datasets import load_dataset
from clipspm.errors import CacheError, ClipspmError, DatasetError
from clipspm.pipeline.encoder import ClipModel, feature_width
from clipspm.pipeline.episode import StepResult, episode_step
from clipspm.pipeline.methods import build_head
from clipspm.pipeline.tower import enable_activation_checkpointing, train_mode, unfreeze
from clipspm.stages import distributed
from clipspm.stages.checkpoint import VISUAL, checkpoint_dir, load_checkpoint
from clipspm.stages.episodes import EpisodeIndex, EpisodeSampler, build_episode, step_generator
from clipspm.stages.evaluate import evaluate_episodes
from clipspm.stages.extract import PREPARATION
from clipspm.stages.runs import (
    MetricsWindow,
    RunData,
    RunLog,
    TrainResult,
    backbone_of,
    check_run_dir,
    class_prompts,
    clip_of_cache,
    description_features,
    head_inputs,
    load_run_config,
    open_run_cache,
    prepare_run_dir,
    prepared_settings,
    save_validation,
    selection_episodes,
    training_progress,
)
from clipspm.system import keeps_caller_threads, make_console, use_threads
from clipspm.video.decode import VideoReadError
from clipspm.video.sampling import video_rng
from clipspm.video.views import VideoViewsDataset, ViewSettings, collate_items, load_views


@keeps_caller_threads
def train_finetune(cfg: DictConfig, run_dir: Path, *, resume: bool = False, init: Path | None = None,
                   progress: bool = True, device: str | None = None, console: Console | None = None) -> TrainResult:
    """Fine-tune (or resume) the run that `cfg` describes into `run_dir`; under torchrun every rank calls it.

    `resume` continues from the last checkpoint; a run directory without one is started afresh. Nothing is
    written into the run directory before the cache, the videos, the models and the episodes are ready.
    """
    resume = check_run_dir(run_dir, "finetune", resume=resume)
    dist = distributed.setup(device)
    console = console or make_console(quiet=not dist.is_main)
    started = time.perf_counter()
    ft, t = cfg.finetune, cfg.train
    threads = use_threads(dist.device, ft.workers)   # decoding workers and the tower's threads share the cores
    workers = threads.workers
    console.print(f"finetune on {dist.device}: {threads.describe()}")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    init_tower = False   # whether --init starts the tower too (a finetune or imported run), not only the heads
    if init is not None and not resume:
        init_tower = check_init(Path(init), cfg)
        ft.init = str(Path(init).resolve())

    # ---- data: labels, class prompts and the starting tower from the cache; frames from the videos
    cache = open_run_cache(cfg, run_dir, resume=resume, console=console)
    dataset = video_dataset(cache, cfg)
    train, held_out = split_videos(cache, dataset, "train"), split_videos(cache, dataset, t.select_on)
    class_text = class_prompts(cache, cfg, dist.device)
    base_classes = train.labels.unique().to(dist.device)
    clip = cached_clip(cache, dist.device)
    inputs = head_inputs(cfg, cache, dist.device, clip)   # the text tower, for methods that need it, is clip's
    train_text, held_out_text = (description_features(cfg, videos.keys, inputs) for videos in (train, held_out))
    settings = cache.meta["settings"]
    views = ViewSettings(num_segments=cache.num_frames, train_views=1, shorter_side=settings["resize_shorter_side"],
                         crop=settings["crop"], hflip=settings["hflip"],
                         sampling=prepared_settings(settings)["sampling"])   # SPEC section 1, as extracted
    precision = training_precision(ft.precision, dist.device)

    # ---- model: the tower (chosen blocks trainable, BatchNorm statistics frozen) and the heads
    tower = clip.model.visual
    tower_parameters = unfreeze(tower, ft.unfreeze, ft.blocks)
    if ft.activation_checkpointing:
        enable_activation_checkpointing(tower)
    torch.manual_seed(t.seed)  # the heads' initial weights, like everything after, follow from the seed
    head = build_head(cfg.model, cfg.loss, clip.feature_dim, inputs).to(dist.device)
    if ft.init and not resume:
        load_checkpoint(Path(ft.init) / "checkpoints" / "best", heads=head, visual=tower if init_tower else None)
    head_parameters = [p for p in head.parameters() if p.requires_grad]
    groups = [{"params": head_parameters, "lr": t.lr, "weight_decay": t.weight_decay},
              {"params": tower_parameters, "lr": ft.tower_lr, "weight_decay": ft.tower_weight_decay}]
    optimizer = torch.optim.Adam([group for group in groups if group["params"]], betas=tuple(t.betas))
    parameters = head_parameters + tower_parameters
    for parameter in parameters:  # kept allocated and zeroed, never freed: every rank reduces the same buffers
        parameter.grad = torch.zeros_like(parameter)

    # ---- schedule: steps, this rank's micro-batches, resume, validation episodes
    per_step, micro = t.episodes_per_step, ft.micro_episodes
    total_steps = -(-t.episodes // per_step)
    val_steps, log_steps = max(1, t.val_every // per_step), max(1, t.log_every // per_step)
    starts = micro_batch_starts(per_step, micro, dist)
    sampler = EpisodeSampler(train.labels, t.ways, t.shots, t.queries)
    held_out_index = selection_episodes(cache, cfg, held_out.labels, held_out.keys) if dist.is_main else None
    if dist.is_main:
        prepare_run_dir(run_dir, cfg, resume=resume)
    step, best, resumed_at = 0, (-1.0, 0), None
    if resume:
        state = load_checkpoint(run_dir / "checkpoints" / "last", heads=head, optimizer=optimizer, visual=tower)
        step, best, resumed_at = state["step"], (state["best_val"], state["best_episode"]), state["episode"]
        console.print(f"resuming {run_dir} at episode {state['episode']}")
    loader = DataLoader(EpisodeFrames(train, views, t.seed), batch_size=None, num_workers=workers,
                        sampler=micro_batches(sampler, t.seed, range(step, total_steps), per_step, micro, starts),
                        pin_memory=dist.device.type == "cuda")
    batches = iter(loader)

    def validate() -> float:
        tower.eval()
        features = encode_test_views(clip, held_out, replace(views, train_views=0), precision, workers,
                                     ft.val_batch)
        data = RunData(features, held_out.labels.to(dist.device), class_text, held_out.keys, train_views=0,
                       video_text=held_out_text)
        return float(evaluate_episodes(head, held_out_index, data, batch=cfg.eval.batch).mean())

    window = MetricsWindow()
    try:
        with (RunLog(run_dir, resumed_at) if dist.is_main else nullcontext()) as log, \
                training_progress("finetune", console, progress and dist.is_main) as bar:
            task = bar.add_task("finetune", total=total_steps * per_step, completed=step * per_step, loss=None,
                                acc=None, val=best[0] if best[0] >= 0 else None, rate=None)
            while step < total_steps:
                # ---- one optimiser step: this rank's micro-batches, then gradients summed over ranks
                train_mode(tower)
                head.train()
                optimizer.zero_grad(set_to_none=False)
                totals = 0.0
                for _ in starts:
                    batch, frames = next(batches)
                    torch.manual_seed(t.seed * 1_000_003 + step * per_step + batch.first)  # dropout: per episode
                    result = forward_episodes(clip, head, batch, frames.to(dist.device, non_blocking=True),
                                              train.labels, class_text, base_classes, precision, cfg.loss, per_step,
                                              train_text)
                    weight = len(batch.index) / per_step     # this share of the step's mean loss
                    (result.loss * weight).backward()
                    totals = totals + weight * torch.tensor(list(result.metrics.values()))
                metrics = dict(zip(result.metrics, sum_over_ranks(parameters, totals, dist).tolist(), strict=True))
                optimizer.step()
                step += 1

                # ---- logging, validation, checkpoints: rank 0 writes, the others wait
                episode_count = step * per_step
                if dist.is_main:
                    window.add(metrics)
                    if step % log_steps == 0 or step == total_steps:
                        averaged = window.write(log, episode_count, per_step)
                        bar.update(task, loss=averaged["loss"], acc=averaged["accuracy"],
                                   rate=averaged["episodes_per_s"])
                if step % val_steps == 0 or step == total_steps:
                    if dist.is_main:
                        best = save_validation(run_dir, validate(), log=log, split=t.select_on, step=step,
                                               episode=episode_count, best=best, heads=head, optimizer=optimizer,
                                               visual=tower)
                        bar.update(task, val=best[0])
                    dist.barrier()
                    window.restart_clock()  # validation time is not training throughput
                bar.update(task, completed=episode_count)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(cfg) from None
    return TrainResult(run_dir, total_steps * per_step, best[0], best[1], time.perf_counter() - started, trained=True)


@dataclass(frozen=True)
class SplitVideos:
    """One split's usable videos (done in the cache), in cache order: rows of its episode tables."""

    labels: torch.Tensor   # [n] class rows (CPU)
    keys: list[str]        # `CLASS/VIDEO`
    paths: list[Path]


@dataclass(frozen=True)
class MicroBatch:
    """The episodes of one forward: which step, where in it they start, and their videos."""

    step: int
    first: int             # index of the first episode within the step
    index: EpisodeIndex    # rows of the train split's SplitVideos


class EpisodeFrames(Dataset):
    """MicroBatch -> (MicroBatch, uint8 frames [m, N*(K+M), T, 3, S, S]), supports then queries.

    Video v of episode e in step s is seen through the train view drawn from video_rng(seed, v, s, e):
    the same whichever worker, rank or resumed process decodes it.
    """

    def __init__(self, videos: SplitVideos, settings: ViewSettings, seed: int):
        self.videos, self.settings, self.seed = videos, settings, seed

    def __getitem__(self, batch: MicroBatch) -> tuple[MicroBatch, torch.Tensor]:
        rows = torch.cat([batch.index.support, batch.index.query], 1).tolist()        # [m][N*(K+M)]
        frames = [torch.stack([self._train_view(row, batch.step, batch.first + e) for row in episode])
                  for e, episode in enumerate(rows)]
        return batch, torch.stack(frames)

    def _train_view(self, row: int, step: int, episode: int) -> torch.Tensor:
        key = self.videos.keys[row]
        try:
            views = load_views(self.videos.paths[row], self.settings, video_rng(self.seed, key, step, episode),
                               test_view=False)
        except VideoReadError as error:
            raise ClipspmError(f"{key} decoded when the cache was made but fails now: {error}") from None
        return views.frames[0]                                          # the train view [T, 3, S, S]


def micro_batch_starts(per_step: int, micro: int, dist: distributed.Distributed) -> list[int]:
    """First episodes of this rank's micro-batches in every step (micro-batches dealt round-robin)."""
    if micro < 1 or per_step < 1:
        raise ClipspmError("train.episodes_per_step and finetune.micro_episodes must be at least 1")
    starts = list(range(0, per_step, micro))
    if len(starts) < dist.world_size:
        raise ClipspmError(f"a step of {per_step} episodes, {micro} per forward, is {len(starts)} forwards: too few "
                           f"for {dist.world_size} processes; lower finetune.micro_episodes or raise "
                           f"train.episodes_per_step")
    return starts[dist.rank::dist.world_size]


def micro_batches(sampler: EpisodeSampler, seed: int, steps: range, per_step: int, micro: int,
                  starts: list[int]) -> Iterator[MicroBatch]:
    """What this rank's DataLoader workers decode, step after step: episodes drawn from (seed, step)."""
    for step in steps:
        index = sampler.sample(per_step, step_generator(seed, step, torch.device("cpu")))
        for first in starts:
            yield MicroBatch(step, first, index.slice(first, first + micro))


def forward_episodes(clip: ClipModel, head: torch.nn.Module, batch: MicroBatch, frames: torch.Tensor,
                     labels: torch.Tensor, class_text: torch.Tensor, base_classes: torch.Tensor, precision: str,
                     loss_cfg: DictConfig, episodes_per_step: int, video_text: torch.Tensor | None = None
                     ) -> StepResult:
    """Frames of m episodes -> tower -> an Episode gathered like the heads stage's -> `episode_step`.
    `video_text` [n, C]: the description feature of every train video (rows of `labels`), if the run has them."""
    m, videos, num_frames = frames.shape[:3]
    features = clip.encode_frames(frames.flatten(0, 2), precision)                      # [(m V T), C]
    features = rearrange(features, "(v t) c -> v 1 t c", t=num_frames)                 # one view per video
    positions = torch.arange(m * videos, device=features.device).view(m, videos)
    supports = batch.index.support.shape[1]                                              # N*K
    local = EpisodeIndex(positions[:, :supports], positions[:, supports:], batch.index.classes.to(features.device),
                         batch.index.shots, batch.index.queries)
    rows = torch.cat([batch.index.support, batch.index.query], 1).flatten()
    episode = build_episode(local, features, labels[rows].to(features.device), class_text, None, base_classes,
                            None if video_text is None else video_text[rows.to(video_text.device)])
    return episode_step(head, episode, loss_cfg, episodes_per_step)


def sum_over_ranks(parameters: list[torch.nn.Parameter], metrics: torch.Tensor,
                   dist: distributed.Distributed) -> torch.Tensor:
    """Sum the accumulated gradients and the episode-weighted metrics of all ranks (one all-reduce).

    Each rank scaled its episodes by 1/episodes_per_step, so the sums are the means over the step.
    A plain all-reduce rather than DistributedDataParallel: one reduction per optimiser step is all
    accumulation needs, and it is indifferent to activation checkpointing and unused parameters.
    """
    if not dist.enabled:
        return metrics
    grads = [parameter.grad for parameter in parameters]
    flat = torch.cat([grad.flatten() for grad in grads] + [metrics.to(grads[0].device, grads[0].dtype)])
    torch.distributed.all_reduce(flat)
    for grad, part in zip(grads, flat[:-metrics.numel()].split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(part.view_as(grad))
    return flat[-metrics.numel():].cpu()


@torch.no_grad()
def encode_test_views(clip: ClipModel, videos: SplitVideos, settings: ViewSettings, precision: str, workers: int,
                      batch: int) -> torch.Tensor:
    """[n, 1, T, C]: each video's test view through the tower as it is now (the caller sets eval mode)."""
    items = [(row, key, path, None) for row, (key, path) in enumerate(zip(videos.keys, videos.paths))]
    loader = DataLoader(VideoViewsDataset(items, settings, seed=0), batch_size=batch, num_workers=workers,
                        collate_fn=collate_items)
    features = []
    for decoded in loader:
        broken = [f"{videos.keys[item.row]} ({item.error})" for item in decoded if item.views is None]
        if broken:
            raise ClipspmError(f"video {broken[0]} decoded when the cache was made but fails now")
        frames = torch.stack([item.views.frames for item in decoded])                   # [b, 1, T, 3, S, S]
        encoded = clip.encode_frames(frames.flatten(0, 2), precision)                   # [(b T), C]
        features.append(rearrange(encoded, "(b t) c -> b 1 t c", t=settings.num_segments))
    return torch.cat(features)


def check_init(init: Path, cfg: DictConfig) -> bool:
    """Refuse `--init` before anything loads when it cannot start this run. Return whether it holds a tuned
    tower besides its heads (a finetune or imported run): the tower then starts from it too, and this run
    takes over what that tower was trained on (`adopt_tower_data`)."""
    init_cfg = load_run_config(init)
    best = checkpoint_dir(init / "checkpoints" / "best")
    if best is None:
        raise ClipspmError(f"--init {init} holds no best checkpoint; has its training validated at least once?")
    with_tower = (best / VISUAL).is_file()
    if with_tower:
        adopt_tower_data(init, init_cfg, cfg)
    theirs = OmegaConf.select(init_cfg, "data.cache_key.model") or backbone_of(init_cfg)
    ours = backbone_of(cfg)
    if feature_width(theirs) != feature_width(ours):
        raise ClipspmError(f"--init {init}: its heads were trained on {theirs} features {feature_width(theirs)} wide, "
                           f"but this run's tower {ours} gives features {feature_width(ours)} wide; start from a "
                           f"heads run of {ours} (or a backbone of the same width), or leave --init out")
    return with_tower


def adopt_tower_data(init: Path, init_cfg: DictConfig, cfg: DictConfig) -> None:
    """A tuned tower goes on seeing frames as it was trained on them: this run takes the init run's backbone, T
    and preparation (normalize, sampling, class_names; an imported run's are the released code's) where its own
    data settings leave them unset, and is refused where they set them otherwise."""
    trained = init_cfg.data.cache_key     # a finetune run: the settings of the cache it trained from
    if trained:
        source = {"backbone": trained["model"], "num_frames": trained["num_frames"], **prepared_settings(trained)}
    else:                                 # an imported run: its config
        source = {"backbone": backbone_of(init_cfg), "num_frames": init_cfg.data.num_frames,
                  **{name: init_cfg.data[name] for name in PREPARATION}}
    conflicts = []
    for name, value in source.items():
        if value is None:
            continue
        if cfg.data[name] is None:
            cfg.data[name] = value
        elif cfg.data[name] != value:
            conflicts.append(f"data.{name}={cfg.data[name]} (its tower's: {value})")
    if conflicts:
        raise ClipspmError(f"--init {init} starts this run's tower from one trained on other frames than this run "
                           f"asks for: {', '.join(conflicts)}; leave those settings out to take the tower's")


def video_dataset(cache: FeatureCache, cfg: DictConfig) -> VideoDataset:
    """The train videos and those selecting the best checkpoint (val, or test with train.select_on=test) on disk,
    from `data.root` or the root the cache was extracted from."""
    root = cfg.data.root or cache.meta["dataset_root"]
    dataset = load_dataset(cfg.data.dataset, root, split_dir=cfg.data.split_dir,
                           splits=("train", cfg.train.select_on), seed=cfg.data.seed)
    if dataset.split_hash != cache.meta["split_hash"]:
        raise CacheError(f"the split files of {cfg.data.dataset} at {root} are not those cache "
                         f"{cache.store_path.parent} was made with; pass the same --split-dir, or another --cache")
    return dataset


def split_videos(cache: FeatureCache, dataset: VideoDataset, split: str) -> SplitVideos:
    rows = cache.rows(split)
    if rows.size == 0:
        raise CacheError(f"cache {cache.store_path.parent} has no usable {split} videos")
    paths = {video.key: video.path for video in dataset.videos}
    keys = cache.video_ids[rows].tolist()
    missing = [key for key in keys if paths.get(key) is None]
    if missing:
        raise DatasetError(f"{len(missing)} {split} videos of the cache are not under {dataset.root} (first: "
                           f"{missing[0]}); pass the root the cache was extracted from with --root")
    return SplitVideos(torch.from_numpy(cache.labels[rows].astype("int64")), keys, [paths[key] for key in keys])


def cached_clip(cache: FeatureCache, device: torch.device) -> ClipModel:
    """The CLIP model the cache was made with: the tower training starts from, and the text tower
    behind the cache's class prompts."""
    settings = cache.meta["settings"]
    if settings.get("tuned_weights_sha256"):
        raise CacheError(f"cache {cache.store_path.parent} was made with a fine-tuned tower; fine-tuning starts "
                         f"from the pretrained weights: pass a cache of those (or leave --cache out)")
    if settings.get("person_crop"):
        raise CacheError(f"cache {cache.store_path.parent} holds person-cropped frames (extract --person-crop); "
                         f"fine-tuning decodes frames on the fly and does not run the person detector: fine-tune "
                         f"from a cache without --person-crop")
    return clip_of_cache(cache, device)


def training_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA where the GPU has it, else fp32 (the schema refuses fp16: it needs loss scaling)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def out_of_memory(cfg: DictConfig) -> ClipspmError:
    ft, t = cfg.finetune, cfg.train
    return ClipspmError(
        f"the GPU ran out of memory fine-tuning {backbone_of(cfg)} on {t.ways}-way {t.shots}-shot episodes with "
        f"{t.queries} queries per class, {ft.micro_episodes} episode(s) per forward. Options that lower memory: "
        f"--set finetune.micro_episodes=1 (gradients are still accumulated over train.episodes_per_step), "
        f"--set finetune.activation_checkpointing=true, --set finetune.unfreeze=last --set finetune.blocks=N "
        f"(train only the last N blocks), or fewer shots or queries (train.shots, train.queries)")
