"""Run configs: the schema's defaults, then the YAML data of `clipspm/configs/`, then the user's file and
`--set key=value`, validated against the schema (`clipspm.schema` and the method's own options).

Layers, later ones winning:
  1. the schema defaults (`clipspm.schema`; `model`/`loss`: the options of the method `model.kind` names)
  2. `stages.yaml[stage]`              what the finetune stage changes (its lr)
  3. `datasets.yaml[dataset]`          per-dataset schedules (paper Sec. 4.2: 100,000 episodes for SSv2)
  4. `methods/{method}.yaml`           the method's own data: its profile, per-stage and per-dataset values
  5. `--config FILE`, then each `--set key=value`
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ValidationError

from clipspm.errors import ClipspmError
from clipspm.schema import SECTIONS, DataConfig, ModelOptions

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
METHOD_CONFIG_DIR = CONFIG_DIR / "methods"
STAGES = ("heads", "finetune")


class ConfigError(ClipspmError):
    """A config key is unknown, of the wrong type, or out of range."""


def load_config(name: str) -> DictConfig:
    """A shipped YAML file by name, e.g. `load_config("extract")` reads `configs/extract.yaml`."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ClipspmError(f"no shipped config {name!r} (looked for {path})")
    return OmegaConf.load(path)


def resolve_config(stage: str, dataset: str | None = None, config_file: str | Path | None = None,
                   overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config of a `stage` (heads, finetune) run: the layers of the module docstring."""
    from clipspm.pipeline.methods import get_method

    if stage not in STAGES:
        raise ClipspmError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    user = user_layers(config_file, overrides)
    chosen = _select(user, "data.dataset") or dataset or DataConfig.model_fields["dataset"].default
    method = get_method(_select(user, "model.kind") or ModelOptions.model_fields["kind"].default)
    layers: list[Any] = [schema_defaults(stage, method)]
    layers.append(_plain(load_config("stages").get(stage, {})))
    layers.append(_plain(load_config("datasets").get(chosen, {})))
    layers.extend(method_layers(method.defaults, stage, chosen, _select(user, "model.profile")))
    layers.append({"data": {"dataset": chosen}})
    return validate_config(_merge(*layers, *user), stage)


def user_layers(config_file: str | Path | None, overrides: Sequence[str]) -> list[dict]:
    """The user's file and `--set key=value` items (values parsed as YAML), as plain dicts."""
    layers = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ClipspmError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ClipspmError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ClipspmError(f"config file {path} must hold a mapping of sections (data:, train:, model:, ...)")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ClipspmError(f"--set expects key=value, got {item!r} (example: --set model.padm=false)")
        try:
            layers.append(_plain(OmegaConf.from_dotlist([item])))
        except Exception as error:  # omegaconf's grammar errors for odd keys
            raise ClipspmError(f"--set {item!r} cannot be parsed: {error}") from None
    return layers


def schema_defaults(stage: str, method) -> dict:
    sections = {name: cls().model_dump() for name, cls in SECTIONS.items() if name != "finetune" or stage == "finetune"}
    return {**sections, "model": method.model_options().model_dump(), "loss": method.loss_options().model_dump()}


def method_layers(defaults: str | None, stage: str, dataset: str, profile: str | None = None) -> list[dict]:
    """The layers of `configs/methods/{defaults}.yaml` for a stage, dataset and profile.

    The file holds sections (`model`, `loss`, `train`, ...) at its top, then optional `stages: {STAGE:
    sections}` and `datasets: {DATASET: sections}`, a dataset's own `stages: {STAGE: sections}` last; a
    method with profiles has `profiles: {NAME: the same structure}`, applied after the top level, the first
    profile being the default. The chosen profile is also written to `model.profile`.
    """
    if defaults is None:
        return []
    data = method_data(defaults)
    layers = _structure_layers(data, stage, dataset)
    profiles = data.get("profiles") or {}
    if profiles:
        chosen = profile or next(iter(profiles))
        if chosen not in profiles:
            near = difflib.get_close_matches(str(chosen), profiles, n=1)
            raise ConfigError(f"model.profile={chosen!r} is not a profile of {defaults} (profiles: "
                              f"{', '.join(profiles)})" + (f"; did you mean {near[0]!r}?" if near else ""))
        layers += [*_structure_layers(profiles[chosen], stage, dataset), {"model": {"profile": chosen}}]
    return layers


@cache
def method_data(name: str) -> dict:
    path = METHOD_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ClipspmError(f"no method defaults {path}")
    return yaml.safe_load(path.read_text()) or {}


def _structure_layers(data: Mapping, stage: str, dataset: str) -> list[dict]:
    reserved = {"profiles", "stages", "datasets"}
    dataset_data = (data.get("datasets") or {}).get(dataset) or {}
    return [{key: value for key, value in data.items() if key not in reserved},
            (data.get("stages") or {}).get(stage) or {},
            {key: value for key, value in dataset_data.items() if key != "stages"},
            (dataset_data.get("stages") or {}).get(stage) or {}]


def validate_config(merged: Mapping, stage: str) -> DictConfig:
    """Check every section of a merged config against the schema; a DictConfig of the validated values."""
    from clipspm.pipeline.methods import get_method

    merged = _plain(merged)
    expected = [name for name in SECTIONS if name != "finetune" or stage == "finetune"] + ["model", "loss"]
    unknown = [key for key in merged if key not in expected]
    if unknown:
        raise ConfigError("; ".join(_unknown_message(key, expected, "") for key in unknown))
    method = get_method((merged.get("model") or {}).get("kind", ModelOptions.model_fields["kind"].default))
    classes = {**SECTIONS, "model": method.model_options, "loss": method.loss_options}
    checked, problems = {}, []
    for name in expected:   # every section, so that one message names every bad key
        try:
            checked[name] = validate_section(classes[name], merged.get(name) or {}, name).model_dump()
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("; ".join(problems))
    return OmegaConf.create(checked)


def validate_section(cls: type[BaseModel], values: Mapping, section: str) -> BaseModel:
    """`cls` validated from `values`; a ConfigError naming each bad key, what it expects and what it got."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {section} must be a mapping of keys, got {values!r}")
    try:
        return cls.model_validate(dict(values))
    except ValidationError as error:
        raise ConfigError("; ".join(_error_message(cls, item, section) for item in error.errors())) from None


def describe_type(cls: type[BaseModel], name: str) -> str:
    """What a field accepts, in words: 'true or false', 'an integer >= 1', 'one of all, last', ..."""
    field = cls.model_fields[name]
    args = [arg for arg in get_args(field.annotation) if arg is not type(None)]
    optional = type(None) in get_args(field.annotation)
    kinds = args if get_origin(field.annotation) in (Union, UnionType) else [field.annotation]
    bounds = []
    for item in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attribute.capitalize())):
                bounds.append(f"{symbol} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen) and any(get_origin(kind) is list for kind in kinds):
            bounds.append(f"of at least {item.min_length} items")
    text = ", or ".join(_describe_kind(kind) for kind in kinds)
    if bounds:
        text += " " + " and ".join(bounds)
    return text + (" or null" if optional else "")


def _describe_kind(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(value) for value in get_args(annotation))
    plurals = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if get_origin(annotation) is list:
        items = get_args(annotation)
        item = get_args(items[0])[0] if items and get_origin(items[0]) is Annotated else (items or [None])[0]
        return f"a list of {plurals.get(item, 'values')}" if items else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _error_message(cls: type[BaseModel], item: dict, section: str) -> str:
    loc = [str(part) for part in item["loc"]]
    if item["type"] == "extra_forbidden":
        return _unknown_message(loc[0], list(cls.model_fields), section + ".", _owner(cls, section))
    name, key = loc[0], ".".join([section, *loc])
    if name in cls.model_fields:
        return f"{key}={item.get('input')!r} is not valid: it expects {describe_type(cls, name)}"
    return f"{key}: {item['msg']}"


def _owner(cls: type[BaseModel], section: str) -> str:
    """' of model.kind=NAME' for a method's sections: their keys depend on the method."""
    method = getattr(cls, "method_name", None) or (cls.model_fields["kind"].default if "kind" in cls.model_fields
                                                   else None)
    return f" (model.kind={method})" if section in ("model", "loss") and method else ""


def _unknown_message(key: str, known: list[str], prefix: str, owner: str = "") -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{near[0]}?" if near else f"known keys: {', '.join(prefix + k for k in known)}"
    return f"unknown config key {prefix}{key}{owner}: {hint}"


def _select(layers: list[dict], key: str) -> Any:
    """The last value a list of layers gives `key` (dotted), or None."""
    value = None
    for layer in layers:
        node: Any = layer
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            value = node
    return value


def _merge(*layers: Any) -> dict:
    return _plain(OmegaConf.merge(*[OmegaConf.create(layer) for layer in layers]))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@cache
def prompt_templates() -> tuple[str, ...]:
    """The 16 prompt templates of Appendix A, in the paper's order (`{}` stands for the class)."""
    return tuple(load_config("prompt_templates").templates)


def option_rows(stage: str = "finetune", kind: str | None = None) -> list[tuple[str, str, str, str]]:
    """(key, what it accepts, default, meaning) of every config key of `stage`, for the method `kind` (or
    every method's `model`/`loss` keys when None): the reference that `clipspm config` prints."""
    from clipspm.pipeline.methods import get_method, methods

    classes: list[tuple[str, type[BaseModel]]] = [(name, cls) for name, cls in SECTIONS.items()
                                                  if name != "finetune" or stage == "finetune"]
    chosen = [get_method(kind)] if kind else list(methods().values())
    for method in chosen:
        classes += [(f"model ({method.name})", method.model_options), (f"loss ({method.name})", method.loss_options)]
    rows = []
    for label, cls in classes:
        section = label.split(" ")[0]
        for name, field in cls.model_fields.items():
            if name == "cache_key":
                continue
            default = field.default
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            rows.append((f"{section}.{name}" + (label[len(section):] if section != label else ""),
                         describe_type(cls, name), shown, field.description or ""))
    return rows


def options_markdown(stage: str = "finetune") -> str:
    """Every config key as a Markdown table (docs/CONFIG.md is this text)."""
    lines = ["# Config reference", "",
             "Generated from the schema (`clipspm.schema` and each method's options) by `clipspm config --markdown`.",
             "Defaults are the schema's; `clipspm/configs/stages.yaml`, `datasets.yaml` and `methods/*.yaml` change",
             "some of them per stage, dataset and method profile (`clipspm config --show` prints a resolved config).",
             "", "| key | accepts | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {accepts} | `{default}` | {meaning.replace('|', '/')} |"
              for key, accepts, default, meaning in option_rows(stage)]
    return "\n".join(lines) + "\n"
