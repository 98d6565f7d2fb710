"""CLIP-SPM (Li et al., 2025): HSMR + SPM + PADM over OTAM (Eq. 3-6, 15), in two profiles (`model.profile`):
official, the authors' released code (SPEC section 6), and paper, the paper's reading (SPEC sections 2-3).
Also the mapping of a released checkpoint's head onto ours (`released_heads_state_dict`)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.hsmr import HSMR
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.pipeline.otam import otam_distance
from clipspm.pipeline.padm import PrototypeAnchorDualModulation
from clipspm.pipeline.prompt_generator import PromptGenerator
from clipspm.pipeline.released_layers import ReleasedTransformer
from clipspm.pipeline.semantic_fusion import ReleasedSemanticFusion, SemanticFusion
from clipspm.pipeline.spm import SemanticPrototypeModulation
from clipspm.schema import LossOptions, ModelOptions

RELEASED_KEYS = Path(__file__).parents[2] / "configs" / "methods" / "clipspm_released_keys.yaml"


class CLIPSPMOptions(ModelOptions):
    kind: Literal["clipspm"] = "clipspm"
    profile: Literal["official", "paper"] = Field(
        "paper", description="official: the architecture and loss of the authors' released code (SPEC 6, "
                             "README, CLIP-SPM: model.profile); paper: the paper's reading (SPEC 2-3). A run "
                             "gets the first profile of configs/methods/clipspm.yaml, official, with that file's "
                             "data; this default holds only for options built without it")
    hsmr: bool = Field(True, description="HSMR: adds L_H only; the features going on are unchanged (Table 3)")
    spm: bool = Field(True, description="SPM: text-prompt modulation, d_spm (Table 3)")
    padm: bool = Field(True, description="PADM: prototype / anchor modulation, d_padm (Table 3)")
    sf_gate: bool = Field(True, description="SF gates σ(Ψ_v), σ(Ψ_tp); off: f' = f + p (official: f + α·p) "
                                            "(Table 4)")
    sf_sum: bool = Field(True, description="SF sum of frames and prompt; off: f' = f, gates unused (Table 4)")
    support_consistency: bool = Field(True, description="SPM consistency on supports (Eq. 12, Table 5)")
    query_consistency: bool = Field(True, description="SPM consistency on queries, training only (Eq. 12, Table 5)")
    otam_lambda: float = Field(0.5, gt=0, description="soft-min temperature of OTAM")
    otam_bidirectional: bool = Field(True, description="SeqDis = OTAM(D) + OTAM(D^T); false: query-to-support only")
    cosine_eps: float = Field(0.0, ge=0, description="OTAM frame distance 1 - x·y / (‖x‖ ‖y‖ + eps): 0 is the exact "
                                                     "cosine; the released code adds 0.01 (myRes.py cos_sim)")
    num_heads: int = Field(8, ge=1, description="attention heads of SF and PADM; paper: must divide the feature "
                                                "width C; official: each `head_dim` wide")
    mlp_ratio: float = Field(4.0, gt=0, description="paper: transformer MLP width / C")
    dropout: float = Field(0.1, ge=0, lt=1, description="paper: transformer, MLP and prompt generator dropout")
    head_dim: int = Field(256, ge=1, description="official: width of one attention head, whatever C (released "
                                                 "8 x 256)")
    mlp_hidden: int = Field(2048, ge=1, description="official: hidden width of the transformer MLP, whatever C "
                                                    "(released 2048)")
    prompt_hidden: int = Field(2048, ge=1, description="official: hidden width of the prompt generator MLP "
                                                       "(released token_tr, 2048)")
    attention_dropout: float = Field(0.2, ge=0, lt=1, description="official: dropout after the attention output "
                                                                  "projection (none on the attention weights)")
    mlp_dropout: float = Field(0.05, ge=0, lt=1, description="official: dropout after the GELU and after the second "
                                                             "Linear of the transformer MLP and the prompt generator")
    gate_text_ratio: float = Field(1.5, gt=0, description="official: hidden width / C of the SF prompt gate MLP "
                                                          "(released mid_dim_text; per dataset in clipspm.yaml)")
    gate_vision_ratio: float = Field(0.5, gt=0, description="official: hidden width / C of the SF frame gate MLP "
                                                            "(released mid_dim_vision)")
    gate_slope: float = Field(0.0025, ge=0, description="official: LeakyReLU negative slope inside the SF gates "
                                                        "(released negative_slope)")
    fusion_alpha: float = Field(0.2, ge=0, description="official: weight α of the gated prompt in the SF sum "
                                                       "(released alpha)")


class CLIPSPMLoss(LossOptions):
    lambda_padm: float = Field(1.0, ge=0, description="λ1: weight of d_padm in d when SPM is on as well (Eq. 6)")
    lambda_spm: float = Field(0.5, ge=0, description="λ2: weight of d_spm in d when PADM is on as well (Eq. 6)")
    lambda_h: float = Field(0.001, ge=0, description="λ3: weight of L_H, the HSMR consistency (Eq. 15; official: "
                                                     "L_H already carries the learned α_h)")
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
    episode (Eq. 15; official: L_H as `HSMR.loss` reduces it) and averaged over episodes.

    `profile` official builds the parts as the released code does (SPEC 6): `ReleasedSemanticFusion`
    and `ReleasedTransformer` for SF (context2) and PADM (context1), the released MFE, L_H and PG.
    The forward is the same for both profiles: it is the released order of HSMR on the raw features,
    SPM (supports with their class text, queries with the generated prompt), PADM on SPM's output.
    """

    def __init__(self, dim: int, options: CLIPSPMOptions, loss: CLIPSPMLoss):
        super().__init__()
        released = options.profile == "official"
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional
        self.cosine_eps = options.cosine_eps
        self.lambda_padm, self.lambda_spm = loss.lambda_padm, loss.lambda_spm
        fusion = semantic_fusion(dim, options) if options.hsmr or options.spm else None
        self.hsmr = HSMR(dim, fusion, released=released) if options.hsmr else None
        self.spm = semantic_prototype_modulation(dim, options, fusion) if options.spm else None
        self.padm = prototype_anchor_dual_modulation(dim, options) if options.padm else None

    def forward(self, episode: Episode) -> HeadOutput:
        support, query, shots = episode.support, episode.query, episode.shots   # [E, NK, T, C], [E, NM, T, C]
        aux: dict[str, Tensor] = {}
        if self.hsmr is not None and self.training:
            videos = torch.cat([support, query], 1).flatten(0, 1)                          # [(E V), T, C]
            d_h = self.hsmr(videos).view(episode.num_episodes, -1)                          # [E, V]
            aux["hsmr"] = self.hsmr.loss(d_h, support.shape[1]).mean()                      # L_H (Eq. 15)

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
        return otam_distance(query, protos, self.otam_lambda, self.bidirectional, self.cosine_eps)


