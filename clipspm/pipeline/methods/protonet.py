"""ProtoNet (Snell et al., NeurIPS 2017) on time-averaged CLIP features: no parameters."""

from __future__ import annotations

from typing import Literal

from einops import reduce
from torch import nn

from clipspm.pipeline.episode import Episode, HeadOutput
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.otam import frame_distances
from clipspm.schema import ModelOptions


class ProtoNetOptions(ModelOptions):
    kind: Literal["protonet"] = "protonet"


class ProtoNetHead(nn.Module):
    """logits = cos - 1 between the time-averaged query and the class means of the time-averaged supports."""

    def forward(self, episode: Episode) -> HeadOutput:
        protos = reduce(episode.support, "e (n k) t c -> e n c", "mean", k=episode.shots)   # [E, N, C]
        query = reduce(episode.query, "e q t c -> e q c", "mean")                           # [E, NM, C]
        return HeadOutput(logits=-frame_distances(query, protos), query_features=episode.query)


register_method(Method(
    name="protonet", title="ProtoNet", paper="Snell et al., Prototypical Networks, NeurIPS 2017", code="-",
    build=lambda model, loss, dim: ProtoNetHead(), model_options=ProtoNetOptions, trainable=False,
    parity="closed form: tested against cosine to class means"))
