"""`clipspm report SUITE_DIR`: an ablation suite as the paper shows it, with ours beside the paper's numbers.

Writes `report.md` and `report.csv` (variants x K, mean ± 95% CI, each variant's paired difference
to the reference variant over the same stored episodes, the paper's number where it has one) and
`figures/`: training curves, ablation bars, accuracy against a value column (Fig. 5) and a 2-D
t-SNE map of test-video embeddings (Fig. 6). Runs not scored yet are listed, not guessed.

The report names the stage that trained the runs (heads on cached features, or end to end), how
their checkpoints were chosen (val, or the test split: marked as optimistic), the method profile of
the heads (`model.profile`) and the suite's `note`. A run in which nothing that trains reaches the
logits (`reach.config_reach`: HSMR without SPM in the heads stage) is marked with the reason instead
of printed as a result: its scores are the untrained model's.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from sklearn.manifold import TSNE

from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import CONFIG_DIR
from clipspm.experiments import figures
from clipspm.experiments.reach import LogitReach, config_reach
from clipspm.experiments.suites import Suite, SuiteSettings, Variant, read_suite_dir, run_dir_of, variant_config
from clipspm.pipeline.methods import HeadInputs, get_method
from clipspm.stages.episodes import EpisodeIndex, build_episode
from clipspm.stages.evaluate import compare_runs, finished_result, open_test_run
from clipspm.stages.runs import head_inputs, metrics_path, selection_key
from clipspm.system import make_console

PAPER_RESULTS = CONFIG_DIR / "paper_results.yaml"
EMBEDDING_CLASSES, EMBEDDING_VIDEOS = 5, 40      # Fig. 6: five classes, 40 test videos each


@dataclass
class Cell:
    """One (variant, K) entry, in percent; None where there is nothing (yet)."""

    accuracy: float | None = None
    ci95: float | None = None
    difference: float | None = None        # variant - reference, paired over the same episodes
    difference_ci95: float | None = None
    paper: float | None = None
    not_a_result: str | None = None        # why this run's scores cannot come from its training (then no numbers)
    idle: tuple[str, ...] = ()             # trained modules whose parameters do not reach the logits


@dataclass
class ReportResult:
    markdown: Path
    csv: Path
    figures: list[Path]
    missing: list[str]                     # run directories without a result for the suite's eval settings
    not_results: dict[tuple[str, int], str]   # (variant, K) -> why its scores are not a result of training


def write_report(suite_dir: Path, *, device: str | None = None, console: Console | None = None) -> ReportResult:
    """Tables and figures of a suite directory, from what its runs have written so far."""
    console = console or make_console()
    suite_dir = Path(suite_dir)
    suite, settings = read_suite_dir(suite_dir)
    cells, missing = collect_cells(suite_dir, suite, settings)
    figure_dir = suite_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    made = [_training_curves(suite_dir, suite, settings, figure_dir / "training_curves.png"),
            _bars(suite, settings, cells, figure_dir / "ablation_bars.png")]
    if suite.curve is not None:
        made.append(_curve(suite, settings, cells, figure_dir / f"accuracy_vs_{suite.curve}.png"))
    reference = run_dir_of(suite_dir, suite.variant(suite.reference), settings.shots[0])
    if cells[suite.reference, settings.shots[0]].accuracy is not None:   # Fig. 6: the full model at the smallest K
        points = embedding_points(reference, device=device)
        if points is not None:
            made.append(_embedding(points, suite, figure_dir / "embedding_tsne.png"))
    markdown, table = suite_dir / "report.md", suite_dir / "report.csv"
    markdown.write_text(render_markdown(suite, settings, cells, missing, [p.relative_to(suite_dir) for p in made]))
    _write_csv(table, suite, settings, cells)
    if missing:
        console.print(f"[yellow]{len(missing)} runs not scored yet[/] (rerun `clipspm ablate` to finish them): "
                      + ", ".join(missing))
    not_results = {key: cell.not_a_result for key, cell in cells.items() if cell.not_a_result}
    return ReportResult(markdown, table, made, missing, not_results)


def paper_numbers(suite: Suite, settings: SuiteSettings) -> dict[str, dict[int, float]]:
    """The paper's accuracy per variant and K for this dataset and backbone. A variant the suite's own table
    lacks falls back to its method's Table 1/2 row (`methods:`), the reference variant to the full model's."""
    if suite.paper is None:
        return {}
    data = yaml.safe_load(PAPER_RESULTS.read_text())
    table = data["suites"].get(suite.paper, {}).get(settings.backbone, {}).get(settings.dataset, {})
    numbers = {name: dict(values) for name, values in table.items()}
    for variant in suite.variants:
        # a variant that is another method (model.kind=NAME) takes that method's row of Tables 1-2
        kinds = [o.split("=", 1)[1] for o in variant.overrides if o.startswith("model.kind=")]
        methods = data["methods"].get(kinds[-1], {}) if kinds else {}
        row = methods.get(settings.backbone, {}).get(settings.dataset, {})
        if row:
            numbers[variant.name] = {**row, **numbers.get(variant.name, {})}
    full = data["full_model"].get(settings.backbone, {}).get(settings.dataset, {})
    if full:
        numbers[suite.reference] = {**full, **numbers.get(suite.reference, {})}
    return numbers


def collect_cells(suite_dir: Path, suite: Suite, settings: SuiteSettings) -> tuple[dict, list[str]]:
    """{(variant name, K): Cell} from the runs' results, and the runs still missing."""
    paper = paper_numbers(suite, settings)
    with FeatureCache(find_store(Path(settings.cache))) as cache:
        dim, frames = cache.meta["feature_dim"], cache.num_frames
        inputs = {variant.name: stage_inputs(variant_config(settings, variant, settings.shots[0]), cache)
                  for variant in suite.variants}   # once per variant: a text tower is not loaded again per K
    cells, missing = {}, []
    for k in settings.shots:
        reference = run_dir_of(suite_dir, suite.variant(suite.reference), k)
        reference_done = _scored(reference, settings)
        for variant in suite.variants:
            run = run_dir_of(suite_dir, variant, k)
            reach = variant_reach(settings, variant, k, dim=dim, frames=frames, inputs=inputs[variant.name])
            cell = Cell(paper=paper.get(variant.name, {}).get(k), not_a_result=reach.reason(),
                        idle=reach.idle_modules)
            cells[variant.name, k] = cell
            result = _scored(run, settings)
            if result is None:
                missing.append(run.name)
                continue
            if cell.not_a_result:
                continue
            cell.accuracy, cell.ci95 = 100 * result["accuracy"], 100 * result["ci95"]
            if variant.name != suite.reference and reference_done:
                paired = compare_runs(run, reference)
                cell.difference, cell.difference_ci95 = 100 * paired.difference, 100 * paired.ci95
    return cells, missing


