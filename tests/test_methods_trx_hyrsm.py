"""TRX and HyRSM: parity with their authors' released heads (tests/fixtures/{trx,hyrsm}), batching,
their own errors, their per-dataset defaults, and training from a cache through the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipspm.config import resolve_config
from clipspm.errors import ClipspmError
from clipspm.pipeline import Episode, build_head, episode_step
from clipspm.pipeline.methods import method_options
from tests.conftest import run_cli
from tests.test_heads import make_episode

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [(1, 1), (1, 4), (5, 4)]     # (K, M), 16 five-way episodes each, T = 8, C = 16
WIDTH, WAYS, BASE_CLASSES = 16, 5, 64
# The settings the fixtures were made with (their README.md); everything else is the default.
PARITY = {
    "trx": ({"kind": "trx", "out_dim": 24, "dropout": 0.0}, {}),
    "hyrsm": ({"kind": "hyrsm", "num_heads": 2, "position_a": 2048.0, "position_b": 0.01, "position_dropout": 0.0,
               "intra_dropout": 0.0, "inter_attention_dropout": 0.0, "inter_dropout": 0.0, "num_classes": 64},
              {"classification": 0.4}),
}
# the released training loss, as our loss options (trx: CE summed over queries; hyrsm: CE means)
RELEASED_LOSS = {"trx": {"ce": "sum"}, "hyrsm": {"ce": "mean", "aux_per_task": False}}


def our_key(table: dict, released: str) -> str | None:
    """The parameter of ours that a released state-dict key maps to (keys.json), or None."""
    for pattern, ours in table["keys"].items():
        match = re.fullmatch(re.escape(pattern.replace("{i}", "@")).replace("@", r"(\d+)"), released)
        if match:
            return ours.replace("{i}", match.group(1)) if ours and match.groups() else ours
    raise KeyError(f"{released} is not in keys.json")


def released_head(method: str):
    """Our head at the fixture's width and settings, holding the released weights; its key mapping; its loss."""
    model, loss = PARITY[method]
    loss = {**loss, **RELEASED_LOSS[method]}
    _, _, loss_options = method_options(model, loss)
    head = build_head(model, loss, WIDTH).double()
    table = json.loads((FIXTURES / method / "keys.json").read_text())
    weights = load_file(FIXTURES / method / "weights.safetensors")
    mapping = {key: our_key(table, key) for key in weights}
    shapes = {name: p.shape for name, p in head.named_parameters()}
    head.load_state_dict({ours: weights[key].reshape(shapes[ours]) for key, ours in mapping.items() if ours},
                         strict=True)          # strict: every parameter of ours comes from a released one
    return head, mapping, loss_options.model_dump()


def fixture_episode(case: dict, shots: int) -> Episode:
    episodes = case["support"].shape[0]
    class_ids = case.get("class_ids", torch.arange(WAYS).expand(episodes, -1))
    return Episode(support=case["support"].double(), query=case["query"].double(), query_labels=case["query_labels"],
                   class_text=torch.zeros(episodes, WAYS, WIDTH, dtype=torch.float64), class_ids=class_ids,
                   base_text=torch.zeros(BASE_CLASSES, WIDTH, dtype=torch.float64), shots=shots)


