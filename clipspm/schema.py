"""The schema of every run config key: type, range, default and meaning (pydantic, strict).

A run config has the sections `data`, `train`, `eval`, `finetune` (finetune stage only), `model`
and `loss`. The first four are defined here; `model` and `loss` belong to the method that
`model.kind` names: each method registers its own option classes (subclasses of `ModelOptions`
and `LossOptions`, see `clipspm/pipeline/methods/`), so a method's options exist only when that
method is chosen. YAML files under `clipspm/configs/` hold what differs from these defaults per
dataset, per stage and per method profile (`clipspm.config.resolve_config` layers them).

Strict: `model.padm=0` or `train.episodes=1.5` are refused, not coerced; an unknown key is refused
with the nearest known one. `clipspm config` prints this schema as the reference of every option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class DataConfig(Section):
    dataset: str = Field("synthetic", description="dataset name, see `clipspm datasets`")
    root: str | None = Field(None, description="dataset root; needed only when the cache must still be extracted "
                                               "or frames are decoded (finetune)")
    split_dir: str | None = Field(None, description="custom split files (custom dataset, or replacing the shipped "
                                                    "ones)")
    backbone: str | None = Field(None, description="open_clip model; null: the dataset's default (RN50; tiny ViT for "
                                                   "synthetic)")
    pretrained: str | None = Field(None, description="tag, weight file or none; null: the dataset's default (openai; "
                                                     "none for synthetic)")
    num_frames: int | None = Field(None, ge=2, description="T of the cache; null: the extract default (8)")
    train_views: int | None = Field(None, ge=0, description="augmented views per video in the cache; null: the "
                                                            "extract default")
    normalize: Literal["clip", "none"] | None = Field(
        None, description="pixels into the tower: clip, the weights' mean/std | none, [0, 1] as the released "
                          "CLIP-SPM code (its checkpoints); null: the extract default (clip)")
    sampling: Literal["tsn", "released"] | None = Field(
        None, description="frames of a video: tsn | released, int(linspace) as the released CLIP-SPM loader; null: "
                          "the extract default (tsn)")
    class_names: Literal["benchmark", "released"] | None = Field(
        None, description="class texts in the prompts: benchmark, each dataset's rule | released, the released "
                          "CLIP-SPM configs' lists; null: the extract default (benchmark)")
    seed: int = Field(0, ge=0, description="extraction seed (train views, synthetic data)")
    cache: str | None = Field(None, description="an explicit cache directory; null: the one these settings address "
                                                "(extracted if missing)")
    cache_dir: str = Field("caches", description="where caches are looked up and made")
    cache_key: dict[str, Any] | None = Field(None, description="set by training: the settings of the cache the run "
                                                               "was trained from (checked on resume)")
    descriptions: str | None = Field(None, description="CSV or JSON of video id (CLASS/VIDEO) -> description, for "
                                                       "methods that read per-video text (mcdp); null: each video's "
                                                       "class prompt stands in")
    descriptions_sha256: str | None = Field(None, description="set by training: the hash of data.descriptions "
                                                              "(checked on resume and at evaluation)")


class TrainConfig(Section):
    ways: int = Field(5, ge=2, description="N: classes per episode")
    shots: int = Field(1, ge=1, description="K: support videos per class")
    queries: int = Field(4, ge=1, description="M: queries per class in training episodes (paper: 4)")
    episodes: int = Field(20000, ge=1, description="training episodes (paper: 20,000; 100,000 for SSv2, see "
                                                   "datasets.yaml)")
    episodes_per_step: int = Field(16, ge=1, description="episodes batched into one optimiser step (paper: 16 "
                                                         "accumulated)")
    lr: float = Field(3.0e-4, gt=0, description="Adam lr of the heads (heads stage: suite heads_lr on synthetic; "
                                                "finetune: the paper's 1e-5)")
    weight_decay: float = Field(5.0e-5, ge=0, description="Adam weight decay of the heads (paper)")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2, description="Adam (beta1, beta2) of every "
                                                                                      "parameter group")
    val_every: int = Field(1000, ge=1, description="validate (and checkpoint) every this many episodes")
    val_episodes: int = Field(1000, ge=1, description="fixed val episodes")
    val_queries: int = Field(1, ge=1, description="queries per class in val episodes")
    log_every: int = Field(160, ge=1, description="episodes between metrics.jsonl records")
    select_on: Literal["val", "test"] = Field("val", description="split whose fixed episodes pick the `best` "
                                                                 "checkpoint: val, or test (the released code's "
                                                                 "protocol: validates on the stored test episodes "
                                                                 "`eval` scores, so the test number is optimistic; "
                                                                 "results are marked)")
    seed: int = Field(0, ge=0, description="episode sampling, view choice and dropout are functions of (seed, step)")
    cuda_graph: bool = Field(False, description="heads stage on CUDA: capture the optimiser step (episode gather, "
                                                "heads forward and backward, Adam) in a CUDA graph and replay it "
                                                "instead of launching its many small kernels one by one; the CPU "
                                                "always runs eagerly. benchmarks/gpu.py measures both")


class EvalConfig(Section):
    episodes: int = Field(10000, ge=1, description="test episodes (paper: 10,000)")
    queries: int = Field(1, ge=1, description="M at test (CLIP-FSAR/CLIP-MEI code: 1; the paper text says 4); "
                                              "recorded in results")
    seed: int = Field(0, ge=0, description="the stored test episodes are drawn from this seed")
    batch: int = Field(250, ge=1, description="episodes per forward at evaluation")


class FinetuneConfig(Section):
    init: str | None = Field(None, description="run whose best checkpoint starts this one (`--init RUN_DIR`): a heads "
                                               "run's heads, or a finetune or imported run's heads and tower")
    unfreeze: Literal["all", "last"] = Field("all", description="all: the whole tower trains | last: only its last "
                                                                "`blocks` blocks and what follows")
    blocks: int = Field(2, ge=1, description="with unfreeze=last: ViT resblocks (12 in ViT-B/16); ResNet layer1..4 + "
                                             "attnpool (5)")
    tower_lr: float = Field(1.0e-5, gt=0, description="Adam lr of the visual tower (paper, Sec. 4.2)")
    tower_weight_decay: float = Field(5.0e-5, ge=0, description="Adam weight decay of the visual tower (paper)")
    micro_episodes: int = Field(1, ge=1, description="episodes per forward; train.episodes_per_step / this many "
                                                     "forwards per step")
    activation_checkpointing: bool = Field(True, description="recompute tower activations in backward: far less "
                                                             "memory, ~1/3 more compute")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA where supported, else "
                                                                           "fp32 (fp16 would need loss scaling)")
    workers: int = Field(8, ge=0, description="DataLoader processes decoding episodes (0: in the training process); "
                                              "lowered to the CPU cores, on the CPU to all but the tower's threads "
                                              "($CLIPSPM_THREADS: the cores to use)")
    val_batch: int = Field(32, ge=1, description="val videos per encoder forward at validation")


class ModelOptions(Section):
    """What every method's `model:` section has; methods subclass it with their own options."""

    kind: str = Field("clipspm", description="the method, see `clipspm methods`")
    num_templates: int = Field(16, ge=1, description="R: class prompt = mean of the first R template embeddings "
                                                     "(Eq. 2, Fig. 5)")


class LossOptions(Section):
    """A method's `loss:` section: how the cross-entropy is reduced, and (in subclasses) the weights of the
    method's auxiliary losses, named like the aux keys its head returns (`clipspm.pipeline.episode`)."""

    ce: Literal["mean", "sum"] = Field("mean", description="cross-entropy over an episode's queries: mean, or sum "
                                                           "(the released CLIP-SPM code family, utils.loss)")
    aux_per_task: bool | list[str] = Field(False, description="each episode adds its auxiliary losses in full "
                                                              "(released 16-task accumulation) instead of a "
                                                              "1/episodes_per_step share: true for all of them, or "
                                                              "the list of those that do")


SECTIONS: dict[str, type[Section]] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                                      "finetune": FinetuneConfig}
