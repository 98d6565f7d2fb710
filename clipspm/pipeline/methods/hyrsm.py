"""HyRSM (Wang et al., CVPR 2022): hybrid relation module + set matching, on the cached CLIP frame
features (README "TRX and HyRSM").

Intra-relation: each video's frames (scaled, plus a sinusoidal position) go through one multi-head
self-attention over time. Inter-relation: for each query, the time-averaged class prototypes (mean over
shots) and the query form a set of N+1 tokens that attend to each other; each video's frames are then
fused with its set token, so the prototypes are adapted to the query they are compared with. The
metric is the bidirectional Hausdorff-style set distance on frame cosine distances (Bi-MHM, summed over
frames as released). In training, a linear classifier over the training classes labels every frame of
every support and query after the intra-relation (aux "classification").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from pydantic import Field
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.registry import Method, register_method
from clipspm.schema import LossOptions, ModelOptions


class HyRSMOptions(ModelOptions):
    kind: Literal["hyrsm"] = "hyrsm"
    num_heads: int = Field(8, ge=1, description="heads of the intra- and inter-relation attention, C // num_heads "
                                                "channels each (TRAIN.HEAD)")
    position_a: float = Field(10.0, gt=0, description="frames are scaled by sqrt(C / position_a) before the position "
                                                      "is added (TRAIN.POSITION_A)")
    position_b: float = Field(1.0, ge=0, description="weight of the sinusoidal position added to the frames "
                                                     "(TRAIN.POSITION_B)")
    position_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the position-encoded frames")
    intra_dropout: float = Field(0.2, ge=0, lt=1, description="dropout on the output of the intra-relation attention")
    inter_attention_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the inter-relation attention "
                                                                        "weights")
    inter_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the output of the inter-relation attention")
    num_classes: int = Field(64, ge=1, description="outputs of the frame classifier: at least the number of training "
                                                   "classes (TRAIN.NUM_CLASS; 64 when unset, as released)")


class HyRSMLoss(LossOptions):
    classification: float = Field(0.15, ge=0, description="weight of the frame classification loss over the training "
                                                          "classes (TRAIN.USE_CLASSIFICATION_VALUE)")


def hyrsm_positions(frames: int, dim: int) -> Tensor:
    """[T, C] float64, the released table: channel i (even) is sin(t / 10000^(2i/C)), channel i+1 is
    cos(t / 10000^(2(i+1)/C)) (the exponent counts channels, not channel pairs)."""
    position = torch.arange(frames, dtype=torch.float64)[:, None]
    even = torch.arange(0, dim, 2, dtype=torch.float64)
    table = torch.zeros(frames, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position / 10000 ** (2 * even / dim))
    table[:, 1::2] = torch.cos(position / 10000 ** (2 * (even + 1) / dim))[:, :dim // 2]
    return table


class IntraRelation(nn.Module):
    """Pre-norm multi-head self-attention over a video's frames, residual, ReLU: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        # released: a single head as wide as the features needs no output map
        self.out = None if heads == 1 else nn.Linear(heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)")
        return F.relu(x + (attended if self.out is None else self.dropout(self.out(attended))))


