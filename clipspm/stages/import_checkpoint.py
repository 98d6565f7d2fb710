"""A checkpoint of the released CLIP-SPM code as a run of ours (`clipspm import-checkpoint`).

The released `run/main_run.py` writes `checkpoint_{best,iter_N}.pt` with torch.save: a dict of
`iteration`, `model_state_dict`, `optimizer_state_dict`, `scheduler` (a MultiStepLR state dict, whose
`milestones` is a collections.Counter) and `acc` (test accuracy in %, a numpy float64). In
`model_state_dict`, `backbone.*` (`backbone.module.*` when saved from DataParallel) is the OpenAI CLIP
visual tower, the rest is the head.

    SRC.pt -> torch's weights-only unpickler (RELEASED_GLOBALS and nothing else: no code runs)
           -> head: released_heads_state_dict (our official profile), widths read from the tensors
           -> tower: the open_clip tower of --backbone, key by key and shape by shape
           -> RUN/config.yaml, RUN/checkpoints/best/{heads,visual}.safetensors, RUN/checkpoints/best/state.json

Everything is checked before anything is written, and the run directory appears whole (written under a
temporary name, then renamed). It is a run like a finetune run's: `clipspm eval RUN` scores it through a
test cache its tower extracts, `clipspm train --stage finetune --init RUN` fine-tunes from it. Its config
holds what the released model saw: frames in [0, 1] without CLIP's mean/std, the released frame sampling
and, where the released configs name them, the released class names (README "Released checkpoints").
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from clipspm.config import resolve_config
from clipspm.datasets.class_names import released_names
from clipspm.datasets.registry import SPECS
from clipspm.errors import ClipspmError, damaged_file
from clipspm.pipeline.encoder import feature_width, file_sha256, first_line, load_clip
from clipspm.pipeline.methods import build_head
from clipspm.pipeline.methods.clipspm import released_head_widths, released_heads_state_dict
from clipspm.stages.checkpoint import save_checkpoint
from clipspm.stages.runs import CONFIG_NAME

# OpenAI's CLIP weights were trained with QuickGELU; open_clip builds it into these configs (a weight file given
# to plain `ViT-B-16` would get exact GELU in both towers, plain `RN50` in its text tower).
OPENAI_MODELS = {"RN50": "RN50-quickgelu", "ViT-B-16": "ViT-B-16-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu"}
RELEASED_NUM_FRAMES = 8          # configs/clipspm/*.yaml DATA.SEQ_LEN
BACKBONE_PREFIXES = ("backbone.module.", "backbone.")   # DataParallel's first: it also starts with `backbone.`
FORMAT = "hnlxy/CLIP-SPM run/main_run.py save_checkpoint"


def released_globals() -> list:
    """What torch's weights-only unpickler admits beyond tensors and plain containers: the scheduler's Counter
    and `acc`, a numpy float64 (pickled by numpy 1 as numpy.core.multiarray.scalar, by numpy 2 as
    numpy._core.multiarray.scalar)."""
    multiarray = getattr(np, "_core", None) or np.core
    scalar = multiarray.multiarray.scalar
    return [collections.Counter, np.dtype, type(np.dtype(np.float64)),
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


@dataclass
class ImportOptions:
    source: Path                 # the released .pt
    out: Path                    # the run directory to make (must not exist, or be empty)
    backbone: str                # RN50 | ViT-B-16 (their OpenAI QuickGELU configs are used) | another open_clip model
    method: str = "clipspm"
    dataset: str | None = None   # None: the released dataset whose parameter set fits the gate widths, if one does
    shots: int | None = None     # None: the config's train.shots
    cache_dir: Path = Path("caches")


@dataclass
class ImportResult:
    run_dir: Path
    source: Path
    sha256: str
    iteration: int | None
    acc: float | None
    dataset: str
    model: str                   # the open_clip model the tower was mapped onto
    shots: int
    widths: dict[str, int]       # released_head_widths
    tower_entries: int
    head_entries: int
    class_names: str             # released | benchmark (no released names for the dataset)
    notes: list[str] = field(default_factory=list)


def import_checkpoint(options: ImportOptions) -> ImportResult:
    """Check a released CLIP-SPM checkpoint against our official profile and write it as a run directory."""
    source, out = Path(options.source), Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipspmError(f"--out {out} already exists; pass a new run directory")
    if options.method != "clipspm":
        raise ClipspmError(f"--method {options.method}: only checkpoints of the released CLIP-SPM code "
                           f"(hnlxy/CLIP-SPM, --method clipspm) can be imported")
    if options.dataset is not None and options.dataset not in SPECS:
        raise ClipspmError(f"--dataset {options.dataset}: unknown; choose one of {', '.join(SPECS)}")
    released = read_released(source)
    tower_state, head_state, prefix = split_model_state(released["model_state_dict"], source)
    widths = released_head_widths(head_state)
    model = OPENAI_MODELS.get(options.backbone, options.backbone)
    dataset = options.dataset or fitting_dataset(widths)
    cfg = imported_config(options, model, dataset, widths)
    tower = load_clip(model, "none").model.visual
    check_tower(tower, tower_state, prefix, model)
    tower.load_state_dict(tower_state)
    head = build_head(cfg.model, cfg.loss, widths["C"])
    head.load_state_dict(released_heads_state_dict(head_state))

    sha256 = file_sha256(source)
    iteration, acc = _number(released.get("iteration"), int), _number(released.get("acc"), float)
    state = {"imported_from": str(source.resolve()), "sha256": sha256, "format": FORMAT, "iteration": iteration,
             "acc": acc}
    staging = out.with_name(out.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    OmegaConf.save(cfg, staging / CONFIG_NAME)
    save_checkpoint(staging / "checkpoints" / "best", heads=head, visual=tower, state=state)
    if out.exists():
        out.rmdir()     # empty, checked above
    staging.rename(out)
    notes = [] if cfg.data.class_names == "released" else [
        f"{dataset} has no released class names: its class texts follow the benchmark's rule"]
    return ImportResult(out, source, sha256, iteration, acc, dataset, model, cfg.train.shots, widths,
                        len(tower_state), len(head_state), cfg.data.class_names, notes)


def read_released(path: Path) -> dict:
    """The released checkpoint's dict, through torch's weights-only unpickler with `released_globals` admitted.
    A pickle that would call anything else is refused (exit 2) without running it."""
    fix = "pass a checkpoint_*.pt written by the released CLIP-SPM code (run/main_run.py)"
    if not path.is_file():
        raise ClipspmError(f"released checkpoint {path} is not a file; {fix}")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(released_globals()):
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        calls = _foreign_globals(path)
        if calls:
            raise ClipspmError(f"{path} is not a released CLIP-SPM checkpoint: its pickle names {', '.join(calls)}, "
                               f"which loading it would call. It was not executed (read with torch's weights-only "
                               f"unpickler, which admits tensors, numbers, containers, a collections.Counter and "
                               f"numpy float64 scalars) and nothing was written; {fix}") from None
        raise damaged_file(path, "released checkpoint", fix, error) from None
    except Exception as error:   # a zip that does not open, a truncated file: the file, not us
        raise (damaged_file(path, "released checkpoint", fix, error)
               or ClipspmError(f"released checkpoint {path} cannot be read ({first_line(error)}); {fix}")) from None
    state = loaded.get("model_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        keys = ", ".join(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise ClipspmError(f"{path} holds no `model_state_dict` of tensors (it holds: {keys}); {fix}")
    return loaded


def _foreign_globals(path: Path) -> list[str]:
    """The globals a pickle names beyond what torch and `released_globals` admit, found without unpickling."""
    allowed = {name for item in released_globals() if isinstance(item, tuple) for name in item[1:]}
    allowed |= {f"{item.__module__}.{item.__qualname__}" for item in released_globals() if not isinstance(item, tuple)}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:    # not a zip archive (legacy torch.save format): the unpickler's message names the first
        return []
    return [name for name in found if name not in allowed]


def split_model_state(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(tower entries without their prefix, head entries, the prefix): `backbone.module.` or `backbone.`."""
    prefixes = {next(p for p in BACKBONE_PREFIXES if key.startswith(p)) for key in state if key.startswith("backbone.")}
    if not prefixes:
        raise ClipspmError(f"{path} holds no visual tower (no `backbone.*` entries in its model_state_dict); a "
                           f"released CLIP-SPM checkpoint holds the tuned CLIP visual tower beside the head")
    if len(prefixes) > 1:
        raise ClipspmError(f"{path} holds the tower under both `backbone.` and `backbone.module.`; keep one")
    prefix = prefixes.pop()
    tower = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    head = {key: value for key, value in state.items() if not key.startswith("backbone.")}
    return tower, head, prefix


