"""Few-shot methods: one file per method, each registering itself (see `registry.py`).

`build_head(model_cfg, loss_cfg, dim, inputs)` is the one door to every head: it looks the method up
by `model_cfg["kind"]`, validates both sections against the method's option classes, and builds it,
handing the stage's `HeadInputs` to the methods that need them.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from clipspm.pipeline.methods.registry import (
    CACHE_INPUTS,
    OTHER_INPUTS,
    STAGE_INPUTS,
    HeadInputs,
    Method,
    get_method,
    methods,
    register_method,
)


def method_options(model_cfg: Mapping, loss_cfg: Mapping):
    """(method, validated model options, validated loss options) of a config's two method sections."""
    from clipspm.config import validate_section

    model_cfg, loss_cfg = _plain(model_cfg), _plain(loss_cfg)
    method = get_method(model_cfg.get("kind", "clipspm"))
    return (method, validate_section(method.model_options, model_cfg, "model"),
            validate_section(method.loss_options, loss_cfg, "loss"))


def build_head(model_cfg: Mapping, loss_cfg: Mapping, dim: int, inputs: HeadInputs | None = None) -> nn.Module:
    """The head `model_cfg.kind` names, for features of width `dim`; refused when it needs more than the
    cache and `inputs` (what the calling stage loaded beside the cache) hold."""
    method, model, loss = method_options(model_cfg, loss_cfg)
    reason = method.refusal(inputs.provided() if inputs is not None else frozenset())
    if reason:
        from clipspm.errors import ClipspmError

        raise ClipspmError(reason)
    return method.build(model, loss, dim, inputs) if method.stage_inputs else method.build(model, loss, dim)


def _plain(section: Mapping) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


__all__ = ["CACHE_INPUTS", "OTHER_INPUTS", "STAGE_INPUTS", "HeadInputs", "Method", "build_head", "get_method",
           "method_options", "methods", "register_method"]