def variant_reach(settings: SuiteSettings, variant: Variant, shots: int, *, dim: int, frames: int,
                  inputs: HeadInputs | None = None) -> LogitReach:
    """What of a variant's training reaches its logits, in the suite's stage (features of width `dim`, `frames`).
    A method that needs what the stages load beside the cache (a text tower) gets `inputs`, or, without them,
    those of the suite's cache."""
    cfg = variant_config(settings, variant, shots)
    if inputs is None:
        with FeatureCache(find_store(Path(settings.cache))) as cache:
            inputs = stage_inputs(cfg, cache)
    return config_reach(cfg, dim=dim, frames=frames, stage=settings.stage, inputs=inputs)


def stage_inputs(cfg, cache: FeatureCache) -> HeadInputs | None:
    """What the stages would load beside `cache` for the method of `cfg` (on the CPU); None if it needs nothing."""
    return head_inputs(cfg, cache, torch.device("cpu")) if get_method(cfg.model.kind).stage_inputs else None


def _scored(run_dir: Path, settings: SuiteSettings) -> dict | None:
    return finished_result(run_dir, episodes=settings.eval_episodes, queries=settings.eval_queries,
                           seed=settings.eval_seed)


STAGE_TEXT = {
    "heads": "Heads stage: each run trained its heads on the frozen CLIP features of the cache (the paper trained "
             "every row end to end: `clipspm ablate --stage finetune`).",
    "finetune": "Finetune stage: each run trained its heads and the CLIP visual tower end to end, as the paper's "
                "rows were, and was scored on the test split encoded by its own tuned tower.",
}
SELECTION_TEXT = {
    "val": "Each run's checkpoint was chosen on the val split.",
    "test": "**Checkpoints chosen on the TEST split** (`--select-on test`, the released code's protocol): each run "
            "kept the best of its validations on these very test episodes, so every number here is optimistic. "
            "A `--select-on val` suite on the same cache is scored on the same episodes: `clipspm compare` pairs "
            "them to show by how much.",
}
NOT_A_RESULT = "not a result †"


