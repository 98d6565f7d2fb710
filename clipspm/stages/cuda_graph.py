"""A training step captured once in a CUDA graph and replayed: one launch instead of hundreds of small kernels.

The heads stage's step (gather an Episode from index tensors, the heads forward and backward, the Adam
update) is many kernels on small tensors; on a GPU its time goes to launching them rather than to the
arithmetic. A graph records the whole sequence once and replays it with one launch. What capture needs,
and how it is met here:

- fixed memory: each call's inputs are copied into tensors made at capture, and the outputs are the tensors
  the captured step wrote, overwritten by every replay (read them before the next call);
- state made lazily by the first steps (Adam's moments, library handles, cached index tables) must exist
  before capture: the first `warmup` calls run eagerly, on a side stream as capture requires. They are real
  steps; the next call is captured and then replayed, so no step is skipped or repeated;
- nothing read back to the host inside the step (its metrics stay tensors: `episode_loss`), and an optimiser
  made with `capturable=True`;
- random numbers (dropout) come from the default CUDA generator, which a replay reads at replay time:
  `torch.manual_seed` before a call seeds the replayed step as it seeds an eager one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

Out = TypeVar("Out")

WARMUP_STEPS = 3   # eager steps before capture (the PyTorch documentation's whole-network example uses 3)


class GraphedStep(Generic[Out]):
    """`step(*inputs)` on CUDA tensors (or None, in the same places on every call), replayed from a CUDA graph."""

    def __init__(self, step: Callable[..., Out], warmup: int = WARMUP_STEPS):
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor | None] = []
        self.outputs: Out | None = None

    def __call__(self, *inputs: Tensor | None) -> Out:
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = [None if x is None else x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):   # records the step; nothing runs until the replay below
                self.outputs = self.step(*self.inputs)
        else:
            for static, x in zip(self.inputs, inputs, strict=True):
                if (static is None) != (x is None):
                    raise ValueError("a graphed step takes None in the same inputs on every call")
                if static is not None:
                    static.copy_(x)
        self.graph.replay()
        return self.outputs
