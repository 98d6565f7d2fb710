"""The dataset registry: benchmarks defined by the shipped split files, plus `custom` and `synthetic`.

Each benchmark is a row of data (split folder, class-text rule, layout rules, flip policy);
`load_dataset` is the one door that turns a row and a root into a `Dataset`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from clipspm.datasets.layout import LayoutRules, check_root, resolve_videos, scan_class_folders
from clipspm.datasets.splits import SplitLine, check_disjoint, class_keys, read_split_file, split_hash
from clipspm.datasets.types import SPLITS, ClassEntry, Dataset, DatasetInfo, VideoEntry
from clipspm.errors import DatasetError

SPLIT_ROOT = Path(__file__).parent / "splits"  # package data, present in editable and wheel installs

TextRule = Callable[[str], str]


def text_from_underscores(key: str) -> str:
    """HMDB51, Kinetics: 'brush_hair' -> 'brush hair'."""
    return key.replace("_", " ")


def text_from_camel_case(key: str) -> str:
    """UCF101: 'BlowingCandles' -> 'blowing candles'; a capital run stays one word ('PlayingTV' -> 'playing tv')."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", key).lower()


def text_from_folder_name(key: str) -> str:
    """Custom classes: underscores and hyphens are spaces, CamelCase is split, all lowercase."""
    return " ".join(text_from_camel_case(word) for word in re.split(r"[_\-\s]+", key) if word)


def text_from_json(path: Path) -> TextRule:
    """Class text looked up in a JSON map of class key -> text (SSv2's cls2realC.json, synthetic's classes.json)."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"class-text map {path} does not exist; it maps each class key to its text") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"class-text map {path} is not valid JSON ({error}); fix or regenerate it") from None
    if not isinstance(mapping, dict):
        raise DatasetError(f"class-text map {path} must be a JSON object of class key -> text")

    def lookup(key: str) -> str:
        text = mapping.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"class-text map {path} has no text for class {key!r}; add \"{key}\": \"...\"")
        return text

    return lookup


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    example: str                       # one video path below the root, shown when the root is wrong
    split_folder: str | None = None    # under SPLIT_ROOT
    class_text: TextRule | str = text_from_underscores  # a rule, or a JSON map in the split folder (synthetic: root)
    layout: LayoutRules = field(default_factory=LayoutRules)
    hflip: bool = True
    default_backbone: str = "RN50"
    default_pretrained: str = "openai"


SPECS = {spec.name: spec for spec in (
    DatasetSpec("hmdb51", "HMDB51, ARN few-shot split", "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                "hmdb_ARN"),
    DatasetSpec("ucf101", "UCF101, ARN few-shot split", "BlowingCandles/v_BlowingCandles_g01_c01.avi",
                "ucf_ARN", text_from_camel_case),
    DatasetSpec("kinetics100", "Kinetics-100, CMN few-shot split", "stretching_arm/nfLjZfWpjVg.mp4",
                "kinetics_CMN", layout=LayoutRules(clip_suffix=True)),
    DatasetSpec("ssv2_small", "Something-Something v2 Small, CMN-J split", "train24/88644.webm or DIR/88644.webm",
                "ssv2_CMN", "cls2realC.json", LayoutRules(flat_fallback=True), hflip=False),
    DatasetSpec("ssv2_full", "Something-Something v2 Full, OTAM split", "train24/88644.webm or DIR/88644.webm",
                "ssv2_OTAM", "cls2realC.json", LayoutRules(flat_fallback=True), hflip=False),
    DatasetSpec("synthetic", "generated moving-shape videos for tests and smoke runs (motion direction is "
                "the label)", "CLASS/VIDEO.mp4", class_text="classes.json", hflip=False,
                default_backbone="clipspm-tiny-vit", default_pretrained="none"),
    DatasetSpec("custom", "your own videos: CLASS/VIDEO under --root, split by --split-dir, by "
                "train/val/test folders, or all as test classes", "CLASS/VIDEO.mp4", class_text=text_from_folder_name),
)}


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset with its split sizes (None where they depend on the data)."""
    return [_info(name) for name in SPECS]


@cache
def _info(name: str) -> DatasetInfo:
    spec = SPECS[name]
    if spec.split_folder is None:
        return DatasetInfo(name, spec.description, None, None)
    lines = [line for path in _split_files(SPLIT_ROOT / spec.split_folder).values()
             for line in read_split_file(path, _split_of(path))]
    videos = {split: sum(line.split == split for line in lines) for split in SPLITS}
    classes = {split: len({line.class_key for line in lines if line.split == split}) for split in SPLITS}
    return DatasetInfo(name, spec.description, videos, classes)


def shipped_classes(name: str) -> list[ClassEntry]:
    """The classes of a benchmark with shipped split files, in dataset order, without looking for its videos."""
    spec = SPECS[name]
    if spec.split_folder is None:
        raise DatasetError(f"{name} has no shipped split files; its classes depend on its root")
    folder = SPLIT_ROOT / spec.split_folder
    lines = [line for path in _split_files(folder).values() for line in read_split_file(path, _split_of(path))]
    return [ClassEntry(key, _text_rule(spec, folder)(key), split) for key, split in class_keys(lines)]


