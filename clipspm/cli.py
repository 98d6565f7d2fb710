"""The `clipspm` command: parse options, call a stage, print what happened.

Exit status: 0 success; 1 the job finished but something in it failed (videos that could not be
decoded, a cache that does not verify); 2 bad input or options (the message says what to fix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from clipspm.errors import ClipspmError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="CLIP-SPM few-shot action recognition: extract CLIP features once, train and evaluate "
                       "the heads from the cache, fine-tune end to end.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
app.add_typer(cache_app, name="cache")
console = Console()
err_console = Console(stderr=True)

DEFAULT_CACHE_DIR = Path(os.environ.get("CLIPSPM_CACHE_DIR", "caches"))

DatasetOpt = Annotated[str, typer.Option(help="Dataset name, see `clipspm datasets`.")]
RootOpt = Annotated[Optional[Path], typer.Option(
    help="Dataset root holding CLASS/VIDEO.ext files or CLASS/VIDEO/ frame folders. For `synthetic`: where to "
         "generate it (default data/synthetic-seed{seed}).")]
SplitDirOpt = Annotated[Optional[Path], typer.Option(
    help="Folder with trainlist*.txt / vallist*.txt / testlist*.txt (CLASS/VIDEO per line) for `custom`.")]
BackboneOpt = Annotated[Optional[str], typer.Option(
    help="open_clip model name (RN50, ViT-B-16, ...). Default: the dataset's (RN50; clipspm-tiny-vit for synthetic).")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    help="Weights: an open_clip tag (openai), a local weight file, or `none` (random, for tests). "
         "Default: the dataset's (openai; none for synthetic).")]
CacheDirOpt = Annotated[Path, typer.Option(help="Where caches live ($CLIPSPM_CACHE_DIR).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the train-view sampling (and of the synthetic data).")]


def main() -> None:
    try:
        app()
    except ClipspmError as error:
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(2)


@app.command()
def datasets() -> None:
    """List the known datasets with their split sizes (videos / classes)."""
    from clipspm.datasets import list_datasets

    table = Table("dataset", "train", "val", "test", "description")
    for info in list_datasets():
        sizes = [f"{info.videos[s]} / {info.classes[s]}" if info.videos else "-" for s in ("train", "val", "test")]
        table.add_row(info.name, *sizes, info.description)
    console.print(table)


@app.command()
def extract(
    dataset: DatasetOpt = "synthetic",
    root: RootOpt = None,
    split_dir: SplitDirOpt = None,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to extract.")] = "train,val,test",
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = None,
    weights: Annotated[Optional[Path], typer.Option(
        help="Fine-tuned visual tower to encode with: a finetune run directory or its visual safetensors.")] = None,
    num_frames: Annotated[Optional[int], typer.Option(help="T: TSN segments (frames) per video.")] = None,
    train_views: Annotated[Optional[int], typer.Option(
        help="V: augmented train views per video besides the centre-crop test view.")] = None,
    seed: SeedOpt = 0,
    format: Annotated[str, typer.Option(help="Store format: zarr or hdf5.")] = "zarr",
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
    batch_frames: Annotated[Optional[int], typer.Option(help="Frames per encoder forward.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Decoding worker processes (0: in the main process).")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu. Default: CUDA when available.")] = None,
    block: Annotated[Optional[int], typer.Option(
        help="Videos per written chunk: after a kill at most this many are encoded again.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Decode 8-frame TSN samples, encode them with a frozen CLIP visual tower, store features + text features.

    The same command twice reuses the cache; after a kill it resumes. Videos that cannot be decoded are recorded
    with the reason and skipped; the exit status is then 1. Under `torchrun --nproc_per_node K -m clipspm extract`
    the videos are shared out across K processes that write one cache.
    """
    from clipspm.stages.extract import ExtractOptions, extract as run_extract

    options = ExtractOptions(dataset=dataset, root=root, split_dir=split_dir, splits=_split_list(splits),
                             backbone=backbone, pretrained=pretrained, weights=_weights_file(weights), seed=seed,
                             format=format, cache_root=cache_dir, device=device, progress=progress)
    for name, value in [("num_frames", num_frames), ("train_views", train_views), ("batch_frames", batch_frames),
                        ("workers", workers), ("precision", precision), ("block", block)]:
        if value is not None:
            setattr(options, name, value)
    result = run_extract(options)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    _print_extract_summary(result)
    if result.failed:
        raise typer.Exit(1)


def _print_extract_summary(result) -> None:
    table = Table(title="extraction", show_header=False)
    table.add_row("cache", str(result.path))
    table.add_row("videos", f"{result.done} done, {result.failed} failed, {result.total} in all")
    if result.reused:
        table.add_row("this run", "reused the finished cache, encoded nothing")
    else:
        table.add_row("this run", f"encoded {result.encoded_now} videos in {result.seconds:.1f} s "
                                  f"({result.videos_per_second:.1f} videos/s)" + (", resumed" if result.resumed else ""))
    console.print(table)
    if result.failures:
        console.print(f"[yellow]{result.failed} videos failed[/] (skipped; see `clipspm cache info {result.path}`):")
        for video, reason in result.failures[:10]:
            console.print(f"  {video}: {reason}")
        if result.failed > 10:
            console.print(f"  ... and {result.failed - 10} more")


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="Cache directory (or the store inside it).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
) -> None:
    """Provenance, shapes, per-split counts and failed videos of a cache."""
    import clipspm.cache
    from clipspm.cache.inspect import describe

    with clipspm.cache.open(path) as cache:
        info = describe(cache)
    if as_json:
        console.print_json(json.dumps(info))
        return
    meta = info["meta"]
    table = Table(title=str(path), show_header=False)
    for key, value in [("format", info["format"]), ("complete", info["complete"]),
                       ("features", f"{info['features']} (videos, views, T, C) float16"),
                       ("text features", f"{info['text_features']} (classes, templates, C)"),
                       ("dataset", f"{meta['settings']['dataset']} (split hash {meta['split_hash'][:12]})"),
                       ("model", f"{meta['model']} / {meta['pretrained']} (sha256 {meta['weight_sha256'][:12]})"),
                       ("open_clip / torch", f"{meta['open_clip_version']} / {meta['torch_version']}"),
                       ("sampling", meta["sampling"]), ("crop", json.dumps(meta["crop"])),
                       ("created", meta["created"]), ("clipspm", meta["clipspm_version"])]:
        table.add_row(key, str(value))
    console.print(table)
    splits = Table("split", "videos", "done", "failed", "pending", "classes")
    for name, counts in info["splits"].items():
        splits.add_row(name, *(str(counts[k]) for k in ("videos", "done", "failed", "pending", "classes")))
    console.print(splits)
    if info["failures"]:
        console.print(f"[yellow]failed videos[/] by reason: {info['failure_reasons']}")
        for video, reason in info["failures"][:20]:
            console.print(f"  {video}: {reason}")


@cache_app.command("verify")
def cache_verify(path: Annotated[Path, typer.Argument(help="Cache directory (or the store inside it).")]) -> None:
    """Read every array of a cache: no unreadable chunk, no NaN, in-range indices, counts that agree. Exit 1 if not."""
    import clipspm.cache
    from clipspm.cache.inspect import verify

    with clipspm.cache.open(path) as cache:
        problems = verify(cache)
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/] {problem}")
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {path} verified")


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _weights_file(path: Path | None) -> Path | None:
    """A finetune run directory names its tuned visual tower; a file is taken as it is."""
    if path is None or path.is_file():
        return path
    from clipspm.stages.checkpoint import tuned_visual_weights

    return tuned_visual_weights(path)
