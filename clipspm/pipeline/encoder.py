"""The single door to open_clip: model configs, weights (tag, local file or none), encoding.

Offline machines are common on clusters. open_clip would retry the hub for ~45 s before
failing on a missing tag; here a tag is first looked up in the local caches and, when absent and
the hub is unreachable, refused in seconds with the way to pass a local file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import open_clip
import torch
from torch import nn

from clipspm.config import MODEL_CONFIG_DIR
from clipspm.errors import ClipspmError, WeightsUnavailableError, damaged_file, reading

HUB_HOST = "huggingface.co"
# How pixels enter the tower: `clip`, the weights' own mean/std; `none`, plain [0, 1] as the released
# CLIP-SPM loader feeds them (video_reader.py: ToTensor, no normalisation).
NORMALIZATIONS = ("clip", "none")
OPENAI_URL_CACHE = Path("~/.cache/clip").expanduser()


@dataclass
class ClipModel:
    """A loaded CLIP model and everything the cache records about it."""

    model: nn.Module
    name: str
    pretrained: str            # tag, resolved file path, or "none"
    pretrained_kind: str       # "tag" | "file" | "none"
    weight_sha256: str         # of the weight file; of the initial state dict for "none"
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    config_sha256: str         # of the open_clip architecture config: same weights, other config, other features

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float normalised with this model's mean/std, on the model's device.

        `out` (float32 of that shape, on the device) is filled instead of a new tensor: on the CPU, a new
        tensor of a batch's size is fresh memory whose page faults cost as much as the arithmetic here.
        """
        frames = frames.to(self.device, non_blocking=True)
        frames = frames.float() if out is None else out.copy_(frames)   # our own tensor: the rest is in place
        mean = torch.tensor(self.mean, device=frames.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=frames.device).view(3, 1, 1)
        return frames.div_(255).sub_(mean).div_(std)

    def encode_frames(self, frames: torch.Tensor, precision: str = "fp32", out: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """uint8 frames [B, 3, S, S] -> projected image embeddings [B, C] (not L2-normalised); `out`: see normalize."""
        with autocast(self.device, precision):
            return self.model.encode_image(self.normalize(frames, out)).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch: int = 256) -> torch.Tensor:
        """Text embeddings [len(texts), C] (not L2-normalised) from the frozen text tower."""
        tokenizer = open_clip.get_tokenizer(self.name)
        out = [self.model.encode_text(tokenizer(texts[i:i + batch]).to(self.device)).float()
               for i in range(0, len(texts), batch)]
        return torch.cat(out)


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA (fp16/bf16); a no-op context for fp32 and on the CPU."""
    if precision not in {"fp32", "fp16", "bf16"}:
        raise ClipspmError(f"unknown precision {precision!r}: use fp32, fp16 or bf16")
    enabled = device.type == "cuda" and precision != "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where the GPU supports it, else fp16 on CUDA, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@cache
def register_model_configs() -> None:
    """Make the project's tiny configs (`clipspm-tiny-vit`, `clipspm-tiny-rn`) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def feature_width(name: str) -> int | None:
    """C, the width of open_clip model `name`'s projected embeddings (None for a name open_clip does not know)."""
    register_model_configs()
    config = open_clip.get_model_config(name)
    return None if config is None else int(config["embed_dim"])


def check_model_name(name: str) -> None:
    """Refuse a model name open_clip does not know (before any work that needs the model)."""
    register_model_configs()
    if name not in open_clip.list_models():
        raise ClipspmError(f"unknown open_clip model {name!r}; known names include RN50, ViT-B-16, "
                           f"clipspm-tiny-vit (see `open_clip.list_models()`)")


