"""CLIP-CPM2C (Guo et al., Neurocomputing 2025): consistency prototype module and motion compensation.

Reference code: `models/model_cpm2c.py` of the CLIP-MEI repository (D-XH/CLIP-MEI), the port of the
authors' CPM-MC code into the training framework CLIP-SPM was later built on; the README section
"CLIP-CPM2C and CLIP-MEI" says why this copy and what differs from the other two.

Two streams, appearance (the frames) and motion (their bidirectional differences), each through the
same temporal transformer with a leading token: supports lead with their class text, queries with a
learned token standing in for the text they lack. Distance = OTAM between the class means of the
supports and the queries, frames only; the learned token is pulled towards the true query text by a
consistency loss (training only), and a video-text cross-entropy over the base classes adapts CLIP.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from pydantic import Field
from torch import Tensor, nn

from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.released_layers import (
    MotionDifference,
    ReleasedTransformer,
    consistency_distance,
    released_cosine,
    released_otam_distance,
)
from clipspm.schema import LossOptions, ModelOptions


class CPM2COptions(ModelOptions):
    kind: Literal["cpm2c"] = "cpm2c"
    appearance_coeff: float = Field(1.0, ge=0, description="weight of the appearance stream in the distance and the "
                                                           "consistency loss (released NORMAL_COFF)")
    motion_coeff: float = Field(1.0, ge=0, description="weight of the motion stream in the distance and the "
                                                       "consistency loss (released MOTION_COFF; 0 on UCF101)")
    text_weight: float = Field(0.1, ge=0, description="share of the leading token (text or learned) added to every "
                                                      "frame before the transformer")
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    num_heads: int = Field(8, ge=1, description="attention heads of the temporal transformer")
    head_dim: int | None = Field(None, ge=1, description="width of one attention head; default C / num_heads "
                                                        "(released: C // 8)")
    mlp_hidden: int = Field(2048, ge=1, description="hidden width of the transformer MLP (released: 2048 at any C)")
    attention_dropout: float = Field(0.2, ge=0, lt=1, description="dropout after the attention output projection")
    mlp_dropout: float = Field(0.05, ge=0, lt=1, description="dropout after the MLP's GELU and its output")


class CPM2CLoss(LossOptions):
    video_text: float = Field(0.5, ge=0, description="weight of the video-text cross-entropy over the base classes, "
                                                     "summed over the episode's videos (released LMD[0])")
    consistency: float = Field(0.001, ge=0, description="weight of the consistency distance, added in full by each "
                                                        "episode (loss.aux_per_task: [consistency], as released)")


class Stream(NamedTuple):
    distance: Tensor                # [E, NM, N] OTAM between token-led queries and text-led class means
    consistency: Tensor | None      # [E] token-led vs text-led outputs (training only)
    query: Tensor                   # [E, NM, L, C] the token-led query frames


class CPM2CHead(nn.Module):
    """logits = -(a·OTAM_appearance + m·OTAM_motion) between class means of text-led supports and
    token-led queries, frames only. Aux (training): "video_text" (cross-entropy summed over the
    support and query videos against all base-class texts; needs `episode.base_text`) and
    "consistency" (token-led vs text-led outputs of the same videos, both streams).
    """

    def __init__(self, dim: int, options: CPM2COptions):
        super().__init__()
        self.options = options
        self.transformer = ReleasedTransformer(dim, options.num_heads, options.mlp_hidden, options.attention_dropout,
                                               options.mlp_dropout, options.head_dim)
        self.motion = MotionDifference(dim)
        self.appearance_token = nn.Parameter(torch.randn(1, 1, dim))     # stands in for the query's missing text
        self.motion_token = nn.Parameter(torch.randn(1, 1, dim))
        self.text_logit_scale = nn.Parameter(torch.ones(1))              # plain multiplier of the video-text cosine

    def forward(self, episode: Episode) -> HeadOutput:
        support, query, shots = episode.support, episode.query, episode.shots     # [E, NK, T, C], [E, NM, T, C]
        support_text, query_text = episode.support_text(), None                  # [E, NK, 1, C]
        if self.training:   # the true query texts feed the consistency loss only
            rows = torch.arange(episode.num_episodes, device=query.device)[:, None]
            query_text = episode.class_text[rows, episode.query_labels][:, :, None]        # [E, NM, 1, C]
        appearance = self._stream(support, query, support_text, query_text, self.appearance_token, shots)
        motion = self._stream(self._motion(support), self._motion(query), support_text, query_text,
                              self.motion_token, shots)                         # frames -> T-1 differences
        a, m = self.options.appearance_coeff, self.options.motion_coeff
        aux: dict[str, Tensor] = {}
        if self.training:
            aux["consistency"] = (a * appearance.consistency + m * motion.consistency).mean()
            if episode.base_text is not None:
                aux["video_text"] = self._video_text(episode)
        return HeadOutput(logits=-(a * appearance.distance + m * motion.distance), aux=aux,
                          query_features=appearance.query)

    def _stream(self, support: Tensor, query: Tensor, support_text: Tensor, query_text: Tensor | None,
                token: Tensor, shots: int) -> Stream:
        support_real = self._lead(support, support_text)                    # [E, NK, 1+L, C]
        query_token = self._lead(query, token.expand(*query.shape[:2], 1, -1))
        protos = class_prototypes(support_real, shots)
        o = self.options
        distance = released_otam_distance(query_token[:, :, 1:], protos[:, :, 1:], o.otam_lambda, o.otam_bidirectional)
        consistency = None
        if query_text is not None:
            support_token = self._lead(support, token.expand(*support.shape[:2], 1, -1))
            query_real = self._lead(query, query_text)
            consistency = (consistency_distance(support_real, support_token)
                           + consistency_distance(query_token, query_real))
        return Stream(distance, consistency, query_token[:, :, 1:])

    def _lead(self, frames: Tensor, token: Tensor) -> Tensor:
        """[token ; frames + w·token] through the transformer: [E, V, L, C], [E, V, 1, C] -> [E, V, 1+L, C]."""
        tokens = torch.cat([token, frames + self.options.text_weight * token], 2)
        return self.transformer(tokens.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def _motion(self, frames: Tensor) -> Tensor:
        return self.motion(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def _video_text(self, episode: Episode) -> Tensor:
        """Cross-entropy of every support and query video against all base-class texts, summed per episode."""
        videos = reduce(torch.cat([episode.support, episode.query], 1), "e v t c -> e v c", "mean")
        logits = released_cosine(videos, episode.base_text) * self.text_logit_scale           # [E, V, B]
        labels = torch.cat([repeat(episode.class_ids, "e n -> e (n k)", k=episode.shots),
                            torch.gather(episode.class_ids, 1, episode.query_labels)], 1)        # [E, V]
        ce = F.cross_entropy(rearrange(logits, "e v b -> (e v) b"), labels.flatten(), reduction="sum")
        return ce / episode.num_episodes


register_method(Method(
    name="cpm2c", title="CLIP-CPM2C",
    paper="Guo et al., Consistency Prototype Module and Motion Compensation for Few-Shot Action Recognition "
          "(CLIP-CPM2C), Neurocomputing 611:128649, 2025",
    code="github.com/D-XH/CLIP-MEI (models/model_cpm2c.py; the authors' github.com/cofly2014/CPM-MC differs, see "
         "the README, CLIP-CPM2C and CLIP-MEI)",
    build=lambda model, loss, dim: CPM2CHead(dim, model), model_options=CPM2COptions, loss_options=CPM2CLoss,
    needs=("frames", "class_text", "base_text"), defaults="cpm2c",
    parity="released head (D-XH/CLIP-MEI models/model_cpm2c.py + run/main_run.py loss) at C=16, float64: "
           "logits, 16-task loss and every gradient within 1e-5 (tests/fixtures/cpm2c)"))
