"""OTAM speed: the vectorised implementation against the cell-by-cell recursion, forward + backward.

Run `python benchmarks/otam.py`; `run()` returns the measurements for a larger benchmark report.
Two measurements per batch size: `distance` is `otam_distance` on [E, 20, 8, C] queries and
[E, 5, 8, C] prototypes (frame distances included, shared by both methods); `cumulative` is the
OTAM recursion alone on the bidirectional frame-distance tensors [2, E, 20, 5, 8, 8]. The
recursion runs as the public TRX / CLIP-FSAR code does, one call per direction ("2 calls"), and
with both directions batched into one call ("batched"), so the speed-up does not hinge on that.
Times are the best of several interleaved rounds, so load from other processes hits all methods alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from einops import rearrange

if __package__ in (None, ""):  # run as `python benchmarks/otam.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import print_table, seconds_per_call
from clipspm.pipeline.otam import frame_distances, otam_cumulative, otam_cumulative_recursive, otam_distance

FRAMES, QUERIES, PROTOTYPES, LAMBDA = 8, 20, 5, 0.5


def _recursive_distance(query: torch.Tensor, protos: torch.Tensor, batched: bool) -> torch.Tensor:
    dists = frame_distances(rearrange(query, "e q t c -> e q 1 t c"), rearrange(protos, "e p s c -> e 1 p s c"))
    return _recursive_cumulative(torch.stack([dists, dists.transpose(-1, -2)]), batched)


def _recursive_cumulative(dists: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        return otam_cumulative_recursive(dists, LAMBDA).sum(0)
    return otam_cumulative_recursive(dists[0], LAMBDA) + otam_cumulative_recursive(dists[1], LAMBDA)


MEASUREMENTS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "distance": {
        "vectorised": lambda q, p: otam_distance(q, p, LAMBDA),
        "recursion, 2 calls": lambda q, p: _recursive_distance(q, p, batched=False),
        "recursion, batched": lambda q, p: _recursive_distance(q, p, batched=True),
    },
    "cumulative": {
        "vectorised": lambda d: otam_cumulative(d, LAMBDA).sum(0),
        "recursion, 2 calls": lambda d: _recursive_cumulative(d, batched=False),
        "recursion, batched": lambda d: _recursive_cumulative(d, batched=True),
    },
}


def _time_ms(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], calls: int) -> float:
    return seconds_per_call(lambda: torch.autograd.grad(fn(*inputs).sum(), inputs), calls, inputs[0].device) * 1e3


def run(episodes: tuple[int, ...] = (1, 16), dim: int = 512, rounds: int = 7, device: str = "cpu") -> dict:
    """ms per forward+backward call of each method, and the recursion / vectorised ratios."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for num_episodes in episodes:
        query = torch.randn(num_episodes, QUERIES, FRAMES, dim, generator=generator).to(device).requires_grad_()
        protos = torch.randn(num_episodes, PROTOTYPES, FRAMES, dim, generator=generator).to(device).requires_grad_()
        dists = 2 * torch.rand(2, num_episodes, QUERIES, PROTOTYPES, FRAMES, FRAMES, generator=generator)
        inputs = {"distance": (query, protos), "cumulative": (dists.to(device).requires_grad_(),)}
        for what, methods in MEASUREMENTS.items():
            torch.testing.assert_close(methods["vectorised"](*inputs[what]),
                                       methods["recursion, 2 calls"](*inputs[what]), atol=1e-4, rtol=1e-5)
            best = dict.fromkeys(methods, float("inf"))
            for _ in range(rounds):
                for name, fn in methods.items():
                    calls = 10 if name == "vectorised" else 2
                    best[name] = min(best[name], _time_ms(fn, inputs[what], calls))
            rows.append({
                "episodes": num_episodes, "what": what, **{f"{name} ms": round(ms, 2) for name, ms in best.items()},
                "speed-up vs 2 calls": round(best["recursion, 2 calls"] / best["vectorised"], 1),
                "speed-up vs batched": round(best["recursion, batched"] / best["vectorised"], 1),
            })
    return {"name": "otam", "frames": FRAMES, "queries": QUERIES, "prototypes": PROTOTYPES, "lambda": LAMBDA,
            "dim": dim, "device": device, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    torch.set_num_threads(1)   # small tensors: one thread measures the method, not thread-pool contention
    result = run()
    print_table(f"OTAM forward+backward, T={FRAMES}, {QUERIES} queries x {PROTOTYPES} prototypes per episode, "
                f"C={result['dim']}, bidirectional, lambda={LAMBDA}, {result['device']}, {result['threads']} "
                f"thread(s)", result["rows"])


if __name__ == "__main__":
    main()
