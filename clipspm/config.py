"""YAML configs shipped in `clipspm/configs/`, merged with a user file and `--set key=value`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipspm.errors import ClipspmError

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


def load_config(name: str) -> DictConfig:
    """A shipped config by name, e.g. `load_config("extract")` reads `configs/extract.yaml`."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ClipspmError(f"no shipped config {name!r} (looked for {path})")
    return OmegaConf.load(path)


def merge_config(base: DictConfig, config_file: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """`base`, then the keys of `config_file`, then each `key=value` override (values parsed as YAML).

    Unknown keys are refused so that a typo in `--set` cannot silently do nothing.
    """
    layers = [base]
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ClipspmError(f"config file {path} does not exist")
        layers.append(OmegaConf.load(path))
    for item in overrides:
        if "=" not in item:
            raise ClipspmError(f"--set expects key=value, got {item!r} (example: --set model.padm=false)")
        layers.append(OmegaConf.from_dotlist([item]))
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(*layers)
    except Exception as error:  # omegaconf raises several types for unknown keys and bad values
        raise ClipspmError(f"bad config override: {error}") from None
    OmegaConf.set_struct(merged, False)
    return merged


@cache
def prompt_templates() -> tuple[str, ...]:
    """The 16 prompt templates of Appendix A, in the paper's order (`{}` stands for the class)."""
    return tuple(load_config("prompt_templates").templates)
