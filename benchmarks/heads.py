"""Stage two speed: heads episodes/s from cached features, the visual tower in the loop, OTAM, stage wall time.

Run `python benchmarks/heads.py [--quick]`; `run()` returns the measurements. Sections:

    episodes      episodes/s of the heads stage on random features of a cache's shape (T=8, 1+4 views, float16
                  on the device), shipped heads config, 5-way 1- and 5-shot, C=1024 (RN50) and C=512 (ViT-B/16).
                  train: the trainer's loop body (EpisodeSampler, then `training_step`: build_episode, the loss,
                  backward, Adam; the metrics read back) on E = train.episodes_per_step episodes; eval:
                  `evaluate_episodes`, eval.batch per forward
    tower         one 5-way 1-shot 4-query training episode, forward + backward, same heads at C=1024: gathered
                  from cached features, against the finetune stage's `forward_episodes` with the RN50 visual
                  tower (random weights) in the loop on 8 random 224x224 frames per video (no decoding). The
                  tower frozen (eval mode, no gradient: what training the heads without a cache would cost),
                  and trainable as the finetune stage's defaults have it (whole tower, activation checkpointing)
    text_tower    episodes/s of a head that runs the CLIP text tower inside its step (MCDP-FSAR: its learned
                  context through the frozen text tower of RN50 / ViT-B/16, random weights, class prompts standing
                  in for descriptions) against heads on the cache's fixed text features (CLIP-FSAR, CLIP-SPM), on
                  the same random features, 5-way 1-shot, shipped configs; train and eval as in `episodes`, with
                  TEXT_TOWER_STEP episodes per optimiser step (fewer on a CPU, where a step at full size takes minutes)
    otam          benchmarks/otam.py: vectorised OTAM against the cell-by-cell recursion, forward + backward
    stage         wall time of train.episodes training episodes (with validation every train.val_every) and
                  eval.episodes test episodes at C=1024, extrapolated from the episodes/s of `episodes`

Rounds are interleaved; the best round of each measurement is reported.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

if __package__ in (None, ""):  # run as `python benchmarks/heads.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, describe_device, interleaved, print_table, seconds_per_call
from benchmarks.otam import run as run_otam
from clipspm.config import load_config, resolve_config
from clipspm.pipeline.encoder import load_clip
from clipspm.pipeline.episode import episode_step, metric_values
from clipspm.pipeline.methods import HeadInputs, build_head
from clipspm.pipeline.text_tower import TextTower
from clipspm.pipeline.tower import enable_activation_checkpointing, train_mode, unfreeze
from clipspm.stages.cuda_graph import GraphedStep
from clipspm.stages.episodes import EpisodeSampler, build_episode, step_generator
from clipspm.stages.evaluate import evaluate_episodes
from clipspm.stages.finetune import MicroBatch, forward_episodes, training_precision
from clipspm.stages.heads import training_step
from clipspm.stages.runs import RunData

EXTRACT = load_config("extract")         # T and the number of train views of a cache

WIDTHS = {"RN50": 1024, "ViT-B/16": 512}
SHOTS = (1, 5)
CLASSES = {"train": 64, "test": 24}      # the few-shot Kinetics-100 split
VIDEOS_PER_CLASS = 30
TOWER = "RN50"
SECTIONS = ("episodes", "tower", "text_tower", "otam", "stage")
# Work per timed call: a few hundred episodes on a GPU; on a CPU, where one training step at C=1024 takes
# seconds, one step and one eval batch.
TRAIN_STEPS = {"cpu": 1, "cuda": 25}
EVAL_EPISODES = {"cpu": 250, "cuda": 2000}
CACHE_EPISODES = {"cpu": 5, "cuda": 50}
WARM_UP_EPISODES = 25
TEXT_METHODS = ("clipfsar", "clipspm", "mcdp")
TEXT_TOWER_STEP = {"cpu": 2, "cuda": 16}          # episodes per optimiser step in the text_tower section
TEXT_TOWER_EVAL = {"cpu": 10, "cuda": 1000}       # eval episodes per timed call there


def run(sections: tuple[str, ...] = SECTIONS, rounds: int = 3, tower_rounds: int = 2,
        device: str | None = None) -> dict:
    """Each section's rows (see the module docstring); `tower_rounds` bounds the slow tower-in-the-loop episodes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # as the heads trainer does
    result = {"name": "heads", "device": describe_device(device), "rounds": rounds}
    if "episodes" in sections or "stage" in sections:
        result["episodes"] = _episodes_per_second(device, rounds)
    if "tower" in sections:
        result["tower"] = _cache_against_tower(device, tower_rounds)
    if "text_tower" in sections:
        result["text_tower"] = _text_tower_in_the_loop(device, rounds)
    if "otam" in sections:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # as benchmarks/otam.py does: small tensors, one thread measures the method
        try:
            otam = run_otam(device=str(device), rounds=rounds)
        finally:
            torch.set_num_threads(threads)
        result["otam"] = [{"C": otam["dim"], "threads": otam["threads"], **row} for row in otam["rows"]]
    if "stage" in sections:
        result["stage"] = _stage_time(result["episodes"])
    return result


