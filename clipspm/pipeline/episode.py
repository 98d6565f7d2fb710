"""The Episode batch, what a head returns, and the one episode step that assembles the loss.

A batch holds E episodes. Heads process all of them in one forward pass; the loss is the mean
over episodes, so one batched step has the gradient of the paper's accumulation over E episodes.
Both trainers (heads on cached features, end-to-end fine-tuning) call `episode_step`: it is the
only place the training loss is put together (Eq. 15).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

# aux key of a head -> the `loss:` config key holding its weight (Eq. 15: λ3 L_H, λ4 L_S). A head whose
# aux key is not listed here names it after its weight's key.
AUX_LOSS_WEIGHTS = {"hsmr": "lambda_h", "spm": "lambda_s"}


@dataclass(kw_only=True)
class Episode:
    """E N-way K-shot episodes with M queries per class, T frames of width C.

    Fields (shapes; float tensors are float32 features, long tensors are indices):
        support       [E, N*K, T, C] float, class-major: support[e, n*K + k] is shot k of class n
        query         [E, N*M, T, C] float, class-major: query[e, n*M + m] is query m of class n
        query_labels  [E, N*M] long in [0, N): the class of each query (n for query[e, n*M + m]); heads read it
                      only in training mode
        class_text    [E, N, C] float: the prompt feature of each episode class (mean of its first R templates)
        class_ids     [E, N] long: each episode class's global index; rows of `base_text` in training episodes
        base_text     [B, C] float or None: the prompt features of all B training classes (CLIP-FSAR's
                      video-text loss); None at test time
        shots         int: K

    The ways N and queries per class M follow from the shapes (`ways`, `queries_per_class`).
    """

    support: Tensor            # [E, N*K, T, C] class-major: support[e, n*K + k] belongs to class n
    query: Tensor              # [E, N*M, T, C]
    query_labels: Tensor       # [E, N*M] long in [0, N); heads read it only in training mode (a head that reads
                               # it at test time, only to reproduce a released protocol, says so with an
                               # attribute `reads_query_labels = True`: evaluation marks its results as leaking)
    class_text: Tensor         # [E, N, C] prompt feature per episode class (mean of its first R templates)
    class_ids: Tensor          # [E, N] long: global class index (row of base_text for base classes)
    base_text: Tensor | None = None  # [B, C] prompt features of all base classes (CLIP-FSAR video-text loss)
    shots: int                 # K
    class_rows: Tensor | None = None          # [E, N] long: rows of the cache's class arrays (HeadInputs.class_texts)
    support_video_text: Tensor | None = None  # [E, N*K, C] a text feature per video (its description), or None:
    query_video_text: Tensor | None = None    # [E, N*M, C]   the run has none (see STAGE_INPUTS["video_text"])

    def __post_init__(self) -> None:
        e, nk, t, c = self.support.shape
        if nk % self.shots:
            raise ValueError(f"{nk} support videos do not split into {self.shots}-shot classes")
        n = nk // self.shots
        expected = {"query": (e, self.query.shape[1], t, c), "query_labels": (e, self.query.shape[1]),
                    "class_text": (e, n, c), "class_ids": (e, n), "class_rows": (e, n),
                    "support_video_text": (e, nk, c), "query_video_text": (e, self.query.shape[1], c)}
        for name, shape in expected.items():
            if getattr(self, name) is not None and tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Episode.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.query.shape[1] % n:
            raise ValueError(f"{self.query.shape[1]} queries do not split over {n} classes")

    @property
    def num_episodes(self) -> int:
        return self.support.shape[0]

    @property
    def ways(self) -> int:
        return self.class_text.shape[1]

    @property
    def queries_per_class(self) -> int:
        return self.query.shape[1] // self.ways

    @property
    def frames(self) -> int:
        return self.support.shape[2]

    @property
    def dim(self) -> int:
        return self.support.shape[3]

    @property
    def support_labels(self) -> Tensor:
        """[E, N*K] class of each support video (class-major layout)."""
        labels = torch.arange(self.ways, device=self.support.device)
        return repeat(labels, "n -> e (n k)", e=self.num_episodes, k=self.shots)

    def support_text(self) -> Tensor:
        """[E, N*K, 1, C] f_TP: the prompt feature of each support video's class."""
        return repeat(self.class_text, "e n c -> e (n k) 1 c", k=self.shots)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Episode:
        """Move every tensor to `device`; cast the float ones to `dtype` if given."""
        def move(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        return replace(self, support=move(self.support), query=move(self.query), query_labels=move(self.query_labels),
                       class_text=move(self.class_text), class_ids=move(self.class_ids), base_text=move(self.base_text),
                       class_rows=move(self.class_rows), support_video_text=move(self.support_video_text),
                       query_video_text=move(self.query_video_text))

    def select(self, index: slice | int) -> Episode:
        """A sub-batch of the episodes (an int keeps the episode dim: E = 1)."""
        index = slice(index, index + 1) if isinstance(index, int) else index

        def part(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[index]
        return replace(self, support=self.support[index], query=self.query[index],
                       query_labels=self.query_labels[index], class_text=self.class_text[index],
                       class_ids=self.class_ids[index], class_rows=part(self.class_rows),
                       support_video_text=part(self.support_video_text), query_video_text=part(self.query_video_text))


def class_prototypes(support: Tensor, shots: int) -> Tensor:
    """Class prototypes: the mean over the K shots, [E, N*K, T, C] -> [E, N, T, C]."""
    return reduce(support, "e (n k) t c -> e n t c", "mean", k=shots)


@dataclass
class HeadOutput:
    logits: Tensor                                         # [E, N*M, N] = -distance
    aux: dict[str, Tensor] = field(default_factory=dict)   # unweighted auxiliary losses, mean over episodes
    query_features: Tensor | None = None                   # [E, N*M, T, C] the queries as compared with the
                                                           # prototypes (the embedding map of Fig. 6)


@dataclass
class StepResult:
    loss: Tensor                   # scalar, differentiable
    logits: Tensor                 # [E, N*M, N]
    metrics: dict[str, float]      # loss, ce, accuracy and each auxiliary loss (unweighted)


def episode_step(head: nn.Module, episode: Episode, loss_cfg: Mapping, episodes_per_step: int | None = None
                 ) -> StepResult:
    """Forward the head and assemble L = CE + Σ weight * aux (Eq. 15), averaged over the E episodes.

    `loss_cfg.ce`: "mean" averages the cross-entropy over an episode's queries, "sum" adds it up (the
    released CLIP-SPM code family). `loss_cfg.aux_per_task` (true, or a list of aux names): each episode
    adds those auxiliary losses in full, as the released 16-task accumulation does, rather than a 1/E
    share: they are then scaled by `episodes_per_step` (default: this batch's E), so that a step split
    into micro-batches (finetune) and one batched step (heads) give the same gradient.
    """
    loss, logits, metrics = episode_loss(head, episode, loss_cfg, episodes_per_step)
    return StepResult(loss=loss, logits=logits, metrics=metric_values(metrics))


def episode_loss(head: nn.Module, episode: Episode, loss_cfg: Mapping, episodes_per_step: int | None = None
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """`episode_step` without reading anything back from the device: (loss, logits [E, N*M, N], metrics as
    detached scalar tensors). A step captured in a CUDA graph can only return tensors."""
    out = head(episode)
    labels = episode.query_labels
    ce = F.cross_entropy(rearrange(out.logits, "e q n -> (e q) n"), labels.flatten())  # mean over queries, episodes
    loss = ce * labels.shape[1] if loss_cfg.get("ce", "mean") == "sum" else ce
    per_task = loss_cfg.get("aux_per_task", False)
    for name, value in out.aux.items():
        weight = AUX_LOSS_WEIGHTS.get(name, name)
        if weight not in loss_cfg:
            raise KeyError(f"head returned an auxiliary loss {name!r} with no weight {weight!r} in its loss options")
        in_full = per_task is True or (not isinstance(per_task, bool) and name in per_task)
        scale = (episodes_per_step or episode.num_episodes) if in_full else 1
        loss = loss + scale * loss_cfg[weight] * value
    accuracy = (out.logits.argmax(-1) == labels).float().mean()
    metrics = dict(zip(["loss", "ce", "accuracy", *out.aux], (loss, ce, accuracy, *out.aux.values())))
    return loss, out.logits, {name: value.detach().float() for name, value in metrics.items()}


def metric_values(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Scalar tensors as floats, read back from the device in one sync."""
    return dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