def load_dataset(name: str, root: str | Path | None = None, *, split_dir: str | Path | None = None,
                 splits: Sequence[str] = SPLITS, seed: int = 0) -> Dataset:
    """Classes and videos of a registered dataset, each video resolved to a file or frame folder under root.

    `splits` limits which videos are resolved (extracting only the test split needs only its videos on
    disk); `classes` always lists every class so that class indices do not depend on it. `split_dir`
    replaces the shipped split files (`trainlist*.txt`, `vallist*.txt`, `testlist*.txt`, any subset).
    `seed` picks the synthetic dataset (its default root is data/synthetic-seed{seed}).
    """
    if name not in SPECS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[name]
    wanted = _check_splits(splits)
    root = _ensure_synthetic(root, seed) if name == "synthetic" else check_root(root, name, spec.example)
    if split_dir is not None:
        split_folder = Path(split_dir)
    elif spec.split_folder is not None:
        split_folder = SPLIT_ROOT / spec.split_folder
    elif name == "synthetic":
        split_folder = root / "splits"
    else:
        return _load_custom_folders(spec, root, wanted)
    text_rule = _text_rule(spec, root if name == "synthetic" else split_folder)
    files = _split_files(split_folder)
    lines = [line for path in files.values() for line in read_split_file(path, _split_of(path))]
    sources = [(_split_of(path), path.read_bytes()) for path in files.values()]
    return _assemble(spec, root, lines, text_rule, sources, wanted)


def _text_rule(spec: DatasetSpec, folder: Path) -> TextRule:
    """The spec's class-text rule, or its JSON map read from `folder`."""
    return text_from_json(folder / spec.class_text) if isinstance(spec.class_text, str) else spec.class_text


def _check_splits(splits: Sequence[str]) -> set[str]:
    wanted = {splits} if isinstance(splits, str) else set(splits)
    unknown = wanted - set(SPLITS)
    if unknown or not wanted:
        raise DatasetError(f"splits must be a non-empty subset of {', '.join(SPLITS)}; got {sorted(unknown) or 'none'}")
    return wanted


def _ensure_synthetic(root: str | Path | None, seed: int) -> Path:
    """Generate the synthetic videos on first use; imported here so the registry works without the generator."""
    from clipspm.datasets.synthetic import ensure_synthetic

    root = Path(root) if root is not None else Path("data") / f"synthetic-seed{seed}"
    return Path(ensure_synthetic(root, seed)).resolve()


def _split_files(folder: Path) -> dict[str, Path]:
    """split -> its split file in `folder` (`trainlist*.txt` ...); a split may be absent, not ambiguous."""
    if not folder.is_dir():
        raise DatasetError(f"split folder {folder} does not exist; pass --split-dir DIR with trainlist*.txt, "
                           "vallist*.txt and/or testlist*.txt")
    files = {}
    for split in SPLITS:
        matches = sorted(folder.glob(f"{split}list*.txt"))
        if len(matches) > 1:
            raise DatasetError(f"{folder} holds several {split} split files ({', '.join(p.name for p in matches)}); "
                               "keep one, or point --split-dir at a folder with one per split")
        if matches:
            files[split] = matches[0]
    if not files:
        raise DatasetError(f"{folder} holds no split files; expected trainlist*.txt, vallist*.txt and/or "
                           "testlist*.txt with one CLASS/VIDEO per line")
    return files


def _split_of(path: Path) -> str:
    return next(split for split in SPLITS if path.name.startswith(f"{split}list"))


def _load_custom_folders(spec: DatasetSpec, root: Path, wanted: set[str]) -> Dataset:
    """Custom splits from folders: root/{train,val,test}/CLASS/... if present, else root/CLASS/... as test."""
    split_folders = {split: root / split for split in SPLITS if (root / split).is_dir()} or {"test": root}
    found = [item for split, folder in split_folders.items() for item in scan_class_folders(folder, split)]
    lines = [line for line, _ in found]
    sources = [(split, "\n".join(line.key for line in lines if line.split == split).encode())
               for split in split_folders]
    return _assemble(spec, root, lines, text_from_folder_name, sources, wanted,
                     paths={line.key: path for line, path in found})


def _assemble(spec: DatasetSpec, root: Path, lines: list[SplitLine], text_rule: TextRule,
              sources: list[tuple[str, bytes]], wanted: set[str], paths: dict[str, Path] | None = None) -> Dataset:
    """The Dataset of some split lines: classes from all of them, videos from the wanted splits only.

    `paths` holds the videos' paths where they were found while listing folders (custom); otherwise each
    line is resolved against the root.
    """
    check_disjoint(lines)
    classes = [ClassEntry(key, text_rule(key), split) for key, split in class_keys(lines)]
    chosen = sorted((line for line in lines if line.split in wanted), key=lambda line: SPLITS.index(line.split))
    if not chosen:
        present = sorted({line.split for line in lines}, key=SPLITS.index)
        raise DatasetError(f"{spec.name} at {root} has no videos in the requested splits {sorted(wanted)}; "
                           f"it has: {', '.join(present)}")
    if paths is None:
        videos = resolve_videos(spec.name, root, chosen, spec.layout)
    else:
        videos = [VideoEntry(line.key, line.class_key, line.split, paths[line.key]) for line in chosen]
    return Dataset(spec.name, root, classes, videos, split_hash(sources, classes), spec.hflip,
                   spec.default_backbone, spec.default_pretrained)
