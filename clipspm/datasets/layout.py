"""Finding each split entry on disk: a video file or a folder of extracted frames.

The root is read through a memoised directory index (one `os.scandir` per folder, never one glob per
entry), so resolving SSv2-Full's 82k entries costs one pass over the folders they live in.
Only the class part of an entry is joined to the root, after split parsing has refused '..', absolute
paths and separators; the video part is only a key looked up in directory listings. So a split line
can only reach what is really inside the root (symlinks placed there by the user are followed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from clipspm.datasets.splits import SplitLine
from clipspm.datasets.types import SPLITS, VideoEntry
from clipspm.errors import DatasetError

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")  # preference order
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CLIP_SUFFIX = re.compile(r"^(?P<id>.+)_\d{6}_\d{6}$")  # Kinetics clips: {id}_{start:06d}_{end:06d}
TREE_DEPTH = 4  # how many folder levels below the root the SSv2 fallback searches (root/a/b/c/d/88644.webm)


@dataclass(frozen=True)
class LayoutRules:
    """Dataset-specific ways a video may be named on disk, beyond `CLASS/VIDEO.ext` and `CLASS/VIDEO/`."""

    clip_suffix: bool = False    # Kinetics: CLASS/{id}_{start:06d}_{end:06d}.mp4
    flat_fallback: bool = False  # SSv2 original release: root/{id}.webm, matched by name below root when unique


class Candidate(NamedTuple):
    name: str     # the entry's name in its folder
    is_dir: bool  # a frame folder candidate (its images are checked when it is chosen)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def split_video_name(name: str) -> tuple[str, int] | None:
    """(stem, position of the extension in VIDEO_EXTENSIONS) of a video file name, any case; else None."""
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower()
    return (stem, VIDEO_EXTENSIONS.index(suffix)) if suffix in VIDEO_EXTENSIONS else None


def has_images(folder: Path) -> bool:
    """Whether a folder holds extracted frames; stops at the first image so big folders cost one read."""
    try:
        with os.scandir(folder) as entries:
            return any(is_image(entry.name) and entry.is_file() for entry in entries)
    except OSError:
        return False


def list_folder(folder: Path, clip_suffix: bool = False) -> dict[str, list[Candidate]] | None:
    """Video name -> what in `folder` could be that video, best first; None if `folder` is not a directory.

    Best first means: exact name before Kinetics clip name, video file before frame folder, then
    VIDEO_EXTENSIONS order, so a folder holding both `v.avi` and `v.mp4` resolves the same way every time.
    """
    ranked: list[tuple[tuple[int, int, int, str], str, Candidate]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                video = split_video_name(entry.name)
                if video is not None and entry.is_file():
                    (stem, rank), is_dir = video, False
                elif entry.is_dir():
                    stem, is_dir, rank = entry.name, True, len(VIDEO_EXTENSIONS)
                else:
                    continue
                candidate = Candidate(entry.name, is_dir)
                ranked.append(((0, is_dir, rank, entry.name), stem, candidate))
                clip = CLIP_SUFFIX.match(stem) if clip_suffix else None
                if clip:
                    ranked.append(((1, is_dir, rank, entry.name), clip["id"], candidate))
    except OSError:
        return None
    listing: dict[str, list[Candidate]] = {}
    for _, video, candidate in sorted(ranked, key=lambda item: item[0]):
        listing.setdefault(video, []).append(candidate)
    return listing


def entry_candidates(listing: dict[str, list[Candidate]], video: str) -> list[Candidate]:
    """What in a folder listing can be the split entry's `video`: the name itself, else, for an entry written
    with its video extension (`CLASS/v_X_g01_c01.avi`, as UCF101's official lists are), its stem, the file
    it names first (a copy transcoded to another container is taken when that file is not there)."""
    if video in listing:
        return listing[video]
    named = split_video_name(video)
    if named is None:
        return []
    return sorted(listing.get(named[0], []), key=lambda candidate: candidate.name != video)


def pick(folder: Path, candidates: Sequence[Candidate]) -> tuple[Path | None, str | None]:
    """The first usable candidate in `folder`; a frame folder without images is reported, not used."""
    problem = None
    for candidate in candidates:
        path = folder / candidate.name
        if not candidate.is_dir or has_images(path):
            return path, None
        problem = f"frame folder {path} has no {'/'.join(ext[1:] for ext in IMAGE_EXTENSIONS)} images"
    return None, problem


class RootIndex:
    """Resolves split entries against one root, listing each folder once."""

    def __init__(self, root: Path, rules: LayoutRules):
        self.root = root
        self.rules = rules
        self._class_folders: dict[tuple[str, str], list[tuple[Path, dict[str, list[Candidate]]]]] = {}
        self._tree: dict[str, dict[Path, list[tuple[int, Candidate]]]] | None = None

    def resolve(self, line: SplitLine) -> tuple[Path | None, str | None]:
        """Path of one entry, or None and the reason: root/CLASS, then root/SPLIT/CLASS, then anywhere (SSv2)."""
        problem = None
        for folder, listing in self.class_folders(line.class_key, line.split):
            candidates = entry_candidates(listing, line.video)
            if candidates:
                path, problem_here = pick(folder, candidates)
                if path is not None:
                    return path, None
                problem = problem or problem_here
        if self.rules.flat_fallback:
            path, problem_here = self._resolve_anywhere(line.video)
            if path is not None:
                return path, None
            problem = problem or problem_here
        return None, problem or self._not_found(line)

    def class_folders(self, class_key: str, split: str) -> list[tuple[Path, dict[str, list[Candidate]]]]:
        """The folders that exist for a class, with their listings: root/CLASS, root/SPLIT/CLASS, other splits."""
        if (class_key, split) not in self._class_folders:
            bases = ("", split, *(other for other in SPLITS if other != split))
            folders = [self.root / base / class_key for base in bases]
            listings = [(folder, list_folder(folder, self.rules.clip_suffix)) for folder in folders]
            self._class_folders[class_key, split] = [(folder, found) for folder, found in listings if found is not None]
        return self._class_folders[class_key, split]

    def _resolve_anywhere(self, video: str) -> tuple[Path | None, str | None]:
        if self._tree is None:
            self._tree = index_tree(self.root)
        named = split_video_name(video)
        places = self._tree.get(video) or (self._tree.get(named[0], {}) if named else {})
        if len(places) > 1:
            shown = ", ".join(str(folder) for folder in sorted(places)[:3])
            return None, (f"{video!r} matches {len(places)} places under {self.root} ({shown}); "
                          "keep one, or arrange the videos as CLASS/VIDEO")
        for folder, ranked in places.items():
            return pick(folder, [candidate for _, candidate in sorted(ranked)])
        return None, None

    def _not_found(self, line: SplitLine) -> str:
        extensions = "|".join(VIDEO_EXTENSIONS)
        looked = [f"{line.key}{extensions}", f"{line.key}/ with frames", "the same under train/, val/, test/"]
        if self.rules.clip_suffix:
            looked.append(f"{line.key}_{{start:06d}}_{{end:06d}}.*")
        if self.rules.flat_fallback:
            looked.append(f"{line.video}.* or {line.video}/ up to {TREE_DEPTH} folders below the root")
        return f"no video file or frame folder for {line.key!r} under {self.root} (looked for {', '.join(looked)})"


def index_tree(root: Path) -> dict[str, dict[Path, list[tuple[int, Candidate]]]]:
    """Video name -> {folder: [(rank, candidate)]} over the whole tree below root.

    A folder whose listing shows an image is a frame folder: it is indexed by its name and not read
    further. Folders are visited once by inode, so symlink loops cannot recurse, and at most
    TREE_DEPTH levels deep, so a root given by mistake (a home folder) cannot start an endless walk.
    """
    index: dict[str, dict[Path, list[tuple[int, Candidate]]]] = {}
    visited: set[tuple[int, int]] = set()
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        listed = _list_once(folder, visited)
        if listed is None:
            continue
        is_frame_folder, videos, subfolders = listed
        if is_frame_folder and folder != root:
            frames = Candidate(folder.name, True)
            index.setdefault(folder.name, {}).setdefault(folder.parent, []).append((len(VIDEO_EXTENSIONS), frames))
        elif not is_frame_folder:
            for name, stem, rank in videos:
                index.setdefault(stem, {}).setdefault(folder, []).append((rank, Candidate(name, False)))
            if depth < TREE_DEPTH:
                stack.extend((folder / name, depth + 1) for name in subfolders)
    return index


def _list_once(folder: Path, visited: set[tuple[int, int]]
               ) -> tuple[bool, list[tuple[str, str, int]], list[str]] | None:
    """(is a frame folder, videos as (name, stem, rank), subfolder names); None if unreadable or visited."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in visited:
            return None
        visited.add((info.st_dev, info.st_ino))
        videos, subfolders = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if is_image(entry.name):
                    return True, [], []
                video = split_video_name(entry.name)
                if video is not None and entry.is_file():
                    videos.append((entry.name, *video))
                elif entry.is_dir():
                    subfolders.append(entry.name)
        return False, videos, subfolders
    except OSError:
        return None


def check_root(root: str | Path | None, name: str, example: str) -> Path:
    """The dataset root as an absolute directory, or a DatasetError that says which --root to pass."""
    hint = f"pass --root DIR where DIR holds the class folders, e.g. DIR/{example}"
    if root is None:
        raise DatasetError(f"{name} needs the folder with its videos: {hint}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{name}: the root {path} does not exist; {hint}")
    if not path.is_dir():
        raise DatasetError(f"{name}: the root {path} is not a folder; {hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"{name}: the root {path} is not readable by this user; fix its permissions")
    return path.resolve()


def resolve_videos(name: str, root: Path, lines: Sequence[SplitLine], rules: LayoutRules) -> list[VideoEntry]:
    """One VideoEntry per split line; a root where no entry resolves is the wrong folder and raises."""
    index = RootIndex(root, rules)
    videos = []
    for line in lines:
        path, problem = index.resolve(line)
        videos.append(VideoEntry(line.key, line.class_key, line.split, path, problem))
    if videos and all(video.path is None for video in videos):
        first = lines[0]
        examples = [f"{root / first.class_key / first.video}.mp4", f"{root / first.class_key / first.video}/img_00001.jpg"]
        if rules.flat_fallback:
            examples.append(f"{root / first.video}.webm")
        top = sorted(entry.name for entry in os.scandir(root) if not entry.name.startswith("."))
        shown = ", ".join(top[:8]) + (f" and {len(top) - 8} more" if len(top) > 8 else "") if top else "nothing"
        raise DatasetError(
            f"{name}: none of the {len(videos)} videos was found under {root}, so it is probably the wrong "
            f"folder. Expected a video file (any of {', '.join(VIDEO_EXTENSIONS)}) or a frame folder per entry, "
            f"e.g. {' or '.join(examples)}. The root holds: {shown}. First problem: {videos[0].problem}")
    return videos


def scan_class_folders(folder: Path, split: str) -> list[tuple[SplitLine, Path]]:
    """A split read from `folder/CLASS/VIDEO.ext` and `folder/CLASS/VIDEO/` (the custom dataset)."""
    class_dirs = sorted(entry.name for entry in os.scandir(folder)
                        if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{folder} holds no class folders; arrange the videos as {folder}/CLASS/VIDEO.mp4 "
                           f"or {folder}/CLASS/VIDEO/img_00001.jpg")
    found = []
    for class_key in class_dirs:
        class_folder = folder / class_key
        listing = list_folder(class_folder) or {}
        videos = [(video, pick(class_folder, listing[video])[0]) for video in sorted(listing)]
        videos = [(video, path) for video, path in videos if path is not None]
        if not videos:
            raise DatasetError(f"class folder {class_folder} holds no video files ({', '.join(VIDEO_EXTENSIONS)}) "
                               "or frame folders; add its videos or remove the folder")
        found.extend((SplitLine(class_key, video, split, class_folder, None), path) for video, path in videos)
    return found
