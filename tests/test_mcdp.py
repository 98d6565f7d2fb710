"""MCDP-FSAR: the text tower in the training step, parity with the released AMCAP head (tests/fixtures/mcdp),
label hygiene of its query prompts, descriptions, and training from a cache through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import resolve_config
from clipspm.errors import CacheError, ClipspmError
from clipspm.pipeline import Episode, build_head, episode_step
from clipspm.pipeline.encoder import load_clip
from clipspm.pipeline.methods import STAGE_INPUTS, HeadInputs, Method, get_method
from clipspm.pipeline.text_tower import TextTower
from clipspm.schema import ModelOptions
from clipspm.stages.runs import clip_of_cache
from tests.conftest import TINY_MODEL, run_cli
from tests.test_heads import make_episode

FIXTURES = Path(__file__).parent / "fixtures" / "mcdp"
TOWER_NAME = "mcdp-fixture-tower"
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# The fixture's widths (its README): C = W = 16, the released transformer and prompt generator rebuilt small,
# every dropout 0. Everything else is the shipped HMDB51 configuration (video_text 1.2).
PARITY_MODEL = {"num_heads": 8, "mlp_hidden": 32, "attention_dropout": 0.0, "mlp_dropout": 0.0, "prompt_hidden": 16,
                "prompt_heads": 8, "prompt_dropout": 0.0}
PROTOCOLS = {"all_classes": "all_classes", "leak": "true_class_leak"}
SMALL = {"kind": "mcdp", "num_heads": 4, "mlp_hidden": 64, "prompt_hidden": 32}   # fast CPU variants of the head


@pytest.fixture(scope="module")
def fixture_tower() -> TextTower:
    """The released text encoder's weights (their CLIP class at width 16) in an open_clip model of that shape."""
    open_clip.add_model_config(FIXTURES / f"{TOWER_NAME}.json")
    model = open_clip.create_model(TOWER_NAME, pretrained=None).double()
    state = load_file(FIXTURES / "tower.safetensors")
    rows, embeddings = state.pop("token_embedding.rows"), state.pop("token_embedding.weight")
    with torch.no_grad():                       # only the tokens of the prompts are stored
        model.token_embedding.weight.zero_()
        model.token_embedding.weight[rows] = embeddings
    missing, unexpected = model.load_state_dict(state, strict=False)
    text_keys = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
    assert not unexpected and not [key for key in missing if key.startswith(text_keys)]
    return TextTower(model, TOWER_NAME)


@pytest.fixture(scope="module")
def tiny_inputs() -> HeadInputs:
    clip = load_clip(TINY_MODEL, "none", seed=0)
    return HeadInputs(text_tower=TextTower(clip.model, clip.name),
                      class_texts=tuple(f"action number {i}" for i in range(12)))


def tiny_episode(**kwargs) -> Episode:
    episode = make_episode(dim=64, **kwargs)
    return replace(episode, class_rows=episode.class_ids)


def released_head(tower: TextTower, protocol: str) -> tuple[torch.nn.Module, dict, dict]:
    keys = json.loads((FIXTURES / "keys.json").read_text())
    overrides = ["model.kind=mcdp", f"model.query_prompt={PROTOCOLS[protocol]}",
                 *(f"model.{key}={value}" for key, value in PARITY_MODEL.items())]
    cfg = resolve_config("heads", "hmdb51", overrides=overrides)
    model, loss = dict(cfg.model), dict(cfg.loss)
    head = build_head(model, loss, 16, HeadInputs(text_tower=tower, class_texts=tuple(keys["class_texts"]))).double()
    released = load_file(FIXTURES / "weights.safetensors")
    head.load_state_dict({keys["keys"][key]: value for key, value in released.items()}, strict=True)
    return head, keys["keys"], loss


def fixture_episode(case: dict) -> Episode:
    text = case["text"].double()
    support, query = case["support"].double(), case["query"].double()
    described = "support_video_text" in case
    return Episode(support=support, query=query, query_labels=case["query_labels"], class_text=text[case["class_ids"]],
                   class_ids=case["class_ids"], base_text=text, shots=support.shape[1] // 5,
                   class_rows=case["class_ids"],
                   support_video_text=case["support_video_text"].double() if described else None,
                   query_video_text=case["query_video_text"].double() if described else None)


# ---- the text tower

def test_text_tower_gives_encode_text_and_cut_prompts_read_the_same(tiny_inputs):
    tower = tiny_inputs.text_tower
    clip = load_clip(TINY_MODEL, "none", seed=0)
    texts = ["a photo of action brush hair", "wave"]
    torch.testing.assert_close(tower.encode(texts), clip.encode_texts(texts))
    tokens = tower.tokenize(texts)
    ends = tower.end_positions(tokens)
    full = tower(tower.embed(tokens), ends[:, None])
    cut = int(ends.max()) + 1                     # causal: positions after the last read change nothing
    torch.testing.assert_close(tower(tower.embed(tokens[:, :cut]), ends[:, None]), full)


