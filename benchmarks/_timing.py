"""What the benchmarks share: interleaved rounds, synchronised timing, a plain table, the command line."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def interleaved(candidates: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Every candidate once per round, round after round: load from other processes on a shared
    machine then falls on all candidates alike. Returns each candidate's results in round order."""
    results: dict[str, list[T]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, candidate in candidates.items():
            results[name].append(candidate())
    return results


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device | str = "cpu") -> float:
    """Mean wall time of `calls` calls of `fn`, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def print_table(title: str, rows: list[dict]) -> None:
    """`rows` as right-aligned columns (the keys of the first row) under `title`."""
    print(title)
    columns = list(rows[0])
    widths = [max(len(column), *(len(str(row[column])) for row in rows)) for column in columns]
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[column]).rjust(width) for column, width in zip(columns, widths)))
    print()


def command_line() -> str:
    """The command that made these figures, as typed from the repository root."""
    return shlex.join(["python", *sys.argv])


def describe_device(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} torch thread(s)"


def print_markdown_table(title: str, rows: list[dict]) -> None:
    """`rows` as a Markdown table (the keys of the first row as its header) under `title`."""
    print(f"{title}\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")
    print()
