"""CLIP-FSAR (Wang et al., IJCV 2023): text-conditioned prototype modulation + OTAM (SPEC section 2.8)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import reduce, repeat
from pydantic import Field
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.losses import video_text_loss
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.otam import otam_distance
from clipspm.pipeline.semantic_fusion import MAX_FRAMES, TransformerLayer
from clipspm.schema import LossOptions, ModelOptions


class CLIPFSAROptions(ModelOptions):
    kind: Literal["clipfsar"] = "clipfsar"
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    num_heads: int = Field(8, ge=1, description="attention heads of the temporal transformer; must divide C")
    mlp_ratio: float = Field(4.0, gt=0, description="transformer MLP width / C")
    dropout: float = Field(0.1, ge=0, lt=1, description="transformer dropout")


class CLIPFSARLoss(LossOptions):
    video_text: float = Field(1.0, ge=0, description="weight of the video-text contrastive loss over the base classes")


class CLIPFSARHead(nn.Module):
    """Each support's frames, with its class text as an extra token, go through a temporal transformer;
    queries go through the same transformer without text. Prototypes are the mean over shots, the
    metric is OTAM. In training, with `episode.base_text`, the time-averaged outputs of supports and
    queries are classified against all base-class texts (aux "video_text"; learned temperature).
    """

    def __init__(self, dim: int, options: CLIPFSAROptions):
        super().__init__()
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional
        self.position = nn.Parameter(torch.zeros(1 + MAX_FRAMES, dim))    # slot 0: the text token
        nn.init.trunc_normal_(self.position, std=0.02)
        self.transformer = TransformerLayer(dim, options.num_heads, options.mlp_ratio, options.dropout)
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
        logits = -otam_distance(query, class_prototypes(support, k), self.otam_lambda, self.bidirectional)
        aux = {}
        if self.training and episode.base_text is not None:
            videos = reduce(torch.cat([support, query], 1), "e v t c -> e v c", "mean")
            labels = torch.cat([repeat(episode.class_ids, "e n -> e (n k)", k=k),
                                torch.gather(episode.class_ids, 1, episode.query_labels)], 1)    # [E, V]
            aux["video_text"] = video_text_loss(videos, episode.base_text, labels, self.logit_scale)
        return HeadOutput(logits=logits, aux=aux, query_features=query)


register_method(Method(
    name="clipfsar", title="CLIP-FSAR", paper="Wang et al., CLIP-guided Prototype Modulating for Few-shot Action "
                                               "Recognition, IJCV 2023",
    code="github.com/alibaba-mmai-research/CLIP-FSAR (models/base/few_shot.py, CNN_OTAM_CLIPFSAR)",
    build=lambda model, loss, dim: CLIPFSARHead(dim, model), model_options=CLIPFSAROptions,
    loss_options=CLIPFSARLoss, needs=("frames", "class_text", "base_text")))
