"""CLIP-MEI (Deng et al., Knowledge-Based Systems 2025): QSA + TFE over OTAM, MIC as a loss.

Reference code: `models/model_clipmei.py` and the `clipmei` loss of `run/main_run.py` in D-XH/CLIP-MEI
(README "CLIP-CPM2C and CLIP-MEI"). The parts, in the README's names:
- QSA (query-specific semantic information augmentation): a query is led through a transformer by a
  prompt generated from the mean episode text and the query's own mean activation; supports are led
  by their class text. d_qsa = OTAM(class means of the supports, queries).
- TFE (task-based feature enhancement): a set transformer over videos per frame position, supports
  with class tokens (mean of a class's supports and all queries: transductive), queries with their
  anchor (the mean class token). d_tfe = OTAM(modulated class means, modulated queries) + OTAM(anchor,
  modulated class tokens), the second one value per class shared by all queries.
- MIC (motion information compensation): consistency of shallow and deep motion, a loss only.
logits = -(0.5 d_qsa + d_tfe). Everything runs on per-frame features; nothing needs patch tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, reduce
from pydantic import Field
from torch import Tensor, nn

from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.released_layers import (
    MotionDifference,
    ReleasedTransformer,
    consistency_distance,
    feed_forward,
    released_otam_distance,
)
from clipspm.schema import LossOptions, ModelOptions


class CLIPMEIOptions(ModelOptions):
    kind: Literal["clipmei"] = "clipmei"
    qsa_weight: float = Field(0.5, ge=0, description="weight of d_qsa beside d_tfe in the distance")
    token_weight: float = Field(0.1, ge=0, description="share of the leading token (prompt, text or motion) added "
                                                       "to every frame before the QSA/MIC transformer")
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    num_heads: int = Field(8, ge=1, description="attention heads of both transformers")
    head_dim: int = Field(256, ge=1, description="width of one attention head (released: 256 at any C)")
    mlp_hidden: int = Field(2048, ge=1, description="hidden width of the transformers' MLP (released: 2048)")
    prompt_hidden: int = Field(2048, ge=1, description="hidden width of the QSA prompt generator MLP (released: 2048)")
    attention_dropout: float = Field(0.2, ge=0, lt=1, description="dropout after the attention output projection")
    mlp_dropout: float = Field(0.05, ge=0, lt=1, description="dropout in the transformers' and prompt generator's MLPs")


class CLIPMEILoss(LossOptions):
    consistency: float = Field(0.001, ge=0, description="weight of the QSA consistency: generated- vs text-led "
                                                        "query tokens and frames")
    prompt: float = Field(0.001, ge=0, description="weight of the QSA prompt distance: generated prompt to true "
                                                   "query text, and their led tokens, halved")
    motion: float = Field(0.001, ge=0, description="weight of MIC, α_m times shallow-vs-deep motion distance")


class CLIPMEIHead(nn.Module):
    """Aux (training): "consistency", "prompt", "motion" (the released `dists` split in its three terms,
    each a mean over the episode's videos as released, then over episodes)."""

    def __init__(self, dim: int, options: CLIPMEIOptions):
        super().__init__()
        self.options = options
        o = options
        self.motion = MotionDifference(dim)
        self.prompt_generator = feed_forward(dim, o.prompt_hidden, o.mlp_dropout)
        self.token_transformer = ReleasedTransformer(dim, o.num_heads, o.mlp_hidden, o.attention_dropout,
                                                     o.mlp_dropout, o.head_dim)   # QSA and MIC
        self.task_transformer = ReleasedTransformer(dim, o.num_heads, o.mlp_hidden, o.attention_dropout,
                                                    o.mlp_dropout, o.head_dim)    # TFE
        self.motion_alpha = nn.Parameter(torch.ones(1))           # α_m, learned, unconstrained

    def forward(self, episode: Episode) -> HeadOutput:
        support, query, shots = episode.support, episode.query, episode.shots     # [E, NK, T, C], [E, NM, T, C]
        o = self.options
        aux: dict[str, Tensor] = {}
        if self.training:
            aux["motion"] = (self.motion_alpha * self._motion_consistency(support, query)).mean()

        # QSA. The episode's mean text (released: over the queries' true texts, the same in a balanced episode).
        mean_text = reduce(episode.class_text, "e n c -> e 1 1 c", "mean")
        prompt = self.prompt_generator(mean_text * reduce(query, "e q t c -> e q 1 1", "mean"))   # [E, NM, 1, C]
        query_prompt_token, query_led = self._lead(query, prompt)
        _, support_led = self._lead(support, episode.support_text())
        d_qsa = released_otam_distance(query_led, class_prototypes(support_led, shots), o.otam_lambda,
                                       o.otam_bidirectional)
        if self.training:   # the true query texts feed the losses only
            rows = torch.arange(episode.num_episodes, device=query.device)[:, None]
            query_text = episode.class_text[rows, episode.query_labels][:, :, None]        # [E, NM, 1, C]
            query_text_token, query_text_led = self._lead(query, query_text)
            aux["prompt"] = 0.5 * (consistency_distance(query_text, prompt)
                                   + consistency_distance(query_text_token, query_prompt_token)).mean()
            aux["consistency"] = consistency_distance(torch.cat([query_text_token, query_text_led], 2),
                                                      torch.cat([query_prompt_token, query_led], 2)).mean()

        # TFE on the QSA outputs.
        supports = rearrange(support_led, "e (n k) t c -> e n k t c", k=shots)
        videos = torch.cat([supports, query_led[:, None].expand(-1, supports.shape[1], -1, -1, -1)], 2)
        class_tokens = videos.mean(2)                                        # [E, N, T, C] K supports + all queries
        anchor = class_tokens.mean(1, keepdim=True)                          # [E, 1, T, C]
        class_tokens, support_task = self._task(class_tokens, support_led)
        anchor, query_task = self._task(anchor, query_led)
        d_tfe = (released_otam_distance(query_task, class_prototypes(support_task, shots), o.otam_lambda,
                                        o.otam_bidirectional)
                 + released_otam_distance(anchor, class_tokens, o.otam_lambda, o.otam_bidirectional))  # [E, 1, N]
        return HeadOutput(logits=-(o.qsa_weight * d_qsa + d_tfe), aux=aux, query_features=query_task)

    def _lead(self, frames: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """[token ; frames + w·token] through the token transformer, split again:
        [E, V, T, C], [E, V, 1, C] -> token [E, V, 1, C], frames [E, V, T, C]."""
        tokens = torch.cat([token, frames + self.options.token_weight * token], 2)
        tokens = self.token_transformer(tokens.flatten(0, 1)).unflatten(0, frames.shape[:2])
        return tokens[:, :, :1], tokens[:, :, 1:]

    def _task(self, lead: Tensor, videos: Tensor) -> tuple[Tensor, Tensor]:
        """The TFE transformer over [lead ; videos] with videos as tokens, one set per (episode, frame)."""
        e, count = lead.shape[0], lead.shape[1]
        tokens = rearrange(torch.cat([lead, videos], 1), "e v t c -> (e t) v c")
        tokens = rearrange(self.task_transformer(tokens), "(e t) v c -> e v t c", e=e)
        return tokens[:, :count], tokens[:, count:]

    def _motion_consistency(self, support: Tensor, query: Tensor) -> Tensor:
        """MIC: the mean motion m of each video leads its frames through the token transformer; the led
        token must agree with the mean motion of the led frames. Mean over supports + mean over queries: [E]."""
        videos = torch.cat([support, query], 1)                                     # [E, V, T, C]
        shallow = reduce(self._motion(videos), "e v t c -> e v 1 c", "mean")
        shallow_led, frames_led = self._lead(videos, shallow)
        deep = reduce(self._motion(frames_led), "e v t c -> e v 1 c", "mean")
        distance = (deep - shallow_led).square().sum((-2, -1))                      # [E, V]
        count = support.shape[1]
        return distance[:, :count].mean(1) + distance[:, count:].mean(1)

    def _motion(self, frames: Tensor) -> Tensor:
        return self.motion(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])


register_method(Method(
    name="clipmei", title="CLIP-MEI",
    paper="Deng et al., CLIP-MEI: Exploit more effective information for few-shot action recognition, "
          "Knowledge-Based Systems 2025 (113965)",
    code="github.com/D-XH/CLIP-MEI (models/model_clipmei.py)",
    build=lambda model, loss, dim: CLIPMEIHead(dim, model), model_options=CLIPMEIOptions, loss_options=CLIPMEILoss,
    needs=("frames", "class_text"), defaults="clipmei",
    parity="released head (D-XH/CLIP-MEI models/model_clipmei.py + run/main_run.py loss) at C=16, float64: "
           "logits, 16-task loss and every gradient within 1e-5 (tests/fixtures/clipmei)"))
