"""Stage one: decode TSN samples, encode them with the frozen CLIP visual tower, store the features.

    dataset -> videos -> DataLoader workers (decode, sample, crop: uint8) -> encoder (batched
    frames of many videos, autocast on CUDA) -> blocks of videos written to the store

The same command run twice reuses the cache; a killed run resumes at the first unfinished block;
a bad video is recorded with its reason and skipped. Every run on an existing store first checks
it (clipspm/cache/checksum.py): blocks that fail their checksum are encoded again with the pending
ones, damaged class arrays and text features are rewritten, so the same command repairs a cache.
Under torchrun the blocks to encode are shared out across ranks, which all write into the one
store (an HDF5 file being repaired is written by rank 0 alone).

With `person_crop` (MCDP-FSAR's VFAM, clipspm/video/person.py) every sampled frame is first cut
around the one person a detector finds in it; the detector and its weights' hash are part of the
cache's settings (another address), the person boxes are stored beside the features. The detector
runs where the frames are decoded: in the DataLoader workers on the CPU, or, on a GPU, in the main
process on the GPU (decoding then happens there too).

`normalize`, `sampling` and `class_names` choose between our preparation of frames and class names
and the released CLIP-SPM code's (extract.yaml), which its checkpoints were trained with.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import open_clip
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

import clipspm
from clipspm.cache.address import cache_path
from clipspm.cache.checksum import Damage, count_of
from clipspm.cache.store import (
    DONE,
    FAILED,
    STAGING_NAME,
    STORE_NAMES,
    CacheShape,
    FeatureCache,
    StoreWriter,
    convert_to_hdf5,
    create_store,
)
from clipspm.config import load_config, prompt_templates
from clipspm.datasets import Dataset, load_dataset
from clipspm.datasets.class_names import CLASS_NAMES, with_class_names
from clipspm.errors import CacheError, ClipspmError
from clipspm.pipeline.encoder import (
    NORMALIZATIONS,
    ClipModel,
    check_model_name,
    file_sha256,
    load_clip,
    resolve_precision,
    state_dict_sha256,
)
from clipspm.stages import distributed
from clipspm.system import keeps_caller_threads, make_console, use_threads
from clipspm.video.person import PersonCropper, PersonCropSettings, build_detector
from clipspm.video.sampling import SAMPLINGS
from clipspm.video.views import VideoItem, VideoViewsDataset, ViewSettings, collate_items

DEFAULTS = load_config("extract")
SPLITS = ("train", "val", "test")
PREPARATION = ("normalize", "sampling", "class_names")     # settings with ours as default and the released code's
SAMPLING_TEXT = {
    "tsn": "TSN: T equal segments; view 0 = middle frame of each segment, views 1..V = one uniformly random frame "
           "per segment",
    "released": "released CLIP-SPM (video_reader.py get_seq): int(linspace(start, end, T)); view 0 spans frames "
                "1..n-2, views 1..V move start and end inwards by a random 0..min(5, (n-T)/2)",
}


@dataclass
class ExtractOptions:
    """What to extract and how. `backbone`/`pretrained` None take the dataset's defaults."""

    dataset: str = "synthetic"
    root: Path | None = None
    split_dir: Path | None = None
    splits: tuple[str, ...] = SPLITS
    backbone: str | None = None
    pretrained: str | None = None
    weights: Path | None = None          # fine-tuned visual-tower weights (safetensors) loaded on top
    num_frames: int = DEFAULTS.num_frames
    train_views: int = DEFAULTS.train_views
    normalize: str = DEFAULTS.normalize       # clip | none: pixels in [0, 1], as the released CLIP-SPM loader
    sampling: str = DEFAULTS.sampling         # tsn | released: the released loader's frames
    class_names: str = DEFAULTS.class_names   # benchmark | released: the released configs' class names
    seed: int = DEFAULTS.seed
    format: str = DEFAULTS.format
    cache_root: Path = Path("caches")
    batch_frames: int = DEFAULTS.run.batch_frames
    workers: int = DEFAULTS.run.workers
    precision: str = DEFAULTS.run.precision
    device: str | None = None
    block: int = DEFAULTS.run.block
    progress: bool = True
    # An existing store's written blocks are read and checked against their checksums (False: only
    # their chunk files are looked for, when the caller checks what it reads, as training does).
    check_blocks: bool = True
    person_crop: str | None = None          # a detector (clipspm.video.person.DETECTORS): cut frames around a person
    detector_weights: Path | None = None    # its weights, a local file
    person_score: float = DEFAULTS.person_crop.score
    person_tries: int = DEFAULTS.person_crop.tries
    person_detector: nn.Module | None = None  # a detection module of the caller's, used instead of building
                                              # `person_crop` (which then only names it)


