"""Layers as the released code of the CLIP-MEI / CLIP-CPM2C / CLIP-SPM family writes them (their
`models/myRes.py`), for the heads that reproduce that code (`methods/cpm2c.py`, `methods/clipmei.py`).

They differ from the paper-reading modules of this package (`semantic_fusion`, `hsmr`) in ways that
move results by more than 1e-5: cosine with +0.01 in the denominator, one LayerNorm shared by q, k
and v, an MLP without a norm in front, two convolutions without a nonlinearity between them.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.otam import otam_cumulative

COSINE_EPSILON = 0.01   # their cos_sim: x·y / (|x| |y| + 0.01), an offset rather than a clamp


def cosine_similarity(x: Tensor, y: Tensor, epsilon: float = COSINE_EPSILON) -> Tensor:
    """[..., A, C], [..., B, C] -> [..., A, B], leading dims broadcast."""
    dot = x @ y.transpose(-1, -2)
    norms = x.norm(dim=-1, keepdim=True) @ y.norm(dim=-1, keepdim=True).transpose(-1, -2)
    return dot / (norms + epsilon)


def released_otam_distance(query: Tensor, protos: Tensor, lam: float = 0.5, bidirectional: bool = True) -> Tensor:
    """OTAM on 1 - their cosine: query [E, Q, Tq, C], prototypes [E, P, Ts, C] -> [E, Q, P].

    Bidirectional is OTAM(D) + OTAM(D^T), D rows indexed by query frames; a prototype set of one
    (the anchor of CLIP-MEI) broadcasts over the queries or the other way round.
    """
    dists = 1 - cosine_similarity(rearrange(query, "e q t c -> e q 1 t c"), rearrange(protos, "e p s c -> e 1 p s c"))
    distance = otam_cumulative(dists, lam)
    return distance + otam_cumulative(dists.transpose(-1, -2), lam) if bidirectional else distance


def consistency_distance(a: Tensor, b: Tensor) -> Tensor:
    """Their `_dis`: squared L2 norm over the last two axes, mean over the videos. [E, V, L, C] -> [E]."""
    return (a - b).square().sum((-2, -1)).mean(-1)


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Their `FeedForward`: Linear, exact GELU, dropout, Linear, dropout; [..., C] -> [..., C], no residual."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class QKVTransformer(nn.Module):
    """Their `Transformer_v1` of depth 1 used as self-attention: [B, L, C] -> [B, L, C].

    x + Attn(LN(x)) with q, k, v projected without bias from the one LayerNorm output, heads x
    head_dim inner width (not tied to C), output Linear + dropout; then x + MLP(x), no norm before it.
    No positional embedding: token order only matters through what the caller puts where.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, attention_dropout: float,
                 mlp_dropout: float):
        super().__init__()
        if heads < 1 or head_dim < 1:
            raise ClipspmError(f"attention needs at least one head of width >= 1, got {heads} x {head_dim}")
        inner = heads * head_dim
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        # A single head as wide as C needs no output projection (theirs: project_out).
        project = not (heads == 1 and head_dim == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(attention_dropout)) if project else nn.Identity()
        self.mlp = feed_forward(dim, mlp_hidden, mlp_dropout)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm(x)
        q, k, v = (rearrange(proj(normed), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(q, k, v)              # softmax(q k^T / sqrt(d)) v, no dropout
        x = x + self.to_out(rearrange(attended, "b h l d -> b l (h d)"))
        return x + self.mlp(x)


class MotionDifference(nn.Module):
    """Their `get_motion_feats` before any pooling: frames [B, T, C] -> motion [B, T-1, C].

    Φ = conv2(conv1(f)) over time (kernel 3, padding 1, no nonlinearity between);
    m_t = ((Φ[t+1] - f[t]) + (Φ[t] - f[t+1])) / 2.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, frames: Tensor) -> Tensor:
        if frames.shape[1] < 2:
            raise ClipspmError("motion features need at least two frames per video")
        phi = rearrange(self.conv2(self.conv1(rearrange(frames, "b t c -> b c t"))), "b c t -> b t c")
        return 0.5 * ((phi[:, 1:] - frames[:, :-1]) + (phi[:, :-1] - frames[:, 1:]))