def test_registry_provides_the_text_tower_through_the_stages_and_still_refuses_patch_tokens(tiny_inputs):
    method = get_method("mcdp")
    assert method.refusal() is not None and method.refusal(set(STAGE_INPUTS)) is None
    with pytest.raises(ClipspmError, match="needs the frozen CLIP text tower"):
        build_head({"kind": "mcdp"}, {}, 64)
    patches = Method(name="patches", title="Patches", paper="-", code="-", build=lambda *args: None,
                     model_options=ModelOptions, needs=("frames", "patch_tokens"))
    assert "patch tokens" in patches.refusal(set(STAGE_INPUTS))
    assert patches.refusal(tiny_inputs.provided()) is not None


# ---- parity with the released head

@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("case", ["case-1shot-1query", "case-5shot-4query"])
def test_mcdp_matches_the_released_head(fixture_tower, case, protocol):
    head, keys, loss_cfg = released_head(fixture_tower, protocol)
    assert loss_cfg["video_text"] == 1.2 and loss_cfg["ce"] == "mean" and not loss_cfg["aux_per_task"]
    expected = load_file(FIXTURES / f"{case}.safetensors")
    episode = fixture_episode(expected)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(episode).logits, expected[f"{protocol}.logits_eval"], **TOLERANCE)
    result = episode_step(head.train(), episode, loss_cfg, 16)
    torch.testing.assert_close(result.loss, expected[f"{protocol}.loss"], **TOLERANCE)
    result.loss.backward()
    parameters = dict(head.named_parameters())
    assert sorted(keys.values()) == sorted(parameters)
    for released_key, our_key in keys.items():
        torch.testing.assert_close(parameters[our_key].grad, expected[f"{protocol}.grad.{released_key}"], **TOLERANCE,
                                   msg=lambda text, key=released_key: f"{key}: {text}")


# ---- what trains, and what the queries may read

def test_context_tokens_learn_and_the_text_tower_does_not(tiny_inputs):
    tower = tiny_inputs.text_tower
    before = {key: value.clone() for key, value in tower.state_dict().items()}
    head = build_head(SMALL, {"video_text": 1.0}, 64, tiny_inputs)
    assert not any(name.startswith("tower") for name, _ in head.named_parameters())
    assert "tower" not in " ".join(head.state_dict())            # not saved with the head's checkpoint
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    context = head.context.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        episode_step(head.train(), tiny_episode(), {"video_text": 1.0}).loss.backward()
        assert head.context.grad.abs().sum() > 0
        assert head.context_shift.text_proj.weight.grad.abs().sum() > 0
        assert all(parameter.grad is None for parameter in tower.parameters())
        optimizer.step()
    assert not torch.equal(head.context, context)
    for key, value in tower.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("described", [False, True])
def test_scrambled_query_labels_change_no_logit_by_default(tiny_inputs, described):
    episode = tiny_episode(queries=3)
    if described:
        generator = torch.Generator().manual_seed(3)
        episode = replace(episode, support_video_text=torch.randn(2, 5, 64, generator=generator),
                          query_video_text=torch.randn(2, 15, 64, generator=generator))
    scrambled = replace(episode, query_labels=episode.query_labels[:, torch.randperm(15)])
    head = build_head(SMALL, {}, 64, tiny_inputs).eval()
    leak = build_head({**SMALL, "query_prompt": "true_class_leak"}, {}, 64, tiny_inputs).eval()
    leak.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(head(episode).logits, head(scrambled).logits)
        assert not torch.equal(leak(episode).logits, leak(scrambled).logits)   # the released protocol reads them
    assert not getattr(head, "reads_query_labels") and leak.reads_query_labels


def test_a_query_scored_as_its_true_class_is_the_released_score(tiny_inputs):
    # Column n of the default protocol is what the released protocol gives a query whose label is n.
    episode = tiny_episode(queries=1)
    head = build_head(SMALL, {}, 64, tiny_inputs).eval()
    leak = build_head({**SMALL, "query_prompt": "true_class_leak"}, {}, 64, tiny_inputs).eval()
    leak.load_state_dict(head.state_dict())
    with torch.no_grad():
        every = head(episode).logits                                           # [E, 5, 5]
        for n in range(5):
            labelled = leak(replace(episode, query_labels=torch.full_like(episode.query_labels, n))).logits
            torch.testing.assert_close(labelled[..., n], every[..., n])


def test_class_names_in_the_prompt_change_what_a_class_reads(tiny_inputs):
    episode = tiny_episode()
    plain = build_head(SMALL, {}, 64, tiny_inputs).eval()
    named = build_head({**SMALL, "class_name_in_prompt": True}, {}, 64, tiny_inputs).eval()
    named.load_state_dict(plain.state_dict())
    assert plain.prompt_tokens.shape[0] == 1 and named.prompt_tokens.shape[0] == 12
    with torch.no_grad():
        assert not torch.allclose(plain(episode).logits, named(episode).logits)


def test_episodes_without_class_rows_or_enough_frames_are_refused(tiny_inputs):
    head = build_head(SMALL, {}, 64, tiny_inputs)
    with pytest.raises(ClipspmError, match="class_rows"):
        head(make_episode(dim=64))
    with pytest.raises(ClipspmError, match="prompt_frame=3, but videos have T=3"):
        head(tiny_episode(frames=3))


