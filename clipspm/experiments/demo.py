"""`clipspm demo`: the whole pipeline offline on the synthetic dataset, in minutes on a CPU.

Extract (once), train CLIP-SPM, and score it beside the two parameter-free baselines on the same
stored test episodes. Every step reuses what an earlier demo finished.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from clipspm.config import resolve_config
from clipspm.errors import ClipspmError
from clipspm.stages.evaluate import compare_runs, evaluate_run, finished_result
from clipspm.stages.heads import train_heads
from clipspm.stages.runs import CONFIG_NAME
from clipspm.system import make_console

VARIANTS = [("CLIP-SPM", "clipspm"), ("OTAM (CLIP features)", "otam"), ("ProtoNet", "protonet")]


def run_demo(*, episodes: int | None, eval_episodes: int, shots: int, runs_dir: Path, cache_dir: Path,
             progress: bool = True, console: Console | None = None) -> list[dict]:
    """Train (or resume) and evaluate each variant; rows of model, accuracy, CI and paired difference."""
    console = console or make_console()
    if eval_episodes < 1:
        raise ClipspmError(f"--eval-episodes must be at least 1, got {eval_episodes}")
    overrides = [f"train.shots={shots}", f"data.cache_dir={cache_dir}"]
    if episodes is not None:
        overrides.append(f"train.episodes={episodes}")
    rows = []
    for label, kind in VARIANTS:
        cfg = resolve_config("heads", "synthetic", overrides=[*overrides, f"model.kind={kind}"])
        run_dir = Path(runs_dir) / f"demo-synthetic-{shots}shot-{cfg.train.episodes}ep-{kind}"
        console.rule(f"{label}: {run_dir}")
        train_heads(cfg, run_dir, resume=(run_dir / CONFIG_NAME).exists(), progress=progress, console=console)
        result = finished_result(run_dir, episodes=eval_episodes, queries=cfg.eval.queries, seed=cfg.eval.seed) \
            or evaluate_run(run_dir, episodes=eval_episodes, progress=progress, console=console).__dict__
        rows.append({"model": label, "run": str(run_dir), "accuracy": result["accuracy"], "ci95": result["ci95"]})
    full = rows[0]["run"]
    rows[0]["paired"] = "-"
    for row in rows[1:]:
        comparison = compare_runs(Path(full), Path(row["run"]))
        row["paired"] = f"{100 * comparison.difference:+.2f} ± {100 * comparison.ci95:.2f}"
    return rows