def fitting_dataset(widths: dict[str, int]) -> str:
    """The released dataset (configs/released_class_names.yaml) whose parameter set gives the gate widths; refused
    when none or several do (the gates' slope and α, which differ, are not in the tensors)."""
    fits = [name for name in released_names() if not _gate_problems(_official(name), widths)]
    if len(fits) == 1:
        return fits[0]
    told = (f"fit {', '.join(fits)} alike (they differ in the gates' slope and α, which the tensors do not show)"
            if fits else f"fit no released parameter set ({', '.join(released_names())})")
    raise ClipspmError(f"the gate widths of this checkpoint (text {widths['GT']}, vision {widths['GV']} at C="
                       f"{widths['C']}) {told}: pass --dataset, the dataset it was trained on")


def imported_config(options: ImportOptions, model: str, dataset: str, widths: dict[str, int]) -> DictConfig:
    """The run config of the import: the finetune stage, model.profile official with the dataset's parameter set,
    the tensors' widths, the released frame preparation. Refused, naming the keys, where the tensors do not fit
    the backbone or the dataset's parameter set."""
    base = _official(dataset)
    c, width = widths["C"], feature_width(model)
    if width is None:
        raise ClipspmError(f"--backbone {options.backbone}: open_clip knows no model {model}; pass RN50 or ViT-B-16")
    problems = []
    if c != width:
        problems.append(f"the head is C={c} wide (motion_conv1.weight [C, C, 3]) but {model} gives features "
                        f"{width} wide: pass the --backbone it was trained with (RN50: 1024, ViT-B-16: 512)")
    for ours, theirs, what in (("I", "A", "attention width (to_q.weight [heads x head_dim, C])"),
                               ("M", "B", "MLP width (layers.0.1.net.0.weight [hidden, C])")):
        if widths[ours] != widths[theirs]:
            problems.append(f"context2 and context1 differ in {what}: {widths[ours]} vs {widths[theirs]}; the official "
                            f"profile gives both transformers one width")
    if widths["I"] % base.model.num_heads:
        problems.append(f"the attention width {widths['I']} (context2.layers.0.0.fn.to_q.weight) does not split into "
                        f"{base.model.num_heads} heads, the released count")
    problems += _gate_problems(base, widths)
    if problems:
        raise ClipspmError(f"{options.source} does not fit {dataset} on {model}: " + "; ".join(problems))
    names = "released" if dataset in released_names() else "benchmark"
    overrides = [f"data.backbone={model}", "data.pretrained=openai", f"data.num_frames={RELEASED_NUM_FRAMES}",
                 "data.normalize=none", "data.sampling=released", f"data.class_names={names}",
                 "train.select_on=test",   # run/main_run.py keeps as best the checkpoint of the best test accuracy
                 f"data.cache_dir={options.cache_dir}", f"model.head_dim={widths['I'] // base.model.num_heads}",
                 f"model.mlp_hidden={widths['M']}", f"model.prompt_hidden={widths['P']}"]
    if options.shots is not None:
        overrides.append(f"train.shots={options.shots}")
    return _official(dataset, overrides)