def _heads_config(shots: int) -> DictConfig:
    return resolve_config("heads", "synthetic", overrides=[f"train.shots={shots}"])


def random_split(classes: int, width: int, views: int, device: torch.device) -> RunData:
    """A split as the heads stage holds it: float16 features [n, views, T, C], labels, class prompts."""
    generator = torch.Generator().manual_seed(classes * width)
    n = classes * VIDEOS_PER_CLASS
    features = torch.randn(n, views, EXTRACT.num_frames, width, generator=generator).to(device, torch.float16)
    labels = torch.arange(classes).repeat_interleave(VIDEOS_PER_CLASS).to(device)
    class_text = torch.randn(classes, width, generator=generator).to(device)
    return RunData(features, labels, class_text, [f"video{i}" for i in range(n)], train_views=views - 1)


# ---- episodes/s of the heads stage

def _episodes_per_second(device: torch.device, rounds: int) -> list[dict]:
    candidates, labels = {}, []
    for (backbone, width), shots in itertools.product(WIDTHS.items(), SHOTS):
        cfg = _heads_config(shots)
        train = random_split(CLASSES["train"], width, 1 + EXTRACT.train_views, device)
        test = random_split(CLASSES["test"], width, 1, device)
        key = (backbone, width, shots)
        candidates[(*key, "train")] = train_rate(cfg, train, device)
        candidates[(*key, "eval")] = eval_rate(cfg, test, device)
        labels.append(key)
    best = {key: max(rates) for key, rates in interleaved(candidates, rounds).items()}
    return [{"backbone": backbone, "C": width, "shots": shots,
             "train episodes/s": round(best[(backbone, width, shots, "train")], 1),
             "eval episodes/s": round(best[(backbone, width, shots, "eval")], 1)}
            for backbone, width, shots in labels]


def train_rate(cfg: DictConfig, data: RunData, device: torch.device, inputs: HeadInputs | None = None
               ) -> Callable[[], float]:
    """Episodes/s of the heads trainer's optimiser step (clipspm/stages/heads.py), as its loop calls it."""
    step, _ = trainer_steps(cfg, data, device, inputs=inputs)
    step()  # first-call costs: allocations, kernel choices
    return lambda: cfg.train.episodes_per_step / seconds_per_call(step, TRAIN_STEPS[device.type], device)


def trainer_steps(cfg: DictConfig, data: RunData, device: torch.device, *, graph: bool = False,
                  capturable: bool | None = None, compile: str | None = None, seed: int | None = None,
                  inputs: HeadInputs | None = None) -> tuple[Callable[[], dict[str, float]], torch.nn.Module]:
    """The heads trainer's loop body from step 0 as a call: draw the step's episodes, take the optimiser step
    (`training_step`; with `graph` replayed from a CUDA graph on CUDA as train.cuda_graph does, with `compile` the
    heads under torch.compile with that backend), read the metrics back. Also returns the head being trained."""
    t = cfg.train
    seed = t.seed if seed is None else seed
    graphed = graph and device.type == "cuda"
    torch.manual_seed(seed)
    head = build_head(cfg.model, cfg.loss, data.features.shape[-1], inputs).to(device)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas),
                                 weight_decay=t.weight_decay, capturable=graphed if capturable is None else capturable)
    forward = torch.compile(head, backend=compile) if compile else head
    step = training_step(forward, optimizer, data, data.labels.unique(), cfg.loss, t.shots, t.queries,
                         t.episodes_per_step)
    if graphed:
        step = GraphedStep(step)
    sampler = EpisodeSampler(data.labels, t.ways, t.shots, t.queries)
    numbers = itertools.count()

    def drive() -> dict[str, float]:
        number = next(numbers)
        generator = step_generator(seed, number, device)
        torch.manual_seed(seed * 1_000_003 + number)   # dropout, as the trainer seeds it
        index = sampler.sample(t.episodes_per_step, generator)
        return metric_values(step(index.support, index.query, index.classes, data.random_views(index, generator)))

    return drive, head


