"""CLIP-SPM (Li et al., 2025; SPEC sections 2-3): HSMR + SPM + PADM over OTAM (Eq. 3-6, 15)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.hsmr import HSMR
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.otam import otam_distance
from clipspm.pipeline.padm import PrototypeAnchorDualModulation
from clipspm.pipeline.semantic_fusion import SemanticFusion
from clipspm.pipeline.spm import SemanticPrototypeModulation
from clipspm.schema import LossOptions, ModelOptions


class CLIPSPMOptions(ModelOptions):
    kind: Literal["clipspm"] = "clipspm"
    hsmr: bool = Field(True, description="HSMR: adds L_H only; the features going on are unchanged (Table 3)")
    spm: bool = Field(True, description="SPM: text-prompt modulation, d_spm (Table 3)")
    padm: bool = Field(True, description="PADM: prototype / anchor modulation, d_padm (Table 3)")
    sf_gate: bool = Field(True, description="SF gates σ(Ψ_v), σ(Ψ_tp); off: f' = f + p (Table 4)")
    sf_sum: bool = Field(True, description="SF sum of frames and prompt; off: f' = f, gates unused (Table 4)")
    support_consistency: bool = Field(True, description="SPM consistency on supports (Eq. 12, Table 5)")
    query_consistency: bool = Field(True, description="SPM consistency on queries, training only (Eq. 12, Table 5)")
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    num_heads: int = Field(8, ge=1, description="attention heads of SF and PADM; must divide the feature width C")
    mlp_ratio: float = Field(4.0, gt=0, description="transformer MLP width / C")
    dropout: float = Field(0.1, ge=0, lt=1, description="transformer, MLP and prompt generator dropout")


class CLIPSPMLoss(LossOptions):
    lambda_padm: float = Field(1.0, ge=0, description="λ1: weight of d_padm in d when SPM is on as well (Eq. 6)")
    lambda_spm: float = Field(0.5, ge=0, description="λ2: weight of d_spm in d when PADM is on as well (Eq. 6)")
    lambda_h: float = Field(0.001, ge=0, description="λ3: weight of L_H, the HSMR consistency (Eq. 15)")
    lambda_s: float = Field(0.001, ge=0, description="λ4: weight of L_S, the SPM consistency (Eq. 15)")


class CLIPSPMHead(nn.Module):
    """HSMR + SPM + PADM over OTAM (Eq. 3-6). The options switch parts off (Tables 3-5).

    Distance to class n (Eq. 6): d = λ1 d_padm + λ2 d_spm when both parts are on. A part that is
    off contributes no term and a lone term is used unweighted (λ1, λ2 only balance two distances;
    scaling a lone one would just change the softmax temperature): padm off -> d = d_spm (SPEC
    2.7); spm off -> d = d_padm on raw features; both off -> d = OTAM on raw features, the
    "CLIP features + OTAM" baseline, whatever hsmr says (HSMR only adds L_H). Disabled parts are
    not built: their parameters do not exist, and with all three off the head has none at all.
    Aux losses (training only): "hsmr" = L_H, "spm" = L_S, each summed over the videos of an
    episode (Eq. 15) and averaged over episodes.
    """

    def __init__(self, dim: int, options: CLIPSPMOptions, loss: CLIPSPMLoss):
        super().__init__()
        heads, mlp_ratio, dropout = options.num_heads, options.mlp_ratio, options.dropout
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional
        self.lambda_padm, self.lambda_spm = loss.lambda_padm, loss.lambda_spm
        fusion = None
        if options.hsmr or options.spm:
            fusion = SemanticFusion(dim, heads, mlp_ratio, dropout, gate=options.sf_gate, sum=options.sf_sum)
        self.hsmr = HSMR(dim, fusion) if options.hsmr else None
        self.spm = SemanticPrototypeModulation(
            dim, dropout, fusion, support_consistency=options.support_consistency,
            query_consistency=options.query_consistency) if options.spm else None
        self.padm = PrototypeAnchorDualModulation(dim, heads, mlp_ratio, dropout) if options.padm else None

    def forward(self, episode: Episode) -> HeadOutput:
        support, query, shots = episode.support, episode.query, episode.shots   # [E, NK, T, C], [E, NM, T, C]
        aux: dict[str, Tensor] = {}
        if self.hsmr is not None and self.training:
            videos = torch.cat([support, query], 1).flatten(0, 1)                          # [(E V), T, C]
            d_h = self.hsmr(videos).view(episode.num_episodes, -1)                          # [E, V]
            aux["hsmr"] = d_h.sum(1).mean()                                                 # L_H (Eq. 15)

        d_spm = d_padm = None
        if self.spm is not None:
            # The query's true prompt feeds only its consistency term, and only in training.
            query_text = None
            if self.training and self.spm.query_consistency:
                rows = torch.arange(episode.num_episodes, device=query.device)[:, None]
                query_text = episode.class_text[rows, episode.query_labels][:, :, None]    # [E, NM, 1, C]
            out = self.spm(support, query, episode.support_text(), query_text)
            support, query = out.support, out.query
            if out.consistency is not None:
                aux["spm"] = out.consistency.mean()                                         # L_S (Eq. 15)
            d_spm = self._otam(query, class_prototypes(support, shots))                     # Eq. 4
        compared = query                                            # the queries as they meet the prototypes
        if self.padm is not None:
            out = self.padm(support, query, shots)
            compared = out.query
            shared = self._otam(out.anchor, out.prototypes)         # [E, 1, N]: one value per class for all queries
            d_padm = self._otam(out.query, class_prototypes(out.support, shots)) + shared   # Eq. 5
        if d_spm is not None and d_padm is not None:
            distance = self.lambda_padm * d_padm + self.lambda_spm * d_spm                  # Eq. 6
        elif d_spm is not None or d_padm is not None:
            distance = d_spm if d_spm is not None else d_padm
        else:
            distance = self._otam(query, class_prototypes(support, shots))
        return HeadOutput(logits=-distance, aux=aux, query_features=compared)

    def _otam(self, query: Tensor, protos: Tensor) -> Tensor:
        return otam_distance(query, protos, self.otam_lambda, self.bidirectional)


register_method(Method(
    name="clipspm", title="CLIP-SPM",
    paper="Li et al., Distinguishing Visually Similar Actions: Prompt-Guided Semantic Prototype Modulation for "
          "Few-Shot Action Recognition, 2025",
    code="github.com/hnlxy/CLIP-SPM (models/model_clipspm.py)",
    build=lambda model, loss, dim: CLIPSPMHead(dim, model, loss), model_options=CLIPSPMOptions,
    loss_options=CLIPSPMLoss, needs=("frames", "class_text"),
    parity="paper reading: an independent re-implementation of SPEC 2-3 matched to 4e-15"))
