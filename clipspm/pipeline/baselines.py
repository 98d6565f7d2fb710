"""Baseline heads that run from the same cache (SPEC section 2.8): ProtoNet and CLIP-FSAR.

The OTAM baseline is the CLIP-SPM head with every part switched off (`build_head(kind="otam")`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from einops import reduce, repeat
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput
from clipspm.pipeline.losses import video_text_loss
from clipspm.pipeline.otam import frame_distances, otam_distance
from clipspm.pipeline.semantic_fusion import MAX_FRAMES, TransformerLayer


class ProtoNetHead(nn.Module):
    """Prototypical network on time-averaged features: logits = cos - 1 to the class means. No parameters."""

    def forward(self, episode: Episode) -> HeadOutput:
        protos = reduce(episode.support, "e (n k) t c -> e n c", "mean", k=episode.shots)   # [E, N, C]
        query = reduce(episode.query, "e q t c -> e q c", "mean")                           # [E, NM, C]
        logits = -frame_distances(query, protos)                                            # [E, NM, N]
        return HeadOutput(logits=logits, query_features=episode.query)


class CLIPFSARHead(nn.Module):
    """CLIP-FSAR (Wang et al., IJCV 2023): text-conditioned prototype modulation + OTAM.

    Each support's frames, with its class text as an extra token, go through a temporal transformer;
    queries go through the same transformer without text. Prototypes are the mean over shots, the
    metric is OTAM. In training, with `episode.base_text`, the time-averaged outputs of supports and
    queries are classified against all base-class texts (aux "video_text"; learned temperature).
    """

    def __init__(self, dim: int, model_cfg: Mapping):
        super().__init__()
        self.otam_lambda = float(model_cfg["otam_lambda"])
        self.bidirectional = bool(model_cfg["otam_bidirectional"])
        self.position = nn.Parameter(torch.zeros(1 + MAX_FRAMES, dim))    # slot 0: the text token
        nn.init.trunc_normal_(self.position, std=0.02)
        self.transformer = TransformerLayer(dim, model_cfg["num_heads"], model_cfg["mlp_ratio"], model_cfg["dropout"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def modulate(self, frames: Tensor, text: Tensor | None = None) -> Tensor:
        """frames [B, T, C], optional text [B, 1, C] -> frames [B, T, C]."""
        count = frames.shape[1]
        if count > MAX_FRAMES:
            raise ClipspmError(f"CLIP-FSAR supports up to {MAX_FRAMES} frames per video, got {count}")
        tokens = frames + self.position[1:1 + count]
        if text is not None:
            tokens = torch.cat([text + self.position[:1], tokens], 1)
        return self.transformer(tokens)[:, -count:]

    def forward(self, episode: Episode) -> HeadOutput:
        e, k = episode.num_episodes, episode.shots
        support = self.modulate(episode.support.flatten(0, 1), episode.support_text().flatten(0, 1))
        query = self.modulate(episode.query.flatten(0, 1))
        support, query = support.unflatten(0, (e, -1)), query.unflatten(0, (e, -1))      # [E, NK|NM, T, C]
        protos = reduce(support, "e (n k) t c -> e n t c", "mean", k=k)
        logits = -otam_distance(query, protos, self.otam_lambda, self.bidirectional)
        aux = {}
        if self.training and episode.base_text is not None:
            videos = reduce(torch.cat([support, query], 1), "e v t c -> e v c", "mean")
            labels = torch.cat([repeat(episode.class_ids, "e n -> e (n k)", k=k),
                                torch.gather(episode.class_ids, 1, episode.query_labels)], 1)    # [E, V]
            aux["video_text"] = video_text_loss(videos, episode.base_text, labels, self.logit_scale)
        return HeadOutput(logits=logits, aux=aux, query_features=query)
