"""STEN as the CLIP-SPM code base runs it (github hnlxy/CLIP-SPM, `models/model_sten.py`): no parameters.

STEN (Chen et al., Applied Intelligence 2024) adds cross-modal fusion and temporal modules to CLIP;
in the CLIP-SPM release those modules are commented out, so what runs there, and here, is a
product of two softmaxes over cosines of time-averaged CLIP features: query-to-class-text and
query-to-visual-prototype. Its loss trains only the visual tower (finetune). Parity with that
code: tests/fixtures/sten.
"""

from __future__ import annotations

from typing import Literal

from einops import reduce
from torch import nn

from clipspm.pipeline.episode import Episode, HeadOutput
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.released_layers import released_cosine
from clipspm.schema import ModelOptions


class STENOptions(ModelOptions):
    kind: Literal["sten"] = "sten"


class STENHead(nn.Module):
    """logits = softmax_n cos(q̄, text_n) * softmax_n cos(q̄, s̄_n): q̄ the time-averaged query, s̄_n the
    mean over shots of the time-averaged supports of class n; cosine as `released_cosine`."""

    def forward(self, episode: Episode) -> HeadOutput:
        protos = reduce(episode.support, "e (n k) t c -> e n c", "mean", k=episode.shots)      # [E, N, C]
        query = reduce(episode.query, "e q t c -> e q c", "mean")                              # [E, NM, C]
        text_match = released_cosine(query, episode.class_text).softmax(-1)                     # [E, NM, N]
        visual_match = released_cosine(query, protos).softmax(-1)                               # [E, NM, N]
        return HeadOutput(logits=text_match * visual_match, query_features=episode.query)


register_method(Method(
    name="sten", title="STEN", paper="Chen et al., Cross-modal guides spatio-temporal enrichment network for "
                                     "few-shot action recognition, Applied Intelligence 54 (2024)",
    code="github.com/hnlxy/CLIP-SPM (models/model_sten.py; loss: run/main_run.py); STEN's authors released none",
    build=lambda model, loss, dim: STENHead(), model_options=STENOptions, needs=("frames", "class_text"),
    trainable=False, defaults="sten",
    parity="matches the CLIP-SPM code base's STEN to 1e-5 in float64: eval logits, the loss of a 16-episode step "
           "and its gradient w.r.t. the frame features (tests/fixtures/sten)",
    notes="the STEN modules are commented out in the CLIP-SPM release: text and visual cosine matching only"))
