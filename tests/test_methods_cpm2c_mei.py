"""CLIP-CPM2C and CLIP-MEI: parity with their released heads, and a run from a cache through the CLI.

The fixtures (tests/fixtures/{cpm2c,clipmei}/README.md) hold the released modules' own numbers at a
small width in float64; the heads here, built from the shipped configs at that width and loaded with
the released weights through the fixtures' key maps, must give the same logits, 16-task loss and
gradients to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipspm.config import resolve_config
from clipspm.pipeline import Episode, build_head, episode_step, methods

from .conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
WIDTH = 16
TASKS = 16                      # released TASKS_PER_BATCH: every fixture case is one optimiser step
CASES = [(1, 1), (5, 4)]        # (K, M), 5-way
# The small width each fixture was made at (its README), and the released config values it was run with.
FIXTURE_MODEL = {
    "cpm2c": {"num_heads": 2, "head_dim": 8, "mlp_hidden": 24, "attention_dropout": 0.0, "mlp_dropout": 0.0,
              "appearance_coeff": 1.1, "motion_coeff": 0.7},
    "clipmei": {"num_heads": 2, "head_dim": 12, "mlp_hidden": 24, "prompt_hidden": 20, "attention_dropout": 0.0,
                "mlp_dropout": 0.0},
}
KINDS = list(FIXTURE_MODEL)


def close(actual, expected, name=""):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def key_map(kind: str) -> dict[str, str | None]:
    """Released parameter name -> ours (None: the released forward never uses it, so it is not built)."""
    return yaml.safe_load((FIXTURES / kind / "keys.yaml").read_text())


def released_head(kind: str):
    """(head with the fixture's released weights, the shipped loss section) at the fixture's width."""
    overrides = [f"model.kind={kind}", *(f"model.{key}={value}" for key, value in FIXTURE_MODEL[kind].items())]
    cfg = resolve_config("heads", "hmdb51", overrides=overrides)
    head = build_head(cfg.model, cfg.loss, WIDTH).double()
    weights = load_file(FIXTURES / kind / "weights.safetensors")
    keys = key_map(kind)
    assert set(keys) == set(weights), "the key map names exactly the released parameters"
    head.load_state_dict({keys[name]: value for name, value in weights.items() if keys[name] is not None}, strict=True)
    return head, cfg.loss


def fixture_episode(kind: str, shots: int, queries: int, training: bool) -> tuple[Episode, dict]:
    case = load_file(FIXTURES / kind / f"case-{shots}shot-{queries}query.safetensors")
    table = load_file(FIXTURES / kind / "text_table.safetensors")["text"]
    ids = case["class_ids"]
    episode = Episode(support=case["support"].double(), query=case["query"].double(),
                      query_labels=case["query_labels"], class_text=table[ids], class_ids=ids,
                      base_text=table if training else None, shots=shots)
    return episode, case


@pytest.mark.parametrize(("shots", "queries"), CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_logits_match_the_released_head(kind, shots, queries):
    head, _ = released_head(kind)
    episode, case = fixture_episode(kind, shots, queries, training=False)
    with torch.no_grad():
        close(head.eval()(episode).logits, case["logits_eval"], "logits")


@pytest.mark.parametrize(("shots", "queries"), CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_matches_the_released_16_task_accumulation(kind, shots, queries):
    head, loss_cfg = released_head(kind)
    episode, case = fixture_episode(kind, shots, queries, training=True)
    head.train()
    step = episode_step(head, episode, loss_cfg, TASKS)
    close(step.logits, case["logits_train"], "train logits")
    close(step.loss, case["loss"], "loss")
    ours = dict(head.named_parameters())
    grads = dict(zip(ours, torch.autograd.grad(step.loss, list(ours.values()))))
    for released, name in key_map(kind).items():
        if name is None:     # not built here: the released forward never uses it
            assert case[f"grad.{released}"].abs().max() == 0, released
        else:
            close(grads[name], case[f"grad.{released}"], f"grad of {released} ({name})")


def test_cpm2c_auxiliary_losses_are_the_released_terms():
    head, _ = released_head("cpm2c")
    episode, case = fixture_episode("cpm2c", 5, 4, training=True)
    aux = head.train()(episode).aux
    close(aux["consistency"], case["parts.consistency"].mean(), "consistency")
    logits = case["parts.class_logits"]                                          # [E, V, B]
    labels = torch.cat([episode.class_ids.repeat_interleave(5, 1), torch.gather(episode.class_ids, 1,
                                                                                episode.query_labels)], 1)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / TASKS
    close(aux["video_text"], expected, "video_text")


def test_clipmei_auxiliary_losses_are_the_released_terms():
    head, _ = released_head("clipmei")
    episode, case = fixture_episode("clipmei", 5, 4, training=True)
    aux = head.train()(episode).aux
    close(aux["motion"], (head.motion_alpha.detach() * case["parts.motion"]).mean(), "motion")
    close(aux["prompt"], case["parts.prompt"].mean(), "prompt")
    close(aux["consistency"], case["parts.consistency"].mean(), "consistency")
    close(aux["motion"] + aux["prompt"] + aux["consistency"], case["parts.dists"].mean(), "dists")


@pytest.mark.parametrize("kind", KINDS)
def test_batched_episodes_equal_separate_episodes(kind):
    # One step over E episodes is the released accumulation of E tasks: same loss, same gradient.
    head, loss_cfg = released_head(kind)
    episode, _ = fixture_episode(kind, 5, 4, training=True)
    episode = episode.select(slice(0, 3))
    params = list(head.train().parameters())
    batched = episode_step(head, episode, loss_cfg, 3)
    batched_grads = torch.autograd.grad(batched.loss, params)
    singles = [episode_step(head, episode.select(e), loss_cfg, 3) for e in range(3)]
    for e, single in enumerate(singles):
        close(single.logits[0], batched.logits[e], "logits")
    close(batched.loss, torch.stack([single.loss for single in singles]).mean(), "loss")
    single_grads = [torch.autograd.grad(single.loss, params) for single in singles]
    for (name, _), grad, *per_episode in zip(head.named_parameters(), batched_grads, *single_grads):
        close(grad, torch.stack(per_episode).mean(0), name)


def test_cpm2c_motion_stream_is_off_on_ucf101_as_released():
    assert resolve_config("heads", "ucf101", overrides=["model.kind=cpm2c"]).model.motion_coeff == 0
    assert resolve_config("heads", "hmdb51", overrides=["model.kind=cpm2c"]).model.motion_coeff == 1


@pytest.mark.parametrize("kind", KINDS)
def test_method_is_listed_as_running_from_a_cache_with_its_parity(kind, tmp_path):
    method = methods()[kind]
    assert method.refusal() is None and "1e-5" in method.parity
    listed = run_cli("methods", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    block = listed.stdout.split(f"{kind}  ", 1)[1].split("\n\n", 1)[0]
    assert "runs from a feature cache" in block and "tests/fixtures/" + kind in block.replace("\n", " ")


@pytest.mark.parametrize("kind", KINDS)
def test_method_trains_and_evaluates_from_a_cache(kind, synthetic_cache, tmp_path):
    run = tmp_path / "runs" / kind
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache),
                      "--set", f"model.kind={kind}", "--episodes", "32", "--set", "train.val_every=32",
                      "--set", "train.val_episodes=20", "--run-dir", str(run), "--no-progress", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["kind"] == kind and config["loss"]["ce"] == "sum"
    evaluated = run_cli("eval", str(run), "--episodes", "50", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 50 and 0 <= results["accuracy"] <= 1
