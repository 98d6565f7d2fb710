"""The method registry: every head registers itself here by name, with what it needs and where its
authors' code is. `model.kind=NAME`, the suites and `clipspm methods` read this table; nothing else
names the methods.

Adding a method is one file: put it in this folder (it is imported on first use), or in a file of
your own listed in the environment variable `CLIPSPM_METHODS` (paths separated by `:`), which is
imported as well. The file defines its options (subclasses of `clipspm.schema.ModelOptions` and
`LossOptions`), its head (an `nn.Module` mapping an `Episode` to a `HeadOutput`) and calls
`register_method(Method(...))`. Per-dataset and per-profile defaults go in
`clipspm/configs/methods/NAME.yaml` (see `clipspm.config.method_layers`).
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
OTHER_INPUTS = {"patch_tokens": "patch tokens of every frame (the cache holds one embedding per frame)",
                "text_tower": "the CLIP text tower run inside the training step (the cache holds fixed text "
                              "features)"}
PLUGIN_VARIABLE = "CLIPSPM_METHODS"


@dataclass(frozen=True)
class Method:
    """A registered few-shot head and what a user needs to know about it."""

    name: str                                   # model.kind
    title: str                                  # short display name, e.g. "CLIP-SPM"
    paper: str                                  # citation
    code: str                                   # where its authors' code is ("-" if none)
    build: Callable[[Any, Any, int], nn.Module]  # (model options, loss options, feature width C) -> head
    model_options: type[ModelOptions]
    loss_options: type[LossOptions] = LossOptions
    needs: tuple[str, ...] = ("frames",)        # keys of CACHE_INPUTS / OTHER_INPUTS
    trainable: bool = True                      # False: no parameters, scored without training
    parity: str = "not checked against its authors' code"
    defaults: str | None = None                 # configs/methods/{defaults}.yaml, if it has per-dataset data
    notes: str = ""

    @property
    def missing_inputs(self) -> list[str]:
        """What this method needs beyond the cache; empty when it runs from cached features."""
        return [need for need in self.needs if need not in CACHE_INPUTS]

    def refusal(self) -> str | None:
        """Why the method cannot run from a feature cache, or None."""
        missing = self.missing_inputs
        if not missing:
            return None
        reasons = "; ".join(OTHER_INPUTS.get(need, need) for need in missing)
        return f"model.kind={self.name} ({self.title}) needs {reasons}, which the feature cache does not hold"


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
    for entry in filter(None, os.environ.get(PLUGIN_VARIABLE, "").split(os.pathsep)):
        _import_plugin(entry)


def _import_plugin(entry: str) -> None:
    path = Path(entry).expanduser()
    if not path.is_file():
        raise ClipspmError(f"${PLUGIN_VARIABLE} names {entry}, which is not a Python file")
    spec = importlib.util.spec_from_file_location(f"clipspm_plugin_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))   # a bug in the file shows its traceback
