"""The `clipspm` command: parse options, call a stage, print what happened.

Exit status: 0 success; 1 the job finished but something in it failed (videos that could not be
decoded, a cache that does not verify, runs of a suite); 2 bad input or options (the message says what to
fix); 130 interrupted. A user's mistake is reported in one message, never as a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from clipspm.errors import ClipspmError
from clipspm.system import make_console

if TYPE_CHECKING:
    from clipspm.experiments.report import ReportResult

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="CLIP-based few-shot action recognition (CLIP-SPM and the methods of its comparison "
                       "tables): extract CLIP features once, train and evaluate any method's heads from the cache, "
                       "fine-tune end to end.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
app.add_typer(cache_app, name="cache")
console = make_console(stderr=False)
err_console = make_console()

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
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)   # commands in it stay whole
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


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
    normalize: Annotated[Optional[str], typer.Option(
        help="clip (default): the weights' mean/std; none: pixels in [0, 1], as the released CLIP-SPM code feeds "
             "its checkpoints.")] = None,
    sampling: Annotated[Optional[str], typer.Option(
        help="tsn (default): the middle / a random frame of T segments; released: the released CLIP-SPM loader's "
             "int(linspace) frames.")] = None,
    class_names: Annotated[Optional[str], typer.Option(
        help="benchmark (default): each dataset's rule; released: the released CLIP-SPM configs' names "
             "(hmdb51, ucf101, kinetics100, ssv2_small, ssv2_full).")] = None,
    seed: SeedOpt = 0,
    format: Annotated[str, typer.Option(help="Store format: zarr or hdf5.")] = "zarr",
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
    batch_frames: Annotated[Optional[int], typer.Option(help="Frames per encoder forward.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Decoding worker processes (0: in the main process); at most the CPU cores, on the CPU all but the "
             "encoder's ($CLIPSPM_THREADS: the cores to use).")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu. Default: CUDA when available.")] = None,
    block: Annotated[Optional[int], typer.Option(
        help="Videos per written chunk: after a kill at most this many are encoded again.")] = None,
    person_crop: Annotated[Optional[str], typer.Option(
        help="Cut every sampled frame around the one person a torchvision detector finds in it (MCDP-FSAR's VFAM): "
             "fasterrcnn_resnet50_fpn[_v2], fasterrcnn_mobilenet_v3_large[_320]_fpn, retinanet_resnet50_fpn[_v2] or "
             "fcos_resnet50_fpn. Frames without exactly one person are replaced by the nearest one of their "
             "segment that has one. A separate cache.")] = None,
    detector_weights: Annotated[Optional[Path], typer.Option(
        help="The detector's weights, a local state-dict file (.pth or .safetensors); nothing is downloaded.")] = None,
    person_score: Annotated[Optional[float], typer.Option(
        help="Detection score from which a person counts (default 0.25, the released detector call's).")] = None,
    person_tries: Annotated[Optional[int], typer.Option(
        help="Frames of a segment tried, the sampled one then the nearest, before the video fails (default 8).")]
    = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Decode 8-frame TSN samples, encode them with a frozen CLIP visual tower, store features + text features.

    The same command twice reuses the cache; after a kill it resumes. Videos that cannot be decoded are recorded
    with the reason and skipped; the exit status is then 1. Under `torchrun --nproc_per_node K -m clipspm extract`
    the videos are shared out across K processes that write one cache.
    """
    from clipspm.stages.extract import ExtractOptions
    from clipspm.stages.extract import extract as run_extract

    options = ExtractOptions(dataset=dataset, root=root, split_dir=split_dir, splits=_split_list(splits),
                             backbone=backbone, pretrained=pretrained, weights=_weights_file(weights), seed=seed,
                             format=format, cache_root=cache_dir, device=device, progress=progress,
                             person_crop=person_crop, detector_weights=detector_weights)
    for name, value in [("num_frames", num_frames), ("train_views", train_views), ("batch_frames", batch_frames),
                        ("workers", workers), ("precision", precision), ("block", block),
                        ("person_score", person_score), ("person_tries", person_tries), ("normalize", normalize),
                        ("sampling", sampling), ("class_names", class_names)]:
        if value is not None:
            setattr(options, name, value)
    result = run_extract(options)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    _print_extract_summary(result)
    if result.failed:
        raise typer.Exit(1)


