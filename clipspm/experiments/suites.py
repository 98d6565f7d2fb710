"""Ablation suites as data: the YAML format, its checks, and the suite directory's `suite.yaml`.

A suite (clipspm/configs/suites/NAME.yaml, or any file a user writes) lists variants, each a row
of the paper's table made by `--set` overrides; `reference` names the variant the others are
paired with. Example (the whole format):

    title: Consistency constraints in SPM (Table 5)   # heading of the report
    paper: consistency        # optional: table in configs/paper_results.yaml to print beside ours
    columns: [Support, Query] # optional: on/off (or value) columns of the table, in order
    curve: null               # optional: a column to plot accuracy against (Fig. 5: R)
    set: [model.profile=paper]   # optional: overrides of every variant, before the user's --set
    note: Only the paper profile has the consistency terms.   # optional: a line of the report
    reference: both           # the "full model" every variant is paired with
    variants:
      - name: none            # short id: run directories, paper_results.yaml keys
        label: No Consistency Constraint          # optional: the row's name (default: name)
        columns: {Support: false, Query: false}   # a value for every column (bool: ✓ / ✗)
        set: [model.support_consistency=false, model.query_consistency=false]

`ablate` writes the suite and its resolved settings to `SUITE_DIR/suite.yaml`; every later step
(worker processes, `report`) reads them back from there, so they all build the same configs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from clipspm.config import CONFIG_DIR, resolve_config
from clipspm.errors import ClipspmError

SUITES_DIR = CONFIG_DIR / "suites"
SUITE_FILE = "suite.yaml"
SUITE_KEYS = {"name", "title", "paper", "columns", "curve", "set", "note", "reference", "variants"}
VARIANT_KEYS = {"name", "label", "columns", "set"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    columns: dict[str, Any]
    overrides: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "columns": dict(self.columns), "set": list(self.overrides)}


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    columns: tuple[str, ...]
    variants: tuple[Variant, ...]
    reference: str
    paper: str | None = None
    curve: str | None = None
    overrides: tuple[str, ...] = ()   # `set`: every variant's, after the command line's options, before --set
    note: str | None = None           # why the suite sets them, or anything else the report must say

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise ClipspmError(f"suite {self.name!r} has no variant {name!r}; it has "
                           f"{', '.join(v.name for v in self.variants)}")

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "paper": self.paper, "columns": list(self.columns),
                "curve": self.curve, "set": list(self.overrides), "note": self.note, "reference": self.reference,
                "variants": [v.as_dict() for v in self.variants]}


@dataclass
class SuiteSettings:
    """What every variant of one suite run shares, recorded so that resuming and reporting rebuild it."""

    dataset: str
    backbone: str              # the model of the cache (named in the suite directory)
    cache: str                 # the one cache directory every variant trains and is scored on
    shots: list[int]
    overrides: list[str]       # applied to every variant before its own (data, schedule, eval, the suite's `set`,
                               # the user's --set)
    eval_episodes: int
    eval_queries: int
    eval_seed: int
    stage: str = "heads"       # heads: from the cache; finetune: end to end, the visual tower trained too
    select_on: str = "val"     # the split whose episodes chose each run's checkpoint (train.select_on)


def shipped_suites() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def load_suite(suite: str | Path) -> Suite:
    """A shipped suite by name (`components`), or a suite YAML file by path."""
    path = Path(suite)
    if not path.is_file():
        if path.suffix in {".yaml", ".yml"} or len(path.parts) > 1:
            raise ClipspmError(f"suite file {path} does not exist")
        path = SUITES_DIR / f"{suite}.yaml"
        if not path.is_file():
            raise ClipspmError(f"no shipped suite {suite!r}: choose one of {', '.join(shipped_suites())}, "
                               f"or pass the path of a suite YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClipspmError(f"suite file {path} is not valid YAML: {error}") from None
    return parse_suite(data, default_name=path.stem, source=str(path))


def parse_suite(data: Any, *, default_name: str, source: str) -> Suite:
    """Check a suite's YAML form and build it; every problem names the file and the variant."""
    if not isinstance(data, dict):
        raise ClipspmError(f"{source}: a suite is a mapping with `variants` (see clipspm/configs/suites/)")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise ClipspmError(f"{source}: unknown suite keys {sorted(unknown)}; known: {sorted(SUITE_KEYS)}")
    name = str(data.get("name") or default_name)
    columns = tuple(str(column) for column in data.get("columns") or ())
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ClipspmError(f"{source}: `variants` must be a non-empty list")
    variants = tuple(_parse_variant(item, columns, f"{source}, variant {i + 1}") for i, item in enumerate(raw_variants))
    names = [variant.name for variant in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClipspmError(f"{source}: variant names must be unique; repeated: {repeated}")
    reference = data.get("reference")
    if reference not in names:
        raise ClipspmError(f"{source}: `reference` must name one of the variants ({', '.join(names)}), "
                           f"got {reference!r}")
    curve = data.get("curve")
    if curve is not None and curve not in columns:
        raise ClipspmError(f"{source}: `curve` must name one of the columns {list(columns)}, got {curve!r}")
    overrides = _overrides(data.get("set"), f"{source}: `set`")
    note = data.get("note")
    return Suite(name=name, title=str(data.get("title") or name), columns=columns, variants=variants,
                 reference=reference, paper=data.get("paper"), curve=curve, overrides=overrides,
                 note=None if note is None else str(note))


def _parse_variant(item: Any, columns: tuple[str, ...], where: str) -> Variant:
    if not isinstance(item, dict):
        raise ClipspmError(f"{where}: a variant is a mapping with `name` and `set`")
    unknown = set(item) - VARIANT_KEYS
    if unknown:
        raise ClipspmError(f"{where}: unknown variant keys {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
    name = str(item.get("name", ""))
    if not NAME_PATTERN.match(name):
        raise ClipspmError(f"{where}: `name` {name!r} must be letters, digits and _ . + - (it names a directory)")
    overrides = _overrides(item.get("set"), f"{where} ({name}): `set`")
    values = item.get("columns") or {}
    if not isinstance(values, dict) or set(values) != set(columns):
        raise ClipspmError(f"{where} ({name}): `columns` must give a value for each of {list(columns)}, "
                           f"got {values!r}")
    return Variant(name=name, label=str(item.get("label") or name), columns=values, overrides=overrides)


def _overrides(items: Any, where: str) -> tuple[str, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise ClipspmError(f"{where} must be a list of key=value strings, e.g. [model.padm=false]")
    return tuple(items)


def suite_dir_name(dataset: str, backbone: str, suite: Suite, stage: str = "heads", select_on: str = "val") -> str:
    """ablate-{dataset}-{backbone}-{suite}, with -ft for the finetune stage (as `train` names its runs) and
    -select-test when checkpoints are chosen on the test split, so that both protocols can share a runs dir."""
    name = f"ablate-{dataset}-{backbone}-{suite.name}" + ("-ft" if stage == "finetune" else "") \
        + ("-select-test" if select_on == "test" else "")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def run_dir_of(suite_dir: Path, variant: Variant, shots: int) -> Path:
    return Path(suite_dir) / f"{variant.name}-{shots}shot"


def variant_config(settings: SuiteSettings, variant: Variant, shots: int) -> DictConfig:
    """The resolved config of one variant at K = `shots` for the suite's stage: shared settings, then the
    variant's overrides."""
    return resolve_config(settings.stage, settings.dataset,
                          overrides=[*settings.overrides, *variant.overrides, f"train.shots={shots}"])


def write_suite_dir(suite_dir: Path, suite: Suite, settings: SuiteSettings) -> None:
    suite_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"suite": suite.as_dict(), "settings": asdict(settings)}, sort_keys=False,
                          allow_unicode=True)
    (suite_dir / SUITE_FILE).write_text(text)


def read_suite_dir(suite_dir: Path) -> tuple[Suite, SuiteSettings]:
    path = Path(suite_dir) / SUITE_FILE
    if not path.is_file():
        raise ClipspmError(f"{suite_dir} is not a suite directory (no {SUITE_FILE}); they are made by `clipspm ablate`")
    try:
        data = yaml.safe_load(path.read_text())
        suite = parse_suite(data["suite"], default_name=Path(suite_dir).name, source=str(path))
        return suite, SuiteSettings(**data["settings"])
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise ClipspmError(f"{path} is damaged ({type(error).__name__}: {str(error).splitlines()[0]}); run the "
                           f"`clipspm ablate` command that made it again: it rewrites it and keeps the runs") from None

