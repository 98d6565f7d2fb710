"""Can training change what a run is scored on? Whether anything that trains reaches the head's logits.

An ablation row is a result only if what trains can move the logits that evaluation scores. In the
heads stage the inputs are fixed cached features, so that means: some trainable parameter of the
head lies on the autograd path of the logits. A parameter used only by an auxiliary loss (HSMR
without SPM: L_H trains HSMR's own parameters, none of which feed the distance) trains but cannot
change a single score, so such a row is the untrained model by construction. In the finetune stage
the visual tower trains, so the features themselves are trained inputs, and they reach the logits.

The check is one eval-mode forward (what evaluation runs) of the head on a random episode of the
run's shape, and a walk of the logits' autograd graph back to its leaves (no backward is run):
what trains and is not among those leaves cannot move a score. Nothing is hard-coded per method or suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from clipspm.pipeline.episode import Episode
from clipspm.pipeline.methods import HeadInputs, build_head

FEATURES = "features"   # the name of the episode's features among what trains (finetune: the tower's output)


@dataclass(frozen=True)
class LogitReach:
    trained: tuple[str, ...]    # what training changes: the head's trainable parameters, FEATURES when the tower trains
    reaching: tuple[str, ...]   # those on the autograd path of the logits

    @property
    def scores_fixed(self) -> bool:
        """Something trains, yet nothing it changes reaches the logits: every score is the untrained model's."""
        return bool(self.trained) and not self.reaching

    @property
    def idle_modules(self) -> tuple[str, ...]:
        """Top-level modules whose trainable parameters all miss the logits (they train for auxiliary losses only)."""
        reaching = {name.split(".")[0] for name in self.reaching}
        return tuple(sorted({name.split(".")[0] for name in self.trained} - reaching))

    def reason(self) -> str | None:
        """Why the run's scores cannot be a result of its training, or None when they can (or nothing trains)."""
        if not self.scores_fixed:
            return None
        return (f"no trained parameter reaches the logits (those of {', '.join(self.idle_modules)} feed only "
                f"auxiliary losses), so training cannot change a score: the row is the untrained model")


def logit_reach(head: torch.nn.Module, episode: Episode, *, features_trained: bool) -> LogitReach:
    """Which of the head's trainable parameters (and, if `features_trained`, the episode's features) reach the
    logits of one eval-mode forward on `episode`."""
    named = [(name, parameter) for name, parameter in head.named_parameters() if parameter.requires_grad]
    if features_trained:
        episode.support.requires_grad_(True)
        episode.query.requires_grad_(True)
        named += [(FEATURES, episode.support), (FEATURES, episode.query)]
    if not named:
        return LogitReach((), ())
    head.eval()
    with torch.enable_grad():
        leaves = graph_leaves(head(episode).logits)                             # logits [E, N*M, N]
    trained = tuple(dict.fromkeys(name for name, _ in named))
    reaching = tuple(dict.fromkeys(name for name, tensor in named if id(tensor) in leaves))
    return LogitReach(trained, reaching)


def graph_leaves(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters, inputs that require grad) on the autograd graph of `output`:
    those a backward from it would give a gradient, found by walking the graph without running backward."""
    leaves, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):              # AccumulateGrad: the node of a leaf
            leaves.add(id(node.variable))
        stack.extend(parent for parent, _ in node.next_functions)
    return leaves


def config_reach(cfg: DictConfig, *, dim: int, frames: int, stage: str, inputs: HeadInputs | None = None
                 ) -> LogitReach:
    """`logit_reach` of the head a resolved run config builds (with the stage's `inputs`, for a method that
    needs them), on a random test-shaped episode (N = train.ways, K = train.shots, M = eval.queries,
    T = `frames`, C = `dim`; the episode's classes are the first N class rows)."""
    generator = torch.Generator().manual_seed(0)
    ways, shots, queries = cfg.train.ways, cfg.train.shots, cfg.eval.queries
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)   # the head's initial weights; the caller's random state is left as it was
        head = build_head(cfg.model, cfg.loss, dim, inputs)
    episode = Episode(support=torch.randn(1, ways * shots, frames, dim, generator=generator),
                      query=torch.randn(1, ways * queries, frames, dim, generator=generator),
                      query_labels=torch.arange(ways).repeat_interleave(queries)[None],
                      class_text=torch.randn(1, ways, dim, generator=generator),
                      class_ids=torch.arange(ways)[None], class_rows=torch.arange(ways)[None], shots=shots)
    return logit_reach(head, episode, features_trained=stage == "finetune")
