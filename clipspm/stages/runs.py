"""What every training stage shares: the resolved config, the run directory, the cache it reads.

A run directory holds `config.yaml` (the resolved config, including the cache it was trained
from), `metrics.jsonl` and the same metrics as TensorBoard event files, `checkpoints/{last,best}/`,
and after evaluation `results.json`. It is written only once a start is known to be able to run;
until its first checkpoint it is not a run yet, and the same command starts it again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from clipspm.cache.store import FeatureCache, find_store
from clipspm.errors import CacheError, ClipspmError
from clipspm.pipeline.encoder import ClipModel, feature_width, file_sha256, load_clip
from clipspm.pipeline.methods import HeadInputs, get_method
from clipspm.pipeline.text_tower import TextTower
from clipspm.stages.checkpoint import checkpoint_dir, read_state, save_checkpoint
from clipspm.stages.descriptions import read_descriptions
from clipspm.stages.episodes import EpisodeIndex, episode_file_name, fixed_episodes

CONFIG_NAME = "config.yaml"
TENSORBOARD_PREFIX = "events.out.tfevents."                    # SummaryWriter's file names
TENSORBOARD_TAGS = {"val_acc": "val/accuracy", "test_acc": "test/accuracy"}   # others: train window means, train/KEY
PIPE_LINE_SECONDS = 30.0                                        # a progress line this often when not on a terminal


def default_run_dir(cfg: DictConfig, stage: str, runs_root: Path = Path("runs")) -> Path:
    """runs/{dataset}-{backbone}-{K}shot, with `-ft` for the finetune stage."""
    name = f"{cfg.data.dataset}-{backbone_of(cfg)}-{cfg.train.shots}shot" + ("-ft" if stage == "finetune" else "")
    return runs_root / name


def backbone_of(cfg: DictConfig) -> str:
    """The open_clip model a run uses: `data.backbone`, else its dataset's default."""
    from clipspm.datasets.registry import SPECS

    if cfg.data.backbone:
        return cfg.data.backbone
    if cfg.data.dataset not in SPECS:
        raise ClipspmError(f"unknown dataset {cfg.data.dataset!r}; see `clipspm datasets`")
    return SPECS[cfg.data.dataset].default_backbone


def load_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved config, validated again (keys added to the schema since it was written take their
    defaults)."""
    from clipspm.config import validate_config

    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ClipspmError(f"{run_dir} is not a run directory (no {CONFIG_NAME}); runs are made by `clipspm train`")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
        raise ClipspmError(f"{path} is damaged ({type(error).__name__}: {str(error).splitlines()[0]}); the run "
                           f"cannot be read back, train it again into another --run-dir") from None
    return validate_config(loaded, "finetune" if "finetune" in loaded else "heads")


def run_stage(cfg: DictConfig) -> str:
    """heads or finetune: the stage a resolved run config belongs to."""
    return "finetune" if cfg.get("finetune") is not None else "heads"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run has trained far enough to be resumed; before that, a run directory is only a start
    that died early, and the same command starts it again."""
    return checkpoint_dir(Path(run_dir) / "checkpoints" / "last") is not None


