"""Hierarchical Synergistic Motion Refinement (Sec. 3.3, Eq. 7-8; SPEC section 2.4).

HSMR only contributes the loss L_H: the features that go on to SPM are the original frames.
`released=True` gives HSMR as the authors' released code has it (SPEC section 6, official profile).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from clipspm.pipeline.losses import condis
from clipspm.pipeline.released_layers import MotionDifference


class MotionFeatureExtractor(nn.Module):
    """MFE (Eq. 8): frames [B, T, C] -> motion descriptor m [B, 1, C].

    Φ is two temporal convolutions (kernel 3, padding 1, C -> C) with a GELU between them; without
    it the pair would collapse into one linear kernel-5 filter. Note that with Φ = identity the
    forward and backward differences cancel exactly, so the motion lives entirely in what Φ learns.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.phi = nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv1d(dim, dim, 3, padding=1))

    def forward(self, frames: Tensor) -> Tensor:
        if frames.shape[1] < 2:
            raise ValueError("motion features need at least two frames per video")
        phi = rearrange(self.phi(rearrange(frames, "b t c -> b c t")), "b c t -> b t c")
        forward = phi[:, 1:] - frames[:, :-1]     # m_t^f = Φ(f)[t+1] - f[t]
        backward = phi[:, :-1] - frames[:, 1:]    # m_t^b = Φ(f)[t] - f[t+1]
        return (forward + backward).mean(1, keepdim=True)   # m = mean over t = 1..T-1 (paper: sum)


class ReleasedMotionFeatureExtractor(MotionDifference):
    """MFE as released (get_motion_feats): m = mean_t ½(m_f + m_b), Φ without a nonlinearity. [B, T, C] -> [B, 1, C]."""

    def forward(self, frames: Tensor) -> Tensor:
        return super().forward(frames).mean(1, keepdim=True)


class HSMR(nn.Module):
    """frames [B, T, C] -> d_h [B]: consistency of shallow and deep motion (Eq. 3, 7); `loss` reduces it to L_H.

    released: the released MFE, and L_H = α_h · (mean over supports + mean over queries), α_h learned
    from 1 (mo_alpha1); the paper's L_H sums d_h over the videos (Eq. 15).
    """

    def __init__(self, dim: int, semantic_fusion: nn.Module, released: bool = False):
        super().__init__()
        self.motion = ReleasedMotionFeatureExtractor(dim) if released else MotionFeatureExtractor(dim)
        self.semantic_fusion = semantic_fusion     # the instance SPM uses as well
        self.alpha = nn.Parameter(torch.tensor(1.0)) if released else None

    def forward(self, frames: Tensor) -> Tensor:
        shallow = self.motion(frames)                                   # m_s
        shallow, fused = self.semantic_fusion(shallow, frames)          # (m_s', f_s) = SF(m_s, f)
        deep = self.motion(fused)                                       # m_d = MFE(f_s)
        return condis(shallow, deep)                                    # d_h = ConDis(m_s', m_d)

    def loss(self, d_h: Tensor, supports: int) -> Tensor:
        """L_H of each episode: d_h [E, V] with the episode's `supports` support videos first -> [E]."""
        if self.alpha is None:
            return d_h.sum(1)
        return self.alpha * (d_h[:, :supports].mean(1) + d_h[:, supports:].mean(1))
