"""Semantic Prototype Modulation (Sec. 3.4, Eq. 10-12; SPEC section 2.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import reduce
from torch import Tensor, nn

from clipspm.pipeline.losses import condis
from clipspm.pipeline.prompt_generator import PromptGenerator


@dataclass
class SPMOutput:
    support: Tensor               # [E, N*K, T, C] real-prompt branch f_s^real (support labels are known)
    query: Tensor                 # [E, N*M, T, C] learned-prompt branch f̄_q (no label at test time)
    consistency: Tensor | None    # [E] L_S per episode: Σ d_s over the videos given a real prompt; None if none


class SemanticPrototypeModulation(nn.Module):
    """Modulates supports with their class prompt and queries with a prompt generated from the episode.

    Consistency (Eq. 12) ties the two branches on videos that have both: supports when
    `support_consistency`, queries when `query_consistency` (training only: it needs the label).
    Branches no output or loss needs are not computed. `semantic_fusion` is a `SemanticFusion` or a
    `ReleasedSemanticFusion`; `prompt_generator` defaults to the paper's PG of width `dim`.
    """

    def __init__(self, dim: int, dropout: float, semantic_fusion: nn.Module,
                 support_consistency: bool = True, query_consistency: bool = True,
                 prompt_generator: PromptGenerator | None = None):
        super().__init__()
        self.semantic_fusion = semantic_fusion     # shared with HSMR
        self.prompt_generator = PromptGenerator(dim, dropout) if prompt_generator is None else prompt_generator
        self.support_consistency = support_consistency
        self.query_consistency = query_consistency

    def forward(self, support: Tensor, query: Tensor, support_text: Tensor,
                query_text: Tensor | None = None) -> SPMOutput:
        """support [E, NK, T, C], query [E, NM, T, C], support_text f_TP [E, NK, 1, C],
        query_text [E, NM, 1, C]: the true class prompt of each query, needed in training only."""
        support_pair = self.training and self.support_consistency
        query_pair = self.training and self.query_consistency
        if query_pair and query_text is None:
            raise ValueError("query consistency needs the text prompt of each query's true class in training")
        nk, nm = support.shape[1], query.shape[1]
        # Real-prompt branch (Eq. 11, lines 1-2): supports; queries only to pair them with their learned branch.
        real_frames = torch.cat([support, query], 1) if query_pair else support
        real_prompts = torch.cat([support_text, query_text], 1) if query_pair else support_text
        # Learned-prompt branch (Eq. 10; Eq. 11, lines 3-4): queries; supports only for their consistency.
        learned_frames = torch.cat([query, support], 1) if support_pair else query
        learned_prompts = self.prompt_generator(support_text, learned_frames)
        # One SF pass over both branches: [E, V_real + V_learned, ...].
        prompts, frames = self.semantic_fusion(torch.cat([real_prompts, learned_prompts], 1),
                                               torch.cat([real_frames, learned_frames], 1))
        real = real_frames.shape[1]
        real_prompts, real_frames = prompts[:, :real], frames[:, :real]
        learned_prompts, learned_frames = prompts[:, real:], frames[:, real:]

        terms = []
        if support_pair:   # learned supports sit after the nm learned queries
            terms.append(_consistency(real_prompts[:, :nk], real_frames[:, :nk],
                                      learned_prompts[:, nm:], learned_frames[:, nm:]))
        if query_pair:
            terms.append(_consistency(real_prompts[:, nk:], real_frames[:, nk:],
                                      learned_prompts[:, :nm], learned_frames[:, :nm]))
        consistency = sum(terms) if terms else None
        return SPMOutput(support=real_frames[:, :nk], query=learned_frames[:, :nm], consistency=consistency)


def _consistency(prompt: Tensor, frames: Tensor, learned_prompt: Tensor, learned_frames: Tensor) -> Tensor:
    """Σ over videos of d_s = ConDis(f_tp, f̄_tp) + ConDis([f_tp; f], [f̄_tp; f̄]) (Eq. 12): [E, V, ...] -> [E]."""
    d_prompt = condis(prompt, learned_prompt, batch_dims=2)
    d_tokens = condis(torch.cat([prompt, frames], 2), torch.cat([learned_prompt, learned_frames], 2), batch_dims=2)
    return reduce(d_prompt + d_tokens, "e v -> e", "sum")