def _print_extract_summary(result) -> None:
    from clipspm.cache.checksum import count_of

    table = Table(title="extraction", show_header=False)
    table.add_row("cache", str(result.path))
    table.add_row("videos", f"{result.done} done, {result.failed} failed, {result.total} in all")
    recorded = f"; recorded the checksums of {result.checksums_recorded} blocks" if result.checksums_recorded else ""
    if result.reused:
        table.add_row("this run", "reused the finished cache (checked sound), encoded nothing" + recorded)
    else:
        repaired = ""
        if result.repaired:
            arrays = [item.array for item in result.repaired if item.block is None]
            repaired = (f"repaired {count_of(result.repaired_blocks, 'block')} "
                        f"({count_of(result.repaired_videos, 'video')})"
                        + (f" and rewrote {', '.join(arrays)}" if arrays else "") + ": ")
        table.add_row("this run", repaired + f"encoded {result.encoded_now} videos in {result.seconds:.1f} s "
                                  f"({result.videos_per_second:.1f} videos/s)" + (", resumed" if result.resumed else "")
                                  + recorded)
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
    if "person_crop" in meta["settings"]:
        person = meta["settings"]["person_crop"]
        table.add_row("person crops", f"{person['detector']} (sha256 {person['detector_sha256'][:12]}), score >= "
                                      f"{person['score']}, {person['tries']} tries per segment, "
                                      f"{person['width']}x{person['height']}")
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
    """Read every array of a cache: every block matches its checksum, no NaN, in-range indices, counts that agree.
    Exit 1 if not, naming the damaged blocks and the extract command that repairs them."""
    import clipspm.cache
    from clipspm.cache.inspect import verify

    with clipspm.cache.open(path) as cache:
        problems = verify(cache)
        repair, checksummed = cache.repair_command(), cache.has_checksums
    if not checksummed:
        console.print(f"[yellow]note:[/] {escape(str(path))} was made before checksums were kept: its blocks were "
                      f"checked only for lost or undecodable chunks; to record checksums run: {escape(repair)}",
                      soft_wrap=True)
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/] {escape(problem)}", soft_wrap=True)
        console.print(f"Damaged blocks are encoded again (and an unfinished extraction resumed) by: {escape(repair)}",
                      soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {path} verified")


class Stage(str, Enum):
    heads = "heads"
    finetune = "finetune"


class SelectOn(str, Enum):
    val = "val"
    test = "test"


SelectOnOpt = Annotated[Optional[SelectOn], typer.Option(
    help="Split whose fixed episodes pick the best checkpoint (train.select_on). Default val. `test` reproduces the "
         "released code's protocol: validating on the stored test episodes `eval` scores, which makes the test "
         "number optimistic; results are marked, and `clipspm compare` with a val-selected run shows by how much.")]


@app.command()
def train(
    stage: Annotated[Stage, typer.Option(help="heads: from the feature cache; finetune: end to end with the "
                                              "visual tower unfrozen.")] = Stage.heads,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (config data.dataset).")] = None,
    root: RootOpt = None,
    split_dir: SplitDirOpt = None,
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = None,
    shots: Annotated[Optional[int], typer.Option(help="K shots per class (train.shots).")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="Training episodes (train.episodes).")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        help="Train from this cache directory. Default: the cache the data settings address, extracted if missing. "
             "A cache of another dataset, backbone, T or width is refused.")] = None,
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
    init: Annotated[Optional[Path], typer.Option(
        help="finetune: start from this run: a heads run's heads (same width), or a finetune or imported run's heads "
             "and tower (its backbone, T and frame preparation are taken over).")] = None,
    select_on: SelectOnOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file merged over the shipped defaults.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key, e.g. --set model.padm=false --set loss.lambda_h=0 (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        help="Run directory. Default: runs/{dataset}-{backbone}-{K}shot[-ft][-NAME].")] = None,
    name: Annotated[Optional[str], typer.Option(help="Suffix of the default run directory name.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its last checkpoint, with its saved "
                                              "config. A run directory without a checkpoint (a start that died "
                                              "early) is started again by the same command, with or without "
                                              "--resume.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu. Default: CUDA when available.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a method's heads from the feature cache (model.kind, default CLIP-SPM), or fine-tune end to end
    (--stage finetune).

    Config layers: the schema's defaults (`clipspm config`), clipspm/configs/stages.yaml, datasets.yaml for
    the dataset, configs/methods/KIND.yaml (profiles, per-dataset values), then --config, then --set. The run
    directory receives the resolved config, metrics.jsonl, TensorBoard events, checkpoints (safetensors +
    JSON) and, after `clipspm eval`, results.json.
    """
    from clipspm.config import resolve_config
    from clipspm.stages.runs import default_run_dir, has_checkpoint, load_run_config

    overrides = list(set_ or [])
    for key, value in [("data.dataset", dataset), ("data.backbone", backbone), ("data.pretrained", pretrained),
                       ("train.shots", shots), ("train.episodes", episodes),
                       ("train.select_on", select_on.value if select_on else None)]:
        if value is not None:
            overrides.append(f"{key}={value}")
    for key, value in [("data.root", root), ("data.split_dir", split_dir), ("data.cache", cache)]:
        if value is not None:
            overrides.append(f"{key}={value.resolve()}")
    overrides.append(f"data.cache_dir={cache_dir}")
    cfg = resolve_config(stage.value, dataset, config, overrides)
    if run_dir is None:
        run_dir = default_run_dir(cfg, stage.value)
        if name:
            run_dir = run_dir.with_name(f"{run_dir.name}-{name}")
    if resume and has_checkpoint(run_dir):
        cfg = load_run_config(run_dir)
    if stage is Stage.heads:
        from clipspm.stages.heads import train_heads

        result = train_heads(cfg, run_dir, resume=resume, progress=progress, device=device)
    else:
        from clipspm.stages.finetune import train_finetune

        result = train_finetune(cfg, run_dir, resume=resume, init=init, progress=progress, device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=f"{stage.value} run", show_header=False)
    table.add_row("run", str(result.run_dir))
    table.add_row("episodes", str(result.episodes))
    split = cfg.train.select_on
    table.add_row(f"best {split} accuracy", f"{result.best_val:.2%} (episode {result.best_episode})"
                  + (": chosen on the test episodes `eval` scores (optimistic)" if split == "test" else ""))
    table.add_row("time", f"{result.seconds:.0f} s")
    console.print(table)
    console.print(f"next: clipspm eval {result.run_dir}")


@app.command()
def methods() -> None:
    """Every registered few-shot method: its paper, its authors' code, what it needs, its parity status."""
    from clipspm.pipeline.methods import STAGE_INPUTS
    from clipspm.pipeline.methods import methods as registered

    for method in registered().values():
        reason = method.refusal(set(STAGE_INPUTS))
        usable = "runs from a feature cache" if reason is None else f"[yellow]refused[/]: {reason}"
        if reason is None and method.stage_inputs:
            usable += ", with what the stages load beside it: " + "; ".join(STAGE_INPUTS[need]
                                                                           for need in method.stage_inputs)
        console.print(f"[bold]{method.name}[/]  {method.title} ({'trained' if method.trainable else 'no parameters'})")
        for label, text in [("paper", method.paper), ("code", method.code), ("needs", ", ".join(method.needs)),
                            ("input", usable), ("parity", method.parity), ("notes", method.notes)]:
            if text:
                console.print(f"    {label:<7}{text}", highlight=False)


@app.command("config")
def config_reference(
    stage: Annotated[Stage, typer.Option(help="The stage whose keys to list (finetune adds the finetune section).")]
    = Stage.finetune,
    kind: Annotated[Optional[str], typer.Option(help="Only this method's model/loss keys (default: every method's).")]
    = None,
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table (docs/CONFIG.md).")] = False,
    show: Annotated[bool, typer.Option(help="Print the resolved config of --dataset/--config/--set instead.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="With --show: the dataset.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="With --show: a YAML file merged over the defaults.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="With --show: key=value overrides.")] = None,
) -> None:
    """Every config key with what it accepts, its default and its meaning; `--show` resolves one config."""
    from omegaconf import OmegaConf

    from clipspm.config import option_rows, options_markdown, resolve_config

    if show:
        overrides = list(set_ or []) + ([f"model.kind={kind}"] if kind else [])
        console.print(OmegaConf.to_yaml(resolve_config(stage.value, dataset, config, overrides)), end="")
        return
    if markdown:
        print(options_markdown(stage.value), end="")
        return
    table = Table("key", "accepts", "default", "meaning")
    for row in option_rows(stage.value, kind):
        table.add_row(*row)
    console.print(table)


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory made by `clipspm train`.")],
    episodes: Annotated[Optional[int], typer.Option(help="Test episodes (default eval.episodes: 10000).")] = None,
    queries: Annotated[Optional[int], typer.Option(help="Queries per class M (default eval.queries: 1).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best (by the accuracy on train.select_on: val unless the run "
                                                 "chose test) or last.")] = "best",
    cache: Annotated[Optional[Path], typer.Option(
        help="Evaluate on this cache instead of the run's (it must fit the run's backbone, T and width).")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Finetune or imported run: the dataset root whose test videos its tower encodes (default: the run's "
             "data.root, else the root its training cache came from).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="Finetune or imported run: the weights under its tuned tower, whose text tower gives the class texts "
             "(an imported run's default: openai; or a local file).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cpu. Default: CUDA when available.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """5-way K-shot accuracy with a 95% confidence interval on stored test episodes; writes RUN/results.json.

    The episodes are drawn once per (N, K, M, count, seed) and kept beside the cache, so every run on that
    cache is scored on the same episodes and `clipspm compare` can pair them. A fine-tuned run is evaluated
    on a cache of the test split extracted with its tuned tower (made once, then reused).
    """
    from clipspm.stages.evaluate import evaluate_run

    result = evaluate_run(run, episodes=episodes, queries=queries, checkpoint=checkpoint, cache_path=cache,
                          device=device, progress=progress, root=root.resolve() if root else None,
                          pretrained=_pretrained(pretrained))
    table = Table(title=str(run), show_header=False)
    table.add_row("accuracy", f"{100 * result.accuracy:.2f} ± {100 * result.ci95:.2f} % (95% CI)")
    table.add_row("protocol", f"{result.ways}-way {result.shots}-shot, {result.queries} "
                              f"{'query' if result.queries == 1 else 'queries'} per class, "
                              f"{result.episodes} episodes (seed {result.seed})")
    table.add_row("episodes file", result.episodes_file)
    table.add_row("checkpoint", result.checkpoint)
    if result.checkpoint == "best":
        table.add_row("model selection", _selection_text(result.select_on))
    if result.video_text is not None:
        table.add_row("descriptions", result.video_text)
    if result.label_leak:
        table.add_row("label leak", "[red]yes[/]: each query was scored with its true class's prompt (the released "
                                    "protocol); not a few-shot accuracy")
    console.print(table)
    if result.label_leak:
        console.print("[red]LABEL LEAK[/]: this accuracy read the query labels (model.query_prompt=true_class_leak); "
                      "compare it with a run of the default query_prompt on the same episodes (`clipspm compare`)")


def _selection_text(select_on: str) -> str:
    if select_on == "test":
        return ("[bold yellow]on the TEST split[/] (train.select_on=test, the released code's protocol): the best of "
                "the validations on these test episodes, an optimistic number")
    return "on the val split"


@app.command("import-checkpoint")
def import_checkpoint(
    source: Annotated[Path, typer.Argument(help="A checkpoint_*.pt of the released CLIP-SPM code (run/main_run.py).")],
    backbone: Annotated[str, typer.Option(
        help="Its tower: RN50 or ViT-B-16 (built as open_clip's OpenAI QuickGELU configs), or another open_clip "
             "model.")],
    out: Annotated[Path, typer.Option(help="The run directory to make; it must not exist yet.")],
    method: Annotated[str, typer.Option(help="The released method; clipspm (hnlxy/CLIP-SPM).")] = "clipspm",
    dataset: Annotated[Optional[str], typer.Option(
        help="The dataset it was trained on: its gate parameters and class names. Default: the released dataset "
             "whose parameter set fits the gate widths, if only one does.")] = None,
    shots: Annotated[Optional[int], typer.Option(help="K of the episodes it is scored on (train.shots).")] = None,
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
) -> None:
    """Turn a released CLIP-SPM checkpoint into a run: heads on the official profile, the tower on open_clip's.

    The file is read without running pickled code (torch's weights-only unpickler: tensors, numbers, a Counter,
    numpy scalars); its keys and shapes are checked against the official profile, the dataset's gate parameters
    and the backbone before anything is written. Then `clipspm eval RUN --root DATA` scores it and
    `clipspm train --stage finetune --init RUN` fine-tunes from it.
    """
    from clipspm.stages.import_checkpoint import ImportOptions, summary
    from clipspm.stages.import_checkpoint import import_checkpoint as run_import

    result = run_import(ImportOptions(source=source, out=out, backbone=backbone, method=method, dataset=dataset,
                                      shots=shots, cache_dir=cache_dir))
    table = Table(title="imported", show_header=False)
    for key, value in summary(result).items():
        table.add_row(key, value)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"next: clipspm eval {result.run_dir} --root DATA")


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="First run (evaluated).")],
    run_b: Annotated[Path, typer.Argument(help="Second run, evaluated on the same episodes.")],
) -> None:
    """Paired difference A - B over the shared test episodes, with its 95% confidence interval."""
    from clipspm.stages.evaluate import compare_runs

    c = compare_runs(run_a, run_b)
    for name, run, accuracy, select_on in (("A", run_a, c.accuracy_a, c.select_on_a),
                                           ("B", run_b, c.accuracy_b, c.select_on_b)):
        chosen = "on the TEST split: optimistic" if select_on == "test" else "on the val split"
        console.print(f"{name} {run}: {100 * accuracy:.2f} % (checkpoint chosen {chosen})")
    verdict = "significant" if c.significant else "not significant"
    console.print(f"A - B = {100 * c.difference:+.2f} ± {100 * c.ci95:.2f} points (95% CI, paired over "
                  f"{c.episodes} episodes): {verdict}")


@app.command()
def demo(
    episodes: Annotated[Optional[int], typer.Option(help="Training episodes of the full model.")] = None,
    eval_episodes: Annotated[int, typer.Option(help="Test episodes per model.")] = 10000,
    shots: Annotated[int, typer.Option(help="K shots.")] = 1,
    runs_dir: Annotated[Path, typer.Option(help="Where the demo's runs go.")] = Path("runs"),
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Offline end to end on the synthetic dataset: extract, train CLIP-SPM, evaluate it against the OTAM and
    ProtoNet baselines on the same test episodes. A few minutes on a laptop CPU; reruns reuse what is done."""
    from clipspm.experiments.demo import run_demo

    rows = run_demo(episodes=episodes, eval_episodes=eval_episodes, shots=shots, runs_dir=runs_dir,
                    cache_dir=cache_dir, progress=progress)
    table = Table("model", "test accuracy (95% CI)", "vs CLIP-SPM (paired)", "run",
                  title=f"synthetic, 5-way {shots}-shot, {eval_episodes} test episodes")
    for row in rows:
        table.add_row(row["model"], f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f} %", row["paired"],
                      row["run"])
    console.print(table)


@app.command()
def ablate(
    suite: Annotated[str, typer.Option(
        help="A shipped suite - components (Table 3), fusion (Table 4), consistency (Table 5), templates (Fig. 5), "
             "baselines (Tables 1-2), heads_lr, profiles (official vs paper), official_parts - or the path of "
             "your own suite YAML file (format: clipspm/configs/suites/*.yaml).")],
    stage: Annotated[Stage, typer.Option(
        help="heads: every variant's heads trained on the cached features; finetune: heads and visual tower "
             "trained end to end, as the paper's ablation rows were (needs the videos: --root).")] = Stage.heads,
    dataset: DatasetOpt = "synthetic",
    root: RootOpt = None,
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = None,
    shots: Annotated[str, typer.Option(help="Comma-separated K values; every variant is trained and scored at "
                                            "each.")] = "1,3,5",
    select_on: SelectOnOpt = None,
    episodes: Annotated[Optional[int], typer.Option(
        help="Training episodes of every variant (train.episodes). Default: the dataset's schedule (20,000; "
             "100,000 for SSv2).")] = None,
    eval_episodes: Annotated[Optional[int], typer.Option(
        help="Stored test episodes per K (eval.episodes, default 10,000); the same episodes for every "
             "variant.")] = None,
    eval_queries: Annotated[Optional[int], typer.Option(
        help="Queries per class M in the test episodes (eval.queries, default 1).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Config override for every variant, applied before the variant's own, e.g. "
                      "--set train.lr=1e-4 (repeatable).")] = None,
    parallel: Annotated[str, typer.Option(
        help="Runs at once: auto (one per device) or N. With more than one, a `python -m clipspm` worker process "
             "per device, pinned to it (CUDA_VISIBLE_DEVICES), takes the next variant whenever it is free.")] = "auto",
    devices: Annotated[Optional[str], typer.Option(
        help="Comma-separated worker devices, e.g. cuda:0,cuda:1 or cpu,cpu. Default: every visible GPU, "
             "else the CPU.")] = None,
    cache_dir: CacheDirOpt = DEFAULT_CACHE_DIR,
    runs_dir: Annotated[Path, typer.Option(
        help="Where the suite directory ablate-{dataset}-{backbone}-{suite} is made.")] = Path("runs"),
    progress: Annotated[bool, typer.Option(help="Show progress bars (single worker).")] = True,
) -> None:
    """Run an ablation suite on one feature cache, then write its report (`clipspm report`).

    The cache is resolved once: reused when one of these settings exists, extracted once when none does.
    Every variant x K is its own run directory, trained from that cache and scored on the same stored test
    episodes. Run the same command again after a kill: finished runs are skipped, half-trained ones resume.
    """
    from clipspm.experiments.ablate import AblateOptions, run_ablation

    options = AblateOptions(suite=suite, dataset=dataset, stage=stage.value,
                            select_on=select_on.value if select_on else None, backbone=backbone,
                            pretrained=pretrained, root=root,
                            shots=tuple(_int_list(shots, "--shots")), episodes=episodes,
                            eval_episodes=eval_episodes, eval_queries=eval_queries, overrides=tuple(set_ or ()),
                            parallel=parallel, devices=_split_list(devices) if devices else None,
                            cache_dir=cache_dir, runs_dir=runs_dir, progress=progress)
    result = run_ablation(options)
    table = Table("variant", "K", "status", "test accuracy (95% CI)", "train s", "eval s",
                  title=f"{result.suite_dir} ({len(result.devices)} worker(s))")
    for outcome in result.outcomes:
        accuracy = ("not a result (see the report)" if (outcome.variant, outcome.shots) in result.report.not_results
                    else f"{100 * outcome.accuracy:.2f} ± {100 * outcome.ci95:.2f} %")
        table.add_row(outcome.variant, str(outcome.shots), outcome.status, accuracy, f"{outcome.train_seconds:.1f}",
                      f"{outcome.eval_seconds:.1f}")
    console.print(table)
    console.print(f"{result.seconds:.0f} s in all ({result.cache_seconds:.1f} s resolving the cache, "
                  f"{result.report_seconds:.1f} s for the report)")
    _print_report(result.report)


@app.command()
def report(
    suite_dir: Annotated[Path, typer.Argument(help="Suite directory made by `clipspm ablate`.")],
    device: Annotated[Optional[str], typer.Option(
        help="Where the embedding map's forward pass runs (cuda, cpu). Default: CUDA when available.")] = None,
) -> None:
    """Markdown + CSV tables in the paper's layout (mean ± 95% CI, paired difference to the full model, the
    paper's numbers beside ours) and PNG figures: training curves, ablation bars, accuracy against R, t-SNE map."""
    from clipspm.experiments.report import write_report

    _print_report(write_report(suite_dir, device=device))


@app.command("ablate-worker", hidden=True)
def ablate_worker(
    suite_dir: Annotated[Path, typer.Argument()],
    device: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """A `clipspm ablate --parallel` worker: runs the suite's jobs named on stdin, one JSON line each on stdout."""
    from clipspm.experiments.ablate import serve_jobs

    serve_jobs(suite_dir, device, sys.stdin, sys.stdout)


def _print_report(result: ReportResult) -> None:
    console.print(f"report: {result.markdown}, {result.csv}")
    for path in result.figures:
        console.print(f"figure: {path}")
    if result.missing:
        console.print(f"[yellow]not scored yet:[/] {', '.join(result.missing)}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in _split_list(text)]
    except ValueError:
        raise ClipspmError(f"{option} takes comma-separated integers, e.g. 1,3,5; got {text!r}") from None


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _pretrained(value: str | None) -> str | None:
    """A local weight file by its absolute path (the run may be scored from another directory); a tag as it is."""
    if value is not None and Path(value).expanduser().is_file():
        return str(Path(value).expanduser().resolve())
    return value


def _weights_file(path: Path | None) -> Path | None:
    """A finetune run directory names its tuned visual tower; a file is taken as it is."""
    if path is None or path.is_file():
        return path
    from clipspm.stages.checkpoint import tuned_visual_weights

    return tuned_visual_weights(path)
