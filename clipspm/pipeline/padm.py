"""Prototype-Anchor Dual Modulation (Sec. 3.5, Eq. 14; SPEC section 2.6).

Transductive: the class tokens average over all queries of the episode, so the queries of one
episode see each other (and nothing of other episodes in the batch). The modulation is a set
attention over videos at each frame position: no positional embedding over videos, so
reordering the queries reorders the outputs and changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from clipspm.pipeline.semantic_fusion import TransformerLayer


@dataclass
class PADMOutput:
    support: Tensor       # [E, N*K, T, C] f_S^PADM: supports modulated by the class tokens
    prototypes: Tensor    # [E, N, T, C]   f_S^P: modulated class tokens
    query: Tensor         # [E, N*M, T, C] f_Q^PADM: queries modulated by the anchor
    anchor: Tensor        # [E, 1, T, C]   f_Q^A: the query-side anchor


class PrototypeAnchorDualModulation(nn.Module):
    """One transformer layer, used on both sets: a paper `TransformerLayer(dim, heads, mlp_ratio, dropout)`,
    or the layer given as `transformer` (the official profile's `ReleasedTransformer`, context1)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, transformer: nn.Module | None = None):
        super().__init__()
        self.transformer = TransformerLayer(dim, heads, mlp_ratio, dropout) if transformer is None else transformer

    def forward(self, support: Tensor, query: Tensor, shots: int) -> PADMOutput:
        """support [E, N*K, T, C] class-major, query [E, N*M, T, C]."""
        supports = rearrange(support, "e (n k) t c -> e n k t c", k=shots)
        # Eq. 14: class token n = mean over its K supports and all N*M queries; anchor = mean of the class tokens.
        class_tokens = (supports.sum(2) + query.sum(1, keepdim=True)) / (shots + query.shape[1])   # [E, N, T, C]
        anchor = class_tokens.mean(1, keepdim=True)                                                # [E, 1, T, C]
        prototypes, support = self._modulate(class_tokens, support)
        anchor, query = self._modulate(anchor, query)
        return PADMOutput(support=support, prototypes=prototypes, query=query, anchor=anchor)

    def _modulate(self, lead: Tensor, videos: Tensor) -> tuple[Tensor, Tensor]:
        """Transformer over [lead ; videos] with videos as tokens, one set per (episode, frame)."""
        e, count = lead.shape[0], lead.shape[1]
        tokens = rearrange(torch.cat([lead, videos], 1), "e v t c -> (e t) v c")
        tokens = rearrange(self.transformer(tokens), "(e t) v c -> e v t c", e=e)
        return tokens[:, :count], tokens[:, count:]