def _official(dataset: str, overrides: list[str] | None = None) -> DictConfig:
    return resolve_config("finetune", dataset, overrides=["model.kind=clipspm", "model.profile=official",
                                                          *(overrides or [])])


def _gate_problems(cfg: DictConfig, widths: dict[str, int]) -> list[str]:
    """Where the gate widths differ from int(r·C) of `cfg`'s parameter set (run/run.py mid_dim_text, _vision)."""
    c, problems = widths["C"], []
    for symbol, gate, ratio in (("GT", "gate_text", cfg.model.gate_text_ratio),
                                ("GV", "gate_vision", cfg.model.gate_vision_ratio)):
        if widths[symbol] != int(c * ratio):
            problems.append(f"{gate}.0.weight is [{widths[symbol]}, {c}] and {gate}.2.weight [{c}, {widths[symbol]}], "
                            f"but the parameter set of {cfg.data.dataset} makes that gate int({ratio} x {c}) = "
                            f"{int(c * ratio)} wide")
    return problems


def check_tower(tower: torch.nn.Module, state: dict[str, Tensor], prefix: str, model: str) -> None:
    """Refuse tower entries that do not match open_clip's `model` tower, naming them (with `prefix`)."""
    expected = {key: tuple(value.shape) for key, value in tower.state_dict().items()}
    missing = [prefix + key for key in expected if key not in state]
    unexpected = [prefix + key for key in state if key not in expected]
    wrong = [f"{prefix}{key} {list(value.shape)} (expected {list(expected[key])})" for key, value in state.items()
             if key in expected and tuple(value.shape) != expected[key]]
    problems = [f"{label} {_listed(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("of other shapes:", wrong)) if items]
    if problems:
        raise ClipspmError(f"the tower of this checkpoint is not open_clip's {model} visual tower: "
                           + "; ".join(problems) + ". Pass the --backbone it was trained with")


def _listed(items: list[str], shown: int = 8) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _number(value, kind: type) -> int | float | None:
    """`iteration` / `acc` as a plain number (a numpy scalar or 0-dim tensor too); None if absent or not a number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return kind(value)
    return None


def summary(result: ImportResult) -> dict:
    """What `clipspm import-checkpoint` prints."""
    return {"run": str(result.run_dir), "source": f"{result.source} (sha256 {result.sha256[:16]})",
            "released": f"iteration {result.iteration}, acc {result.acc}",
            "as": f"{result.dataset}, {result.shots}-shot, clipspm official profile on {result.model}",
            "widths": json.dumps(result.widths),
            "entries": f"{result.tower_entries} tower, {result.head_entries} head",
            "preparation": f"frames in [0, 1] (normalize none), released sampling, {result.class_names} class names"}
