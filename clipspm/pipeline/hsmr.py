"""Hierarchical Synergistic Motion Refinement (Sec. 3.3, Eq. 7-8; SPEC section 2.4).

HSMR only contributes the loss L_H: the features that go on to SPM are the original frames.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from clipspm.pipeline.losses import condis
from clipspm.pipeline.semantic_fusion import SemanticFusion


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


class HSMR(nn.Module):
    """frames [B, T, C] -> d_h [B]: consistency of shallow and deep motion (Eq. 3, 7)."""

    def __init__(self, dim: int, semantic_fusion: SemanticFusion):
        super().__init__()
        self.motion = MotionFeatureExtractor(dim)
        self.semantic_fusion = semantic_fusion     # the instance SPM uses as well

    def forward(self, frames: Tensor) -> Tensor:
        shallow = self.motion(frames)                                   # m_s
        shallow, fused = self.semantic_fusion(shallow, frames)          # (m_s', f_s) = SF(m_s, f)
        deep = self.motion(fused)                                       # m_d = MFE(f_s)
        return condis(shallow, deep)                                    # d_h = ConDis(m_s', m_d)