@dataclass
class ExtractResult:
    path: Path                 # the cache directory
    store: Path                # the Zarr store or HDF5 file inside it
    reused: bool               # an identical finished cache existed and checked sound: nothing was encoded
    resumed: bool              # an unfinished run of the same settings was continued
    total: int
    done: int
    failed: int
    encoded_now: int           # videos encoded by this call: pending and repaired
    seconds: float             # the whole call: model and prompts, store, videos
    encode_seconds: float      # of which decoding, encoding and writing the videos (what grows with the dataset)
    failures: list[tuple[str, str]] = field(default_factory=list)   # (video id, reason)
    repaired: list[Damage] = field(default_factory=list)   # damaged blocks and arrays of a finished cache, redone
    checksums_recorded: int = 0    # blocks of a cache made before checksums, whose checksums were recorded now

    @property
    def repaired_blocks(self) -> int:
        return sum(item.block is not None for item in self.repaired)

    @property
    def repaired_videos(self) -> int:
        return sum(len(item.rows) for item in self.repaired if item.block is not None)

    @property
    def videos_per_second(self) -> float:
        return self.encoded_now / self.seconds if self.seconds > 0 else 0.0


@keeps_caller_threads
def extract(options: ExtractOptions) -> ExtractResult:
    """Make (or reuse, or resume) the feature cache that `options` describe."""
    if options.format not in STORE_NAMES:
        raise ClipspmError(f"unknown cache format {options.format!r}: use zarr or hdf5")
    if options.num_frames < 1 or options.train_views < 0:
        raise ClipspmError("--num-frames must be at least 1 and --train-views at least 0")
    for option, value, choices in (("--sampling", options.sampling, SAMPLINGS),
                                   ("--normalize", options.normalize, NORMALIZATIONS),
                                   ("--class-names", options.class_names, CLASS_NAMES)):
        if value not in choices:   # before anything is generated or loaded
            raise ClipspmError(f"{option} {value}: use one of {', '.join(choices)}")
    dist = distributed.setup(options.device)
    console = make_console(quiet=not dist.is_main)
    started = time.perf_counter()
    threads = use_threads(dist.device, options.workers)   # decoding workers and the encoder share the cores
    if threads.workers < options.workers:
        if options.workers != DEFAULTS.run.workers:
            console.print(f"--workers {options.workers} lowered to {threads.workers}: {threads.describe()}")
        options = replace(options, workers=threads.workers)
    console.print(f"extract on {dist.device}: {threads.describe()}")

    person, person_settings = person_cropper(options, dist.device)
    if person is not None and person.device.type == "cuda" and options.workers:
        console.print("person crops on the GPU: frames are decoded in the main process, where the detector runs")
        options = replace(options, workers=0)
    if options.backbone:
        check_model_name(options.backbone)   # before the synthetic dataset is generated
    dataset = _load_dataset_once(options, dist)
    clip = load_clip(options.backbone or dataset.default_backbone, options.pretrained or dataset.default_pretrained,
                     dist.device, seed=options.seed, weights=options.weights, normalize=options.normalize)
    views = view_settings(options, dataset, clip)
    settings = content_settings(options, dataset, clip, views, person_settings)
    path = cache_path(options.cache_root, settings)
    final = path / STORE_NAMES[options.format]

    working = final if options.format == "zarr" or final.exists() else path / STAGING_NAME
    fresh = not working.exists()
    if dist.is_main and fresh:
        _create(working, dataset, clip, views, settings, options, person_settings)
    dist.barrier()
    solo = working.suffix == ".h5"    # one process writes an HDF5 file
    writer = StoreWriter(working) if dist.is_main or not solo else None
    if writer is not None:
        _check_same_settings(writer.meta, settings, working)
        options = replace(options, block=writer.block_size)   # the store's blocks, whatever --block says now
    if dist.is_main and "extract_args" not in writer.meta:   # a store made before it was recorded
        writer.update_meta(extract_args=extract_args(options, dataset))
    plan = _share(_plan(writer, options.check_blocks) if dist.is_main else None, dist)   # the same plan on every rank
    blocks = sorted({*plan.pending, *(item.block for item in plan.damaged if item.block is not None)})
    if dist.is_main:
        _report_plan(plan, path, writer.num_blocks, fresh, options.check_blocks, console)
        damaged_arrays = {item.array for item in plan.damaged if item.block is None}
        if damaged_arrays - {"text_features"}:
            writer.write_classes(**{name: values for name, values in _class_arrays(dataset).items()
                                    if name in damaged_arrays})
        if not writer.meta["text_done"] or "text_features" in damaged_arrays:
            writer.write_text(text_features(clip, dataset))
    if plan.finished and not plan.damaged:
        if writer is not None:
            writer.close()
        with FeatureCache(final) as cache:
            return _result(path, final, cache.status, cache.video_ids, cache.errors, reused=True, resumed=False,
                           encoded_now=0, seconds=time.perf_counter() - started, encode_seconds=0.0,
                           checksums_recorded=plan.recorded)
    mine = (blocks if dist.is_main else []) if solo else blocks[dist.rank::dist.world_size]
    encode_started = time.perf_counter()
    encoded = _encode_blocks(writer, mine, dataset, clip, views, options, console, dist, person)
    encode_seconds = time.perf_counter() - encode_started

    dist.barrier()
    if dist.is_main:
        status = writer.status
        summary = {"done": int((status == DONE).sum()), "failed": int((status == FAILED).sum()),
                   "total": int(status.size)}
        when = {"repaired" if plan.finished else "completed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        writer.update_meta(complete=True, summary=summary, **when)
    if writer is not None:
        writer.close()
    if dist.is_main and working != final:
        convert_to_hdf5(working, final)
    dist.barrier()
    with FeatureCache(final) as cache:
        return _result(path, final, cache.status, cache.video_ids, cache.errors, reused=False,
                       resumed=not fresh and not plan.finished, encoded_now=encoded,
                       seconds=time.perf_counter() - started, encode_seconds=encode_seconds,
                       repaired=plan.damaged if plan.finished else [], checksums_recorded=plan.recorded)


@dataclass
class _Plan:
    """What an extraction run has to do to a store, decided by rank 0 before anything is encoded."""

    finished: bool              # the store was complete when this run began
    pending: list[int]          # blocks never written
    damaged: list[Damage]       # blocks to encode again, arrays to rewrite: they fail their check
    recorded: int               # blocks of a store made before checksums whose checksums were recorded now


def _plan(writer: StoreWriter, check_blocks: bool) -> _Plan:
    """Check every written block of the store (a fresh store has none: nothing is read). A store made
    before checksums gets them now for its blocks that show no damage."""
    pending = [] if writer.complete else writer.pending_blocks()
    written = sorted(set(range(writer.num_blocks)) - set(pending))
    damaged = writer.check(written, read_blocks=check_blocks)
    recorded = 0
    if not writer.has_checksums and check_blocks:
        broken = {item.block for item in damaged}
        recorded = writer.record_checksums(block for block in written if block not in broken)
    return _Plan(writer.complete, pending, damaged, recorded)


def _share(plan: _Plan | None, dist: distributed.Distributed) -> _Plan:
    if dist.enabled:
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0)
        plan = box[0]
    return plan