def load_clip(name: str, pretrained: str = "openai", device: str | torch.device = "cpu", *,
              seed: int = 0, weights: str | Path | None = None, normalize: str = "clip") -> ClipModel:
    """Build `name` with weights from a tag, a local file, or `none` (random init from `seed`).

    `weights` optionally names a safetensors file of visual-tower weights (a fine-tuned run) loaded
    on top; it then takes part in the recorded weight hash. `normalize` (NORMALIZATIONS): `none` feeds
    the tower pixels in [0, 1] (mean 0, std 1).
    """
    if normalize not in NORMALIZATIONS:
        raise ClipspmError(f"normalize={normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
    check_model_name(name)
    force_quick_gelu = False
    preprocess = {}
    if pretrained == "none":
        torch.manual_seed(seed)
        logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: that is the point
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        digest = state_dict_sha256(model)
        resolved, kind = "none", "none"
    else:
        path, tag_cfg = resolve_weights(name, pretrained)
        force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        preprocess = {key: tag_cfg[key] for key in ("mean", "std") if key in tag_cfg}
        fix = f"pass an intact {name} weight file (safetensors, or a state dict saved by torch.save), or a tag"
        try:
            with warnings.catch_warnings():
                # torch's weights-only loader warns about every pickle protocol but 2; such files load correctly
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                model = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=force_quick_gelu)
        except Exception as error:   # whatever fails here, it is the file the user named that does not load
            raise (damaged_file(path, "weight file", fix, error)
                   or ClipspmError(f"cannot load weights {path} into {name}: {first_line(error)}; {fix}")) from None
        digest = file_sha256(path)
        resolved, kind = (pretrained, "tag") if tag_cfg else (str(path), "file")
    if weights is not None:
        from safetensors.torch import load_file

        fix = "pass the visual.safetensors of a finetune run of this backbone, or its run directory"
        with reading(weights, "visual tower weights", fix):
            tensors = load_file(str(weights))
        try:
            model.visual.load_state_dict(tensors)
        except RuntimeError as error:
            raise ClipspmError(f"visual tower weights {weights} do not fit {name}'s visual tower "
                               f"({first_line(error)}); {fix}") from None
        digest = hashlib.sha256((digest + file_sha256(Path(weights))).encode()).hexdigest()
    model = model.to(device).eval().requires_grad_(False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    plain = normalize == "none"
    return ClipModel(
        model=model, name=name, pretrained=resolved, pretrained_kind=kind, weight_sha256=digest, image_size=image_size,
        mean=(0.0, 0.0, 0.0) if plain else tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=(1.0, 1.0, 1.0) if plain else tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
        feature_dim=feature_width(name),
        config_sha256=hashlib.sha256(json.dumps(open_clip.get_model_config(name), sort_keys=True).encode()).hexdigest(),
    )


def first_line(error: Exception) -> str:
    """The first line of a library's error that says what went wrong (torch's load errors run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1].rstrip(".")
    return lines[0] if lines else type(error).__name__


def resolve_weights(name: str, pretrained: str) -> tuple[Path, dict]:
    """The local weight file for a tag or path, and the tag's open_clip config ({} for a path)."""
    candidate = Path(pretrained).expanduser()
    if candidate.is_file():
        return candidate, {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            raise WeightsUnavailableError(f"weight file {pretrained} does not exist")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
        raise WeightsUnavailableError(f"{pretrained!r} is neither a weight file nor a pretrained tag of {name} "
                                      f"(tags: {tags}; or pass a local file, or `none` for random weights)")
    cached = cached_weight_file(tag_cfg)
    if cached is not None:
        return cached, tag_cfg
    if not hub_reachable():
        sources = " or ".join(filter(None, [tag_cfg.get("url"), tag_cfg.get("hf_hub") and
                                            f"https://huggingface.co/{tag_cfg['hf_hub'].rstrip('/')}"]))
        raise WeightsUnavailableError(
            f"the {name} weights for tag {pretrained!r} are not in the local cache and {HUB_HOST} cannot be "
            f"reached (offline). Download them on a machine with internet ({sources}), copy the file here and "
            f"pass it: --pretrained /path/to/{name}.pt")
    try:
        return Path(open_clip.pretrained.download_pretrained(tag_cfg)), tag_cfg
    except Exception as error:
        raise WeightsUnavailableError(f"downloading {name} weights for tag {pretrained!r} failed: {error}; "
                                      f"pass a local file with --pretrained /path/to/weights") from None


def cached_weight_file(tag_cfg: dict) -> Path | None:
    """The tag's weight file if an earlier download left it in the HF or OpenAI URL cache."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = tag_cfg.get("url", "")
    if url:
        local = OPENAI_URL_CACHE / os.path.basename(url)
        if local.is_file():
            return local
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}:
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
