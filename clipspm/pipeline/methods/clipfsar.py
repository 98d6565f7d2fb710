"""CLIP-FSAR (Wang et al., IJCV 2023) as its authors released it: text-conditioned temporal transformer + OTAM.

Read from github alibaba-mmai-research/CLIP-FSAR (`models/base/few_shot.py`, `CNN_OTAM_CLIPFSAR`, its
`Transformer_v1`; the loss in `runs/train_net_few_shot.py`; per-dataset values in
`configs/projects/CLIPFSAR/`, kept in `clipspm/configs/methods/clipfsar.yaml`). Parity with that code:
tests/fixtures/clipfsar.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.released_layers import ReleasedTransformer, released_otam_distance, released_video_text_loss
from clipspm.schema import LossOptions, ModelOptions


class CLIPFSAROptions(ModelOptions):
    kind: Literal["clipfsar"] = "clipfsar"
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    num_heads: int = Field(8, ge=1, description="attention heads of the temporal transformer, each C // num_heads "
                                                "wide (released: 8)")
    mlp_hidden: int = Field(2048, ge=1, description="hidden width of the transformer MLP (released: 2048 at every C)")
    attention_dropout: float = Field(0.2, ge=0, lt=1, description="dropout after the attention output projection")
    mlp_dropout: float = Field(0.05, ge=0, lt=1, description="dropout after each layer of the transformer MLP")


class CLIPFSARLoss(LossOptions):
    video_text: float = Field(1.0, ge=0, description="weight of the video-text loss: time-averaged CLIP frames "
                                                     "classified against every base-class text (released: per "
                                                     "dataset, in configs/methods/ of the method)")


class CLIPFSARHead(nn.Module):
    """Supports are averaged over their K shots first; each class's frames, with its class text as one
    more token, go through the temporal transformer, whose frame outputs are the prototype. Queries go
    through the same transformer without text. logits = -OTAM(query, prototype), frame distance
    1 - released_cosine. Training adds "video_text": the time-averaged CLIP frames of every support and
    query (before the transformer) classified against all base-class texts, logits = scale * cosine,
    scale a learned factor starting at 1. From a frozen cache that loss moves only `scale`; end to end
    it trains the visual tower.
    """

    def __init__(self, dim: int, options: CLIPFSAROptions):
        super().__init__()
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional
        self.transformer = ReleasedTransformer(dim, options.num_heads, options.mlp_hidden, options.attention_dropout,
                                               options.mlp_dropout)
        self.text_scale = nn.Parameter(torch.ones(1))

    def forward(self, episode: Episode) -> HeadOutput:
        e, t = episode.num_episodes, episode.frames
        merged = class_prototypes(episode.support, episode.shots)                              # [E, N, T, C]
        tokens = torch.cat([merged, episode.class_text[:, :, None]], 2)                        # [E, N, T+1, C]
        protos = self.transformer(tokens.flatten(0, 1))[:, :t].unflatten(0, (e, -1))          # [E, N, T, C]
        query = self.transformer(episode.query.flatten(0, 1)).unflatten(0, (e, -1))           # [E, NM, T, C]
        logits = -released_otam_distance(query, protos, self.otam_lambda, self.bidirectional)
        aux = {}
        if self.training and episode.base_text is not None:
            aux["video_text"] = released_video_text_loss(episode, self.text_scale)
        return HeadOutput(logits=logits, aux=aux, query_features=query)


register_method(Method(
    name="clipfsar", title="CLIP-FSAR", paper="Wang et al., CLIP-guided Prototype Modulating for Few-shot Action "
                                               "Recognition, IJCV 2023",
    code="github.com/alibaba-mmai-research/CLIP-FSAR (models/base/few_shot.py, CNN_OTAM_CLIPFSAR; loss: "
         "runs/train_net_few_shot.py)",
    build=lambda model, loss, dim: CLIPFSARHead(dim, model), model_options=CLIPFSAROptions,
    loss_options=CLIPFSARLoss, needs=("frames", "class_text", "base_text"), defaults="clipfsar",
    parity="matches the released head to 1e-5 in float64: eval logits, the loss of a 16-episode step and every "
           "gradient (tests/fixtures/clipfsar)",
    notes="one class prompt (model.num_templates=1), as the released code uses one template"))
