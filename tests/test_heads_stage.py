"""Stage two from a user's point of view: training from the cache, resuming, evaluating, comparing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipspm.errors import CacheError
from clipspm.stages.checkpoint import load_checkpoint
from clipspm.stages.episodes import EpisodeSampler, step_generator
from clipspm.stages.evaluate import compare_runs, evaluate_run, mean_ci, read_result
from clipspm.stages.heads import train_heads
from tests.conftest import heads_config, kill_after_first_checkpoint, run_cli


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_episode_sampler_draws_valid_class_major_episodes():
    labels = torch.arange(12).repeat_interleave(7)[torch.randperm(84)]
    sampler = EpisodeSampler(labels, ways=5, shots=3, queries=2)
    index = sampler.sample(50, step_generator(0, 0, torch.device("cpu")))
    assert index.support.shape == (50, 15) and index.query.shape == (50, 10) and index.classes.shape == (50, 5)
    for e in range(50):
        assert len(set(index.classes[e].tolist())) == 5
        videos = torch.cat([index.support[e], index.query[e]]).tolist()
        assert len(set(videos)) == 25, "a video appears twice in one episode"
        np.testing.assert_array_equal(labels[index.support[e]].view(5, 3), index.classes[e][:, None].expand(5, 3))
        np.testing.assert_array_equal(labels[index.query[e]].view(5, 2), index.classes[e][:, None].expand(5, 2))


def test_sampler_refuses_a_split_too_small_for_the_protocol():
    with pytest.raises(Exception, match="need 5 classes"):
        EpisodeSampler(torch.arange(4).repeat_interleave(10), ways=5, shots=1, queries=1)


def test_loss_decreases_on_a_small_synthetic_cache(synthetic_cache, tmp_path):
    train_heads(heads_config(synthetic_cache), tmp_path / "run", progress=False)
    losses = [m["ce"] for m in metrics(tmp_path / "run") if "ce" in m]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


def test_full_model_beats_chance_by_a_wide_margin_on_held_out_classes(synthetic_cache, tmp_path):
    cfg = heads_config(synthetic_cache, "train.episodes=1600", "train.val_every=400", "train.val_episodes=300")
    train_heads(cfg, tmp_path / "full", progress=False)
    result = evaluate_run(tmp_path / "full", episodes=2000, progress=False)
    assert result.accuracy - result.ci95 > 0.35, result  # 5-way chance is 0.20; test classes were never trained on


def test_parameter_free_baselines_are_evaluated_without_training(synthetic_cache, tmp_path):
    for kind in ("protonet", "otam"):
        result = train_heads(heads_config(synthetic_cache, f"model.kind={kind}"), tmp_path / kind, progress=False)
        assert not result.trained and result.episodes == 0
        assert (tmp_path / kind / "checkpoints" / "best" / "heads.safetensors").exists()


def test_resume_after_kill_equals_the_uninterrupted_run(synthetic_cache, tmp_path):
    overrides = ["train.episodes=960", "train.val_every=160", "train.log_every=160"]
    clean = tmp_path / "clean"
    train_heads(heads_config(synthetic_cache, *overrides), clean, progress=False)

    killed = tmp_path / "killed"
    args = ["train", "--stage", "heads", "--cache", str(synthetic_cache), "--run-dir", str(killed), "--no-progress",
            "--set", "train.episodes=960", "--set", "train.val_every=160", "--set", "train.log_every=160",
            "--set", "train.val_episodes=100"]
    assert kill_after_first_checkpoint(args, killed) < 960, "the kill should land mid-run"

    train_heads(heads_config(synthetic_cache, *overrides), killed, resume=True, progress=False)
    a = load_file(str(clean / "checkpoints" / "last" / "heads.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "heads.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    strip = lambda records: [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in records]
    assert strip(metrics(clean)) == strip(metrics(killed))


def test_cache_of_another_backbone_or_dataset_is_refused_before_training(synthetic_cache, tmp_path):
    with pytest.raises(CacheError, match=r"RN50.*64 wide.*1024"):
        train_heads(heads_config(synthetic_cache, "data.backbone=RN50"), tmp_path / "a", progress=False)
    with pytest.raises(CacheError, match="hmdb51"):
        cfg = heads_config(synthetic_cache)
        cfg.data.dataset = "hmdb51"
        train_heads(cfg, tmp_path / "b", progress=False)
    with pytest.raises(CacheError, match="T=16"):
        train_heads(heads_config(synthetic_cache, "data.num_frames=16"), tmp_path / "c", progress=False)
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abc")


def test_checkpoints_load_without_unpickling(synthetic_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_heads(heads_config(synthetic_cache, "train.episodes=160"), run, progress=False)
    for path in (run / "checkpoints").rglob("*"):
        if path.is_file():
            assert path.suffix in {".safetensors", ".json"}, path
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must not be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    from clipspm.pipeline.methods import build_head

    cfg = heads_config(synthetic_cache)
    head = build_head(cfg.model, cfg.loss, 64)
    optimizer = torch.optim.Adam(head.parameters())
    state = load_checkpoint(run / "checkpoints" / "last", heads=head, optimizer=optimizer)
    assert state["episode"] == 160 and optimizer.state


def test_checkpoint_of_another_width_is_a_clear_error(synthetic_cache, tmp_path):
    from clipspm.errors import ClipspmError
    from clipspm.pipeline.methods import build_head

    run = tmp_path / "run"
    train_heads(heads_config(synthetic_cache, "train.episodes=160"), run, progress=False)
    cfg = heads_config(synthetic_cache)
    with pytest.raises(Exception, match="does not fit|size mismatch|shape"):
        load_checkpoint(run / "checkpoints" / "best", heads=build_head(cfg.model, cfg.loss, 128))
    with pytest.raises(ClipspmError, match="other switches"):
        load_checkpoint(run / "checkpoints" / "best",
                        heads=build_head({**cfg.model, "padm": False}, cfg.loss, 64))


def test_evaluation_uses_stored_episodes_and_compare_is_the_paired_difference(synthetic_cache, tmp_path):
    runs = {}
    for kind in ("protonet", "otam"):
        runs[kind] = tmp_path / kind
        train_heads(heads_config(synthetic_cache, f"model.kind={kind}"), runs[kind], progress=False)
        result = evaluate_run(runs[kind], episodes=300, progress=False)
        assert result.episodes == 300 and result.queries == 1
    first, acc_otam = read_result(runs["otam"])
    again = evaluate_run(runs["otam"], episodes=300, progress=False)
    assert again.episodes_sha256 == first["episodes_sha256"] and again.accuracy == first["accuracy"]
    _, acc_proto = read_result(runs["protonet"])
    comparison = compare_runs(runs["otam"], runs["protonet"])
    differences = acc_otam.astype(np.float64) - acc_proto.astype(np.float64)
    assert comparison.difference == pytest.approx(differences.mean())
    assert comparison.ci95 == pytest.approx(1.96 * differences.std(ddof=1) / np.sqrt(300))
    assert mean_ci(acc_otam)[0] == pytest.approx(first["accuracy"])


def test_compare_refuses_runs_scored_on_different_episodes(synthetic_cache, tmp_path):
    from clipspm.errors import ClipspmError

    for kind, count in (("protonet", 100), ("otam", 200)):
        train_heads(heads_config(synthetic_cache, f"model.kind={kind}"), tmp_path / kind, progress=False)
        evaluate_run(tmp_path / kind, episodes=count, progress=False)
    with pytest.raises(ClipspmError, match="different episodes"):
        compare_runs(tmp_path / "protonet", tmp_path / "otam")


def test_cli_train_then_eval(synthetic_cache, tmp_path):
    run = tmp_path / "runs" / "cli"
    trained = run_cli("train", "--stage", "heads", "--cache", str(synthetic_cache), "--run-dir", str(run),
                      "--episodes", "160", "--set", "train.val_every=160", "--set", "train.val_episodes=50",
                      "--set", "model.padm=false", "--no-progress", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "best val accuracy" in trained.stdout
    assert "padm: false" in (run / "config.yaml").read_text()
    again = run_cli("train", "--stage", "heads", "--cache", str(synthetic_cache), "--run-dir", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    evaluated = run_cli("eval", str(run), "--episodes", "200", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 200 and 0 <= results["accuracy"] <= 1 and results["ci95"] > 0
    assert f"{100 * results['accuracy']:.2f}" in evaluated.stdout
