"""TRX (Perrett et al., CVPR 2021): temporal-relational cross-transformers over frame tuples, on the
cached CLIP frame features (README "TRX and HyRSM").

Every ordered tuple of ω frames of a video (ω in `cardinalities`) is one token: its frames, with a
sinusoidal position added, concatenated and mapped to a key and a value. Each query tuple attends over
all tuples of a class's K supports; the attention-weighted support values are a query-specific class
prototype, and the distance to class n is the squared distance between the query's tuple values and
that prototype, averaged over tuples. Logits are the negative distances averaged over cardinalities.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from einops import einsum, rearrange
from pydantic import Field
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.schema import LossOptions, ModelOptions


class TRXOptions(ModelOptions):
    kind: Literal["trx"] = "trx"
    cardinalities: list[Annotated[int, Field(ge=1)]] = Field(
        [2, 3], min_length=1, description="tuple sizes ω (one or more), a cross-transformer each; logits are averaged "
                                          "over them (TRX --temp_set)")
    out_dim: int = Field(1152, ge=1, description="width of the tuple keys and values (TRX --trans_linear_out_dim); "
                                                 "their input width is ω·C, C the cache's feature width")
    position_scale: float = Field(0.1, ge=0, description="amplitude of the sinusoidal positional encoding added to the "
                                                         "frames (TRX pe_scale_factor; 0: none)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the position-encoded frames, drawn anew for each "
                                                        "cardinality (TRX --trans_dropout)")


def sinusoidal_positions(frames: int, dim: int) -> Tensor:
    """[T, C] float64: sin on even channels, cos on odd ones, wavelengths 2π·10000^(2i/C) (Vaswani et al.)."""
    position = torch.arange(frames, dtype=torch.float64)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
    table = torch.zeros(frames, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, :dim // 2]
    return table


class TemporalCrossTransformer(nn.Module):
    """One cardinality ω: support [E, N*K, T, C], query [E, Q, T, C] (position-encoded) -> logits [E, Q, N]."""

    def __init__(self, dim: int, out_dim: int, cardinality: int, dropout: float):
        super().__init__()
        self.cardinality = cardinality
        self.dropout = nn.Dropout(dropout)
        self.key = nn.Linear(cardinality * dim, out_dim)
        self.value = nn.Linear(cardinality * dim, out_dim)
        self.key_norm = nn.LayerNorm(out_dim)     # keys are normalised, values are not

    def tuples(self, videos: Tensor, index: Tensor) -> Tensor:
        """videos [E, V, T, C], index [P, ω] -> tuple tokens [E, V, P, ω·C]."""
        return rearrange(self.dropout(videos)[:, :, index], "e v p w c -> e v p (w c)")

    def forward(self, support: Tensor, query: Tensor, shots: int) -> Tensor:
        frames = support.shape[2]
        if self.cardinality > frames:
            raise ClipspmError(f"model.cardinalities holds {self.cardinality}, more than the T={frames} frames of a "
                               f"video; use tuple sizes of at most {frames}")
        index = torch.combinations(torch.arange(frames, device=support.device), self.cardinality)    # [P, ω]
        support, query = self.tuples(support, index), self.tuples(query, index)
        support_keys = rearrange(self.key_norm(self.key(support)), "e (n k) p d -> e n (k p) d", k=shots)
        support_values = rearrange(self.value(support), "e (n k) p d -> e n (k p) d", k=shots)
        query_keys, query_values = self.key_norm(self.key(query)), self.value(query)                # [E, Q, P, D]
        # each query tuple attends over all K·P tuples of a class at once
        scores = einsum(query_keys, support_keys, "e q p d, e n r d -> e q n p r") / math.sqrt(query_keys.shape[-1])
        attention = scores.softmax(-1)                                                             # [E, Q, N, P, R]
        # |v_q - Σ_r a_r v_r|², the distance of a query tuple to its prototype, expanded into dot products so
        # that the per-query prototypes [E, Q, N, P, D] are never formed (the bulk of the time and memory)
        cross = einsum(query_values, support_values, "e q p d, e n r d -> e q n p r")
        gram = einsum(support_values, support_values, "e n r d, e n s d -> e n r s")
        prototype_norms = (einsum(attention, gram, "e q n p r, e n r s -> e q n p s") * attention).sum(-1)
        squared = query_values.pow(2).sum(-1)[:, :, None] - 2 * (attention * cross).sum(-1) + prototype_norms
        return -squared.mean(-1)                                                                   # [E, Q, N]


class TRXHead(nn.Module):
    """TRX on frame features: one cross-transformer per cardinality, logits averaged over them."""

    def __init__(self, dim: int, options: TRXOptions):
        super().__init__()
        self.position_scale = options.position_scale
        self.cross_transformers = nn.ModuleList(
            TemporalCrossTransformer(dim, options.out_dim, cardinality, options.dropout)
            for cardinality in options.cardinalities)

    def forward(self, episode: Episode) -> HeadOutput:
        positions = self.position_scale * sinusoidal_positions(episode.frames, episode.dim)
        positions = positions.to(episode.support.device, episode.support.dtype)                     # [T, C]
        support, query = episode.support + positions, episode.query + positions
        logits = torch.stack([transformer(support, query, episode.shots) for transformer in self.cross_transformers])
        return HeadOutput(logits=logits.mean(0), query_features=episode.query)


register_method(Method(
    name="trx", title="TRX", paper="Perrett et al., Temporal-Relational CrossTransformers for Few-Shot Action "
                                   "Recognition, CVPR 2021",
    code="github.com/tobyperrett/trx (model.py, TemporalCrossTransformer; the same class is models/model_TRX.py of "
         "hnlxy/CLIP-SPM)",
    build=lambda model, loss, dim: TRXHead(dim, model), model_options=TRXOptions, loss_options=LossOptions,
    parity="logits, 16-episode loss and gradients equal the released head to 1e-5 in float64 "
           "(tests/fixtures/trx, tests/test_methods_trx_hyrsm.py)",
    defaults="trx"))