def eval_rate(cfg: DictConfig, data: RunData, device: torch.device, episodes: int | None = None,
              inputs: HeadInputs | None = None) -> Callable[[], float]:
    """Episodes/s of `evaluate_episodes` on episodes drawn like the stored test episodes (`episodes` of them per
    call; default: EVAL_EPISODES of the device type)."""
    t = cfg.train
    head = build_head(cfg.model, cfg.loss, data.features.shape[-1], inputs).to(device)
    index = EpisodeSampler(data.labels.cpu(), t.ways, t.shots, cfg.eval.queries).sample(
        episodes or EVAL_EPISODES[device.type], torch.Generator().manual_seed(cfg.eval.seed))
    evaluate_episodes(head, index.slice(0, WARM_UP_EPISODES), data, batch=cfg.eval.batch)  # first-call costs
    return lambda: len(index) / seconds_per_call(
        lambda: evaluate_episodes(head, index, data, batch=cfg.eval.batch), 1, device)


# ---- one episode from the cache against one with the visual tower in the loop

def _cache_against_tower(device: torch.device, rounds: int) -> list[dict]:
    cfg, ft = _heads_config(1), resolve_config("finetune", "synthetic").finetune
    clip = load_clip(TOWER, "none", device)
    tower = clip.model.visual
    if ft.activation_checkpointing:
        enable_activation_checkpointing(tower)
    data = random_split(CLASSES["train"], clip.feature_dim, 1 + EXTRACT.train_views, device)
    t = cfg.train
    torch.manual_seed(t.seed)
    head = build_head(cfg.model, cfg.loss, clip.feature_dim).to(device)
    generator = step_generator(t.seed, 0, device)
    index = EpisodeSampler(data.labels, t.ways, t.shots, t.queries).sample(1, generator)
    views = data.random_views(index, generator)
    base_classes = data.labels.unique()
    videos = index.support.shape[1] + index.query.shape[1]
    frames = torch.randint(0, 256, (1, videos, EXTRACT.num_frames, 3, clip.image_size, clip.image_size),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    precision = training_precision(ft.precision, device)

    def from_cache() -> None:
        head.train()
        episode = build_episode(index, data.features, data.labels, data.class_text, views, base_classes)
        episode_step(head, episode, cfg.loss).loss.backward()
        head.zero_grad(set_to_none=True)

    def tower_in_the_loop(trainable: bool) -> None:
        if trainable:
            unfreeze(tower, ft.unfreeze, ft.blocks)
            train_mode(tower)
        else:
            tower.requires_grad_(False).eval()
        head.train()
        forward_episodes(clip, head, MicroBatch(0, 0, index), frames, data.labels, data.class_text, base_classes,
                         precision, cfg.loss, 1).loss.backward()
        head.zero_grad(set_to_none=True)
        tower.zero_grad(set_to_none=True)

    from_cache()  # first-call costs; on a CPU the tower's are small beside its minutes per episode
    if device.type == "cuda":
        tower_in_the_loop(False)
        tower_in_the_loop(True)
    seconds = interleaved({
        "from the cache": lambda: seconds_per_call(from_cache, CACHE_EPISODES[device.type], device),
        f"{TOWER} in the loop, frozen": lambda: seconds_per_call(lambda: tower_in_the_loop(False), 1, device),
        f"{TOWER} in the loop, trainable": lambda: seconds_per_call(lambda: tower_in_the_loop(True), 1, device),
    }, rounds)
    cache = min(seconds["from the cache"])
    return [{"episode": name, "videos x frames": f"{videos}x{EXTRACT.num_frames}", "precision": precision,
             "ms": round(min(values) * 1e3, 1), "cost vs cache": round(min(values) / cache, 1)}
            for name, values in seconds.items()]


# ---- the text tower in the training step against fixed text features

def _text_tower_in_the_loop(device: torch.device, rounds: int) -> list[dict]:
    per_step, eval_episodes = TEXT_TOWER_STEP[device.type], TEXT_TOWER_EVAL[device.type]
    class_texts = tuple(f"doing action number {i}" for i in range(max(CLASSES.values())))
    candidates, labels = {}, []
    for backbone, width in WIDTHS.items():
        clip = load_clip(backbone.replace("/", "-"), "none", device)     # open_clip spells it ViT-B-16
        inputs = HeadInputs(text_tower=TextTower(clip.model, clip.name), class_texts=class_texts)
        train = random_split(CLASSES["train"], width, 1 + EXTRACT.train_views, device)
        test = random_split(CLASSES["test"], width, 1, device)
        for kind in TEXT_METHODS:
            cfg = resolve_config("heads", "synthetic", overrides=[f"model.kind={kind}", "train.shots=1",
                                                                  f"train.episodes_per_step={per_step}"])
            candidates[(backbone, kind, "train")] = train_rate(cfg, train, device, inputs)
            candidates[(backbone, kind, "eval")] = eval_rate(cfg, test, device, eval_episodes, inputs)
            labels.append((backbone, width, kind))
    best = {key: max(rates) for key, rates in interleaved(candidates, rounds).items()}
    return [{"backbone": backbone, "C": width, "method": kind,
             "text tower in the step": "yes" if kind == "mcdp" else "no",
             f"train episodes/s (E={per_step})": round(best[(backbone, kind, "train")], 2),
             "eval episodes/s": round(best[(backbone, kind, "eval")], 1)}
            for backbone, width, kind in labels]


# ---- extrapolated stage wall time

def _stage_time(episodes: list[dict]) -> list[dict]:
    rows = []
    for row in episodes:
        if row["C"] != WIDTHS[TOWER]:
            continue
        cfg = _heads_config(row["shots"])
        t, e = cfg.train, cfg.eval
        train_s = t.episodes / row["train episodes/s"]
        val_s = t.episodes // t.val_every * t.val_episodes / row["eval episodes/s"]
        rows.append({"backbone": row["backbone"], "shots": row["shots"],
                     f"train {t.episodes} episodes": _duration(train_s),
                     f"+ validation ({t.episodes // t.val_every}x{t.val_episodes})": _duration(val_s),
                     f"test {e.episodes} episodes": _duration(e.episodes / row["eval episodes/s"])})
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round each (a smoke run)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--tower-rounds", type=int, default=2,
                        help="episodes with the tower in the loop (slow on a CPU: a minute or more each)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tower_rounds = 1, 1
    result = run(tuple(args.sections), args.rounds, args.tower_rounds, args.device)
    where = f"{result['device']}, best of {result['rounds']} interleaved rounds"
    defaults = resolve_config("heads", "synthetic", overrides=["train.episodes=20000"])
    t, e = defaults.train, defaults.eval
    titles = {
        "episodes": f"Heads stage, {t.ways}-way, episodes/s (train: E={t.episodes_per_step} per step, {t.queries} "
                    f"queries; eval: {e.batch} per forward, {e.queries} query), {where}",
        "tower": f"One {t.ways}-way 1-shot {t.queries}-query training episode, heads forward+backward, "
                 f"C={WIDTHS[TOWER]}: from cached features or with the visual tower in the loop, "
                 f"{result['device']}, best of {args.tower_rounds}",
        "text_tower": f"Heads with the CLIP text tower in the step (mcdp) against fixed text features, {t.ways}-way "
                      f"1-shot, episodes/s (train: {t.queries} queries; eval: {e.queries} query), {where}",
        "otam": f"OTAM forward+backward, ms per call, T=8, 20 queries x 5 prototypes per episode, {where}",
        "stage": f"Heads stage wall time, extrapolated from the episodes/s above, {result['device']}",
    }
    for section in SECTIONS:
        if section in result:
            print_table(titles[section], result[section])
    print(f"command: {command_line()}")


if __name__ == "__main__":
    main()