def render_markdown(suite: Suite, settings: SuiteSettings, cells: dict, missing: list[str],
                    figure_paths: list[Path]) -> str:
    """report.md: the accuracy table (the paper's numbers in `paper` columns), the paired table, the figures."""
    with_paper = [k for k in settings.shots if any(cells[v.name, k].paper is not None for v in suite.variants)]
    accuracy_header, difference_header = ["variant", *suite.columns], ["variant", *suite.columns]
    for k in settings.shots:
        accuracy_header += [f"{k}-shot"] + (["paper"] if k in with_paper else [])
        difference_header.append(f"{k}-shot")
    accuracy_rows, difference_rows = [], []
    for variant in suite.variants:
        accuracy_rows.append(_row_start(suite, variant))
        difference_rows.append(_row_start(suite, variant))
        for k in settings.shots:
            cell = cells[variant.name, k]
            accuracy_rows[-1].append(NOT_A_RESULT if cell.not_a_result else _pm(cell.accuracy, cell.ci95))
            if k in with_paper:
                accuracy_rows[-1].append("–" if cell.paper is None else f"{cell.paper:.1f}")
            difference_rows[-1].append("reference" if variant.name == suite.reference else
                                       NOT_A_RESULT if cell.not_a_result else _paired_text(cell))
    protocol = (f"5-way K-shot top-1 accuracy (%), mean ± 95% CI over {settings.eval_episodes} stored test episodes "
                f"per K ({settings.eval_queries} query per class, seed {settings.eval_seed}); every run trained from "
                f"the cache `{settings.cache}` and scored on the episodes stored beside it.")
    lines = [f"# {suite.title}: {settings.dataset}, {settings.backbone}, {settings.stage} stage", "", protocol, "",
             STAGE_TEXT[settings.stage], SELECTION_TEXT[settings.select_on], *profile_lines(suite, settings)]
    if suite.note:
        lines.append(suite.note)
    if with_paper:
        lines.append("`paper`: the paper's number for this dataset and backbone (clipspm/configs/paper_results.yaml).")
    pairing = ("Variant − reference on the same episodes, in points, ± 95% CI of the paired difference; "
               "* where the interval excludes 0.")
    lines += ["", *_table(accuracy_header, accuracy_rows), *_notes(suite, settings, cells), "",
              f"## Paired difference to {suite.variant(suite.reference).label}", "", pairing, "",
              *_table(difference_header, difference_rows)]
    if figure_paths:
        lines += ["", "## Figures", ""] + [f"![{path.stem}]({path.as_posix()})" for path in figure_paths]
    if missing:
        lines += ["", f"Not scored yet (rerun `clipspm ablate` to finish): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def profile_lines(suite: Suite, settings: SuiteSettings) -> list[str]:
    """Which profile (`model.profile`: the released code, or the paper's reading) each variant's head was built
    in; nothing when no variant's method has profiles."""
    labels: dict[str, list[str]] = {}
    for variant in suite.variants:
        profile = variant_config(settings, variant, settings.shots[0]).model.get("profile")
        if profile is not None:
            labels.setdefault(profile, []).append(variant.label)
    if not labels:
        return []
    if len(labels) == 1 and len(next(iter(labels.values()))) == len(suite.variants):
        return [f"Method profile (`model.profile`): `{next(iter(labels))}` for every variant."]
    return ["Method profile (`model.profile`): " + "; ".join(f"`{profile}` for {', '.join(names)}"
                                                          for profile, names in labels.items()) + "."]


def _notes(suite: Suite, settings: SuiteSettings, cells: dict) -> list[str]:
    """Below the accuracy table: why a row is not a result (†), and trained modules that miss the logits."""
    notes = []
    for variant in suite.variants:
        row = [cells[variant.name, k] for k in settings.shots]
        reasons = list(dict.fromkeys(cell.not_a_result for cell in row if cell.not_a_result))
        idle = sorted({name for cell in row if not cell.not_a_result for name in cell.idle})
        notes += [f"- † {variant.label}: {reason}." for reason in reasons]
        if idle:
            notes.append(f"- {variant.label}: the parameters of {', '.join(idle)} train but do not reach the logits "
                         f"(they shape only auxiliary losses).")
    if any(cell.not_a_result for cell in cells.values()) and settings.stage == "heads":
        notes.append("- In the finetune stage the tower trains, and the features it makes reach the logits: "
                     "there such a row is a result.")
    return ["", *notes] if notes else []


def _paired_text(cell: Cell) -> str:
    significant = cell.difference is not None and abs(cell.difference) > cell.difference_ci95
    return _pm(cell.difference, cell.difference_ci95, signed=True) + (" *" if significant else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _row_start(suite: Suite, variant: Variant) -> list[str]:
    """The row's name and its on/off columns (✓ / ✗) or values, as in the paper's tables."""
    values = [variant.columns[column] for column in suite.columns]
    return [variant.label, *(("✓" if v else "✗") if isinstance(v, bool) else str(v) for v in values)]


def _pm(value: float | None, ci: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f} ± {ci:.2f}" if signed else f"{value:.2f} ± {ci:.2f}"


def _write_csv(path: Path, suite: Suite, settings: SuiteSettings, cells: dict) -> None:
    """The same table, one row per variant, a number per field (percent; empty where there is none, and where the
    row is not a result: `not_a_result` says why), with the stage and the split that chose the checkpoints."""
    fields = ("accuracy", "ci95", "difference", "difference_ci95", "paper")
    header = ["variant", "label", *suite.columns, "stage", "select_on", "not_a_result",
              *(f"{k}shot_{name}" for k in settings.shots for name in fields)]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for variant in suite.variants:
            row = [cells[variant.name, k] for k in settings.shots]
            reason = "; ".join(dict.fromkeys(cell.not_a_result for cell in row if cell.not_a_result))
            values = [getattr(cell, name) for cell in row for name in fields]
            writer.writerow([variant.name, variant.label, *(variant.columns[c] for c in suite.columns),
                             settings.stage, settings.select_on, reason,
                             *("" if value is None else repr(value) for value in values)])


def _grid(suite: Suite, settings: SuiteSettings, cells: dict, field: str) -> np.ndarray:
    """[variants, K] of one Cell field, NaN where missing."""
    return np.array([[np.nan if getattr(cells[v.name, k], field) is None else getattr(cells[v.name, k], field)
                      for k in settings.shots] for v in suite.variants], dtype=np.float64)


def _bars(suite: Suite, settings: SuiteSettings, cells: dict, path: Path) -> Path:
    figures.ablation_bars([v.label for v in suite.variants], settings.shots, _grid(suite, settings, cells, "accuracy"),
                          _grid(suite, settings, cells, "ci95"), _grid(suite, settings, cells, "paper"),
                          f"{suite.title}: {settings.dataset}, {settings.backbone}", path)
    return path


def _curve(suite: Suite, settings: SuiteSettings, cells: dict, path: Path) -> Path:
    figures.accuracy_curve(suite.curve, [v.columns[suite.curve] for v in suite.variants], settings.shots,
                           _grid(suite, settings, cells, "accuracy"), _grid(suite, settings, cells, "ci95"),
                           _grid(suite, settings, cells, "paper"), f"{suite.title}: {settings.dataset}", path)
    return path


def _training_curves(suite_dir: Path, suite: Suite, settings: SuiteSettings, path: Path) -> Path:
    records = {}
    for k in settings.shots:
        for variant in suite.variants:
            log = metrics_path(run_dir_of(suite_dir, variant, k))
            if log.exists():
                records[k, variant.label] = [json.loads(line) for line in log.read_text().splitlines() if line]
    figures.training_curves(records, settings.shots, [v.label for v in suite.variants], path,
                            validation_key=selection_key(settings.select_on))
    return path


@dataclass
class EmbeddingPoints:
    classes: list[str]             # class of each video
    raw: np.ndarray                # [V, C] cached CLIP features of the test view, mean over frames
    model: np.ndarray | None       # [V, C] the head's query features, mean over frames (None: the head has none)


@torch.no_grad()
def embedding_points(run_dir: Path, *, classes: int = EMBEDDING_CLASSES, per_class: int = EMBEDDING_VIDEOS,
                     device: str | None = None) -> EmbeddingPoints | None:
    """Test videos of the first `classes` test classes, each scored once as a query of a test-like episode.

    Round r is one N-way K-shot episode with one query per class: video r of each class is the query and
    the next K videos of that class are its supports, so every video is seen by the head exactly as in
    evaluation (PADM is transductive: a query's features depend on its episode). None when fewer than two
    test classes have more than K videos.
    """
    loaded = open_test_run(run_dir, device=device)
    test, shots = loaded.test, loaded.cfg.train.shots
    members = [torch.nonzero(test.labels == label).flatten()[:per_class] for label in test.labels.unique()]
    members = [videos for videos in members if videos.numel() > shots][:classes]
    if len(members) < 2:
        return None
    rounds = max(videos.numel() for videos in members)
    query = torch.stack([torch.stack([m[r % m.numel()] for m in members]) for r in range(rounds)])       # [R, N]
    support = torch.stack([torch.stack([m[(r + 1 + j) % m.numel()] for m in members for j in range(shots)])
                           for r in range(rounds)])                                                      # [R, N*K]
    class_rows = test.labels[query[0]].expand(rounds, -1)                                                # [R, N]
    episode = build_episode(EpisodeIndex(support, query, class_rows, shots, 1), test.features, test.labels,
                            test.class_text, video_text=test.video_text)
    loaded.head.eval()
    compared = loaded.head(episode).query_features                                                       # [R, N, T, C]
    first = torch.tensor([[r < m.numel() for m in members] for r in range(rounds)], device=query.device)  # [R, N]
    videos = query[first]
    raw = test.features[videos, 0].float().mean(1)
    model = None if compared is None else compared.mean(2)[first].cpu().numpy()
    names = [test.video_ids[int(v)].split("/")[0] for v in videos]
    return EmbeddingPoints(names, raw.cpu().numpy(), model)


def _embedding(points: EmbeddingPoints, suite: Suite, path: Path) -> Path:
    panels = [("CLIP features (cache)", _tsne(points.raw))]
    if points.model is not None:
        panels.append((f"{suite.variant(suite.reference).label}: query features", _tsne(points.model)))
    figures.embedding_map(panels, points.classes, path)
    return path


def _tsne(features: np.ndarray) -> np.ndarray:
    """2-D t-SNE of [V, C]. At most 5 x 40 points: the exact gradient is faster than Barnes-Hut at that size.
    The perplexity is capped for the small sets of tests and smoke runs."""
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
                random_state=0).fit_transform(features)
