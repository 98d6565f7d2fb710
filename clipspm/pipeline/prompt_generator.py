"""Prompt generator PG (Sec. 3.4.1, Eq. 13): a learned text prompt per video from the episode's prompts."""

from __future__ import annotations

from einops import rearrange, reduce
from torch import Tensor, nn

from clipspm.pipeline.released_layers import feed_forward


class PromptGenerator(nn.Module):
    """PG(f_TP [E, NK, 1, C] or [E, NK, C], f_X [E, V, T, C]) -> [E, V, 1, C].

    Υ(mean_o f_TP[o] ⊙ mean_t f_X[t]), Υ = Linear C->hidden (2C), GELU, dropout, Linear hidden->C. It
    reads only the support prompts, so it can stand in for the query's missing text at test time; in a
    class-major episode their mean is the mean of the N class texts.

    released (token_trans of model_clipspm.py): the video summary is the mean over frames AND channels,
    one scalar per video, and Υ is their FeedForward (a second dropout at the end). The released token is the mean
    of the query texts of the true classes and the support texts; in a class-balanced episode (M queries
    and K supports per class) that too is the mean of the N class texts, so no query label is read here.
    """

    def __init__(self, dim: int, dropout: float, hidden: int | None = None, released: bool = False):
        super().__init__()
        hidden = hidden or 2 * dim
        self.upsilon = (feed_forward(dim, hidden, dropout) if released else
                        nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)))
        self.summary = "e v t c -> e v 1" if released else "e v t c -> e v c"

    def forward(self, support_text: Tensor, videos: Tensor) -> Tensor:
        text = rearrange(support_text, "e o ... c -> e o (...) c").mean(dim=(1, 2))   # [E, C]
        visual = reduce(videos, self.summary, "mean")                                # [E, V, C] or [E, V, 1]
        return rearrange(self.upsilon(text[:, None] * visual), "e v c -> e v 1 c")   # Eq. 13