def _report_plan(plan: _Plan, path: Path, num_blocks: int, fresh: bool, checked: bool, console: Console) -> None:
    if plan.recorded:
        console.print(f"recorded the checksums of {plan.recorded} blocks of {path} (made before checksums were kept)")
    if plan.damaged:
        blocks = [item for item in plan.damaged if item.block is not None]
        console.print(f"[yellow]repairing[/] {path}: {count_of(len(blocks), 'damaged block')} "
                      f"({count_of(sum(len(item.rows) for item in blocks), 'video')}) to encode again"
                      + "".join(f", {item.array} to rewrite" for item in plan.damaged if item.block is None))
        for item in plan.damaged[:10]:
            console.print(f"  {item.where} {item.reason}", markup=False)
    if plan.finished and not plan.damaged:
        console.print(f"[green]reusing cache[/] {path} (same settings{', every block checked' if checked else ''}; "
                      f"nothing to extract)")
    elif not fresh and not plan.finished:
        console.print(f"resuming {path}: {len(plan.pending)} of {num_blocks} blocks left")


def view_settings(options: ExtractOptions, dataset: Dataset, clip: ClipModel) -> ViewSettings:
    """How the views of every video are cut: T, V, the encoder's crop and the resize before it."""
    return ViewSettings(num_segments=options.num_frames, train_views=options.train_views,
                        shorter_side=round(clip.image_size * DEFAULTS.resize_ratio), crop=clip.image_size,
                        hflip=dataset.hflip, sampling=options.sampling)


