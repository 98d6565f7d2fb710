"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory (`RUN/checkpoints/last`, `RUN/checkpoints/best`) holding
`heads.safetensors`, optionally `visual.safetensors` (fine-tuned tower) and `optimizer.safetensors`,
and `state.json`. It is written under a temporary name and swapped in by renames, so a kill at
any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from clipspm.errors import ClipspmError, reading

HEADS, VISUAL, OPTIMIZER, STATE = "heads.safetensors", "visual.safetensors", "optimizer.safetensors", "state.json"


def save_checkpoint(directory: Path, *, heads: nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None,
                    visual: nn.Module | None = None) -> None:
    """Write a checkpoint directory atomically (temporary directory, then rename)."""
    directory = Path(directory)
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(heads, str(temporary / HEADS))
    if visual is not None:
        save_model(visual, str(temporary / VISUAL))
    if optimizer is not None:
        tensors, groups = _flatten_optimizer(optimizer)
        save_file(tensors, str(temporary / OPTIMIZER))
        state = {**state, "optimizer_param_groups": groups}
    (temporary / STATE).write_text(json.dumps(state, indent=1))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    temporary.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(directory: Path) -> Path | None:
    """The directory itself, or the previous one a kill left behind mid-swap; None if neither."""
    for candidate in (Path(directory), Path(directory).with_name(Path(directory).name + ".old")):
        if (candidate / STATE).is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, *, heads: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    visual: nn.Module | None = None) -> dict:
    """Load weights (and optimizer state) in place; return the JSON state. Never unpickles."""
    found = checkpoint_dir(directory)
    if found is None:
        raise ClipspmError(f"no checkpoint in {directory}")
    fix = "this checkpoint cannot be used: train the run again"
    with reading(found / HEADS, "checkpoint weights", fix):
        missing, unexpected = _load_fitting(heads, found / HEADS)
    if missing or unexpected:
        raise ClipspmError(f"checkpoint {found} does not fit this model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}): was it made with other switches or width?")
    if visual is not None:
        if not (found / VISUAL).is_file():
            raise ClipspmError(f"checkpoint {found} holds no fine-tuned visual tower")
        with reading(found / VISUAL, "checkpoint weights", fix):
            _load_fitting(visual, found / VISUAL, strict=True)
    state = read_state(found)
    if optimizer is not None:
        with reading(found / OPTIMIZER, "optimizer state", fix):
            _restore_optimizer(optimizer, load_file(str(found / OPTIMIZER)), state["optimizer_param_groups"])
    return state


def _load_fitting(module: nn.Module, path: Path, strict: bool = False) -> tuple[list[str], list[str]]:
    """safetensors' load_model, with a tensor of another shape reported as the user's mismatch it is."""
    try:
        return load_model(module, str(path), strict=strict)
    except RuntimeError as error:
        lines = str(error).splitlines()
        if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
            raise
        first = lines[1].strip().rstrip(".") if len(lines) > 1 else lines[0]
        raise ClipspmError(f"{path} does not fit this model ({first}): was it made with another backbone, width "
                           f"or switches?") from None


def read_state(directory: Path) -> dict:
    found = checkpoint_dir(directory)
    if found is None:
        raise ClipspmError(f"no checkpoint in {directory}")
    try:
        return json.loads((found / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClipspmError(f"{found / STATE} is damaged ({error}); train the run again") from None


def tuned_visual_weights(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The fine-tuned visual tower of a finetune run: of `checkpoint` if named, else best, else last."""
    for name in (checkpoint,) if checkpoint else ("best", "last"):
        found = checkpoint_dir(Path(run_dir) / "checkpoints" / name)
        if found is not None and (found / VISUAL).is_file():
            return found / VISUAL
    raise ClipspmError(f"{run_dir} holds no fine-tuned visual tower (expected checkpoints/{checkpoint or 'best'}/"
                       f"{VISUAL}); is it a `clipspm train --stage finetune` run?")


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = (value if isinstance(value, torch.Tensor)
                                         else torch.tensor(value)).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
