"""OTAM (Cao et al., CVPR 2020) on the raw CLIP frame features: the "CLIP features + OTAM" baseline of
Table 3 (CLIP-SPM with every part off). No parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.otam import otam_distance
from clipspm.schema import ModelOptions


class OTAMOptions(ModelOptions):
    kind: Literal["otam"] = "otam"
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")


class OTAMHead(nn.Module):
    """logits = -OTAM(query, mean over shots of the supports)."""

    def __init__(self, options: OTAMOptions):
        super().__init__()
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional

    def forward(self, episode: Episode) -> HeadOutput:
        protos = class_prototypes(episode.support, episode.shots)                     # [E, N, T, C]
        distance = otam_distance(episode.query, protos, self.otam_lambda, self.bidirectional)
        return HeadOutput(logits=-distance, query_features=episode.query)


register_method(Method(
    name="otam", title="OTAM", paper="Cao et al., Few-Shot Video Classification via Temporal Alignment, CVPR 2020",
    code="-", build=lambda model, loss, dim: OTAMHead(model), model_options=OTAMOptions, trainable=False,
    parity="the vectorised OTAM equals the published recursion (tests/test_otam.py)"))