def test_a_cache_whose_model_weights_differ_gives_no_text_tower(synthetic_cache):
    cache = FeatureCache(find_store(synthetic_cache))
    assert clip_of_cache(cache, torch.device("cpu")).weight_sha256 == cache.meta["weight_sha256"]
    cache.meta = {**cache.meta, "weight_sha256": "0" * 64}
    with pytest.raises(CacheError, match="not those cache"):
        clip_of_cache(cache, torch.device("cpu"))


# ---- from a cache, through the CLI

def synthetic_descriptions(cache: Path, path: Path, skip: int = 0) -> Path:
    with FeatureCache(find_store(cache)) as opened:
        videos = opened.video_ids.tolist()
    lines = ["video,description", *(f'{video},"a clip, number {i}"' for i, video in enumerate(videos[skip:]))]
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = ["--set", "model.kind=mcdp", "--episodes", "16", "--set", "train.episodes_per_step=4", "--set",
        "train.val_every=16", "--set", "train.val_episodes=10", "--set", "model.mlp_hidden=64", "--set",
        "model.prompt_hidden=32", "--no-progress"]


def test_mcdp_trains_and_evaluates_from_a_cache_through_the_cli(synthetic_cache, tmp_path):
    run = tmp_path / "mcdp"
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache), *FAST,
                      "--run-dir", str(run), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = run_cli("eval", str(run), "--episodes", "30", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["episodes"] == 30 and not results["label_leak"]
    assert results["video_text"] == "class prompts (no data.descriptions)"
    assert "LABEL LEAK" not in evaluated.stdout


def test_the_released_protocol_is_marked_as_leaking_labels(synthetic_cache, tmp_path):
    run = tmp_path / "leak"
    trained = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache), *FAST,
                      "--set", "model.query_prompt=true_class_leak", "--run-dir", str(run), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = run_cli("eval", str(run), "--episodes", "30", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["label_leak"] is True
    assert "LABEL LEAK" in evaluated.stdout


def test_descriptions_are_read_per_video_and_recorded(synthetic_cache, tmp_path):
    from clipspm.stages.evaluate import evaluate_run
    from clipspm.stages.heads import train_heads
    from tests.conftest import heads_config

    described = synthetic_descriptions(synthetic_cache, tmp_path / "descriptions.csv")
    cfg = heads_config(synthetic_cache, "model.kind=mcdp", "model.mlp_hidden=64", "model.prompt_hidden=32",
                       "train.episodes=8", "train.episodes_per_step=4", "train.val_every=8", "train.val_episodes=10",
                       f"data.descriptions={described}")
    train_heads(cfg, tmp_path / "run", progress=False, device="cpu")
    result = evaluate_run(tmp_path / "run", episodes=20, progress=False, device="cpu")
    assert result.video_text.startswith(str(described.resolve())) and "sha256" in result.video_text
    described.write_text(described.read_text().replace("number 1", "number one"))
    with pytest.raises(ClipspmError, match="changed since the run was trained"):
        evaluate_run(tmp_path / "run", episodes=20, progress=False, device="cpu")


def test_descriptions_must_cover_every_video_and_suit_the_method(synthetic_cache, tmp_path):
    partial = synthetic_descriptions(synthetic_cache, tmp_path / "partial.csv", skip=3)
    missing = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache), *FAST,
                      "--set", f"data.descriptions={partial}", "--run-dir", str(tmp_path / "a"), cwd=tmp_path)
    assert missing.returncode == 2 and "has no description for 3 of" in " ".join(missing.stderr.split())
    other = run_cli("train", "--stage", "heads", "--dataset", "synthetic", "--cache", str(synthetic_cache),
                    "--set", "model.kind=clipfsar", "--set", f"data.descriptions={partial}", "--episodes", "16",
                    "--run-dir", str(tmp_path / "b"), "--no-progress", cwd=tmp_path)
    assert other.returncode == 2 and "reads no per-video text" in " ".join(other.stderr.split())


def test_the_baselines_suite_has_an_mcdp_row_with_the_released_hmdb51_loss():
    from clipspm.experiments.suites import load_suite

    suite = load_suite("baselines")
    row = next(variant for variant in suite.variants if variant.name == "mcdp")
    cfg = resolve_config("heads", "hmdb51", overrides=list(row.overrides))
    assert cfg.model.kind == "mcdp" and cfg.model.query_prompt == "all_classes" and cfg.loss.video_text == 1.2
    assert cfg.model.num_templates == 1


def test_clipspm_methods_lists_mcdp_with_the_text_tower(tmp_path):
    listed = run_cli("methods", cwd=tmp_path, env={"COLUMNS": "500"})    # one line per field
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mcdp  MCDP-FSAR"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    block = " ".join(" ".join(lines[start + 1:end]).split())
    assert "runs from a feature cache, with what the stages load beside it: the frozen CLIP text tower" in block
