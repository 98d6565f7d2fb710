"""A cache is addressed by the settings that determine its contents.

The same settings give the same directory name, so a repeated command finds and reuses its
cache; any other setting (backbone, weights, T, views, seed, split definition...) gives a new one.
How fast the extraction ran (workers, batch size, number of processes) is not part of the address.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# Marks in the weights part of a cache's name where it uses the released CLIP-SPM preparation (extract.yaml
# normalize, sampling, class_names), e.g. hmdb51-RN50-quickgelu-openai-unnormalized-relframes-relnames-tuned-T8-...
PREPARED = {("normalize", "none"): "unnormalized", ("sampling", "released"): "relframes",
            ("class_names", "released"): "relnames"}


def settings_key(settings: dict) -> str:
    """Short stable hash of the content-defining settings."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def cache_path(cache_root: Path, settings: dict) -> Path:
    """`CACHE_ROOT/{dataset}-{model}-{weights}-T{T}-{key}`: readable, and unique per settings (after the
    weights: `-unnormalized`, `-relframes`, `-relnames` for the released frame preparation, `-person` for
    frames cut around a person, extract --person-crop)."""
    marks = "".join(f"-{mark}" for (name, value), mark in PREPARED.items() if settings.get(name) == value)
    weights = (settings["pretrained"] if settings["pretrained_kind"] == "tag" else settings["pretrained_kind"]) + marks
    if settings.get("tuned_weights_sha256"):
        weights += "-tuned"
    if settings.get("person_crop"):
        weights += "-person"
    name = f"{settings['dataset']}-{settings['model']}-{weights}-T{settings['num_frames']}-{settings_key(settings)}"
    return Path(cache_root) / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
