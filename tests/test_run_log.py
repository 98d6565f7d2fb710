"""What a run tells while it trains: metrics.jsonl and TensorBoard event files, the progress bar, results.json."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipspm.stages.evaluate import evaluate_run
from clipspm.stages.heads import train_heads
from tests.conftest import heads_config

SCHEDULE = ("train.episodes=480", "train.val_every=160", "train.log_every=160", "train.val_episodes=50")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files, as TensorBoard reads the directory: tag -> [(step, value)]."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_are_written_as_tensorboard_scalars(synthetic_cache, tmp_path):
    run = tmp_path / "run"
    train_heads(heads_config(synthetic_cache, *SCHEDULE), run, progress=False)
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file in the run directory"
    logged = scalars(run)
    train = [record for record in records(run) if "loss" in record]
    val = [record for record in records(run) if "val_acc" in record]
    assert {"train/loss", "train/ce", "train/accuracy", "train/episodes_per_s", "val/accuracy"} <= set(logged)
    assert [step for step, _ in logged["train/loss"]] == [record["episode"] for record in train] == [160, 320, 480]
    assert [value for _, value in logged["train/loss"]] == pytest.approx([record["loss"] for record in train])
    assert [step for step, _ in logged["val/accuracy"]] == [record["episode"] for record in val] == [160, 320, 480]
    assert [value for _, value in logged["val/accuracy"]] == pytest.approx([record["val_acc"] for record in val])


def test_a_resumed_run_does_not_log_a_step_twice(synthetic_cache, tmp_path):
    """A kill can land after the event file got records past the last checkpoint (the writer flushes every
    minute): here a run logged to episode 480 is given back its checkpoint of episode 160, as such a kill leaves
    it, and resumed. TensorBoard must then show each step once, with the resumed run's values."""
    run, early = tmp_path / "run", tmp_path / "early"
    train_heads(heads_config(synthetic_cache, *SCHEDULE), run, progress=False)
    train_heads(heads_config(synthetic_cache, *SCHEDULE[1:], "train.episodes=160"), early, progress=False)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(early / "checkpoints", run / "checkpoints")   # the same first 160 episodes: steps are seeded
    before = scalars(run)
    assert [step for step, _ in before["val/accuracy"]] == [160, 320, 480]

    train_heads(heads_config(synthetic_cache, *SCHEDULE), run, resume=True, progress=False)
    logged = scalars(run)
    for tag in ("train/loss", "val/accuracy", "train/episodes_per_s"):
        steps = [step for step, _ in logged[tag]]
        assert steps == [160, 320, 480], f"{tag}: {steps}"
    assert [record["episode"] for record in records(run) if "val_acc" in record] == [160, 320, 480]
    assert [value for _, value in logged["val/accuracy"]] == pytest.approx(
        [record["val_acc"] for record in records(run) if "val_acc" in record])


def test_a_finished_run_shows_dashes_not_zeros_for_metrics_it_did_not_compute(synthetic_cache, tmp_path):
    run = tmp_path / "run"
    cfg = heads_config(synthetic_cache, *SCHEDULE)
    train_heads(cfg, run, progress=False)
    shown = io.StringIO()
    console = Console(file=shown, width=200, force_terminal=False)
    train_heads(cfg, run, resume=True, progress=True, console=console)   # a warm rerun: nothing left to train
    text = shown.getvalue()
    assert "480/480" in text and "loss - acc -" in text and "- ep/s" in text, text
    assert "0.000" not in text and "0.0 ep/s" not in text, text


def test_results_name_the_cache_and_the_episodes_by_absolute_path(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("run")   # a relative run directory, as `clipspm train --run-dir run` gives
    train_heads(heads_config(synthetic_cache, *SCHEDULE), run, progress=False)
    result = evaluate_run(run, episodes=20, progress=False)
    saved = json.loads((run / "results.json").read_text())
    assert saved["episodes_file"] == result.episodes_file
    assert Path(saved["episodes_file"]).is_absolute() and Path(saved["episodes_file"]).is_file()
    assert Path(saved["cache"]).is_absolute() and Path(saved["cache"]) == synthetic_cache.resolve()
