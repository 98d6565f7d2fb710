"""Few-shot methods: one file per method, each registering itself (see `registry.py`).

`build_head(model_cfg, loss_cfg, dim)` is the one door to every head: it looks the method up by
`model_cfg["kind"]`, validates both sections against the method's option classes, and builds it.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from clipspm.pipeline.methods.registry import CACHE_INPUTS, OTHER_INPUTS, Method, get_method, methods, register_method


def method_options(model_cfg: Mapping, loss_cfg: Mapping):
    """(method, validated model options, validated loss options) of a config's two method sections."""
    from clipspm.config import validate_section

    model_cfg, loss_cfg = _plain(model_cfg), _plain(loss_cfg)
    method = get_method(model_cfg.get("kind", "clipspm"))
    return (method, validate_section(method.model_options, model_cfg, "model"),
            validate_section(method.loss_options, loss_cfg, "loss"))


def build_head(model_cfg: Mapping, loss_cfg: Mapping, dim: int) -> nn.Module:
    """The head `model_cfg.kind` names, for features of width `dim`; refused when it needs more than a cache."""
    method, model, loss = method_options(model_cfg, loss_cfg)
    reason = method.refusal()
    if reason:
        from clipspm.errors import ClipspmError

        raise ClipspmError(reason)
    return method.build(model, loss, dim)


def _plain(section: Mapping) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


__all__ = ["CACHE_INPUTS", "OTHER_INPUTS", "Method", "build_head", "get_method", "method_options", "methods",
           "register_method"]
