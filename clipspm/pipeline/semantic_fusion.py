"""Semantic Fusion SF (Sec. 3.3.2, Eq. 9; SPEC section 2.3), and the transformer layer it is built on.

One SF instance is shared by HSMR (motion prompt) and SPM (text prompts). `TransformerLayer` is
also the "Transformer" of PADM (Eq. 14). `ReleasedSemanticFusion` is SF as the authors' released
code builds it (SPEC section 6), around `released_layers.ReleasedTransformer`: the official profile
of CLIP-SPM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from clipspm.errors import ClipspmError

MAX_FRAMES = 64  # capacity of the learned positional embeddings (the cache's T is 8 by default)
# The prompt gate starts nearly closed (σ(-4) ≈ 0.02): a prompt enters the frames only as training
# finds it useful. With gates starting at 0.5, the class text added to the supports (and the untrained
# generated prompt added to the queries) dominates the frame distances from the first step and training
# overfitted the class texts on the synthetic benchmark (test 27.8% vs 70.4% with this init; README, Defaults).
PROMPT_GATE_BIAS = -4.0


class TransformerLayer(nn.Module):
    """One pre-norm transformer encoder layer over tokens: [B, L, C] -> [B, L, C]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if dim % heads:
            raise ClipspmError(f"model.num_heads={heads} does not divide the feature width C={dim}; "
                               f"choose a divisor of {dim} (e.g. --set model.num_heads=8)")
        self.heads, self.dropout_p = heads, dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(self.attn_norm(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        x = x + self.dropout(self.proj(rearrange(attn, "b h l d -> b l (h d)")))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class SemanticFusion(nn.Module):
    """SF(prompt [..., 1, C], frames [..., T, C]) -> (prompt_out [..., 1, C], frames_out [..., T, C]).

    gate + sum (Eq. 9 line 1): f' = σ(Ψ_v(f)) ⊙ f + σ(Ψ_tp(p)) ⊙ p; gate off: f' = f + p; sum off:
    f' = f (the gates only weigh the two summands, so without the sum they are not built).
    Then [p ; f'] through one pre-norm transformer layer (Eq. 9 line 2).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, gate: bool = True, sum: bool = True):
        super().__init__()
        self.sum = sum
        if gate and sum:
            self.visual_gate = nn.Linear(dim, dim)   # Ψ_v
            self.prompt_gate = nn.Linear(dim, dim)   # Ψ_tp
            nn.init.constant_(self.prompt_gate.bias, PROMPT_GATE_BIAS)
        else:
            self.visual_gate = self.prompt_gate = None
        # Attention alone is blind to token order; the embedding tells the prompt token from the frames
        # and frame t from frame t+1, which the motion prompt of HSMR is about. Learned, as in CLIP's towers.
        self.position = nn.Parameter(torch.zeros(1 + MAX_FRAMES, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.transformer = TransformerLayer(dim, heads, mlp_ratio, dropout)

    def forward(self, prompt: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        *lead, frames_count, dim = frames.shape
        if frames_count > MAX_FRAMES:
            raise ClipspmError(f"semantic fusion supports up to {MAX_FRAMES} frames per video, got {frames_count}")
        prompt, frames = prompt.reshape(-1, 1, dim), frames.reshape(-1, frames_count, dim)   # [B, 1, C], [B, T, C]
        if self.visual_gate is not None:
            fused = torch.sigmoid(self.visual_gate(frames)) * frames + torch.sigmoid(self.prompt_gate(prompt)) * prompt
        elif self.sum:
            fused = frames + prompt
        else:
            fused = frames
        tokens = self.transformer(torch.cat([prompt, fused], dim=1) + self.position[:1 + frames_count])
        return tokens[:, :1].reshape(*lead, 1, dim), tokens[:, 1:].reshape(*lead, frames_count, dim)


class ReleasedSemanticFusion(nn.Module):
    """SF as released (model_clipspm.py se_te): SF(prompt [..., 1, C], frames [..., T, C]) -> same shapes.

    f' = α · g_text(p) ⊙ p + g_vision(f) ⊙ f, each gate g an MLP Linear(C, int(r·C)), LeakyReLU(slope),
    Linear(int(r·C), C), Sigmoid (gate_text / gate_vision, r = mid_dim_text / mid_dim_vision); then the
    ungated p and f' as [p ; f'] through `transformer`, with no positional embedding. gate off:
    f' = α·p + f; sum off: f' = f (no gates built), as the switches of `SemanticFusion`.
    """

    def __init__(self, dim: int, transformer: nn.Module, text_ratio: float, vision_ratio: float, slope: float,
                 alpha: float, gate: bool = True, sum: bool = True):
        super().__init__()
        self.alpha, self.sum = alpha, sum
        self.gate_text = _released_gate(dim, int(dim * text_ratio), slope) if gate and sum else None
        self.gate_vision = _released_gate(dim, int(dim * vision_ratio), slope) if gate and sum else None
        self.transformer = transformer

    def forward(self, prompt: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        *lead, frames_count, dim = frames.shape
        prompt, frames = prompt.reshape(-1, 1, dim), frames.reshape(-1, frames_count, dim)   # [B, 1, C], [B, T, C]
        if self.gate_text is not None:
            fused = self.alpha * (self.gate_text(prompt) * prompt) + self.gate_vision(frames) * frames
        elif self.sum:
            fused = self.alpha * prompt + frames
        else:
            fused = frames
        tokens = self.transformer(torch.cat([prompt, fused], dim=1))
        return tokens[:, :1].reshape(*lead, 1, dim), tokens[:, 1:].reshape(*lead, frames_count, dim)


def _released_gate(dim: int, hidden: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, dim), nn.Sigmoid())
