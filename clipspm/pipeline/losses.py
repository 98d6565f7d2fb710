"""Auxiliary distances and losses of the heads (SPEC sections 2.2 and 2.8)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def condis(a: Tensor, b: Tensor, batch_dims: int = 1) -> Tensor:
    """ConDis: squared Euclidean distance summed over every axis after the first `batch_dims`.

    [*batch, ...], [*batch, ...] -> [*batch]; e.g. prompts [B, 1, C] or tokens [B, 1+T, C] -> [B].
    The paper measures consistency with Euclidean distance (Sec. 4.2); squared keeps it smooth at 0.
    """
    if a.shape != b.shape:
        raise ValueError(f"condis needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).square().flatten(batch_dims).sum(-1)


def video_text_loss(videos: Tensor, text: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP-FSAR's video-text contrastive loss: cross-entropy of scaled cosine logits to the true text.

    videos [..., C] time-averaged video features, text [B, C] one feature per base class,
    labels [...] long rows of `text`, logit_scale: log of the temperature (CLIP style). Mean over videos.
    """
    logits = F.normalize(videos, dim=-1) @ F.normalize(text, dim=-1).T * logit_scale.exp().clamp(max=100.0)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
