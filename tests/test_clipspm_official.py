"""CLIP-SPM's two profiles: `official` is the released head (parity with the authors' code), `paper` is the
head of commit c7b9547 unchanged; the official profile is the default, with the released data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

from clipspm.config import resolve_config
from clipspm.errors import ClipspmError
from clipspm.pipeline import Episode, build_head, episode_step, frame_distances
from clipspm.pipeline.methods.clipspm import released_head_widths, released_heads_state_dict, released_keys
from clipspm.pipeline.released_layers import COSINE_EPSILON, released_cosine
from tests.conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL, PAPER = FIXTURES / "clipspm_official", FIXTURES / "clipspm_paper"
# The width the released head was run at for the fixture (its README): C = 16, 2 heads x 8, MLPs 24, dropout 0.
FIXTURE_WIDTH = ["model.num_heads=2", "model.head_dim=8", "model.mlp_hidden=24", "model.prompt_hidden=24",
                 "model.attention_dropout=0.0", "model.mlp_dropout=0.0"]
OFFICIAL_CASES = [(1, 1), (1, 4), (5, 1), (5, 4)]


def official_config(*overrides: str):
    """The default heads config of hmdb51 (the fixture's gate parameters are the hmdb line of run/run.py)."""
    return resolve_config("heads", "hmdb51", overrides=[*FIXTURE_WIDTH, *overrides])


def official_head(cfg) -> torch.nn.Module:
    head = build_head(cfg.model, cfg.loss, 16).double()
    head.load_state_dict(released_heads_state_dict(load_file(str(OFFICIAL / "weights.safetensors"))), strict=True)
    return head


def fixture_episode(case: dict, text: torch.Tensor, shots: int) -> Episode:
    return Episode(support=case["support"].double(), query=case["query"].double(), query_labels=case["query_labels"],
                   class_text=text[case["class_ids"]], class_ids=case["class_ids"], base_text=text, shots=shots)


def official_case(shots: int, queries: int) -> tuple[dict, Episode]:
    case = load_file(str(OFFICIAL / f"case-{shots}shot-{queries}query.safetensors"))
    return case, fixture_episode(case, load_file(str(OFFICIAL / "text_table.safetensors"))["text"], shots)


def gradients(head: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*head.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize(("shots", "queries"), OFFICIAL_CASES)
def test_official_profile_matches_the_released_head(shots, queries):
    cfg = official_config()
    head = official_head(cfg)
    case, episode = official_case(shots, queries)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(episode).logits, case["logits_eval"], atol=1e-5, rtol=1e-5)
    step = episode_step(head.train(), episode, cfg.loss, 16)     # one step of the released 16-task accumulation
    torch.testing.assert_close(step.logits, case["logits_train"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.loss, case["loss"], atol=1e-5, rtol=1e-5)
    grads = gradients(head, step.loss)
    for key, entry in released_keys()["keys"].items():
        torch.testing.assert_close(grads[entry["to"]], case[f"grad.{key}"], atol=1e-5, rtol=1e-5, msg=key)
    assert set(grads) == {entry["to"] for entry in released_keys()["keys"].values()}


def test_released_keys_the_mapping_ignores_get_no_gradient_there():
    case, _ = official_case(5, 4)
    for key in released_keys()["ignored"]:
        assert case[f"grad.{key}"].abs().max() == 0


@pytest.mark.parametrize("shots", [1, 5])
def test_paper_profile_reproduces_the_head_of_c7b9547(shots):
    cfg = resolve_config("heads", "synthetic", overrides=["model.profile=paper", "model.num_heads=4",
                                                          "model.dropout=0.0"])
    head = build_head(cfg.model, cfg.loss, 32).double()
    load_model(head, str(PAPER / "weights.safetensors"))
    case = load_file(str(PAPER / f"case-{shots}shot.safetensors"))
    episode = fixture_episode(case, load_file(str(PAPER / "text_table.safetensors"))["text"], shots)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(episode).logits, case["logits_eval"], atol=1e-12, rtol=1e-12)
    step = episode_step(head.train(), episode, cfg.loss)
    torch.testing.assert_close(step.logits, case["logits_train"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(step.loss, case["loss"], atol=1e-12, rtol=1e-12)
    grads = gradients(head, step.loss)
    assert {f"grad.{name}" for name in grads} == {key for key in case if key.startswith("grad.")}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, case[f"grad.{name}"], atol=1e-12, rtol=1e-12, msg=name)


def test_official_is_the_default_profile_with_the_released_data():
    cfg = resolve_config("heads", "hmdb51")
    assert cfg.model.profile == "official"
    assert (cfg.model.gate_text_ratio, cfg.model.gate_vision_ratio, cfg.model.gate_slope, cfg.model.fusion_alpha) \
        == (1.5, 0.5, 0.0025, 0.2)
    assert (cfg.model.num_heads, cfg.model.head_dim, cfg.model.mlp_hidden, cfg.model.prompt_hidden) == (8, 256, 2048,
                                                                                                         2048)
    assert resolve_config("heads", "synthetic").model.head_dim == 16     # the smoke benchmark's scaled widths
    assert (cfg.model.attention_dropout, cfg.model.mlp_dropout, cfg.model.cosine_eps) == (0.2, 0.05, 0.01)
    assert (cfg.loss.ce, cfg.loss.aux_per_task, cfg.loss.lambda_h, cfg.loss.lambda_s) == ("sum", True, 0.001, 0.0)
    assert list(cfg.train.betas) == [0.5, 0.999] and cfg.train.episodes_per_step == 16
    ucf = resolve_config("heads", "ucf101").model
    assert (ucf.gate_text_ratio, ucf.gate_vision_ratio, ucf.gate_slope, ucf.fusion_alpha) == (2.0, 2.0, 0.054, 0.228)
    finetune = resolve_config("finetune", "hmdb51")
    assert (finetune.train.lr, finetune.train.weight_decay, finetune.finetune.tower_lr,
            finetune.finetune.tower_weight_decay) == (1e-5, 5e-5, 1e-5, 5e-5)
    assert (finetune.train.episodes, finetune.eval.episodes, finetune.eval.queries) == (20000, 10000, 1)
    ssv2 = resolve_config("finetune", "ssv2_full")
    assert (ssv2.train.lr, ssv2.train.weight_decay, ssv2.finetune.tower_lr, ssv2.train.episodes) == (1.6e-5, 9.7e-4,
                                                                                                    1.6e-5, 100000)
    assert resolve_config("heads", "ssv2_full").train.lr == resolve_config("heads", "hmdb51").train.lr
    paper = resolve_config("heads", "hmdb51", overrides=["model.profile=paper"])
    assert (paper.model.cosine_eps, paper.loss.ce, paper.loss.lambda_s, list(paper.train.betas)) == (0.0, "mean",
                                                                                                     0.001, [0.9, 0.999])


@pytest.mark.parametrize("training", [False, True])
def test_official_head_never_reads_query_labels(training):
    head = official_head(official_config()).train(training)
    _, episode = official_case(5, 4)
    with torch.no_grad():
        logits = head(episode).logits
        scrambled = replace(episode, query_labels=episode.query_labels[:, torch.randperm(20)])
        torch.testing.assert_close(head(scrambled).logits, logits, atol=0, rtol=0)


# option -> a value other than the default; each must change what the official head computes
OFFICIAL_OPTIONS = {"num_heads": 4, "head_dim": 4, "mlp_hidden": 12, "prompt_hidden": 12, "gate_text_ratio": 2.0,
                    "gate_vision_ratio": 2.0, "gate_slope": 0.5, "fusion_alpha": 0.9, "cosine_eps": 0.5,
                    "attention_dropout": 0.5, "mlp_dropout": 0.5, "sf_gate": False, "sf_sum": False}


@pytest.mark.parametrize("option", list(OFFICIAL_OPTIONS))
def test_every_official_option_changes_the_official_head(option):
    _, episode = official_case(1, 4)

    def outputs(*overrides):
        cfg = official_config(*overrides)
        torch.manual_seed(0)
        head = build_head(cfg.model, cfg.loss, 16).double().train()
        torch.manual_seed(1)
        step = episode_step(head, episode, cfg.loss, 16)
        return step.logits.detach(), step.loss.detach()

    default, changed = outputs(), outputs(f"model.{option}={OFFICIAL_OPTIONS[option]}")
    assert not torch.allclose(default[0], changed[0]) or not torch.allclose(default[1], changed[1])


@pytest.mark.parametrize("part", ["hsmr", "spm", "padm"])
def test_official_parts_switch_off_and_every_built_parameter_learns(part):
    cfg = official_config(f"model.{part}=false")
    head = build_head(cfg.model, cfg.loss, 16).double().train()
    assert not [name for name, _ in head.named_parameters() if name.startswith(f"{part}.")]
    _, episode = official_case(1, 4)
    idle = [name for name, grad in gradients(head, episode_step(head, episode, cfg.loss, 16).loss).items()
            if not grad.abs().sum() > 0]
    assert not idle


def test_released_cosine_adds_eps_to_the_norm_product():
    x, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    expected = 1 - (x @ y.T) / (x.norm(dim=-1)[:, None] * y.norm(dim=-1)[None] + 0.01)
    torch.testing.assert_close(frame_distances(x, y, eps=0.01), expected)
    torch.testing.assert_close(frame_distances(x, y, eps=COSINE_EPSILON), 1 - released_cosine(x, y))
    torch.testing.assert_close(frame_distances(x, y), 1 - torch.cosine_similarity(x[:, None], y[None], dim=-1))


def test_released_mapping_infers_widths_and_fills_the_shared_fusion():
    released = load_file(str(OFFICIAL / "weights.safetensors"))
    assert released_head_widths(released) == {"C": 16, "GT": 24, "GV": 8, "I": 16, "M": 24, "P": 24, "A": 16, "B": 24}
    ours = released_heads_state_dict({**released, "backbone.conv1.weight": torch.zeros(2)})
    assert ours["spm.semantic_fusion.transformer.to_q.weight"] is ours["hsmr.semantic_fusion.transformer.to_q.weight"]
    assert "scale" not in ours and not [key for key in ours if key.startswith("backbone")]


def test_released_mapping_refuses_missing_unexpected_and_misshapen_keys():
    released = load_file(str(OFFICIAL / "weights.safetensors"))
    missing = {key: value for key, value in released.items() if key != "context1.layers.0.0.fn.to_k.weight"}
    with pytest.raises(ClipspmError, match=r"missing context1\.layers\.0\.0\.fn\.to_k\.weight"):
        released_heads_state_dict(missing)
    with pytest.raises(ClipspmError, match=r"unexpected context3\.weight"):
        released_heads_state_dict({**released, "context3.weight": torch.zeros(1)})
    wrong = {**released, "gate_text.2.weight": torch.zeros(16, 20)}
    with pytest.raises(ClipspmError, match=r"gate_text\.2\.weight \[16, 20\] \(expected \['C', 'GT'\] with C=16, "
                                           r"GT=24\)"):
        released_heads_state_dict(wrong)
    with pytest.raises(ClipspmError, match=r"mo_alpha1 \[1\] \(expected 0 dims"):
        released_heads_state_dict({**released, "mo_alpha1": torch.ones(1)})


def test_official_heads_stage_trains_and_evaluates_through_the_cli(synthetic_cache, tmp_path):
    run = tmp_path / "official"
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache),
                      "--episodes", "64", "--run-dir", str(run), "--no-progress", "--device", "cpu",
                      "--set", "train.val_every=32", "--set", "train.val_episodes=50", "--set", "model.profile=official",
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = (run / "config.yaml").read_text()
    assert "profile: official" in config and "cosine_eps: 0.01" in config
    evaluated = run_cli("eval", str(run), "--episodes", "50", "--no-progress", "--device", "cpu", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((run / "results.json").read_text())
    assert result["episodes"] == 50 and 0.0 <= result["accuracy"] <= 1.0
