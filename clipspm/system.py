"""What this machine lends the process (cores, devices, the terminal), and the CPU thread policy.

A stage's CPU work is its torch intra-op threads plus its DataLoader decoding workers (one thread
each: torch sets one in every worker, decord is opened with one). On the CPU the two never add up
to more than the cores the process may keep busy: an OpenMP thread pool that shares its cores with
another busy process waits at every barrier for a descheduled thread, and a small op then takes
about 20x as long (OTAM; benchmarks/threads.py). On a GPU the torch threads are left as they are, and only
the decoding workers are held to the cores.

The cores a process may keep busy: $CLIPSPM_THREADS when set (the user's choice on a shared machine,
or an ablation worker's share of the cores), else the cores the process may run on (shared among the
processes torchrun started on this machine).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from rich.console import Console

from clipspm.errors import ClipspmError

PIPE_WIDTH = 160   # columns of tables and progress lines written to a pipe or a log file (rich's default: 80)
THREADS_VARIABLE = "CLIPSPM_THREADS"

F = TypeVar("F", bound=Callable)


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


def threads_override() -> int | None:
    """$CLIPSPM_THREADS as a number of cores, None when unset."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ClipspmError(f"{THREADS_VARIABLE}={value!r}: set it to the number of CPU cores clipspm may keep busy "
                           f"(1 or more), or unset it to use every core this process may run on")
    return int(value)


def core_budget() -> int:
    """The cores this process may keep busy, decoding workers and torch threads together: $CLIPSPM_THREADS,
    else its share of the cores it may run on among the processes torchrun started on this machine."""
    return threads_override() or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class ThreadPlan:
    cores: int     # what the process may keep busy
    workers: int   # DataLoader decoding processes, one thread each
    threads: int   # torch intra-op threads of this process

    def describe(self) -> str:
        workers = f" + {self.workers} decoding worker(s)" if self.workers else ""
        return f"{self.threads} torch thread(s){workers} on {self.cores} core(s)"


def plan_threads(device_type: str, workers: int = 0, *, cores: int, torch_threads: int,
                 explicit: bool = False) -> ThreadPlan:
    """Decoding workers and torch threads of a stage asking for `workers` decoding processes.

    On the CPU, workers + threads <= cores: the workers get at most all cores but one (none on a
    single core: decoding in the training process then costs no more than a worker would), the torch
    threads the rest. Without an explicit budget the threads also stay at most `torch_threads`,
    torch's own start (its physical cores, or OMP_NUM_THREADS, or what a caller set). On a GPU the
    tower does not run on these cores: workers up to the cores, the threads unchanged.
    """
    if device_type != "cpu":
        return ThreadPlan(cores, min(workers, cores), torch_threads)
    workers = min(workers, cores - 1)
    threads = cores - workers if explicit else min(torch_threads, cores - workers)
    return ThreadPlan(cores, workers, max(1, threads))


def trainer_share(cpu_trainers: int, gpu_trainers: int = 0, cores: int | None = None) -> int:
    """Cores each of `cpu_trainers` CPU training processes may keep busy beside each other and beside
    `gpu_trainers` GPU ones, each of which keeps a core busy feeding its device (at least one)."""
    cores = core_budget() if cores is None else cores
    return max(1, (cores - gpu_trainers) // max(1, cpu_trainers))


def thread_plan(device, workers: int = 0) -> ThreadPlan:
    """`plan_threads` for this process: a stage on `device` asking for `workers` decoding processes."""
    return plan_threads(torch.device(device).type, workers, cores=core_budget(), torch_threads=torch.get_num_threads(),
                        explicit=threads_override() is not None)


def use_threads(device, workers: int = 0) -> ThreadPlan:
    """`thread_plan`, with torch's intra-op threads set to it."""
    plan = thread_plan(device, workers)
    torch.set_num_threads(plan.threads)
    return plan


def keeps_caller_threads(function: F) -> F:
    """Give the caller its torch thread count back after `function` (a stage that calls `use_threads`),
    so a stage run in-process (tests, an ablation run on one device) does not change the caller's."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper  # type: ignore[return-value]
