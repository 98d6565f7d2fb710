"""Episode sampling as index tensors, on whatever device holds the features.

An episode is N classes, K support and M query videos per class. Sampling E episodes at once is
a few tensor ops (random keys + argsort), so thousands of episodes per second cost nothing
beside the heads. Test episodes are fixed by a seed and saved, so that every model and every
ablation variant is scored on the very same episodes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipspm.errors import ClipspmError, reading
from clipspm.pipeline.encoder import file_sha256
from clipspm.pipeline.episode import Episode


@dataclass
class EpisodeIndex:
    """E episodes as rows of a split's feature table."""

    support: torch.Tensor   # [E, N*K] class-major: support[e, n*K + k] is of class n
    query: torch.Tensor     # [E, N*M] class-major
    classes: torch.Tensor   # [E, N] class rows (rows of the cache's class arrays)
    shots: int
    queries: int

    def __len__(self) -> int:
        return self.support.shape[0]

    def slice(self, start: int, stop: int) -> EpisodeIndex:
        return EpisodeIndex(self.support[start:stop], self.query[start:stop], self.classes[start:stop],
                            self.shots, self.queries)


class EpisodeSampler:
    """Draws N-way K-shot episodes with M queries per class from the videos of `split` labelled `labels`."""

    def __init__(self, labels: torch.Tensor, ways: int, shots: int, queries: int, split: str = "train"):
        self.ways, self.shots, self.queries = ways, shots, queries
        protocol = describe_protocol(ways, shots, queries)
        if ways < 2 or shots < 1 or queries < 1:
            raise ClipspmError(f"{protocol} cannot be drawn: episodes need at least 2 ways, 1 shot and 1 query "
                               f"per class")
        classes, counts = labels.unique(return_counts=True)
        usable = counts >= shots + queries
        if int(usable.sum()) < ways:
            raise ClipspmError(f"{protocol} need {ways} classes with at least {shots + queries} videos each; the "
                               f"{split} split has {int(usable.sum())} such classes (of {classes.numel()}, with at "
                               f"most {int(counts.max()) if counts.numel() else 0} videos each); lower the shots "
                               f"or queries")
        self.classes = classes[usable]
        self.counts = counts[usable]
        # [classes, max videos] table of video positions; unused slots are never drawn (their key is +inf)
        self.table = torch.full((self.classes.numel(), int(self.counts.max())), -1, dtype=torch.long,
                                device=labels.device)
        for row, cls in enumerate(self.classes):
            members = torch.nonzero(labels == cls).flatten()
            self.table[row, :members.numel()] = members

    def sample(self, episodes: int, generator: torch.Generator) -> EpisodeIndex:
        device = self.table.device
        keys = torch.rand(episodes, self.classes.numel(), generator=generator, device=device)
        chosen = keys.argsort(dim=1)[:, :self.ways]                                      # [E, N]
        video_keys = torch.rand(episodes, self.ways, self.table.shape[1], generator=generator, device=device)
        slots = torch.arange(self.table.shape[1], device=device)
        video_keys = video_keys.masked_fill(slots >= self.counts[chosen].unsqueeze(-1), float("inf"))
        picks = video_keys.argsort(dim=-1)[..., :self.shots + self.queries]            # [E, N, K+M]
        videos = torch.gather(self.table[chosen], 2, picks)
        support = videos[..., :self.shots].flatten(1)
        query = videos[..., self.shots:].flatten(1)
        return EpisodeIndex(support, query, self.classes[chosen], self.shots, self.queries)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, step), so a resumed run
    draws exactly the episodes the uninterrupted run would have drawn."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:7], "little"))
    return generator


def build_episode(index: EpisodeIndex, features: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  views: torch.Tensor | None = None, base_classes: torch.Tensor | None = None,
                  video_text: torch.Tensor | None = None) -> Episode:
    """Gather an Episode from a split's features.

    features [n, views, T, C] (any float dtype; returned as float32), labels [n] class rows,
    class_text [classes, C] prompt features, views: optional [E, N*(K+M)] view per video (else the
    test view 0). `base_classes` [B] class rows of the training classes enables the CLIP-FSAR
    video-text loss (their row order defines `class_ids`). `video_text` [n, C]: a text feature per
    video (its description), gathered into the episode when given.
    """
    support_views = query_views = 0
    if views is not None:
        support_views, query_views = views[:, :index.support.shape[1]], views[:, index.support.shape[1]:]
    support = features[index.support, support_views].float()                              # [E, NK, T, C]
    query = features[index.query, query_views].float()                                    # [E, NM, T, C]
    query_classes = labels[index.query]                                                    # [E, NM]
    query_labels = (query_classes.unsqueeze(-1) == index.classes.unsqueeze(1)).float().argmax(-1)
    if base_classes is not None:
        lookup = torch.full((class_text.shape[0],), -1, dtype=torch.long, device=base_classes.device)
        lookup[base_classes] = torch.arange(base_classes.numel(), device=base_classes.device)
        class_ids, base_text = lookup[index.classes], class_text[base_classes]
    else:
        class_ids, base_text = index.classes, None
    described = video_text is not None
    return Episode(support=support, query=query, query_labels=query_labels, class_text=class_text[index.classes],
                   class_ids=class_ids, base_text=base_text, shots=index.shots, class_rows=index.classes,
                   support_video_text=video_text[index.support].float() if described else None,
                   query_video_text=video_text[index.query].float() if described else None)


def describe_protocol(ways: int, shots: int, queries: int) -> str:
    """'5-way 1-shot episodes with 1 query per class'."""
    return f"{ways}-way {shots}-shot episodes with {queries} {'query' if queries == 1 else 'queries'} per class"


def fixed_episodes(path: Path, labels: torch.Tensor, video_ids: list[str], *, ways: int, shots: int, queries: int,
                   episodes: int, seed: int, split: str = "test") -> tuple[EpisodeIndex, str]:
    """The stored episodes for these settings, made once and then read back; and their sha256.

    Stored by video id as well as by row, so an episode file cannot be applied to another video
    list by mistake. Nothing is written unless the episodes could be drawn.
    """
    if episodes < 1:
        raise ClipspmError(f"the number of {split} episodes must be at least 1, got {episodes}")
    identity = hashlib.sha256("\n".join(video_ids).encode()).hexdigest()
    if path.exists():
        with reading(path, "episode file", "delete it: the same episodes are drawn again from their seed"):
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                meta = json.loads(handle.metadata()["episodes"])
        if meta["videos_sha256"] != identity:
            raise ClipspmError(f"{path} was made for another list of videos; delete it to draw new episodes")
        index = EpisodeIndex(tensors["support"], tensors["query"], tensors["classes"], shots, queries)
    else:
        sampler = EpisodeSampler(labels.cpu(), ways, shots, queries, split)
        generator = torch.Generator().manual_seed(seed)
        index = sampler.sample(episodes, generator)
        meta = {"ways": ways, "shots": shots, "queries": queries, "episodes": episodes, "seed": seed,
                "videos_sha256": identity}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({"support": index.support.contiguous(), "query": index.query.contiguous(),
                   "classes": index.classes.contiguous()}, str(partial), metadata={"episodes": json.dumps(meta)})
        partial.replace(path)
    return index, file_sha256(path)


def episode_file_name(split: str, ways: int, shots: int, queries: int, episodes: int, seed: int) -> str:
    return f"{split}-{ways}way-{shots}shot-{queries}query-{episodes}ep-seed{seed}.safetensors"
