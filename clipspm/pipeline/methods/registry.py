"""The method registry: every head registers itself here by name, with what it needs and where its
authors' code is. `model.kind=NAME`, the suites and `clipspm methods` read this table; nothing else
names the methods.

Adding a method is one file: put it in this folder (it is imported on first use), or in a file of
your own listed in the environment variable `CLIPSPM_METHODS` (paths separated by `:`), which is
imported as well. The file defines its options (subclasses of `clipspm.schema.ModelOptions` and
`LossOptions`), its head (an `nn.Module` mapping an `Episode` to a `HeadOutput`) and calls
`register_method(Method(...))`. Per-dataset and per-profile defaults go in
`clipspm/configs/methods/NAME.yaml` (see `clipspm.config.method_layers`).

What a head may use: the cache's features and class prompts (CACHE_INPUTS), and what the stages load
beside the cache when a method's `needs` name it (STAGE_INPUTS): such a method's `build` takes a
fourth argument, the `HeadInputs` the stage made. A need that no stage provides (OTHER_INPUTS) makes
the method refused, with its reason.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from clipspm.errors import ClipspmError
from clipspm.schema import LossOptions, ModelOptions

# What a feature cache gives a head: per-frame embeddings of every video and the class prompt features
# (hence the base-class texts too). Anything else a method needs makes it unusable from a cache.
CACHE_INPUTS = {"frames": "per-frame CLIP embeddings [T, C] of every video",
                "class_text": "the prompt feature of every class",
                "base_text": "the prompt features of all training classes"}
# What the heads, finetune and eval stages load beside the cache for a method whose `needs` name it
# (clipspm.stages.runs.head_inputs).
STAGE_INPUTS = {"text_tower": "the frozen CLIP text tower of the cache's model, run inside the training step",
                "video_text": "a text feature per video: its description (data.descriptions) through the text "
                              "tower, or its class prompt where the run has no descriptions"}
# What no stage provides: a method needing one of these is refused.
OTHER_INPUTS = {"patch_tokens": "patch tokens of every frame (the cache holds one embedding per frame)"}
PLUGIN_VARIABLE = "CLIPSPM_METHODS"


@dataclass(frozen=True)
class HeadInputs:
    """What a stage hands the `build` of a method that needs STAGE_INPUTS."""

    text_tower: Any = None                 # clipspm.pipeline.text_tower.TextTower, frozen, on the stage's device
    class_texts: tuple[str, ...] = ()      # the cache's class texts by class row (what Episode.class_rows index)

    def provided(self) -> set[str]:
        """The STAGE_INPUTS these inputs hold (video_text always: the class prompt stands in for descriptions)."""
        return {"video_text"} | ({"text_tower"} if self.text_tower is not None else set())


@dataclass(frozen=True)
class Method:
    """A registered few-shot head and what a user needs to know about it."""

    name: str                                   # model.kind
    title: str                                  # short display name, e.g. "CLIP-SPM"
    paper: str                                  # citation
    code: str                                   # where its authors' code is ("-" if none)
    build: Callable[..., nn.Module]             # (model options, loss options, feature width C) -> head; with
                                                # STAGE_INPUTS in `needs`, a 4th argument: the HeadInputs
    model_options: type[ModelOptions]
    loss_options: type[LossOptions] = LossOptions
    needs: tuple[str, ...] = ("frames",)        # keys of CACHE_INPUTS / STAGE_INPUTS / OTHER_INPUTS
    trainable: bool = True                      # False: no parameters, scored without training
    parity: str = "not checked against its authors' code"
    defaults: str | None = None                 # configs/methods/{defaults}.yaml, if it has per-dataset data
    notes: str = ""

    @property
    def stage_inputs(self) -> list[str]:
        """What this method needs that the stages load beside the cache (STAGE_INPUTS)."""
        return [need for need in self.needs if need in STAGE_INPUTS]

    def missing_inputs(self, provided: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """What this method needs beyond the cache and `provided`; empty when it can run."""
        return [need for need in self.needs if need not in CACHE_INPUTS and need not in provided]

    def refusal(self, provided: set[str] | frozenset[str] = frozenset()) -> str | None:
        """Why the method cannot run from a feature cache and the inputs `provided`, or None."""
        missing = self.missing_inputs(provided)
        if not missing:
            return None
        reasons = "; ".join({**STAGE_INPUTS, **OTHER_INPUTS}.get(need, need) for need in missing)
        where = "the feature cache does not hold" if all(need not in STAGE_INPUTS for need in missing) else \
            "this caller did not provide (the heads, finetune and eval stages do)"
        return f"model.kind={self.name} ({self.title}) needs {reasons}, which {where}"


_METHODS: dict[str, Method] = {}
_loaded = False


def register_method(method: Method) -> Method:
    """Add a method to the table (a second registration of the same name replaces the first)."""
    if method.name in _METHODS and _METHODS[method.name].build is not method.build:
        existing = _METHODS[method.name]
        if existing.model_options.__module__ != method.model_options.__module__:
            raise ClipspmError(f"two methods are named {method.name!r} ({existing.model_options.__module__} and "
                               f"{method.model_options.__module__}); rename one")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name: the shipped ones, then those of $CLIPSPM_METHODS."""
    _load()
    return dict(_METHODS)


def get_method(name: str) -> Method:
    table = methods()
    if name not in table:
        near = difflib.get_close_matches(str(name), table, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ClipspmError(f"unknown model.kind {name!r}{hint} Known methods: {', '.join(sorted(table))} "
                           f"(`clipspm methods`)")
    return table[name]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package)]):
        if module.name != "registry":
            importlib.import_module(f"clipspm.pipeline.methods.{module.name}")
    # By name, not by import order: code that imported one method's module first (clipspm.stages.import_checkpoint
    # imports methods/clipspm.py) must not reorder `clipspm methods` and the config reference.
    shipped = sorted(_METHODS.items())
    _METHODS.clear()
    _METHODS.update(shipped)
    for entry in filter(None, os.environ.get(PLUGIN_VARIABLE, "").split(os.pathsep)):
        _import_plugin(entry)


def _import_plugin(entry: str) -> None:
    path = Path(entry).expanduser()
    if not path.is_file():
        raise ClipspmError(f"${PLUGIN_VARIABLE} names {entry}, which is not a Python file")
    spec = importlib.util.spec_from_file_location(f"clipspm_plugin_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))   # a bug in the file shows its traceback