def person_cropper(options: ExtractOptions, device: torch.device) -> tuple[PersonCropper | None, dict | None]:
    """The person cropper `options` ask for (None without --person-crop) and its settings for the cache:
    the detector, its weights' hash, the rule and the geometry. On the device where it will run: the
    extraction device when frames are decoded in this process (no workers, or a GPU), else the CPU."""
    if options.person_crop is None:
        if options.person_detector is not None or options.detector_weights is not None:
            raise ClipspmError("--detector-weights is for --person-crop DETECTOR; pass both or neither")
        return None, None
    if options.person_detector is not None:
        detector = options.person_detector
        digest = file_sha256(Path(options.detector_weights)) if options.detector_weights else state_dict_sha256(detector)
    else:
        if options.detector_weights is None:
            raise ClipspmError(f"--person-crop {options.person_crop} needs --detector-weights PATH: the detector's "
                               f"weights as a local file (nothing is downloaded)")
        detector = build_detector(options.person_crop, Path(options.detector_weights))
        digest = file_sha256(Path(options.detector_weights))
    geometry = DEFAULTS.person_crop
    settings = PersonCropSettings(score=options.person_score, tries=options.person_tries, height=geometry.height,
                                  width=geometry.width, extend_right=geometry.extend_right,
                                  extend_down=geometry.extend_down, label=geometry.label)
    if not 0 <= settings.score <= 1 or settings.tries < 1:
        raise ClipspmError("--person-score must lie in [0, 1] and --person-tries be at least 1")
    here = device.type == "cuda" or options.workers == 0
    recorded = {"detector": options.person_crop, "detector_sha256": digest, **vars(settings)}
    return PersonCropper(detector, settings, device if here else "cpu"), recorded


