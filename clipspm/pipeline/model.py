"""The CLIP-SPM head (SPEC section 2.7) and `build_head`, the one door to every head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import reduce
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.baselines import CLIPFSARHead, ProtoNetHead
from clipspm.pipeline.episode import Episode, HeadOutput
from clipspm.pipeline.hsmr import HSMR
from clipspm.pipeline.otam import otam_distance
from clipspm.pipeline.padm import PrototypeAnchorDualModulation
from clipspm.pipeline.semantic_fusion import SemanticFusion
from clipspm.pipeline.spm import SemanticPrototypeModulation

HEAD_KINDS = ("clipspm", "otam", "protonet", "clipfsar")


class CLIPSPMHead(nn.Module):
    """HSMR + SPM + PADM over OTAM (Eq. 3-6). `model_cfg` switches parts off (Tables 3-5).

    Distance to class n (Eq. 6): d = λ1 d_padm + λ2 d_spm when both parts are on. A part that is
    off contributes no term and a lone term is used unweighted (λ1, λ2 only balance two distances;
    scaling a lone one would just change the softmax temperature): padm off -> d = d_spm (SPEC
    2.7); spm off -> d = d_padm on raw features; both off -> d = OTAM on raw features, the
    "CLIP features + OTAM" baseline, whatever hsmr says (HSMR only adds L_H). Disabled parts are
    not built: their parameters do not exist, and with all three off the head has none at all.
    Aux losses (training only): "hsmr" = L_H, "spm" = L_S, each summed over the videos of an
    episode (Eq. 15) and averaged over episodes.
    """

    def __init__(self, dim: int, model_cfg: Mapping, loss_cfg: Mapping):
        super().__init__()
        heads, mlp_ratio, dropout = model_cfg["num_heads"], model_cfg["mlp_ratio"], model_cfg["dropout"]
        self.otam_lambda = float(model_cfg["otam_lambda"])
        self.bidirectional = bool(model_cfg["otam_bidirectional"])
        self.lambda_padm, self.lambda_spm = float(loss_cfg["lambda_padm"]), float(loss_cfg["lambda_spm"])
        fusion = None
        if model_cfg["hsmr"] or model_cfg["spm"]:
            fusion = SemanticFusion(dim, heads, mlp_ratio, dropout, gate=model_cfg["sf_gate"], sum=model_cfg["sf_sum"])
        self.hsmr = HSMR(dim, fusion) if model_cfg["hsmr"] else None
        self.spm = SemanticPrototypeModulation(
            dim, dropout, fusion, support_consistency=model_cfg["support_consistency"],
            query_consistency=model_cfg["query_consistency"]) if model_cfg["spm"] else None
        self.padm = PrototypeAnchorDualModulation(dim, heads, mlp_ratio, dropout) if model_cfg["padm"] else None

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
            d_spm = self._otam(query, _prototypes(support, shots))                          # Eq. 4
        compared = query                                            # the queries as they meet the prototypes
        if self.padm is not None:
            out = self.padm(support, query, shots)
            compared = out.query
            shared = self._otam(out.anchor, out.prototypes)         # [E, 1, N]: one value per class for all queries
            d_padm = self._otam(out.query, _prototypes(out.support, shots)) + shared        # Eq. 5
        if d_spm is not None and d_padm is not None:
            distance = self.lambda_padm * d_padm + self.lambda_spm * d_spm                  # Eq. 6
        elif d_spm is not None or d_padm is not None:
            distance = d_spm if d_spm is not None else d_padm
        else:
            distance = self._otam(query, _prototypes(support, shots))
        return HeadOutput(logits=-distance, aux=aux, query_features=compared)

    def _otam(self, query: Tensor, protos: Tensor) -> Tensor:
        return otam_distance(query, protos, self.otam_lambda, self.bidirectional)


def _prototypes(support: Tensor, shots: int) -> Tensor:
    """Class prototypes: mean over the K shots, [E, N*K, T, C] -> [E, N, T, C]."""
    return reduce(support, "e (n k) t c -> e n t c", "mean", k=shots)


def build_head(model_cfg: Mapping, loss_cfg: Mapping, dim: int) -> nn.Module:
    """The head named by `model_cfg.kind` for features of width `dim`."""
    kind = model_cfg["kind"]
    if kind == "clipspm":
        return CLIPSPMHead(dim, model_cfg, loss_cfg)
    if kind == "otam":
        return CLIPSPMHead(dim, {**model_cfg, "hsmr": False, "spm": False, "padm": False}, loss_cfg)
    if kind == "protonet":
        return ProtoNetHead()
    if kind == "clipfsar":
        return CLIPFSARHead(dim, model_cfg)
    raise ClipspmError(f"unknown model.kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
