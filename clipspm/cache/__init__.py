"""The feature cache: `clipspm.cache.open(path)` gives its arrays and provenance to Python users."""

from pathlib import Path

from clipspm.cache.address import cache_path, settings_key
from clipspm.cache.checksum import Damage
from clipspm.cache.store import DONE, FAILED, PENDING, FeatureCache, SplitFeatures, find_store


def open(path: str | Path) -> FeatureCache:
    """Open a cache directory (or the store inside it) for reading. Nothing is checked on opening:
    `load_split` checks what it reads, `check()` finds every damaged block."""
    return FeatureCache(find_store(Path(path)))


__all__ = ["DONE", "FAILED", "PENDING", "Damage", "FeatureCache", "SplitFeatures", "cache_path", "find_store",
           "open", "settings_key"]
