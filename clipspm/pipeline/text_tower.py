"""The frozen CLIP text tower as a function of token embeddings, for heads that learn prompt tokens.

A head that learns context tokens (CoOp-style prompts) puts its own embeddings where a tokenised
text's embeddings would be and runs the tower on them inside the training step: gradients flow
through the tower to those embeddings, never into the tower's weights (frozen, not a parameter of
any head, kept out of checkpoints). The stages load it from the model the cache was extracted with
(`clipspm.stages.runs.load_text_tower`), so the prompts meet the text features the cache holds.

The tower is causal: a position's output depends only on the tokens before it. A head that reads a
few positions can therefore cut its sequences after the last one it reads (`forward` takes any
length up to the context length) and get the same features for a fraction of the work.
"""

from __future__ import annotations

import open_clip
import torch
from torch import Tensor, nn

from clipspm.errors import ClipspmError


class TextTower(nn.Module):
    """token embeddings [B, L, W] + read positions [B, P] -> projected text features [B, P, C]."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        if getattr(model, "token_embedding", None) is None or getattr(model, "attn_mask", None) is None:
            raise ClipspmError(f"the text tower of {name} is not a CLIP text transformer with token embeddings and a "
                               f"causal mask; learned prompts need one (RN50, ViT-B-16 and the like have it)")
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ClipspmError(f"the text tower of {name} pools by {model.text_pool_type!r}; learned prompts are read "
                               f"at the end-of-text token (argmax pooling), as in CLIP")
        self.name = name
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        """W, the width of the token embeddings."""
        return self.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def dim(self) -> int:
        """C, the width of the projected text features."""
        projection = self.text_projection
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    def train(self, mode: bool = True) -> TextTower:
        return super().train(False)   # frozen: no dropout or batch statistics, whatever a caller asks

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [len(texts), context_length] on the tower's device (too long: truncated, as open_clip does)."""
        return self.tokenizer(texts).to(self.token_embedding.weight.device)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings [..., L, W] of token ids [..., L]."""
        return self.token_embedding(tokens)

    @staticmethod
    def end_positions(tokens: Tensor) -> Tensor:
        """Where CLIP reads a tokenised text: its end-of-text token, the largest id. [..., L] -> [...]."""
        return tokens.argmax(-1)

    def forward(self, embeddings: Tensor, positions: Tensor) -> Tensor:
        """The features at `positions` [B, P] of the sequences `embeddings` [B, L, W] (L <= context length):
        what `encode_text` computes from the embeddings of a tokenised text onward. -> [B, P, C]."""
        length = embeddings.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the text tower's context length {self.context_length}")
        x = embeddings.to(self.transformer.get_cast_dtype()) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
        x = torch.gather(x, 1, positions[..., None].expand(-1, -1, x.shape[-1]))            # [B, P, W]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 256) -> Tensor:
        """Text features [len(texts), C] of plain texts (as `ClipModel.encode_texts`), `batch` texts at a time."""
        features = []
        for start in range(0, len(texts), batch):
            tokens = self.tokenize(texts[start:start + batch])
            features.append(self(self.embed(tokens), self.end_positions(tokens)[:, None])[:, 0])
        return torch.cat(features) if features else self.positional_embedding.new_zeros(0, self.dim)