class InterRelation(nn.Module):
    """Multi-head attention across a set of video tokens, post-norm residual, ReLU: [B, L, C] -> [B, L, C]."""

    def __init__(self, dim: int, heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        head_dim = dim // heads
        self.heads, self.attention_dropout = heads, attention_dropout
        self.query, self.key, self.value = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        for linear in (self.query, self.key, self.value):      # the released initialisation
            nn.init.normal_(linear.weight, std=math.sqrt(2.0 / (dim + head_dim)))
        self.out = nn.Linear(heads * head_dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(linear(x), "b l (h d) -> b h l d", h=self.heads) for linear in (self.query, self.key,
                                                                                              self.value))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return F.relu(self.norm(x + self.dropout(self.out(rearrange(attended, "b h l d -> b l (h d)")))))


class HyRSMHead(nn.Module):
    """Intra-relation per video, inter-relation per query's set, Bi-MHM set distance; frame classifier in training."""

    def __init__(self, dim: int, options: HyRSMOptions):
        super().__init__()
        if options.num_heads > dim:
            raise ClipspmError(f"model.num_heads={options.num_heads} exceeds the feature width C={dim}; each head "
                               f"needs C // num_heads >= 1 channels")
        self.feature_scale, self.position_weight = math.sqrt(dim / options.position_a), options.position_b
        self.position_dropout = nn.Dropout(options.position_dropout)
        self.intra_relation = IntraRelation(dim, options.num_heads, options.intra_dropout)
        self.inter_relation = InterRelation(dim, options.num_heads, options.inter_attention_dropout,
                                            options.inter_dropout)
        self.fuse = nn.Linear(2 * dim, dim)          # [frame ; its set token] -> frame
        self.classifier = nn.Linear(dim, options.num_classes)

    def encode(self, videos: Tensor) -> Tensor:
        """Intra-relation: videos [E, V, T, C] -> [E, V, T, C]."""
        positions = hyrsm_positions(videos.shape[2], videos.shape[3]).to(videos.device, videos.dtype)
        videos = self.position_dropout(videos * self.feature_scale + self.position_weight * positions)
        return self.intra_relation(videos.flatten(0, 1)).unflatten(0, videos.shape[:2])

    def forward(self, episode: Episode) -> HeadOutput:
        e, ways, frames = episode.num_episodes, episode.ways, episode.frames
        videos = self.encode(torch.cat([episode.support, episode.query], 1))
        support, query = videos.split([episode.support.shape[1], episode.query.shape[1]], 1)
        queries = query.shape[1]
        protos = class_prototypes(support, episode.shots)                                          # [E, N, T, C]
        # inter-relation: per query, the set {prototypes of the N classes, the query} (prototypes first)
        tokens = torch.cat([repeat(protos.mean(2), "e n c -> e q n c", q=queries), query.mean(2)[:, :, None]], 2)
        tokens = self.inter_relation(tokens.flatten(0, 1)).unflatten(0, (e, queries))               # [E, Q, N+1, C]
        protos = self.fuse(torch.cat([repeat(protos, "e n t c -> e q n t c", q=queries),
                                      repeat(tokens[:, :, :ways], "e q n c -> e q n t c", t=frames)], -1))
        query = self.fuse(torch.cat([query, repeat(tokens[:, :, ways], "e q c -> e q t c", t=frames)], -1))
        # Bi-MHM: each frame to the nearest frame of the other video, both ways, summed over frames
        cosine = einsum(F.normalize(protos, dim=-1), F.normalize(query, dim=-1), "e q n i c, e q j c -> e q n i j")
        distance = 1 - cosine
        distance = distance.min(-1).values.sum(-1) + distance.min(-2).values.sum(-1)              # [E, Q, N]
        aux = {}
        # base_text marks a training episode: its class_ids are then rows of the training classes
        if self.training and episode.base_text is not None:
            aux["classification"] = self.classification_loss(videos, episode)
        return HeadOutput(logits=-distance, aux=aux, query_features=query)

    def classification_loss(self, videos: Tensor, episode: Episode) -> Tensor:
        """Cross-entropy of every frame of every video [E, V, T, C] over the training classes, mean over frames."""
        if episode.base_text.shape[0] > self.classifier.out_features:
            raise ClipspmError(f"model.num_classes={self.classifier.out_features} is less than the "
                               f"{episode.base_text.shape[0]} training classes; set --set "
                               f"model.num_classes={episode.base_text.shape[0]}")
        labels = torch.cat([repeat(episode.class_ids, "e n -> e (n k)", k=episode.shots),
                            torch.gather(episode.class_ids, 1, episode.query_labels)], 1)           # [E, V]
        logits = self.classifier(videos)                                                          # [E, V, T, B]
        labels = repeat(labels, "e v -> (e v t)", t=videos.shape[2])
        return F.cross_entropy(rearrange(logits, "e v t b -> (e v t) b"), labels)


register_method(Method(
    name="hyrsm", title="HyRSM", paper="Wang et al., Hybrid Relation Guided Set Matching for Few-shot Action "
                                       "Recognition, CVPR 2022",
    code="github.com/alibaba-mmai-research/HyRSM (models/base/few_shot.py, CNN_HyRSM_1shot / CNN_HyRSM_5shot)",
    build=lambda model, loss, dim: HyRSMHead(dim, model), model_options=HyRSMOptions, loss_options=HyRSMLoss,
    parity="logits, 16-episode loss and gradients equal the released head to 1e-5 in float64 "
           "(tests/fixtures/hyrsm, tests/test_methods_trx_hyrsm.py)",
    defaults="hyrsm"))
