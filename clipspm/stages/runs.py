"""What every training stage shares: the resolved config, the run directory, the cache it reads.

A run directory holds `config.yaml` (the resolved config, including the cache it was trained
from), `metrics.jsonl`, `checkpoints/{last,best}/`, and after evaluation `results.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import load_config, merge_config
from clipspm.errors import CacheError, ClipspmError
from clipspm.stages.episodes import EpisodeIndex

CONFIG_NAME = "config.yaml"


def resolve_config(stage: str, dataset: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Shipped defaults of `stage` (heads, finetune), the dataset's overrides (paper Sec. 4.2:
    100,000 episodes for SSv2), then the user's file, then `--set key=value`."""
    base = load_config("heads")
    if stage == "finetune":
        base = OmegaConf.merge(base, load_config("finetune"))
    chosen = dataset or _dataset_in(config_file, overrides) or base.data.dataset
    per_dataset = load_config("datasets")
    if chosen in per_dataset:
        base = OmegaConf.merge(base, per_dataset[chosen])
    base.data.dataset = chosen
    return merge_config(base, config_file, overrides)


def _dataset_in(config_file, overrides) -> str | None:
    for item in overrides:
        if item.startswith("data.dataset="):
            return item.split("=", 1)[1]
    if config_file is not None and Path(config_file).is_file():
        return OmegaConf.select(OmegaConf.load(config_file), "data.dataset")
    return None


def default_run_dir(cfg: DictConfig, stage: str, runs_root: Path = Path("runs")) -> Path:
    """runs/{dataset}-{backbone}-{K}shot, with `-ft` for the finetune stage."""
    backbone = cfg.data.backbone or _dataset_default(cfg.data.dataset)
    name = f"{cfg.data.dataset}-{backbone}-{cfg.train.shots}shot" + ("-ft" if stage == "finetune" else "")
    return runs_root / name


def _dataset_default(dataset: str) -> str:
    from clipspm.datasets.registry import SPECS

    if dataset not in SPECS:
        raise ClipspmError(f"unknown dataset {dataset!r}; see `clipspm datasets`")
    return SPECS[dataset].default_backbone


def load_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ClipspmError(f"{run_dir} is not a run directory (no {CONFIG_NAME}); runs are made by `clipspm train`")
    return OmegaConf.load(path)


def prepare_run_dir(run_dir: Path, cfg: DictConfig, *, resume: bool) -> None:
    """Create the run directory and write the resolved config; refuse to overwrite a finished run."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).exists() and not resume:
        raise ClipspmError(f"{run_dir} already holds a run; pass --resume to continue it, or --run-dir/--name "
                           f"for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_NAME)


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


def open_run_cache(cfg: DictConfig, run_dir: Path, *, resume: bool, console: Console) -> FeatureCache:
    """The cache the run trains from: the one it recorded (resume), the one named in `data.cache`,
    or the one its data settings address (extracted now if missing). Refused before anything
    trains if it does not fit the run's dataset, backbone, T or width."""
    data = cfg.data
    if data.cache:
        cache = FeatureCache(find_store(Path(data.cache)))
    else:
        from clipspm.stages.extract import ExtractOptions, extract

        options = ExtractOptions(dataset=data.dataset, root=data.root, split_dir=data.split_dir,
                                 backbone=data.backbone, pretrained=data.pretrained, cache_root=Path(data.cache_dir),
                                 seed=data.seed)
        for name in ("num_frames", "train_views"):
            if data[name] is not None:
                setattr(options, name, data[name])
        result = extract(options)
        cache = FeatureCache(result.store)
    check_cache_fits(cache, cfg)
    recorded = cfg.data.get("cache_key")
    if resume and recorded and recorded != cache.meta["settings"]:
        raise CacheError(f"{cache.store_path} is not the cache {run_dir} was trained from; resume with that cache")
    data.cache = str(cache.store_path.parent.resolve())
    data.cache_key = cache.meta["settings"]
    return cache


def check_cache_fits(cache: FeatureCache, cfg: DictConfig) -> None:
    """Refuse a cache made for another dataset, backbone, T or width, naming each difference."""
    meta, data = cache.meta, cfg.data
    problems = []
    if not cache.complete:
        problems.append("its extraction did not finish (rerun the extract command to complete it)")
    if meta["settings"]["dataset"] != data.dataset:
        problems.append(f"it holds dataset {meta['settings']['dataset']!r}, the run asks for {data.dataset!r}")
    if data.backbone and meta["model"] != data.backbone:
        problems.append(f"it holds {meta['model']} features, the run asks for backbone {data.backbone}")
    if data.backbone:
        from clipspm.pipeline.encoder import register_model_configs

        register_model_configs()
        config = open_clip.get_model_config(data.backbone)
        if config is not None and config["embed_dim"] != meta["feature_dim"]:
            problems.append(f"its features are {meta['feature_dim']} wide, {data.backbone} gives "
                            f"{config['embed_dim']}")
    if data.num_frames is not None and meta["num_frames"] != data.num_frames:
        problems.append(f"it samples T={meta['num_frames']} frames, the run asks for T={data.num_frames}")
    if problems:
        raise CacheError(f"cache {cache.store_path.parent} does not fit this run: " + "; ".join(problems)
                         + ". Pass a matching --cache, or leave it out to use (or extract) the right one")


@dataclass
class RunData:
    """One split's usable videos on the training device."""

    features: torch.Tensor     # [n, views, T, C] (float16 storage; episodes are gathered as float32)
    labels: torch.Tensor       # [n] class rows
    class_text: torch.Tensor   # [classes, C] prompt feature per class: mean of the first R templates (Eq. 2)
    video_ids: list[str]
    train_views: int           # views 1..V are augmented train views; 0 means only the test view exists

    def random_views(self, index: EpisodeIndex, generator: torch.Generator) -> torch.Tensor | None:
        """One train view per video per episode [E, N*(K+M)], or None when there are none."""
        if self.train_views == 0:
            return None
        shape = (index.support.shape[0], index.support.shape[1] + index.query.shape[1])
        return torch.randint(1, self.train_views + 1, shape, generator=generator, device=self.features.device)


def load_run_data(cache: FeatureCache, cfg: DictConfig, split: str, device: torch.device, *,
                  test_view: bool = False) -> RunData:
    """Read a split once and move it to `device`; `test_view` keeps only view 0 (val/test)."""
    views = [0] if test_view else slice(None)
    loaded = cache.load_split(split, views)
    if loaded.rows.size == 0:
        raise CacheError(f"cache {cache.store_path.parent} has no usable {split} videos")
    templates = cfg.model.num_templates
    text = cache.text_features
    if not 1 <= templates <= text.shape[1]:
        raise ClipspmError(f"model.num_templates={templates}, but the cache holds {text.shape[1]} templates")
    class_text = torch.from_numpy(text[:, :templates].mean(axis=1)).float().to(device)
    return RunData(torch.from_numpy(loaded.features).to(device), torch.from_numpy(loaded.labels).to(device),
                   class_text, loaded.video_ids, 0 if test_view else loaded.features.shape[1] - 1)
