"""CLIP-FSAR and STEN: parity with the code their numbers come from (tests/fixtures/clipfsar, tests/fixtures/sten,
each with a README saying how the numbers were made) and runs from a feature cache through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipspm.config import resolve_config
from clipspm.pipeline import Episode, build_head, episode_step, methods
from tests.conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["case-1shot-1query", "case-5shot-4query"]
WAYS, EPISODES_PER_STEP = 5, 16
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# The fixture's widths (its README): the released transformer rebuilt at C = 12 with 4 heads and MLP 24, dropout 0.
CLIPFSAR_WIDTH = {"dim": 12, "model": {"num_heads": 4, "mlp_hidden": 24, "attention_dropout": 0.0, "mlp_dropout": 0.0}}


def released_case(method: str, case: str) -> tuple[Episode, dict]:
    """A fixture case as our Episode (float64, inputs that record their gradient) and its expected numbers."""
    expected = load_file(FIXTURES / method / f"{case}.safetensors")
    text = load_file(FIXTURES / method / "text_table.safetensors")["text"]
    support, query = (expected[name].double().requires_grad_() for name in ("support", "query"))
    episode = Episode(support=support, query=query, query_labels=expected["query_labels"],
                      class_text=text[expected["class_ids"]], class_ids=expected["class_ids"], base_text=text,
                      shots=support.shape[1] // WAYS)
    return episode, expected


def method_config(kind: str, dataset: str, **model) -> tuple[dict, dict]:
    """The shipped (model, loss) sections of `kind` for `dataset`, with `model` overrides."""
    overrides = [f"model.kind={kind}", *(f"model.{key}={value}" for key, value in model.items())]
    cfg = resolve_config("heads", dataset, overrides=overrides)
    return dict(cfg.model), dict(cfg.loss)


def assert_input_gradients(episode: Episode, expected: dict) -> None:
    for name in ("support", "query"):
        want = expected[f"grad_input.{name}"].double()   # stored as float32: compare relative to their size
        torch.testing.assert_close(getattr(episode, name).grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def released_clipfsar() -> tuple[torch.nn.Module, dict, dict]:
    """Our CLIP-FSAR head at the fixture's width holding the released weights; the key map; the loss section."""
    model_cfg, loss_cfg = method_config("clipfsar", "hmdb51", **CLIPFSAR_WIDTH["model"])   # the fixture ran HMDB51's
    head = build_head(model_cfg, loss_cfg, CLIPFSAR_WIDTH["dim"]).double()
    keys = yaml.safe_load((FIXTURES / "clipfsar" / "keys.yaml").read_text())
    released = load_file(FIXTURES / "clipfsar" / "weights.safetensors")
    head.load_state_dict({keys[key]: value for key, value in released.items()}, strict=True)
    return head, keys, loss_cfg


@pytest.mark.parametrize("case", CASES)
def test_clipfsar_matches_the_released_head(case):
    head, keys, loss_cfg = released_clipfsar()
    assert loss_cfg["video_text"] == 1.2 and loss_cfg["ce"] == "mean" and not loss_cfg["aux_per_task"]
    assert sorted(keys.values()) == sorted(name for name, _ in head.named_parameters())
    episode, expected = released_case("clipfsar", case)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(episode).logits, expected["logits_eval"], **TOLERANCE)
    result = episode_step(head.train(), episode, loss_cfg, EPISODES_PER_STEP)
    torch.testing.assert_close(result.loss, expected["loss"], **TOLERANCE)
    result.loss.backward()
    parameters = dict(head.named_parameters())
    for released_key, our_key in keys.items():
        torch.testing.assert_close(parameters[our_key].grad, expected[f"grad.{released_key}"], **TOLERANCE,
                                   msg=lambda text, key=released_key: f"{key}: {text}")
    assert_input_gradients(episode, expected)


def test_clipfsar_video_text_loss_trains_only_its_scale_from_a_cache():
    # The released loss classifies the CLIP frames themselves, before the transformer: on frozen features
    # nothing but its scale can move it.
    head, _, loss_cfg = released_clipfsar()
    episode, _ = released_case("clipfsar", CASES[0])
    aux = head.train()(episode).aux["video_text"]
    grads = torch.autograd.grad(aux, list(head.parameters()), allow_unused=True)
    moved = {name for (name, _), grad in zip(head.named_parameters(), grads) if grad is not None and grad.any()}
    assert moved == {"text_scale"}


def test_clipfsar_video_text_weight_is_the_released_one_per_dataset():
    weights = {dataset: method_config("clipfsar", dataset)[1]["video_text"]
               for dataset in ("hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full")}
    assert weights == {"hmdb51": 1.2, "ucf101": 1.5, "kinetics100": 1.5, "ssv2_small": 3.0, "ssv2_full": 3.0}


@pytest.mark.parametrize("case", CASES)
def test_sten_matches_the_clipspm_code_base(case):
    model_cfg, loss_cfg = method_config("sten", "ucf101")
    assert loss_cfg["ce"] == "sum"
    head = build_head(model_cfg, loss_cfg, 8)
    assert not list(head.parameters())
    episode, expected = released_case("sten", case)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(episode).logits, expected["logits_eval"], **TOLERANCE)
    result = episode_step(head.train(), episode, loss_cfg, EPISODES_PER_STEP)
    torch.testing.assert_close(result.loss, expected["loss"], **TOLERANCE)
    result.loss.backward()
    assert_input_gradients(episode, expected)


@pytest.mark.parametrize("kind", ["clipfsar", "sten"])
def test_method_trains_and_evaluates_from_a_cache(kind, synthetic_cache, tmp_path):
    run = tmp_path / kind
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache),
                      "--run-dir", str(run), "--episodes", "32", "--set", f"model.kind={kind}",
                      "--set", "train.val_every=32", "--set", "train.val_episodes=20", "--no-progress", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["kind"] == kind and config["model"]["num_templates"] == 1
    evaluated = run_cli("eval", str(run), "--episodes", "50", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 50 and 0 <= results["accuracy"] <= 1


def test_methods_lists_both_with_their_parity(tmp_path):
    listed = run_cli("methods", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split("  ")[0] in methods()] + [len(lines)]
    for name in ("clipfsar", "sten"):
        start = next(i for i in headers if lines[i].startswith(f"{name}  "))
        block = " ".join(" ".join(lines[start:headers[headers.index(start) + 1]]).split())   # lines wrap
        assert "runs from a feature cache" in block and f"tests/fixtures/{name}" in block
