"""MCDP-FSAR (Lan, Lin, Su, Yang, 2026): CLIP-FSAR's temporal transformer and OTAM, with a per-video
context token made by learned prompts run through the frozen CLIP text tower (AMCAP).

Read from github sjkjsandy/MCDP-FSAR (`models/base/few_shot.py`: `CNN_OTAM_CLIPFSAR`,
`MultimodalContextualPromptLearner`, `CrossModalAttentionPromptGenerator`, `TextEncoder`; the loss in
`runs/train_net_few_shot.py`; per-dataset values in `configs/projects/CLIPFSAR/`, kept in
`clipspm/configs/methods/mcdp.yaml`). VFAM, its person crops, is preprocessing: `clipspm extract
--person-crop`. What differs from the released code and why: README "MCDP-FSAR". Parity with
the released modules: tests/fixtures/mcdp.

A video's context token: 16 learned token embeddings, all shifted by one vector made from the video's
frame `prompt_frame` and its description (cross-attention, then an MLP), are put between the start
token and the end of the prompt "X X ... X." and run through the text tower; the feature is read at
the end-of-text position of "X X ... X {class name}." of the class in question (released: the class
name itself is not in the sequence). The token joins the video's frames in the temporal transformer.
Supports use their own class; a query's class is what is being predicted, so by default the query is
scored against every class of the episode with that class's context token (`query_prompt`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from pydantic import Field
from torch import Tensor, nn

from clipspm.errors import ClipspmError
from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods.clipfsar import CLIPFSARLoss, CLIPFSAROptions
from clipspm.pipeline.methods.registry import HeadInputs, Method, register_method
from clipspm.pipeline.otam import frame_distances, otam_cumulative
from clipspm.pipeline.released_layers import (
    COSINE_EPSILON,
    ReleasedTransformer,
    released_otam_distance,
    released_video_text_loss,
)

CONTEXT_WORD = "X"        # the released prompt prefix: one "X" per context token (random init, no CTX_INIT)


class MCDPOptions(CLIPFSAROptions):
    """CLIP-FSAR's transformer and OTAM options (the released MCDP-FSAR is built on it), and AMCAP's."""

    kind: Literal["mcdp"] = "mcdp"  # type: ignore[assignment]
    query_prompt: Literal["all_classes", "true_class_leak"] = Field(
        "all_classes", description="all_classes: a query is scored against each episode class with that class's "
                                   "context token, its label never read | true_class_leak: the released protocol, "
                                   "one token made with the query's true class, in training and at test (results "
                                   "marked as leaking the label)")
    context_tokens: int = Field(16, ge=1, description="learned context token embeddings of the prompt (released "
                                                      "N_CTX)")
    prompt_frame: int = Field(3, ge=0, description="the frame whose CLIP feature shifts a video's context (released "
                                                   "3: its configs' INDEX_FRAME_TO_TXTFEATURE is never read)")
    class_name_in_prompt: bool = Field(False, description="false (released): the prompt is the context and '.'; a "
                                                          "class enters only through the position read, the end of "
                                                          "'context + class name.' | true: the name follows the "
                                                          "context in the sequence")
    prompt_hidden: int = Field(512, ge=1, description="width of the cross-attention that shifts the context "
                                                      "(released 512 at every C)")
    prompt_heads: int = Field(8, ge=1, description="heads of that cross-attention; must divide prompt_hidden")
    prompt_dropout: float = Field(0.1, ge=0, lt=1, description="dropout of that cross-attention and its MLP")
    merge_shots: bool = Field(True, description="average the K shots (frames and context token) before the "
                                                "transformer (released MERGE_BEFORE of the 3- and 5-shot configs; "
                                                "1-shot alike either way) | false: average its outputs")


class MCDPLoss(CLIPFSARLoss):
    """CLIP-FSAR's video-text loss (released weights per dataset: configs/methods/mcdp.yaml)."""


class ContextShift(nn.Module):
    """AMCAP's cross-modal prompt generator: the video's description feature attends to its frame
    feature, then an MLP gives the shift added to every context token. visual [B, C], text [B, C] -> [B, W].

    The attention has a single key, so its weight is 1 (0 where attention dropout drops it): the
    attended value is the projected frame feature, and the query/key projections get no gradient.
    """

    def __init__(self, dim: int, width: int, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ClipspmError(f"model.prompt_heads={heads} does not divide model.prompt_hidden={hidden}")
        self.visual_proj = nn.Linear(dim, hidden)
        self.text_proj = nn.Linear(dim, hidden)
        self.cross_attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * hidden, width))
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, visual: Tensor, text: Tensor) -> Tensor:
        visual = rearrange(self.visual_proj(visual), "b h -> b 1 h")
        text = rearrange(self.text_proj(text), "b h -> b 1 h")
        attended, _ = self.cross_attention(text, visual, visual, need_weights=False)      # [B, 1, H]
        return self.norm2(self.ffn(self.norm1(attended[:, 0] + text[:, 0])))


