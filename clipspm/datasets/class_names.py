"""Which name of a class goes into the prompt templates (extract's `class_names` setting).

    benchmark   the benchmark's rule (registry.py): 'draw_sword' -> 'draw sword', 'BlowDryHair' -> 'blow dry hair'
    released    the literal lists of the released CLIP-SPM configs (configs/released_class_names.yaml):
                'draw_sword', 'Blow DryHair', 'Pouring [something] into [something]'

A checkpoint trained by the released code saw its own names; scoring it with ours changes the class
texts it compares against. The released code never looks at the val split (it validates on test), so
val classes have no released name and keep the benchmark's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path

import yaml

from clipspm.datasets.types import ClassEntry, Dataset
from clipspm.errors import ClipspmError, DatasetError

CLASS_NAMES = ("benchmark", "released")
RELEASED_NAMES = Path(__file__).parents[1] / "configs" / "released_class_names.yaml"


@cache
def released_names() -> dict:
    """configs/released_class_names.yaml: our dataset name -> its source, index rule, train and test lists."""
    return yaml.safe_load(RELEASED_NAMES.read_text())


def released_class_texts(dataset: str, classes: Sequence[ClassEntry]) -> dict[str, str]:
    """Class key -> released name, for the train and test classes among `classes` (a dataset's, in its order).

    Each released name is checked to be the same words as the benchmark text of the class it lands on
    (compared without case, spaces, underscores and brackets): split files other than the shipped ones
    would otherwise give classes the names of others, silently.
    """
    entry = released_names()[dataset]
    texts, wrong = {}, []
    for split in ("train", "test"):
        names, members = entry[split], [item for item in classes if item.split == split]
        if entry["index"] == "order":
            positions = list(range(len(members)))
        else:
            positions = [_folder_number(item.key, split) - entry["offset"][split] for item in members]
        if len(members) != len(names) or sorted(positions) != list(range(len(names))):
            raise DatasetError(f"the {split} classes of {dataset} are not the {len(names)} classes of the released "
                               f"{entry['source']}; class_names=released needs the shipped split files")
        for item, position in zip(members, positions, strict=True):
            texts[item.key] = names[position]
            if _words(names[position]) != _words(item.text):
                wrong.append(f"{item.key} ({item.text!r} vs released {names[position]!r})")
    if wrong:
        raise DatasetError(f"the released class names of {dataset} ({entry['source']}) do not fit these split files: "
                           f"{', '.join(wrong[:5])}; class_names=released needs the shipped split files")
    return texts


def with_class_names(dataset: Dataset, choice: str) -> Dataset:
    """`dataset` with the class texts `choice` names (benchmark: unchanged). Its split hash stays that of its split
    files: the choice is a setting of its own in a cache's address."""
    if choice not in CLASS_NAMES:
        raise ClipspmError(f"class names {choice!r}: use one of {', '.join(CLASS_NAMES)}")
    if choice == "benchmark":
        return dataset
    if dataset.name not in released_names():
        raise DatasetError(f"the released CLIP-SPM code names the classes of {', '.join(released_names())}, not of "
                           f"{dataset.name}; use class_names=benchmark")
    texts = released_class_texts(dataset.name, dataset.classes)
    return replace(dataset, classes=[replace(item, text=texts.get(item.key, item.text)) for item in dataset.classes])


def _folder_number(key: str, split: str) -> int:
    """'train24' -> 24: how the released loader numbers SSv2 classes (video_reader.py read_dir)."""
    found = re.fullmatch(rf"{split}(\d+)", key)
    if found is None:
        raise DatasetError(f"class {key!r} is not named {split}NUMBER as the released SSv2 split files name classes; "
                           f"class_names=released needs the shipped split files")
    return int(found.group(1))


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())