def video_loader(dataset: Dataset, rows: list[int], views: ViewSettings, options: ExtractOptions,
                 person: PersonCropper | None = None) -> DataLoader:
    """Workers that decode, sample and crop the videos `rows`: lists of VideoItem, `batch_frames` frames each."""
    videos = [(row, dataset.videos[row].key, dataset.videos[row].path, dataset.videos[row].problem) for row in rows]
    videos_per_batch = max(1, options.batch_frames // (views.views * views.num_segments))
    return DataLoader(VideoViewsDataset(videos, views, options.seed, person), batch_size=videos_per_batch,
                      num_workers=options.workers, collate_fn=collate_items,
                      prefetch_factor=4 if options.workers > 0 else None)


def content_settings(options: ExtractOptions, dataset: Dataset, clip: ClipModel, views: ViewSettings,
                     person: dict | None = None) -> dict:
    """Everything that decides what the cache holds: the cache's address is their hash. Person crops add
    their settings (a cache without them keeps the address it always had)."""
    return {
        "dataset": dataset.name,
        "split_hash": dataset.split_hash,
        "splits": [split for split in SPLITS if split in options.splits],
        "model": clip.name,
        "model_config_sha256": clip.config_sha256,
        "pretrained": clip.pretrained if clip.pretrained_kind == "tag" else clip.pretrained_kind,
        "pretrained_kind": clip.pretrained_kind,
        "weight_sha256": clip.weight_sha256,
        "tuned_weights_sha256": clip.weight_sha256 if options.weights else None,
        "num_frames": views.num_segments,
        "train_views": views.train_views,
        "crop": views.crop,
        "resize_shorter_side": views.shorter_side,
        "hflip": views.hflip,
        "seed": options.seed,
        "templates": list(prompt_templates()),
        **({"person_crop": person} if person is not None else {}),
        **preparation(options),
    }


def preparation(options: ExtractOptions) -> dict:
    """The settings of normalize, sampling and class_names that differ from extract.yaml's: only those enter
    the settings, so that a cache made before these settings existed keeps its address."""
    chosen = {name: getattr(options, name) for name in PREPARATION}
    return {name: value for name, value in chosen.items() if value != DEFAULTS[name]}


def text_features(clip: ClipModel, dataset: Dataset) -> np.ndarray:
    """[classes, R, C]: every template of Appendix A filled with every class text (Eq. 2)."""
    templates = prompt_templates()
    texts = [template.format(entry.text) for entry in dataset.classes for template in templates]
    return clip.encode_texts(texts).reshape(len(dataset.classes), len(templates), -1).cpu().numpy()


def _load_dataset_once(options: ExtractOptions, dist: distributed.Distributed) -> Dataset:
    """Rank 0 first: loading the synthetic dataset may generate it, which must happen once."""
    kwargs = dict(split_dir=options.split_dir, splits=options.splits, seed=options.seed)
    dataset = load_dataset(options.dataset, options.root, **kwargs) if dist.is_main else None
    dist.barrier()
    dataset = dataset if dataset is not None else load_dataset(options.dataset, options.root, **kwargs)
    return with_class_names(dataset, options.class_names)


def _create(working: Path, dataset: Dataset, clip: ClipModel, views: ViewSettings, settings: dict,
            options: ExtractOptions, person: dict | None) -> None:
    """Build the empty store under a temporary name, so that a kill here leaves nothing half-made."""
    shape = CacheShape(num_videos=len(dataset.videos), views=views.views, num_frames=views.num_segments,
                       feature_dim=clip.feature_dim, num_classes=len(dataset.classes),
                       num_templates=len(prompt_templates()), block=options.block)
    meta = {
        "clipspm_version": clipspm.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "dataset_root": str(dataset.root),
        "model": clip.name,
        "pretrained": clip.pretrained,
        "weight_sha256": clip.weight_sha256,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "num_frames": views.num_segments,
        "train_views": views.train_views,
        "feature_dim": clip.feature_dim,
        "features": "projected image embedding (encode_image), not L2-normalised, float16",
        "sampling": SAMPLING_TEXT[views.sampling],
        "crop": {"size": views.crop, "resize_shorter_side": views.shorter_side, "test_view": "center",
                 "train_views": "random crop" + (" + random horizontal flip" if views.hflip else ", no flip")},
        "normalize": {"kind": options.normalize, "mean": list(clip.mean), "std": list(clip.std)},
        "class_names": options.class_names,
        "templates": list(prompt_templates()),
        "split_hash": dataset.split_hash,
        "seed": options.seed,
        "precision": resolve_precision(options.precision, clip.device),
        "format": options.format,
        "extract_args": extract_args(options, dataset),
    }
    if person is not None:
        meta["person_crop"] = {**person, "detector_weights": str(Path(options.detector_weights).resolve())
                               if options.detector_weights else None,
                               "rule": "each sampled frame replaced by the nearest frame of its segment showing "
                                       "exactly one person, cut around that person (clipspm/video/person.py)"}
    staging = working.with_name(working.name + ".creating")
    if staging.exists():
        shutil.rmtree(staging)
    create_store(staging, shape, **_class_arrays(dataset), meta=meta, person_boxes=person is not None)
    working.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(working)


def _class_arrays(dataset: Dataset) -> dict:
    """The arrays a store is created with (and rewritten from, when damaged)."""
    index = dataset.class_index()
    return {"video_ids": [video.key for video in dataset.videos],
            "labels": np.asarray([index[video.class_key] for video in dataset.videos], dtype="int32"),
            "split": [video.split for video in dataset.videos],
            "class_keys": [entry.key for entry in dataset.classes],
            "class_texts": [entry.text for entry in dataset.classes],
            "class_splits": [entry.split for entry in dataset.classes]}


def extract_args(options: ExtractOptions, dataset: Dataset) -> list[str]:
    """The `clipspm extract` options that address this cache (paths made absolute): the command a
    damaged cache names to repair it, with `--cache-dir` where the cache is found."""
    args = ["--dataset", options.dataset, "--root", str(Path(dataset.root).resolve())]
    if options.split_dir is not None:
        args += ["--split-dir", str(Path(options.split_dir).resolve())]
    splits = [split for split in SPLITS if split in options.splits]
    if splits != list(SPLITS):
        args += ["--splits", ",".join(splits)]
    if options.backbone is not None:
        args += ["--backbone", options.backbone]
    if options.pretrained is not None:
        local = Path(options.pretrained)
        args += ["--pretrained", str(local.resolve()) if local.is_file() else options.pretrained]
    if options.weights is not None:
        args += ["--weights", str(Path(options.weights).resolve())]
    args += ["--num-frames", str(options.num_frames), "--train-views", str(options.train_views),
             "--seed", str(options.seed)]
    if options.format != "zarr":
        args += ["--format", options.format]
    if options.person_crop is not None:
        args += ["--person-crop", options.person_crop, "--person-score", str(options.person_score),
                 "--person-tries", str(options.person_tries)]
        if options.detector_weights is not None:
            args += ["--detector-weights", str(Path(options.detector_weights).resolve())]
    for name, value in preparation(options).items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def _check_same_settings(meta: dict, settings: dict, where: Path) -> None:
    if meta.get("settings") != settings:
        raise CacheError(f"{where} was made with other settings than this command asks for; it is not reused. "
                         f"Delete it or pass another --cache-dir")


class _BlockBuffer:
    """Results of one block's videos, collected until the block is complete and written whole."""

    def __init__(self, rows: slice, views: int, num_frames: int, feature_dim: int, person: bool = False):
        n = rows.stop - rows.start
        self.person_boxes = np.full((n, views, num_frames, 4), np.nan, "float32") if person else None
        self.rows = rows
        self.missing = n
        self.features = np.zeros((n, views, num_frames, feature_dim), "float16")
        self.frame_indices = np.full((n, views, num_frames), -1, "int32")
        self.crop_offsets = np.full((n, views, 2), -1, "int16")
        self.flipped = np.zeros((n, views), bool)
        self.num_source_frames = np.zeros(n, "int32")
        self.status = np.full(n, FAILED, "int8")
        self.error = [""] * n

    def add(self, item: VideoItem, features: np.ndarray | None) -> None:
        i = item.row - self.rows.start
        self.missing -= 1
        if item.views is None:
            self.error[i] = item.error or "unknown error"
            return
        self.features[i] = features
        self.frame_indices[i] = item.views.frame_indices
        self.crop_offsets[i] = item.views.crop_offsets
        self.flipped[i] = item.views.flipped
        self.num_source_frames[i] = item.views.num_frames
        if self.person_boxes is not None:
            self.person_boxes[i] = item.views.person_boxes
        self.status[i] = DONE

    def write(self, writer: StoreWriter) -> None:
        writer.write_block(self.rows, features=self.features, frame_indices=self.frame_indices,
                           crop_offsets=self.crop_offsets, flipped=self.flipped,
                           num_source_frames=self.num_source_frames, status=self.status, error=self.error,
                           person_boxes=self.person_boxes)


@torch.inference_mode()
def _encode_blocks(writer: StoreWriter, blocks: list[int], dataset: Dataset, clip: ClipModel, views: ViewSettings,
                   options: ExtractOptions, console: Console, dist: distributed.Distributed,
                   person: PersonCropper | None = None) -> int:
    """Decode in workers, encode batches of frames, write each block once all its videos are in."""
    shape = CacheShape(len(dataset.videos), views.views, views.num_segments, clip.feature_dim, 0, 0, options.block)
    rows = [row for block in blocks for row in range(*shape.block_rows(block).indices(shape.num_videos))]
    if not rows:
        return 0
    loader = video_loader(dataset, rows, views, options, person)
    precision = resolve_precision(options.precision, clip.device)
    # On the CPU every forward reuses one input tensor (see ClipModel.normalize); CUDA's allocator reuses its own.
    inputs = torch.empty(options.batch_frames, 3, views.crop, views.crop) if clip.device.type == "cpu" else None
    buffers: dict[int, _BlockBuffer] = {}
    failed = 0
    columns = [TextColumn("[bold]extract[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("videos"),
               TextColumn("{task.fields[rate]:.1f}/s"), TextColumn("failed {task.fields[failed]}"),
               TimeRemainingColumn()]
    started = time.perf_counter()
    with Progress(*columns, console=console, disable=not options.progress) as progress:
        task = progress.add_task("extract", total=len(rows), rate=0.0, failed=0)
        for batch in loader:
            good = [item for item in batch if item.views is not None]
            features = iter(_encode(clip, good, precision, options.batch_frames, inputs) if good else [])
            for item in batch:
                block = item.row // options.block
                if block not in buffers:
                    buffers[block] = _BlockBuffer(shape.block_rows(block), views.views, views.num_segments,
                                                  clip.feature_dim, person is not None)
                buffers[block].add(item, next(features) if item.views is not None else None)
                failed += item.views is None
                if buffers[block].missing == 0:
                    buffers.pop(block).write(writer)
            progress.update(task, advance=len(batch), failed=failed,
                            rate=progress.tasks[0].completed / max(time.perf_counter() - started, 1e-9))
    return len(rows)


def _encode(clip: ClipModel, items: list[VideoItem], precision: str, batch_frames: int,
            inputs: torch.Tensor | None) -> np.ndarray:
    """[videos, views, T, C] float16 features of the items' crops, `batch_frames` frames per forward
    (normalised into `inputs` [batch_frames, 3, S, S] when given)."""
    frames = torch.cat([item.views.frames.flatten(0, 1) for item in items])     # [(n views T), 3, S, S]
    if clip.device.type == "cuda":
        frames = frames.pin_memory()
    out = torch.cat([clip.encode_frames(chunk, precision, None if inputs is None else inputs[:len(chunk)])
                     for chunk in frames.split(batch_frames)])
    per_video = items[0].views.frames.shape[:2]
    return out.reshape(len(items), *per_video, -1).to(torch.float16).cpu().numpy()


def _result(path: Path, store: Path, status: np.ndarray, video_ids: np.ndarray, errors: np.ndarray, *,
            reused: bool, resumed: bool, encoded_now: int, seconds: float, encode_seconds: float,
            repaired: list[Damage] | None = None, checksums_recorded: int = 0) -> ExtractResult:
    failed_rows = np.flatnonzero(status == FAILED)
    return ExtractResult(path=path, store=store, reused=reused, resumed=resumed, total=int(status.size),
                         done=int((status == DONE).sum()), failed=int(failed_rows.size), encoded_now=encoded_now,
                         seconds=seconds, encode_seconds=encode_seconds,
                         failures=[(str(video_ids[i]), str(errors[i])) for i in failed_rows],
                         repaired=repaired or [], checksums_recorded=checksums_recorded)