def check_run_dir(run_dir: Path, stage: str, *, resume: bool) -> bool:
    """Whether training into `run_dir` continues a run (True) or starts one (False); refuse, before anything is
    loaded or written, a directory that is not a run, a run of the other stage, or a run to be overwritten."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ClipspmError(f"--run-dir {run_dir} is a file; pass a directory")
    if run_dir.is_dir() and not (run_dir / CONFIG_NAME).exists() and any(run_dir.iterdir()):
        raise ClipspmError(f"{run_dir} is not empty and holds no run ({CONFIG_NAME} is missing); pass another "
                           f"--run-dir (or --name) so that nothing in it is overwritten")
    source = imported_from(run_dir)
    if source is not None:
        raise ClipspmError(f"{run_dir} holds the checkpoint imported from {source}, which training into it would "
                           f"replace; fine-tune from it with --init {run_dir} and another --run-dir (or --name)")
    if not has_checkpoint(run_dir):
        return False
    saved = run_stage(load_run_config(run_dir))
    if saved != stage:
        raise ClipspmError(f"{run_dir} holds a {saved} run, not a {stage} run; pass another --run-dir (or --name) "
                           f"for the {stage} stage")
    if not resume:
        raise ClipspmError(f"{run_dir} already holds a run; pass --resume to continue it, or --run-dir/--name "
                           f"for a new one")
    return True


def imported_from(run_dir: Path) -> str | None:
    """The released checkpoint a run was imported from (`clipspm import-checkpoint`); None for a trained run."""
    found = checkpoint_dir(Path(run_dir) / "checkpoints" / "best")
    return read_state(found).get("imported_from") if found is not None else None


@dataclass
class LoadedRun:
    """A run's head with a checkpoint's weights, in eval mode, and the run's resolved config."""

    head: torch.nn.Module      # forward(Episode) -> HeadOutput: .logits [E, N*M, N], .aux (training losses)
    config: DictConfig         # sections data, train, eval, [finetune], model, loss; `.loss` is episode_step's
    run_dir: Path
    checkpoint: str            # best | last


def load_run(run_dir: str | Path, *, checkpoint: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """The head of a heads, finetune or imported run, with the weights of its `checkpoint` (best: by validation;
    an imported run has only best), in eval mode on `device`. Nothing else is loaded: no cache, no tower.

        run = clipspm.load_run("runs/hmdb51-RN50-1shot")
        logits = run.head(episode).logits                          # [E, N*M, N], episode: pipeline.episode.Episode
        run.head.train()
        step = episode_step(run.head, episode, run.config.loss, episodes_per_step=16)   # loss, as training has it

    A fine-tuned (or imported) run's tower is `checkpoints/{checkpoint}/visual.safetensors`; `clipspm eval` scores
    it through a cache of test features that tower encoded.
    """
    from clipspm.pipeline.methods import build_head
    from clipspm.stages.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    model = OmegaConf.select(cfg, "data.cache_key.model") or backbone_of(cfg)
    width = feature_width(model)
    if width is None:
        raise ClipspmError(f"{run_dir} was made with {model}, which open_clip does not know here; register its "
                           f"model config (open_clip.add_model_config) before loading the run")
    head = build_head(cfg.model, cfg.loss, width)
    load_checkpoint(run_dir / "checkpoints" / checkpoint, heads=head)
    return LoadedRun(head.to(device).eval(), cfg, run_dir, checkpoint)


def prepare_run_dir(run_dir: Path, cfg: DictConfig, *, resume: bool) -> None:
    """Write the resolved config: called once everything the run needs has loaded and its episodes are drawn.

    A start without a checkpoint (`resume` False) replaces what an earlier start that died early left there.
    """
    run_dir = Path(run_dir)
    if not resume:
        for path in [metrics_path(run_dir), *run_dir.glob(f"{TENSORBOARD_PREFIX}*")]:
            path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)   # at most a half-written first checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_NAME)


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


