"""Layers as the released code of the CLIP-FSAR family writes them (CLIP-FSAR `models/base/few_shot.py`;
CLIP-MEI, CLIP-CPM2C, CLIP-SPM `models/myRes.py`: the same `Transformer_v1`, `FeedForward`, `cos_sim`),
for the heads that reproduce that code (`methods/clipfsar.py`, `sten.py`, `cpm2c.py`, `clipmei.py`, `mcdp.py`,
and the official profile of `clipspm.py`).

They differ from the paper-reading modules of this package (`semantic_fusion`, `hsmr`) in ways that
move results by more than 1e-5: cosine with +0.01 in the denominator, one LayerNorm shared by q, k
and v, an MLP without a norm in front, two convolutions without a nonlinearity between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode
from clipspm.pipeline.otam import frame_distances, otam_distance

COSINE_EPSILON = 0.01   # their cos_sim: x·y / (|x| |y| + 0.01), an offset rather than a clamp


def released_cosine(x: Tensor, y: Tensor) -> Tensor:
    """Their cosine of every row of x with every row of y: [..., A, C], [..., B, C] -> [..., A, B];
    leading dims broadcast."""
    return 1 - frame_distances(x, y, COSINE_EPSILON)


def released_otam_distance(query: Tensor, protos: Tensor, lam: float = 0.5, bidirectional: bool = True) -> Tensor:
    """OTAM on 1 - their cosine: query [E, Q, Tq, C], prototypes [E, P, Ts, C] -> [E, Q, P].

    Bidirectional is OTAM(D) + OTAM(D^T), D rows indexed by query frames; a prototype set of one
    (the anchor of CLIP-MEI) broadcasts over the queries or the other way round.
    """
    return otam_distance(query, protos, lam, bidirectional, cosine_eps=COSINE_EPSILON)


def released_video_text_loss(episode: Episode, scale: Tensor) -> Tensor:
    """CLIP-FSAR's video-text loss (its `class_logits`): the time-averaged frames of every support and query,
    before any head, against all base-class texts, logits = scale * their cosine; cross-entropy averaged
    over the E episodes' videos. -> scalar."""
    videos = reduce(torch.cat([episode.support, episode.query], 1), "e v t c -> e v c", "mean")
    labels = torch.cat([repeat(episode.class_ids, "e n -> e (n k)", k=episode.shots),
                        torch.gather(episode.class_ids, 1, episode.query_labels)], 1)    # [E, V] base-text rows
    logits = released_cosine(videos, episode.base_text) * scale                           # [E, V, B]
    return F.cross_entropy(rearrange(logits, "e v b -> (e v) b"), labels.flatten())


def consistency_distance(a: Tensor, b: Tensor) -> Tensor:
    """Their `_dis`: squared L2 norm over the last two axes, mean over the videos. [E, V, L, C] -> [E]."""
    return (a - b).square().sum((-2, -1)).mean(-1)


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Their `FeedForward`: Linear, exact GELU, dropout, Linear, dropout; [..., C] -> [..., C], no residual."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class ReleasedTransformer(nn.Module):
    """Their `Transformer_v1` of depth 1 used as self-attention: [B, L, C] -> [B, L, C].

    x + Attn(LN(x)) with q, k, v projected without bias from the one LayerNorm output, heads x
    head_dim inner width (default C // heads; CLIP-MEI: 256 at any C), output Linear + dropout, no
    dropout on the attention weights; then x + MLP(x), no norm before it. No positional embedding.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, attention_dropout: float, mlp_dropout: float,
                 head_dim: int | None = None):
        super().__init__()
        head_dim = head_dim or dim // heads
        if head_dim == 0:
            raise ClipspmError(f"model.num_heads={heads} exceeds the feature width C={dim}; choose at most {dim}")
        self.heads, inner = heads, heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        # A single head as wide as C has no output projection in the released code.
        self.out = (nn.Identity() if heads == 1 and head_dim == dim else
                    nn.Sequential(nn.Linear(inner, dim), nn.Dropout(attention_dropout)))
        self.mlp = feed_forward(dim, mlp_hidden, mlp_dropout)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(x)
        q, k, v = (rearrange(project(tokens), "b l (h d) -> b h l d", h=self.heads)
                   for project in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(d)) v
        x = x + self.out(rearrange(attended, "b h l d -> b l (h d)"))
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
