"""Errors a user can act on. The CLI prints their message, without a traceback, and exits with `exit_code`."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class ClipspmError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = 2   # bad input or options


class DatasetError(ClipspmError):
    """A dataset root, split file or layout is unusable."""


class WeightsUnavailableError(ClipspmError):
    """CLIP weights cannot be found locally and cannot be downloaded."""


class CacheError(ClipspmError):
    """A feature cache is missing, unreadable, or does not fit what was asked of it."""


class JobFailedError(ClipspmError):
    """The job ran, but part of it failed (the message lists what); what finished is kept."""

    exit_code = 1


@contextmanager
def reading(path: str | Path, what: str, fix: str) -> Iterator[None]:
    """Around the reading of one file: a damaged or foreign file becomes a ClipspmError naming `path`
    (see `damaged_file`); `what` says what the file should be ("checkpoint weights"), `fix` what to do."""
    try:
        yield
    except Exception as error:
        converted = damaged_file(path, what, fix, error)
        if converted is None:
            raise
        raise converted from None


def damaged_file(path: str | Path, what: str, fix: str, error: Exception) -> ClipspmError | None:
    """The user's error that `error`, raised while reading `path`, stands for; None if it is none of these: a
    safetensors header or length that does not parse, a pickle that torch's weights-only loader refuses, a zip
    archive (torch.save's format) that does not open, a file that ends early, one that is not there."""
    if isinstance(error, SafetensorError):
        return ClipspmError(f"{what} {path} is not a readable safetensors file ({error}): it is damaged, "
                            f"truncated or another kind of file; {fix}")
    if isinstance(error, pickle.UnpicklingError):
        protocol = pickle_protocol(path)
        if protocol not in (None, 2):
            return ClipspmError(f"{what} {path} was pickled with protocol {protocol}, which torch's weights-only "
                                f"loader cannot read (it reads torch.save's default, 2); save it again with "
                                f"torch.save(state_dict, path) or as safetensors")
        return ClipspmError(f"{what} {path} is not a weights-only PyTorch file ({weights_only_reason(error)}): it "
                            f"is damaged, or holds objects other than tensors, which are never unpickled here; {fix}")
    if isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error):   # torch.load's zip reader
        reason = str(error).split(". ")[0]
        return ClipspmError(f"{what} {path} is not a readable PyTorch file ({reason}): it is damaged or "
                            f"truncated; {fix}")
    if isinstance(error, EOFError):
        return ClipspmError(f"{what} {path} ends too early: it is empty or truncated; {fix}")
    if isinstance(error, (FileNotFoundError, IsADirectoryError)):
        return ClipspmError(f"{what} {path} cannot be read ({error.strerror}); {fix}")
    return None


def pickle_protocol(path: str | Path) -> int | None:
    """The pickle protocol of a torch.save file (zip archive or legacy format); None where there is none."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
                head = archive.open(name).read(2) if name else b""
        else:
            with open(path, "rb") as handle:
                head = handle.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else None


def weights_only_reason(error: Exception) -> str:
    """What torch's weights-only unpickler objected to, without the rest of its message: that message
    suggests loading with `weights_only=False`, which would run whatever code the file holds."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    if found:
        return found.group(1).strip()
    if "weights_only" in text:
        return "weights-only load refused"
    return text.splitlines()[0] if text else "unpickling failed"