class RunLog:
    """The metrics of a run, each record to `metrics.jsonl` and to TensorBoard event files in the run directory
    (`tensorboard --logdir runs` shows every run), both indexed by training episode.

    Opened to resume from a checkpoint at `resumed_at` episodes, it drops the records written after that
    checkpoint, in both: they are written again.
    """

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = metrics_path(run_dir)
        if resumed_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["episode"] <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge, flush_secs=60)

    def write(self, record: dict) -> None:
        """One record: `episode` and metric values (train means of a window, or `val_acc` / `test_acc`)."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "episode":
                self.writer.add_scalar(TENSORBOARD_TAGS.get(key, f"train/{key}"), value, record["episode"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class TrainResult:
    run_dir: Path
    episodes: int
    best_val: float
    best_episode: int
    seconds: float
    trained: bool        # False for parameter-free heads (ProtoNet, plain OTAM): nothing to learn


def training_progress(stage: str, console: Console, enabled: bool) -> Progress:
    """The training bar of both stages; its task carries the fields loss, acc, val and rate (episodes/s), each
    None (shown as "-") until there is a value."""
    columns = [TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
               MetricsColumn(), TimeRemainingColumn()]
    return TrainingProgress(*columns, console=console, disable=not enabled)


class MetricsColumn(ProgressColumn):
    """`loss 1.234 acc 56.7% val 60.1% 812.3 ep/s` of a training task, "-" for a field still None."""

    FIELDS = (("loss", "loss {}", ".3f"), ("acc", "acc {}", ".1%"), ("val", "val {}", ".1%"),
              ("rate", "{} ep/s", ".1f"))

    def render(self, task: Task) -> Text:
        shown = [label.format("-" if task.fields.get(key) is None else format(task.fields[key], spec))
                 for key, label, spec in self.FIELDS]
        return Text(" ".join(shown))


class TrainingProgress(Progress):
    """The live bar on a terminal. Into a pipe or a log file, where rich draws the bar only once it stops, a
    line every PIPE_LINE_SECONDS instead, so that a long run's log shows how it goes."""

    last_line = 0.0

    def update(self, task_id, **fields) -> None:
        super().update(task_id, **fields)
        now = time.monotonic()
        if not self.disable and not self.console.is_terminal and now - self.last_line >= PIPE_LINE_SECONDS:
            self.last_line = now
            self.console.print(self.make_tasks_table(self.tasks))


