"""Split files: one `CLASS/VIDEO` per line, checked so that no entry can address a path outside the root."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from clipspm.datasets.types import SPLITS, ClassEntry
from clipspm.errors import DatasetError

UNSAFE_CHARACTERS = re.compile(r"[\\\x00-\x1f\x7f]")  # backslashes could act as separators elsewhere


class SplitLine(NamedTuple):  # a tuple, not a dataclass: SSv2-Full makes 82k of them per load
    class_key: str
    video: str
    split: str
    source: Path      # the split file, or the folder a custom split was read from
    line: int | None  # 1-based line number in `source`; None for folder-derived splits

    @property
    def key(self) -> str:
        return f"{self.class_key}/{self.video}"

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}" if self.line is not None else str(self.source)


def parse_entry(text: str, source: Path, line: int) -> tuple[str, str]:
    """(class, video) of one split line; the text is refused unless it is two plain path components."""
    if UNSAFE_CHARACTERS.search(text):
        raise DatasetError(f"{source} line {line}: {text!r} contains a backslash or control character; "
                           "write entries as CLASS/VIDEO with plain names")
    if text.startswith("/"):
        raise DatasetError(f"{source} line {line}: {text!r} is an absolute path; "
                           "entries are CLASS/VIDEO relative to the root")
    parts = text.split("/")
    if "." in parts or ".." in parts:
        raise DatasetError(f"{source} line {line}: {text!r} uses '.' or '..' and would leave the dataset root; "
                           "write entries as CLASS/VIDEO")
    if len(parts) != 2 or not all(parts):
        raise DatasetError(f"{source} line {line}: {text!r} is not of the form CLASS/VIDEO; "
                           "fix or delete that line")
    return parts[0], parts[1]


def read_split_file(path: Path, split: str) -> list[SplitLine]:
    """The entries of one split file in line order; blank lines are skipped, duplicates refused."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist; check --split-dir") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"split file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                           "save it as UTF-8") from None
    lines: list[SplitLine] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        entry = raw.strip()
        if not entry:
            continue
        class_key, video = parse_entry(entry, path, number)
        if entry in first_line:
            raise DatasetError(f"{path}: {entry!r} appears on line {first_line[entry]} and again on "
                               f"line {number}; delete one of them")
        first_line[entry] = number
        lines.append(SplitLine(class_key, video, split, path, number))
    if not lines:
        raise DatasetError(f"split file {path} has no entries; it should list one CLASS/VIDEO per line")
    return lines


def check_disjoint(lines: Iterable[SplitLine]) -> None:
    """Few-shot splits must not share videos or classes: a shared one would leak test classes into training."""
    video_at: dict[str, SplitLine] = {}
    class_at: dict[str, SplitLine] = {}
    for line in lines:
        seen = video_at.setdefault(line.key, line)
        if seen is not line:
            raise DatasetError(f"{line.key!r} is listed in the {seen.split} split ({seen.where}) and again in "
                               f"the {line.split} split ({line.where}); a video belongs to one split only")
        seen = class_at.setdefault(line.class_key, line)
        if seen.split != line.split:
            raise DatasetError(f"class {line.class_key!r} appears in the {seen.split} split ({seen.where}) and in "
                               f"the {line.split} split ({line.where}); few-shot splits need disjoint classes")


def class_keys(lines: Iterable[SplitLine]) -> list[tuple[str, str]]:
    """(class key, split) in split order, first-appearance order within a split."""
    order: dict[str, str] = {}
    for line in sorted(lines, key=lambda line: SPLITS.index(line.split)):
        order.setdefault(line.class_key, line.split)
    return list(order.items())


def split_hash(sources: Sequence[tuple[str, bytes]], classes: Sequence[ClassEntry]) -> str:
    """sha256 over the split definition: each split's bytes, then the class texts (they reach the prompts)."""
    digest = hashlib.sha256()
    for split, data in sources:
        digest.update(f"{split}\0{len(data)}\0".encode())
        digest.update(data)
    texts = [[entry.key, entry.text, entry.split] for entry in classes]
    digest.update(json.dumps(texts, ensure_ascii=False).encode())
    return digest.hexdigest()
