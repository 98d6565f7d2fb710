"""Per-video descriptions (`data.descriptions`): a CSV or JSON file mapping a video id to a text.

    JSON  {"brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0": "a woman combs her long hair", ...}
    CSV   video,description          (the header line is optional; quote texts holding commas)
          brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0,a woman combs her long hair

Video ids are the cache's (`CLASS/VIDEO`, as `clipspm cache info` lists them). Every video of a split
a run reads must have one: a description missing for some videos would silently give those the class
prompt instead, and at test time a class prompt of the true class is a label.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from clipspm.errors import ClipspmError

HEADER = ("video", "description")


def read_descriptions(path: Path, video_ids: list[str]) -> list[str]:
    """The description of each of `video_ids`, in that order; refused when any is missing."""
    table = _table(Path(path).resolve(), Path(path).stat().st_mtime_ns)
    missing = [video for video in video_ids if video not in table]
    if missing:
        raise ClipspmError(f"{path} has no description for {len(missing)} of {len(video_ids)} videos (first: "
                           f"{', '.join(missing[:3])}); keys are the cache's video ids, CLASS/VIDEO")
    return [table[video] for video in video_ids]


@lru_cache(maxsize=4)
def _table(path: Path, modified: int) -> dict[str, str]:
    """The file as {video id: text}; read once per version of the file (train and val share it)."""
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ClipspmError(f"descriptions {path} is not valid JSON: {error}") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ClipspmError(f"descriptions {path} must be a JSON object of video id -> text")
        return table
    if path.suffix.lower() != ".csv":
        raise ClipspmError(f"descriptions {path}: use a .csv (video,description) or .json (video id -> text) file")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and tuple(cell.strip().lower() for cell in rows[0]) == HEADER:
        rows = rows[1:]
    bad = next((row for row in rows if len(row) != 2), None)
    if bad is not None:
        raise ClipspmError(f"descriptions {path}: the row {','.join(bad)[:80]!r} has {len(bad)} columns, expected 2 "
                           f"(video,description; quote a text that holds commas)")
    return {video.strip(): text.strip() for video, text in rows}