class MetricsWindow:
    """The optimiser steps since the last metrics.jsonl record: their mean metrics and episodes/s."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def write(self, log: RunLog, episode: int, episodes_per_step: int) -> dict[str, float]:
        """Write the window's means to the run's log, start a new window, return what was written."""
        now = time.perf_counter()
        rate = len(self.steps) * episodes_per_step / max(now - self.started, 1e-9)
        record = {key: float(np.mean([m[key] for m in self.steps])) for key in self.steps[0]}
        record["episodes_per_s"] = rate
        log.write({"episode": episode, **record})
        self.steps, self.started = [], now
        return record

    def restart_clock(self) -> None:
        """Validation time is not training throughput."""
        self.started = time.perf_counter()


def save_validation(run_dir: Path, score: float, *, log: RunLog, split: str, step: int, episode: int,
                    best: tuple[float, int], heads: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    visual: torch.nn.Module | None = None) -> tuple[float, int]:
    """Log the accuracy on the selection episodes of `split` (`val_acc`, or `test_acc` with train.select_on=test),
    checkpoint `best` if it is the best so far and `last` always; return the (best accuracy, its episode). The
    log is flushed with the checkpoint: what a resume keeps is on disk."""
    log.write({"episode": episode, selection_key(split): score})
    log.flush()
    improved = score > best[0]
    if improved:
        best = (score, episode)
    state = {"step": step, "episode": episode, "trained": True, "best_val": best[0], "best_episode": best[1]}
    if improved:
        save_checkpoint(Path(run_dir) / "checkpoints" / "best", heads=heads, visual=visual, state=state)
    save_checkpoint(Path(run_dir) / "checkpoints" / "last", heads=heads, optimizer=optimizer, visual=visual,
                    state=state)
    return best


def open_run_cache(cfg: DictConfig, run_dir: Path, *, resume: bool, console: Console) -> FeatureCache:
    """The cache the run trains from: the one it recorded (resume), the one named in `data.cache`,
    or the one its data settings address (extracted now if missing, repaired if damaged). Refused
    before anything trains if it does not fit the run's dataset, backbone, T or width, or if it is
    damaged (the message names the blocks and the extract command that repairs them)."""
    data = cfg.data
    if data.cache:
        cache = FeatureCache(find_store(Path(data.cache)))
    else:
        from clipspm.stages.extract import PREPARATION, ExtractOptions, extract

        options = ExtractOptions(dataset=data.dataset, root=data.root, split_dir=data.split_dir,
                                 backbone=data.backbone, pretrained=data.pretrained, cache_root=Path(data.cache_dir),
                                 seed=data.seed, check_blocks=False)   # load_run_data checks what it reads
        for name in ("num_frames", "train_views", *PREPARATION):
            if data[name] is not None:
                setattr(options, name, data[name])
        result = extract(options)
        cache = FeatureCache(result.store)
    check_cache_fits(cache, cfg)
    cache.refuse(cache.check(read_blocks=False))   # lost chunks of any split; load_split checks what it reads
    recorded = cfg.data.get("cache_key")
    if resume and recorded and recorded != cache.meta["settings"]:
        raise CacheError(f"{cache.store_path} is not the cache {run_dir} was trained from; resume with that cache")
    data.cache = str(cache.store_path.parent.resolve())
    data.cache_key = cache.meta["settings"]
    if data.get("descriptions"):
        described = Path(data.descriptions)
        if not described.is_file():
            raise ClipspmError(f"data.descriptions {described} is not a file; pass a CSV or JSON of video id -> "
                               f"description, or leave it out (the class prompts stand in)")
        digest = file_sha256(described)
        if resume and data.get("descriptions_sha256") not in (None, digest):
            raise ClipspmError(f"data.descriptions {described} changed since {run_dir} began training; restore it "
                               f"to resume")
        data.descriptions, data.descriptions_sha256 = str(described.resolve()), digest
    return cache


def check_cache_fits(cache: FeatureCache, cfg: DictConfig) -> None:
    """Refuse a cache made for another dataset, backbone, T or width, naming each difference."""
    meta, data = cache.meta, cfg.data
    problems = []
    if not cache.complete:
        problems.append("its extraction did not finish (rerun the extract command to complete it)")
    if meta["settings"]["dataset"] != data.dataset:
        problems.append(f"it holds dataset {meta['settings']['dataset']!r}, the run asks for {data.dataset!r}")
    if data.backbone and meta["model"] != data.backbone:
        problems.append(f"it holds {meta['model']} features, the run asks for backbone {data.backbone}")
    width = feature_width(data.backbone) if data.backbone else None
    if width is not None and width != meta["feature_dim"]:
        problems.append(f"its features are {meta['feature_dim']} wide, {data.backbone} gives {width}")
    if data.num_frames is not None and meta["num_frames"] != data.num_frames:
        problems.append(f"it samples T={meta['num_frames']} frames, the run asks for T={data.num_frames}")
    for name, value in prepared_settings(meta["settings"]).items():
        if data.get(name) is not None and data[name] != value:
            problems.append(f"it was extracted with {name}={value}, the run asks for data.{name}={data[name]}")
    if problems:
        raise CacheError(f"cache {cache.store_path.parent} does not fit this run: " + "; ".join(problems)
                         + ". Pass a matching --cache, or leave it out to use (or extract) the right one")


def prepared_settings(settings: dict) -> dict[str, str]:
    """normalize, sampling and class_names of a cache, from its settings (absent: the extract defaults, which a
    cache's settings leave out)."""
    from clipspm.stages.extract import DEFAULTS, PREPARATION

    return {name: settings.get(name, DEFAULTS[name]) for name in PREPARATION}


@dataclass
class RunData:
    """One split's usable videos on the training device."""

    features: torch.Tensor     # [n, views, T, C] (float16 storage; episodes are gathered as float32)
    labels: torch.Tensor       # [n] class rows
    class_text: torch.Tensor   # [classes, C] prompt feature per class: mean of the first R templates (Eq. 2)
    video_ids: list[str]
    train_views: int           # views 1..V are augmented train views; 0 means only the test view exists
    video_text: torch.Tensor | None = None   # [n, C] each video's description through the text tower, or None

    def random_views(self, index: EpisodeIndex, generator: torch.Generator) -> torch.Tensor | None:
        """One train view per video per episode [E, N*(K+M)], or None when there are none."""
        if self.train_views == 0:
            return None
        shape = (index.support.shape[0], index.support.shape[1] + index.query.shape[1])
        return torch.randint(1, self.train_views + 1, shape, generator=generator, device=self.features.device)


def load_run_data(cache: FeatureCache, cfg: DictConfig, split: str, device: torch.device, *,
                  test_view: bool = False, inputs: HeadInputs | None = None) -> RunData:
    """Read a split once, checked against the cache's checksums, and move it to `device`; `test_view`
    keeps only view 0 (val/test). With `data.descriptions`, each video's description goes through the
    text tower of `inputs`."""
    views = [0] if test_view else slice(None)
    loaded = cache.load_split(split, views)
    if loaded.rows.size == 0:
        raise CacheError(f"cache {cache.store_path.parent} has no usable {split} videos")
    return RunData(torch.from_numpy(loaded.features).to(device), torch.from_numpy(loaded.labels).to(device),
                   class_prompts(cache, cfg, device), loaded.video_ids,
                   0 if test_view else loaded.features.shape[1] - 1,
                   video_text=description_features(cfg, loaded.video_ids, inputs))


def head_inputs(cfg: DictConfig, cache: FeatureCache, device: torch.device, clip: ClipModel | None = None
                ) -> HeadInputs:
    """What the method of `cfg` needs beside the cache (registry STAGE_INPUTS): the frozen text tower of
    the model the cache was extracted with (of `clip` when the caller holds that model already), loaded
    once onto `device`; the cache's class texts. Checks `data.descriptions` against the method and the
    file the run was trained with."""
    method = get_method(cfg.model.kind)
    described = cfg.data.get("descriptions")
    if described and "video_text" not in method.needs:
        raise ClipspmError(f"data.descriptions is set, but model.kind={method.name} reads no per-video text; "
                           f"leave data.descriptions out")
    tower = None
    if "text_tower" in method.needs or described:
        tower = TextTower(clip.model, clip.name) if clip is not None else load_text_tower(cfg, cache, device)
    return HeadInputs(text_tower=tower, class_texts=tuple(cache.class_texts.tolist()))


def load_text_tower(cfg: DictConfig, cache: FeatureCache, device: torch.device) -> TextTower:
    """The text tower of the model `cache` was extracted with, its weights checked against the cache's
    provenance. A cache of a fine-tuned visual tower (a finetune run's test cache) is checked against the
    cache the run trained from: tuning leaves the text tower as it was."""
    if not cache.meta["settings"].get("tuned_weights_sha256"):
        return TextTower(clip_of_cache(cache, device).model, cache.meta["model"])
    with FeatureCache(find_store(Path(cfg.data.cache))) as trained:
        if (trained.meta["model"], trained.meta["pretrained"]) != (cache.meta["model"], cache.meta["pretrained"]):
            raise CacheError(f"cache {cache.store_path.parent} was encoded by a tuned {cache.meta['model']} tower, "
                             f"but the run trained from {trained.meta['model']} {trained.meta['pretrained']}")
        return TextTower(clip_of_cache(trained, device).model, cache.meta["model"])


def clip_of_cache(cache: FeatureCache, device: torch.device) -> ClipModel:
    """The CLIP model a cache was extracted with (random weights again from its seed), refused when its
    weights are not those the cache records."""
    meta = cache.meta
    clip = load_clip(meta["model"], meta["pretrained"], device, seed=meta["settings"]["seed"],
                     normalize=prepared_settings(meta["settings"])["normalize"])
    if clip.weight_sha256 != meta["weight_sha256"]:
        raise CacheError(f"the {meta['model']} weights {meta['pretrained']} are not those cache "
                         f"{cache.store_path.parent} was made with (sha256 {clip.weight_sha256[:12]} vs "
                         f"{meta['weight_sha256'][:12]}); pass the original weights or re-extract the cache")
    return clip


def description_features(cfg: DictConfig, video_ids: list[str], inputs: HeadInputs | None) -> torch.Tensor | None:
    """[n, C] the descriptions of `video_ids` (data.descriptions) through the text tower; None without a file."""
    path = cfg.data.get("descriptions")
    if not path:
        return None
    if not Path(path).is_file():
        raise ClipspmError(f"data.descriptions {path} is not a file (the run was trained with it); restore it")
    recorded, digest = cfg.data.get("descriptions_sha256"), file_sha256(Path(path))
    if recorded and recorded != digest:
        raise ClipspmError(f"data.descriptions {path} changed since the run was trained (sha256 {digest[:12]}, "
                           f"trained with {recorded[:12]}); restore the file or train again")
    if inputs is None or inputs.text_tower is None:
        raise ClipspmError("data.descriptions needs the text tower: load the split with the stage's head_inputs")
    texts = read_descriptions(Path(path), video_ids)
    return inputs.text_tower.encode(texts)


def describe_video_text(cfg: DictConfig) -> str:
    """What stood for each video's description in a run that reads per-video text (results.json)."""
    path = cfg.data.get("descriptions")
    if not path:
        return "class prompts (no data.descriptions)"
    return f"{path} (sha256 {file_sha256(Path(path))[:12]})"


def class_prompts(cache: FeatureCache, cfg: DictConfig, device: torch.device) -> torch.Tensor:
    """[classes, C] prompt feature of every class: the mean of its first R template embeddings (Eq. 2)."""
    templates = cfg.model.num_templates
    text = cache.text_features
    if not 1 <= templates <= text.shape[1]:
        raise ClipspmError(f"model.num_templates={templates}, but the cache holds {text.shape[1]} templates")
    return torch.from_numpy(text[:, :templates].mean(axis=1)).float().to(device)


def selection_key(split: str) -> str:
    """The metrics.jsonl key of the scores that pick the best checkpoint: val_acc, or test_acc."""
    return f"{split}_acc"


def selection_episodes(cache: FeatureCache, cfg: DictConfig, labels: torch.Tensor,
                       video_ids: list[str]) -> EpisodeIndex:
    """The fixed episodes that pick a run's `best` checkpoint, stored beside its cache and shared by both stages:
    the val episodes (train.val_*), or with train.select_on=test the stored test episodes `eval` scores
    (the released code's protocol). `labels` and `video_ids` are those of the split `train.select_on` names."""
    t = cfg.train
    if t.select_on == "test":
        path = eval_episodes_file(cache.store_path.parent, cfg)
        queries, episodes, seed = cfg.eval.queries, cfg.eval.episodes, cfg.eval.seed
    else:
        path = cache.store_path.parent / "episodes" / episode_file_name("val", t.ways, t.shots, t.val_queries,
                                                                        t.val_episodes, t.seed)
        queries, episodes, seed = t.val_queries, t.val_episodes, t.seed
    index, _ = fixed_episodes(path, labels, video_ids, ways=t.ways, shots=t.shots, queries=queries,
                              episodes=episodes, seed=seed, split=t.select_on)
    return index


def eval_episodes_file(cache_dir: Path, cfg: DictConfig, *, episodes: int | None = None,
                       queries: int | None = None) -> Path:
    """Where the stored test episodes of a run's settings live beside the cache in `cache_dir` (eval.episodes,
    eval.queries unless given, eval.seed)."""
    t, e = cfg.train, cfg.eval
    name = episode_file_name("test", t.ways, t.shots, e.queries if queries is None else queries,
                             e.episodes if episodes is None else episodes, e.seed)
    return Path(cache_dir).resolve() / "episodes" / name
