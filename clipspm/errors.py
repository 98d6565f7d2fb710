"""Errors a user can act on. The CLI prints their message, without a traceback, and exits 2."""


class ClipspmError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class DatasetError(ClipspmError):
    """A dataset root, split file or layout is unusable."""


class WeightsUnavailableError(ClipspmError):
    """CLIP weights cannot be found locally and cannot be downloaded."""


class CacheError(ClipspmError):
    """A feature cache is missing, unreadable, or does not fit what was asked of it."""