def semantic_fusion(dim: int, options: CLIPSPMOptions) -> nn.Module:
    """The SF that HSMR and SPM share, as the profile builds it."""
    if options.profile == "paper":
        return SemanticFusion(dim, options.num_heads, options.mlp_ratio, options.dropout, gate=options.sf_gate,
                              sum=options.sf_sum)
    return ReleasedSemanticFusion(dim, released_transformer(dim, options), options.gate_text_ratio,
                                  options.gate_vision_ratio, options.gate_slope, options.fusion_alpha,
                                  gate=options.sf_gate, sum=options.sf_sum)


def semantic_prototype_modulation(dim: int, options: CLIPSPMOptions, fusion: nn.Module
                                  ) -> SemanticPrototypeModulation:
    generator = None
    if options.profile == "official":
        generator = PromptGenerator(dim, options.mlp_dropout, options.prompt_hidden, released=True)
    return SemanticPrototypeModulation(dim, options.dropout, fusion, support_consistency=options.support_consistency,
                                       query_consistency=options.query_consistency, prompt_generator=generator)


def prototype_anchor_dual_modulation(dim: int, options: CLIPSPMOptions) -> PrototypeAnchorDualModulation:
    transformer = released_transformer(dim, options) if options.profile == "official" else None
    return PrototypeAnchorDualModulation(dim, options.num_heads, options.mlp_ratio, options.dropout, transformer)