class MCDPHead(nn.Module):
    """Prototypes: each class's frames (shots averaged) with its supports' context token as one more
    token through the temporal transformer; queries alike with theirs. logits = -OTAM(query, prototype),
    frame distance 1 - released_cosine. Training adds CLIP-FSAR's "video_text" loss."""

    def __init__(self, dim: int, options: MCDPOptions, inputs: HeadInputs):
        super().__init__()
        tower = inputs.text_tower
        if not inputs.class_texts:
            raise ClipspmError("MCDP-FSAR needs the class texts of the cache (HeadInputs.class_texts) for its prompts")
        # The frozen text tower is the stage's, on its device: not a submodule, so neither trained, moved nor
        # saved with the head.
        object.__setattr__(self, "tower", tower)
        self.reads_query_labels = options.query_prompt == "true_class_leak"
        self.context_count, self.prompt_frame = options.context_tokens, options.prompt_frame
        self.class_name_in_prompt, self.merge_shots = options.class_name_in_prompt, options.merge_shots
        self.otam_lambda, self.bidirectional = options.otam_lambda, options.otam_bidirectional

        self.context = nn.Parameter(torch.empty(options.context_tokens, tower.width).normal_(std=0.02))
        self.context_shift = ContextShift(dim, tower.width, options.prompt_hidden, options.prompt_heads,
                                          options.prompt_dropout)
        self.transformer = ReleasedTransformer(dim, options.num_heads, options.mlp_hidden, options.attention_dropout,
                                               options.mlp_dropout)
        self.text_scale = nn.Parameter(torch.ones(1))

        prefix = " ".join([CONTEXT_WORD] * options.context_tokens)
        named = tower.tokenize([f"{prefix} {text}." for text in inputs.class_texts])         # [classes, L]
        read = tower.end_positions(named)                                                    # [classes]
        if int(read.min()) <= options.context_tokens + 1:
            raise ClipspmError(f"model.context_tokens={options.context_tokens} leaves no room for the class names "
                               f"in the text tower's {tower.context_length} tokens; use fewer")
        # Causal tower: nothing after the last position read changes a feature, so the prompts end there.
        length = int(read.max()) + 1
        plain = named if options.class_name_in_prompt else tower.tokenize([f"{prefix}."])
        self.register_buffer("read_position", read, persistent=False)
        self.register_buffer("prompt_tokens", plain[:, :length], persistent=False)         # [classes or 1, L]

    def forward(self, episode: Episode) -> HeadOutput:
        if episode.class_rows is None:
            raise ClipspmError("MCDP-FSAR reads Episode.class_rows (the cache's class row of each episode class)")
        e, n, k, t = episode.num_episodes, episode.ways, episode.shots, episode.frames
        if self.prompt_frame >= t:
            raise ClipspmError(f"model.prompt_frame={self.prompt_frame}, but videos have T={t} frames")
        support, query = episode.support, episode.query
        nm = query.shape[1]

        support_text = episode.support_video_text
        if support_text is None:                         # no descriptions: the class prompt stands in
            support_text = repeat(episode.class_text, "e n c -> e (n k) c", k=k)
        support_rows = repeat(episode.class_rows, "e n -> (e n k) 1", k=k)
        support_context = self.context_token(support.flatten(0, 1), support_text.flatten(0, 1), support_rows)
        protos = self.prototypes(support, support_context.unflatten(0, (e, -1)), k)          # [E, N, T, C]

        if self.reads_query_labels:                      # released: each query's true class (a label leak)
            labels = episode.query_labels
            text = episode.query_video_text
            if text is None:
                text = torch.gather(episode.class_text, 1, repeat(labels, "e q -> e q c", c=episode.dim))
            rows = rearrange(torch.gather(episode.class_rows, 1, labels), "e q -> (e q) 1")
            context = self.context_token(query.flatten(0, 1), text.flatten(0, 1), rows)      # [E*NM, 1, C]
            tokens = torch.cat([query, context.unflatten(0, (e, nm))], 2)                    # [E, NM, T+1, C]
            compared = self.transformer(tokens.flatten(0, 1))[:, :t].unflatten(0, (e, nm))  # [E, NM, T, C]
            distances = released_otam_distance(compared, protos, self.otam_lambda, self.bidirectional)
            query_features = compared
        else:                                            # every class of the episode, the query's label unread
            context = self.query_contexts(episode)                                           # [E, NM, N, C]
            frames = repeat(query, "e q t c -> e q n t c", n=n)
            tokens = torch.cat([frames, rearrange(context, "e q n c -> e q n 1 c")], 3)     # [E, NM, N, T+1, C]
            compared = self.transformer(tokens.flatten(0, 2))[:, :t].unflatten(0, (e, nm, n))
            distances = self.paired_otam(compared, rearrange(protos, "e n t c -> e 1 n t c"))   # q as class n
            query_features = None                        # a query is seen once per class: no single map
        aux = {}
        if self.training and episode.base_text is not None:
            aux["video_text"] = released_video_text_loss(episode, self.text_scale)
        return HeadOutput(logits=-distances, aux=aux, query_features=query_features)

    def context_token(self, frames: Tensor, text: Tensor, rows: Tensor) -> Tensor:
        """The context token of each video read for each of its class rows: frames [B, T, C], its
        description feature text [B, C], class rows [B, P] -> [B, P, C]."""
        visual = F.normalize(frames[:, self.prompt_frame], dim=-1)
        context = self.context + rearrange(self.context_shift(visual, text), "b w -> b 1 w")  # [B, n_ctx, W]
        b, p = rows.shape
        if self.class_name_in_prompt:                    # a sequence per (video, class)
            tokens = self.tower.embed(self.prompt_tokens[rows.flatten()])                    # [B*P, L, W]
            context, positions = context.repeat_interleave(p, 0), self.read_position[rows].reshape(-1, 1)
        else:                                            # one sequence per video, read at P positions
            tokens = self.tower.embed(self.prompt_tokens).expand(b, -1, -1)                  # [B, L, W]
            positions = self.read_position[rows]                                             # [B, P]
        prompts = torch.cat([tokens[:, :1], context.to(tokens.dtype), tokens[:, 1 + self.context_count:]], 1)
        return self.tower(prompts, positions).reshape(b, p, -1)

    def query_contexts(self, episode: Episode) -> Tensor:
        """[E, NM, N, C]: each query's context token for each episode class. Its own description if the run
        has them (one tower sequence per query); else class n's prompt stands in for it under class n."""
        e, nm, n = episode.num_episodes, episode.query.shape[1], episode.ways
        rows = repeat(episode.class_rows, "e n -> (e q) n", q=nm)
        if episode.query_video_text is not None:
            return self.context_token(episode.query.flatten(0, 1), episode.query_video_text.flatten(0, 1),
                                      rows).unflatten(0, (e, nm))
        frames = repeat(episode.query, "e q t c -> (e q n) t c", n=n)
        text = repeat(episode.class_text, "e n c -> (e q n) c", q=nm)
        return self.context_token(frames, text, rearrange(rows, "b n -> (b n) 1")).reshape(e, nm, n, -1)

    def prototypes(self, support: Tensor, context: Tensor, shots: int) -> Tensor:
        """support [E, NK, T, C], context tokens [E, NK, 1, C] -> prototypes [E, N, T, C]."""
        e, t = support.shape[0], support.shape[2]
        tokens = torch.cat([support, context], 2)                                            # [E, NK, T+1, C]
        if self.merge_shots:
            merged = reduce(tokens, "e (n k) l c -> (e n) l c", "mean", k=shots)
            return self.transformer(merged)[:, :t].unflatten(0, (e, -1))
        return class_prototypes(self.transformer(tokens.flatten(0, 1))[:, :t].unflatten(0, (e, -1)), shots)

    def paired_otam(self, query: Tensor, protos: Tensor) -> Tensor:
        """OTAM on 1 - released_cosine of query [..., T, C] with prototype [..., T, C], pair by pair
        (broadcasting) where released_otam_distance takes every query with every prototype. -> [...]."""
        dists = frame_distances(query, protos, COSINE_EPSILON)                               # [..., T, T]
        distance = otam_cumulative(dists, self.otam_lambda)
        if self.bidirectional:
            distance = distance + otam_cumulative(dists.transpose(-1, -2), self.otam_lambda)
        return distance


register_method(Method(
    name="mcdp", title="MCDP-FSAR", paper="Lan, Lin, Su, Yang, Multi-modal Context Dynamic Prompt Learning for "
                                          "Few-shot Action Recognition, 2026",
    code="github.com/sjkjsandy/MCDP-FSAR (models/base/few_shot.py, CNN_OTAM_CLIPFSAR and "
         "MultimodalContextualPromptLearner; VFAM: datasets/utils/gen_3s_video_by_mot.py)",
    build=lambda model, loss, dim, inputs: MCDPHead(dim, model, inputs), model_options=MCDPOptions,
    loss_options=MCDPLoss, needs=("frames", "class_text", "base_text", "text_tower", "video_text"), defaults="mcdp",
    parity="matches the released AMCAP head to 1e-5 in float64: eval logits, the loss of a 16-episode step, and "
           "every gradient against the released code with its text-tower no_grad removed (tests/fixtures/mcdp)",
    notes="context trained through the frozen text tower; queries scored against every class prompt "
          "(model.query_prompt=true_class_leak: the released, label-leaking protocol); VFAM person crops: "
          "clipspm extract --person-crop"))
