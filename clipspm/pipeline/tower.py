"""The CLIP visual tower as a trainable module (stage three): which weights train, frozen BatchNorm
statistics, activation checkpointing.

"Blocks" are the units that `finetune.unfreeze: last` counts from the end of the tower:

    VisionTransformer (ViT-B-16, ...): transformer.resblocks[0..L-1]           (ViT-B/16: 12)
    ModifiedResNet (RN50, ...):        layer1, layer2, layer3, layer4, attnpool (5)

Unfreezing the last N blocks trains those blocks and everything after them (ViT: ln_post, proj);
the stem before the first block (ViT: conv1, class/positional embeddings, ln_pre; ResNet: the
three stem convolutions and their BatchNorms) trains only with `unfreeze: all`.
"""

from __future__ import annotations

from functools import partial

from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipspm.errors import ClipspmError

UNFREEZE_CHOICES = ("all", "last")


def tower_parts(visual: nn.Module) -> tuple[list[nn.Module | nn.Parameter], list[nn.Module]]:
    """(stem, blocks) of an open_clip visual tower, as defined in the module docstring."""
    if isinstance(visual, VisionTransformer):
        stem = [visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre]
        return [part for part in stem if part is not None], list(visual.transformer.resblocks)
    if isinstance(visual, ModifiedResNet):
        return ([visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3],
                [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool])
    raise ClipspmError(f"finetune.unfreeze=last knows the blocks of open_clip VisionTransformer and ModifiedResNet "
                       f"towers, not {type(visual).__name__}; use finetune.unfreeze=all")


def unfreeze(visual: nn.Module, mode: str, blocks: int) -> list[nn.Parameter]:
    """Make the chosen part of the tower trainable; return its trainable parameters in module order."""
    if mode not in UNFREEZE_CHOICES:
        raise ClipspmError(f"finetune.unfreeze={mode!r}: use one of {', '.join(UNFREEZE_CHOICES)}")
    visual.requires_grad_(True)
    if mode == "last":
        stem, all_blocks = tower_parts(visual)
        if not 1 <= blocks <= len(all_blocks):
            raise ClipspmError(f"finetune.blocks={blocks}: this {type(visual).__name__} tower has {len(all_blocks)} "
                               f"blocks; choose 1..{len(all_blocks)} (or finetune.unfreeze=all)")
        for part in stem + all_blocks[:-blocks]:
            part.requires_grad_(False)
    return [parameter for parameter in visual.parameters() if parameter.requires_grad]


def train_mode(visual: nn.Module) -> None:
    """Train mode, except BatchNorm layers: their running statistics stay those of pretraining.

    A few-shot step sees a handful of classes in a few dozen videos, far too narrow a sample to
    re-estimate statistics learnt on hundreds of millions of images (SPEC section 4). The affine
    BatchNorm weights still train where the tower is unfrozen.
    """
    visual.train()
    for module in visual.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def enable_activation_checkpointing(visual: nn.Module) -> None:
    """Recompute the tower's block activations in backward instead of keeping them.

    ViT towers have open_clip's own switch. open_clip's ModifiedResNet has none (its
    `set_grad_checkpointing` is a no-op), so each bottleneck's forward is wrapped here; the module
    tree and its state_dict keys stay unchanged. Frozen BatchNorm makes the recomputation exact.
    """
    if isinstance(visual, ModifiedResNet):
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for block in layer:
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    else:
        visual.set_grad_checkpointing(True)
