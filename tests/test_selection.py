"""Model selection: on the val split by default; on the test split only when asked (`--select-on test`, the
released code's protocol), then validated on the very test episodes `eval` scores and marked as such
everywhere, so that `compare` can show how much choosing on test inflates the number."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from clipspm import cli
from clipspm.cli import app
from clipspm.config import ConfigError, resolve_config
from clipspm.experiments.ablate import AblateOptions, run_ablation
from clipspm.stages.checkpoint import read_state
from clipspm.stages.evaluate import compare_runs, evaluate_run
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.finetune import train_finetune
from clipspm.stages.heads import train_heads
from tests.conftest import heads_config

# Six validations, each on 50 episodes (val) or on the 50 stored test episodes eval scores (test).
SCHEDULE = ("train.episodes=24", "train.episodes_per_step=4", "train.val_every=4", "train.log_every=4",
            "train.val_episodes=50", "eval.episodes=50")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def validations(run: Path, key: str) -> list[dict]:
    return [record for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in record]


def assert_best_is_the_first_highest(run: Path, key: str) -> float:
    """The `best` checkpoint holds the first validation with the highest score; return that score."""
    scores = validations(run, key)
    top = max(record[key] for record in scores)
    first = next(record for record in scores if record[key] == top)
    state = read_state(run / "checkpoints" / "best")
    assert (state["best_episode"], state["best_val"]) == (first["episode"], top)
    return top


@pytest.fixture(scope="module")
def selected_runs(synthetic_cache, tmp_path_factory):
    """The same training selected on val (API) and on test (`clipspm train --select-on test`)."""
    work = tmp_path_factory.mktemp("selection")
    val_run, test_run = work / "val-selected", work / "test-selected"
    train_heads(heads_config(synthetic_cache, *SCHEDULE), val_run, progress=False, device="cpu")
    sets = [item for override in SCHEDULE for item in ("--set", override)]
    trained = invoke("train", "--select-on", "test", "--cache", str(synthetic_cache), "--run-dir", str(test_run),
                     "--device", "cpu", "--no-progress", *sets)
    return val_run, test_run, trained


def invoke(*args: str) -> str:
    """`clipspm ARGS` in this process; what it printed, on a console wide enough that no table cell wraps."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "console", Console(width=300))
        done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return done.output


def test_selection_is_on_val_by_default(selected_runs):
    val_run, _, _ = selected_runs
    assert not validations(val_run, "test_acc") and len(validations(val_run, "val_acc")) == 6
    assert_best_is_the_first_highest(val_run, "val_acc")
    evaluate_run(val_run, progress=False, device="cpu")
    assert json.loads((val_run / "results.json").read_text())["select_on"] == "val"


def test_select_on_test_keeps_the_best_of_the_validations_on_the_episodes_eval_scores(selected_runs):
    _, test_run, printed = selected_runs
    assert "best test accuracy" in printed and "chosen on the test episodes `eval` scores (optimistic)" in printed
    assert not validations(test_run, "val_acc") and len(validations(test_run, "test_acc")) == 6
    best = assert_best_is_the_first_highest(test_run, "test_acc")

    shown = invoke("eval", str(test_run), "--device", "cpu", "--no-progress")
    assert "model selection" in shown and "on the TEST split" in shown
    results = json.loads((test_run / "results.json").read_text())
    assert results["select_on"] == "test" and results["checkpoint"] == "best"
    assert results["accuracy"] == pytest.approx(best, abs=1e-6), "validated on the very episodes eval scored"


def test_compare_pairs_val_and_test_selection_on_the_same_episodes(selected_runs):
    val_run, test_run, _ = selected_runs
    for run in (val_run, test_run):
        evaluate_run(run, progress=False, device="cpu")
    paired = compare_runs(test_run, val_run)
    assert (paired.select_on_a, paired.select_on_b, paired.episodes) == ("test", "val", 50)
    shown = invoke("compare", str(test_run), str(val_run))
    assert f"{100 * paired.difference:+.2f} ± {100 * paired.ci95:.2f} points" in shown
    assert "checkpoint chosen on the TEST split" in shown and "checkpoint chosen on the val split" in shown


def test_select_on_is_a_checked_option():
    assert resolve_config("heads", "synthetic").train.select_on == "val"
    with pytest.raises(ConfigError, match=r"train.select_on='train' is not valid: it expects one of val, test"):
        resolve_config("heads", "synthetic", overrides=["train.select_on=train"])


def test_ablate_select_on_test_marks_the_suite_and_its_report(synthetic_cache, tmp_path):
    suite = tmp_path / "lambda.yaml"
    suite.write_text("""
title: OTAM soft-min temperature
columns: [lambda]
reference: lam0.5
variants:
  - {name: lam0.1, columns: {lambda: 0.1}, set: [model.kind=otam, model.otam_lambda=0.1]}
  - {name: lam0.5, columns: {lambda: 0.5}, set: [model.kind=otam, model.otam_lambda=0.5]}
""")
    options = AblateOptions(suite=str(suite), select_on="test", root=synthetic_cache.parent.parent / "data",
                            cache_dir=synthetic_cache.parent, shots=(1,), episodes=8, eval_episodes=40,
                            overrides=("data.train_views=2", "train.val_episodes=10"), devices=("cpu",),
                            runs_dir=tmp_path / "runs", progress=False)
    with contextlib.redirect_stderr(io.StringIO()):
        result = run_ablation(options)
    assert result.suite_dir.name == "ablate-synthetic-clipspm-tiny-vit-lambda-select-test"
    for outcome in result.outcomes:
        run = Path(outcome.run_dir)
        assert validations(run, "test_acc") and json.loads((run / "results.json").read_text())["select_on"] == "test"
    assert "**Checkpoints chosen on the TEST split**" in result.report.markdown.read_text()
    with open(result.report.csv) as handle:
        assert {row["select_on"] for row in csv.DictReader(handle)} == {"test"}


def test_finetune_select_on_test_validates_on_the_stored_test_episodes(video_root, tmp_path):
    caches = tmp_path / "caches"
    extract(ExtractOptions(dataset="custom", root=video_root, backbone="clipspm-tiny-vit", pretrained="none",
                           train_views=0, cache_root=caches, workers=0, progress=False))
    cfg = resolve_config("finetune", "custom", overrides=[
        "data.dataset=custom", f"data.root={video_root}", "data.backbone=clipspm-tiny-vit", "data.pretrained=none",
        f"data.cache_dir={caches}", "data.train_views=0", "train.ways=2", "train.queries=1", "train.episodes=6",
        "train.episodes_per_step=2", "train.val_every=2", "train.log_every=2", "finetune.workers=0",
        "eval.episodes=30", "train.select_on=test"])
    run = tmp_path / "run"
    train_finetune(cfg, run, progress=False, device="cpu")
    episodes = sorted((Path(cfg.data.cache) / "episodes").glob("test-*"))
    assert [path.name for path in episodes] == ["test-2way-1shot-1query-30ep-seed0.safetensors"]
    best = assert_best_is_the_first_highest(run, "test_acc")
    result = evaluate_run(run, progress=False, device="cpu")
    assert result.select_on == "test" and result.episodes_file == str(episodes[0])
    # validation encodes the test views in memory (float32), eval reads them from the tuned cache (float16)
    assert result.accuracy == pytest.approx(best, abs=1 / 30)