def released_transformer(dim: int, options: CLIPSPMOptions) -> ReleasedTransformer:
    """context1 / context2 of the release: Transformer_v1(dim, heads=8, dim_head_k=256, dropout_atte=0.2)."""
    return ReleasedTransformer(dim, options.num_heads, options.mlp_hidden, options.attention_dropout,
                               options.mlp_dropout, head_dim=options.head_dim)


@cache
def released_keys() -> dict:
    """configs/methods/clipspm_released_keys.yaml: released head key -> ours, shared prefixes, ignored keys."""
    return yaml.safe_load(RELEASED_KEYS.read_text())


def released_head_widths(released: Mapping[str, Tensor]) -> dict[str, int]:
    """The widths a released head's tensors imply, by the symbols of clipspm_released_keys.yaml (C: feature
    width, I / A: attention width heads x head_dim of SF / PADM, M / B: their MLP hidden, P: prompt generator
    hidden, GT / GV: gate hidden). Refuses (ClipspmError) missing or unexpected keys and inconsistent shapes,
    naming them. `backbone.*` entries are skipped."""
    table = released_keys()
    heads = {key: value for key, value in released.items()
             if key not in table["ignored"] and not key.startswith(tuple(table["ignored_prefixes"]))}
    missing = [key for key in table["keys"] if key not in heads]
    unexpected = [key for key in heads if key not in table["keys"]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    if problems:
        raise ClipspmError(f"not a released CLIP-SPM head (models/model_clipspm.py): {'; '.join(problems)}. "
                           f"Pass the checkpoint's model_state_dict")
    widths: dict[str, int] = {}
    wrong = []
    for key, entry in table["keys"].items():
        shape, symbols = tuple(heads[key].shape), entry["shape"]
        if len(shape) != len(symbols):
            wrong.append(f"{key} {list(shape)} (expected {len(symbols)} dims: {symbols})")
            continue
        for symbol, size in zip(symbols, shape):
            expected = symbol if isinstance(symbol, int) else widths.setdefault(symbol, size)
            if size != expected:
                wrong.append(f"{key} {list(shape)} (expected {symbols} with "
                             f"{', '.join(f'{s}={v}' for s, v in widths.items() if s in symbols)})")
                break
    if wrong:
        raise ClipspmError(f"released CLIP-SPM head tensors of inconsistent shapes: {'; '.join(wrong)}")
    return widths


def released_heads_state_dict(released: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our official-profile head's state dict (HSMR, SPM, PADM on) from the released head's entries.

    `released`: a released checkpoint's `model_state_dict` (its `backbone.*` entries are skipped, `scale` is
    dropped: the released forward never reads it). Checked as `released_head_widths` does; the result loads
    with `load_state_dict(strict=True)` into `CLIPSPMHead` built with model.profile=official and the widths
    the tensors imply. Tensors keep their dtype. The class texts are not part of a released checkpoint.
    """
    released_head_widths(released)
    table = released_keys()
    ours = {entry["to"]: released[key] for key, entry in table["keys"].items()}
    for prefix, alias in table["shared"].items():
        ours.update({alias + key[len(prefix):]: value for key, value in list(ours.items()) if key.startswith(prefix)})
    return ours


register_method(Method(
    name="clipspm", title="CLIP-SPM",
    paper="Li et al., Distinguishing Visually Similar Actions: Prompt-Guided Semantic Prototype Modulation for "
          "Few-Shot Action Recognition, 2025",
    code="github.com/hnlxy/CLIP-SPM (models/model_clipspm.py)",
    build=lambda model, loss, dim: CLIPSPMHead(dim, model, loss), model_options=CLIPSPMOptions,
    loss_options=CLIPSPMLoss, needs=("frames", "class_text"), defaults="clipspm",
    parity="profile official = the released head (hnlxy/CLIP-SPM @63f4361) at small width, float64: logits, the "
           "16-episode loss and every gradient match tests/fixtures/clipspm_official to 1e-5 (tests/"
           "test_clipspm_official.py); profile paper = an independent re-implementation of SPEC 2-3 (matched to "
           "4e-15), pinned to c7b9547's head by tests/fixtures/clipspm_paper to 1e-12",
    notes="model.profile: official (default; the released architecture and loss) | paper (SPEC 2-3)"))
