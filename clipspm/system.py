"""What this machine lends the process: cores, devices, the terminal."""

from __future__ import annotations

import os

import torch
from rich.console import Console

from clipspm.errors import ClipspmError

PIPE_WIDTH = 160   # columns of tables and progress lines written to a pipe or a log file (rich's default: 80)


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """`--device NAME` as a torch device: None picks CUDA when available, else the CPU. A name torch does not
    parse, or a GPU this process cannot see, is refused with the devices it can use."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    usable = f"cpu, cuda:0 ... cuda:{visible - 1}" if visible else "cpu only"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClipspmError(f"{option} {name!r} is not a device name; this machine has: {usable}") from None
    if device.type == "cuda" and (device.index or 0) >= visible:
        seen = f"only {visible} CUDA device(s) are visible" if visible else "no CUDA device is visible"
        raise ClipspmError(f"{option} {name}: {seen}; this machine has: {usable}")
    if device.type not in ("cpu", "cuda"):
        raise ClipspmError(f"{option} {name}: only CPU and CUDA devices are supported; this machine has: {usable}")
    return device


def make_console(*, stderr: bool = True, quiet: bool = False) -> Console:
    """A rich Console. Where the stream is a pipe or a file, lines are PIPE_WIDTH columns wide, so that
    tables, paths and progress lines are not cut at rich's default 80."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console
