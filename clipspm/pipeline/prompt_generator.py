"""Prompt generator PG (Sec. 3.4.1, Eq. 13): a learned text prompt per video from the episode's prompts."""

from __future__ import annotations

from einops import rearrange, reduce
from torch import Tensor, nn


class PromptGenerator(nn.Module):
    """PG(f_TP [E, NK, 1, C] or [E, NK, C], f_X [E, V, T, C]) -> [E, V, 1, C].

    Υ(mean_o f_TP[o] ⊙ mean_t f_X[t]), Υ = Linear C->2C, GELU, dropout, Linear 2C->C. It reads
    only the support prompts, so it can stand in for the query's missing text at test time.
    """

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.upsilon = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, support_text: Tensor, videos: Tensor) -> Tensor:
        text = rearrange(support_text, "e o ... c -> e o (...) c").mean(dim=(1, 2))   # [E, C]
        visual = reduce(videos, "e v t c -> e v c", "mean")                          # [E, V, C]
        return rearrange(self.upsilon(text[:, None] * visual), "e v c -> e v 1 c")   # Eq. 13