@pytest.mark.parametrize("shots,queries", CASES)
@pytest.mark.parametrize("method", ["trx", "hyrsm"])
def test_logits_loss_and_gradients_equal_the_released_head(method, shots, queries):
    head, mapping, loss_cfg = released_head(method)
    case = load_file(FIXTURES / method / f"case-{shots}shot-{queries}query.safetensors")
    episode = fixture_episode(case, shots)
    with torch.no_grad():
        logits = head.eval()(episode).logits
    torch.testing.assert_close(logits, case["logits_eval"], atol=1e-5, rtol=1e-5)

    head.train()
    step = episode_step(head, episode, loss_cfg, 16)       # their 16 tasks of one optimiser step, batched
    torch.testing.assert_close(step.loss, case["loss"], atol=1e-5, rtol=1e-5)
    parameters = dict(head.named_parameters())
    grads = dict(zip(parameters, torch.autograd.grad(step.loss, list(parameters.values()))))
    released = {key[len("grad."):]: value for key, value in case.items() if key.startswith("grad.")}
    assert set(released) <= set(mapping)
    for key, grad in released.items():
        ours = mapping[key]
        if ours is None:                                   # built but unused by their forward
            assert grad.abs().max() == 0, key
        else:
            torch.testing.assert_close(grads[ours], grad.reshape(grads[ours].shape), atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("method", ["trx", "hyrsm"])
def test_batched_episodes_equal_separate_episodes(method):
    # One step over E episodes is the accumulation over E episodes: same loss, same gradients.
    head, _, loss_cfg = released_head(method)
    episode = make_episode(episodes=3, shots=3, dim=WIDTH, dtype=torch.float64)
    head.train()
    params = list(head.parameters())
    batched = episode_step(head, episode, loss_cfg)
    batched_grads = torch.autograd.grad(batched.loss, params)
    singles = [episode_step(head, episode.select(e), loss_cfg) for e in range(3)]
    for e, single in enumerate(singles):
        torch.testing.assert_close(single.logits[0], batched.logits[e])
    torch.testing.assert_close(batched.loss, torch.stack([single.loss for single in singles]).mean())
    single_grads = [torch.autograd.grad(single.loss, params) for single in singles]
    for grad, *separate in zip(batched_grads, *single_grads):
        torch.testing.assert_close(grad, torch.stack(separate).mean(0))


def test_trx_averages_its_cardinalities():
    head, _, _ = released_head("trx")
    episode = fixture_episode(load_file(FIXTURES / "trx" / "case-1shot-4query.safetensors"), 1)
    with torch.no_grad():
        both = head.eval()(episode).logits
        pairs = build_head({"kind": "trx", "out_dim": 24, "cardinalities": [2]}, {}, WIDTH).double().eval()
        triples = build_head({"kind": "trx", "out_dim": 24, "cardinalities": [3]}, {}, WIDTH).double().eval()
        pairs.cross_transformers[0].load_state_dict(head.cross_transformers[0].state_dict())
        triples.cross_transformers[0].load_state_dict(head.cross_transformers[1].state_dict())
        torch.testing.assert_close(both, (pairs(episode).logits + triples(episode).logits) / 2)


def test_trx_refuses_tuples_longer_than_the_video():
    head = build_head({"kind": "trx", "cardinalities": [2, 9]}, {}, WIDTH)
    with pytest.raises(ClipspmError, match="cardinalities holds 9, more than the T=8 frames"):
        head(make_episode(dim=WIDTH))


def test_hyrsm_classification_loss_is_for_training_episodes_only():
    head = build_head({"kind": "hyrsm", "num_heads": 2}, {}, WIDTH)
    episode = make_episode(dim=WIDTH)                      # base_text set: a training episode over 12 classes
    assert set(head.train()(episode).aux) == {"classification"}
    assert head.train()(replace(episode, base_text=None)).aux == {}
    assert head.eval()(episode).aux == {}
    too_few = build_head({"kind": "hyrsm", "num_heads": 2, "num_classes": 10}, {}, WIDTH).train()
    with pytest.raises(ClipspmError, match="num_classes=10 is less than the 12 training classes"):
        too_few(episode)


def test_hyrsm_defaults_follow_the_released_dataset_configs():
    kinetics = resolve_config("heads", "kinetics100", overrides=["model.kind=hyrsm"])
    assert (kinetics.model.num_classes, kinetics.model.position_a, kinetics.model.position_b) == (64, 2048.0, 0.01)
    assert kinetics.loss.classification == 0.4 and kinetics.loss.ce == "mean"
    assert resolve_config("heads", "hmdb51", overrides=["model.kind=hyrsm"]).model.num_classes == 31
    assert resolve_config("heads", "ssv2_full", overrides=["model.kind=hyrsm"]).loss.classification == 0.6
    assert resolve_config("heads", "synthetic", overrides=["model.kind=hyrsm"]).model.num_classes == 16
    trx = resolve_config("heads", "hmdb51", overrides=["model.kind=trx"])
    assert trx.loss.ce == "sum" and list(trx.model.cardinalities) == [2, 3] and trx.model.out_dim == 1152


# TRX at its released key/value width (1152) makes a CPU step slow; the plumbing is the same at 128.
@pytest.mark.parametrize("method,overrides", [("trx", ["--set", "model.out_dim=128"]), ("hyrsm", [])])
def test_method_trains_and_evaluates_from_a_cache_through_the_cli(method, overrides, synthetic_cache, tmp_path):
    run = tmp_path / method
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache),
                      "--set", f"model.kind={method}", "--episodes", "32", "--set", "train.val_every=32",
                      "--set", "train.val_episodes=20", *overrides, "--run-dir", str(run), "--no-progress",
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert f"kind: {method}" in (run / "config.yaml").read_text()
    evaluated = run_cli("eval", str(run), "--episodes", "50", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 50 and 0 <= results["accuracy"] <= 1


def test_clipspm_methods_lists_trx_and_hyrsm_as_running_from_a_cache(tmp_path):
    listed = run_cli("methods", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    for name, title in [("trx", "TRX"), ("hyrsm", "HyRSM")]:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}  {title}"))
        header = re.compile(r"\S+  .* \((trained|no parameters)\)$")
        end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
        block = [line.split() for line in lines[start + 1:end]]
        assert ["input", "runs", "from", "a", "feature", "cache"] in block
