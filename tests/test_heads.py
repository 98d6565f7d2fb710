"""The heads (SPEC section 2): shapes, switches, label hygiene, batching, learning, baselines."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from clipspm.errors import ClipspmError
from clipspm.pipeline import (
    Episode,
    HeadOutput,
    MotionFeatureExtractor,
    PrototypeAnchorDualModulation,
    SemanticFusion,
    build_head,
    episode_step,
    get_method,
    methods,
    otam_distance,
)

HEAD_KINDS = sorted(name for name, method in methods().items() if method.refusal() is None)

DIM, HEADS = 32, 4


def configs(**model) -> tuple[dict, dict]:
    """The method's `model:` / `loss:` defaults at test width, with `model` overrides."""
    method = get_method(model.get("kind", "clipspm"))
    defaults = method.model_options().model_dump()
    width = {"num_heads": HEADS} if "num_heads" in defaults else {}
    return {**defaults, **width, **model}, method.loss_options().model_dump()


def make_head(**model) -> nn.Module:
    model_cfg, loss_cfg = configs(**model)
    return build_head(model_cfg, loss_cfg, DIM)


def make_episode(episodes=2, ways=5, shots=1, queries=2, frames=8, dim=DIM, seed=0, classes=12, noise=1.5,
                 scale=1.0, dtype=torch.float32) -> Episode:
    """Episodes over a fixed pool of classes, each a mean trajectory that its videos scatter around;
    the class text is near the class's mean frame. `seed` draws the episodes and videos."""
    pool = torch.Generator().manual_seed(1234)
    class_means = torch.randn(classes, frames, dim, generator=pool, dtype=dtype)
    class_text = scale * (class_means.mean(1) + 0.5 * torch.randn(classes, dim, generator=pool, dtype=dtype))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(classes, generator=generator)[:ways] for _ in range(episodes)])    # [E, N]

    def videos(count: int) -> torch.Tensor:
        means = class_means[ids].repeat_interleave(count, dim=1)                     # [E, N*count, T, C]
        return scale * (means + noise * torch.randn(means.shape, generator=generator, dtype=dtype))

    query_labels = torch.arange(ways).repeat_interleave(queries).expand(episodes, -1).clone()
    return Episode(support=videos(shots), query=videos(queries), query_labels=query_labels,
                   class_text=class_text[ids], class_ids=ids, base_text=class_text, shots=shots)


def parameter_names(head: nn.Module) -> list[str]:
    return [name for name, _ in head.named_parameters()]


@pytest.mark.parametrize("shots", [1, 3, 5])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_heads_give_logits_of_every_query_for_every_class(kind, shots):
    episode = make_episode(episodes=3, shots=shots, queries=2)
    head = make_head(kind=kind)
    for training in (True, False):
        head.train(training)
        out = head(episode)
        assert out.logits.shape == (3, 5 * 2, 5)
        assert torch.isfinite(out.logits).all()
        expected_aux = ({"clipspm": {"hsmr", "spm"}, "clipfsar": {"video_text"}, "hyrsm": {"classification"},
                         "cpm2c": {"consistency", "video_text"}, "clipmei": {"consistency", "prompt", "motion"}}
                        .get(kind, set()) if training else set())
        assert set(out.aux) == expected_aux
        assert all(value.ndim == 0 and torch.isfinite(value) for value in out.aux.values())


def test_semantic_fusion_is_shared_by_hsmr_and_spm():
    head = make_head()
    assert head.hsmr.semantic_fusion is head.spm.semantic_fusion


# switch -> (module attribute or parameter-name fragment that must not exist, aux key that must vanish)
SWITCHES = {
    "hsmr": ("hsmr.", "hsmr"),
    "spm": ("spm.", "spm"),
    "padm": ("padm.", None),
    "sf_gate": ("_gate.", None),
    "sf_sum": ("_gate.", None),
    "support_consistency": (None, None),
    "query_consistency": (None, None),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_disabled_component_gets_no_gradient(switch):
    absent, aux_key = SWITCHES[switch]
    head = make_head(**{switch: False, "dropout": 0.0})
    episode = make_episode()
    episode.support.requires_grad_()
    episode.query.requires_grad_()
    head.train()
    out = head(episode)
    if absent is not None:
        assert not [name for name in parameter_names(head) if absent in name]
    if aux_key is not None:
        assert aux_key not in out.aux
    # Nothing that is built lies idle: every parameter takes part in the loss.
    loss = episode_step(head, episode, configs()[1]).loss
    grads = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
    idle = [name for name, grad in zip(parameter_names(head), grads) if grad is None or not grad.abs().sum() > 0]
    assert not idle
    if switch in ("support_consistency", "query_consistency"):
        # L_S then holds only the other side: it cannot depend on the frames of the switched-off side.
        off_side = episode.support if switch == "support_consistency" else episode.query
        (grad,) = torch.autograd.grad(out.aux["spm"], off_side, allow_unused=True, retain_graph=True)
        assert grad is None or grad.abs().max() == 0
        other = episode.query if switch == "support_consistency" else episode.support
        (grad,) = torch.autograd.grad(out.aux["spm"], other)
        assert grad.abs().max() > 0


def test_without_any_consistency_there_is_no_spm_loss():
    head = make_head(support_consistency=False, query_consistency=False)
    head.train()
    assert "spm" not in head(make_episode()).aux


def test_semantic_fusion_gate_and_sum_switches():
    generator = torch.Generator().manual_seed(0)
    prompt, frames = torch.randn(3, 1, DIM, generator=generator), torch.randn(3, 8, DIM, generator=generator)
    expected = {
        (True, True): None,
        (False, True): frames + prompt,
        (False, False): frames,
        (True, False): frames,
    }
    for (gate, summed), fused in expected.items():
        fusion = SemanticFusion(DIM, HEADS, 4.0, 0.0, gate=gate, sum=summed)
        fusion.transformer = nn.Identity()     # look at the tokens that enter the transformer
        prompt_out, frames_out = fusion(prompt, frames)
        if fused is None:
            fused = (torch.sigmoid(fusion.visual_gate(frames)) * frames
                     + torch.sigmoid(fusion.prompt_gate(prompt)) * prompt)
        torch.testing.assert_close(frames_out, fused + fusion.position[1:9])
        torch.testing.assert_close(prompt_out, prompt + fusion.position[:1])
        assert (fusion.visual_gate is not None) == (gate and summed)


def test_motion_features_follow_eq8():
    mfe = MotionFeatureExtractor(DIM)
    frames = torch.randn(2, 8, DIM)
    phi = mfe.phi(frames.transpose(1, 2)).transpose(1, 2)
    expected = sum((phi[:, t + 1] - frames[:, t]) + (phi[:, t] - frames[:, t + 1]) for t in range(7)) / 7
    torch.testing.assert_close(mfe(frames)[:, 0], expected)
    mfe.phi = nn.Identity()                    # forward and backward differences cancel exactly
    assert mfe(frames).abs().max() < 1e-6


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_eval_does_not_read_query_labels(kind):
    head = make_head(kind=kind).eval()
    episode = make_episode(queries=3)
    with torch.no_grad():
        logits = head(episode).logits
        for labels in (episode.query_labels.flip(-1), torch.full_like(episode.query_labels, 10**6)):
            corrupted = replace(episode, query_labels=labels)
            torch.testing.assert_close(head(corrupted).logits, logits, atol=0, rtol=0)


def test_padm_is_permutation_equivariant_over_queries():
    torch.manual_seed(0)
    padm = PrototypeAnchorDualModulation(DIM, HEADS, 4.0, 0.0).double()
    episode = make_episode(shots=3, queries=3, dtype=torch.float64)
    perm = torch.randperm(episode.query.shape[1])
    out = padm(episode.support, episode.query, episode.shots)
    permuted = padm(episode.support, episode.query[:, perm], episode.shots)
    torch.testing.assert_close(permuted.query, out.query[:, perm])
    for name in ("support", "prototypes", "anchor"):
        torch.testing.assert_close(getattr(permuted, name), getattr(out, name))
    head = make_head().double().eval()             # the whole head: query rows just move along
    moved = replace(episode, query=episode.query[:, perm], query_labels=episode.query_labels[:, perm])
    torch.testing.assert_close(head(moved).logits, head(episode).logits[:, perm])


@pytest.mark.parametrize("kind", ["clipspm", "clipfsar"])
def test_batched_episodes_equal_separate_episodes(kind):
    # One step over E episodes is the paper's accumulation over E episodes: same loss, same gradient.
    torch.manual_seed(0)
    no_dropout = {key: 0.0 for key in get_method(kind).model_options.model_fields if "dropout" in key}
    model_cfg, loss_cfg = configs(kind=kind, **no_dropout)
    head = build_head(model_cfg, loss_cfg, DIM).double().train()
    episode = make_episode(episodes=3, shots=3, dtype=torch.float64)
    params = list(head.parameters())
    batched = episode_step(head, episode, loss_cfg)
    batched_grads = torch.autograd.grad(batched.loss, params)
    separate_losses, separate_grads = [], []
    for e in range(episode.num_episodes):
        single = episode_step(head, episode.select(e), loss_cfg)
        torch.testing.assert_close(single.logits[0], batched.logits[e])
        separate_losses.append(single.loss)
        separate_grads.append(torch.autograd.grad(single.loss, params))
    torch.testing.assert_close(batched.loss, torch.stack(separate_losses).mean())
    for name, grad, *singles in zip(parameter_names(head), batched_grads, *separate_grads):
        torch.testing.assert_close(grad, torch.stack(singles).mean(0), msg=name)


def test_loss_decreases_on_separable_toy_episodes():
    torch.manual_seed(0)
    model_cfg, loss_cfg = configs(dropout=0.0)
    head = build_head(model_cfg, loss_cfg, DIM).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    history = []
    for step in range(40):
        # Noisy enough that raw OTAM is ~45% accurate. Frames of norm ~1.6: the consistency losses grow
        # with the squared norm and would drown CE at the paper's λ3 = λ4 = 0.001 on much larger ones.
        result = episode_step(head, make_episode(episodes=4, frames=4, seed=step, noise=2.0, scale=0.1), loss_cfg)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        history.append(result.metrics)

    def mean(key, steps):
        return sum(metrics[key] for metrics in steps) / len(steps)

    first, last = history[:5], history[-5:]
    assert mean("loss", last) < 0.6 * mean("loss", first)
    assert mean("ce", last) < 0.7 * mean("ce", first)
    assert mean("accuracy", last) > mean("accuracy", first) + 0.15


@pytest.mark.parametrize("hsmr", [False, True])
def test_all_off_equals_plain_otam(hsmr):
    episode = make_episode(shots=3)
    head = make_head(hsmr=hsmr, spm=False, padm=False).eval()     # HSMR adds a loss only
    protos = episode.support.view(2, 5, 3, 8, DIM).mean(2)
    torch.testing.assert_close(head(episode).logits, -otam_distance(episode.query, protos))
    torch.testing.assert_close(make_head(kind="otam")(episode).logits, -otam_distance(episode.query, protos))


def test_two_distances_are_weighted_and_a_lone_one_is_not():
    torch.manual_seed(0)
    episode = make_episode(shots=3)
    model_cfg, loss_cfg = configs(hsmr=False)
    head = build_head(model_cfg, loss_cfg, DIM).eval()
    spm, padm = head.spm, head.padm

    def protos(support):
        return support.view(2, 5, 3, 8, DIM).mean(2)

    def d_padm(support, query):
        out = padm(support, query, 3)
        return otam_distance(out.query, protos(out.support)) + otam_distance(out.anchor, out.prototypes)

    modulated = spm(episode.support, episode.query, episode.support_text())
    d_spm = otam_distance(modulated.query, protos(modulated.support))
    expected = -(loss_cfg["lambda_padm"] * d_padm(modulated.support, modulated.query) + loss_cfg["lambda_spm"] * d_spm)
    torch.testing.assert_close(head(episode).logits, expected)
    head.padm = None                                   # padm off: d = d_spm
    torch.testing.assert_close(head(episode).logits, -d_spm)
    head.padm, head.spm = padm, None                   # spm off: d = d_padm on the raw features
    torch.testing.assert_close(head(episode).logits, -d_padm(episode.support, episode.query))


@pytest.mark.parametrize("kind", ["protonet", "otam"])
def test_parameter_free_baselines_have_no_parameters(kind):
    head = make_head(kind=kind)
    assert sum(p.numel() for p in head.parameters()) == 0
    episode = make_episode(shots=3)
    assert head(episode).logits.shape == (2, 10, 5)


def test_protonet_is_cosine_to_class_means():
    episode = make_episode(shots=3)
    protos = episode.support.mean(2).view(2, 5, 3, DIM).mean(2)
    expected = torch.cosine_similarity(episode.query.mean(2)[:, :, None], protos[:, None], dim=-1) - 1
    torch.testing.assert_close(make_head(kind="protonet")(episode).logits, expected)


def test_clipfsar_video_text_loss_needs_training_and_base_text():
    head = make_head(kind="clipfsar").train()
    episode = make_episode()
    assert set(head(episode).aux) == {"video_text"}
    assert head(replace(episode, base_text=None)).aux == {}
    assert head.eval()(episode).aux == {}


def test_episode_step_weighs_each_auxiliary_loss():
    class Fixed(nn.Module):
        def __init__(self, aux):
            super().__init__()
            self.aux = aux

        def forward(self, episode):
            return HeadOutput(torch.zeros(2, 10, 5), dict(self.aux))

    _, loss_cfg = configs()
    episode = make_episode()
    result = episode_step(Fixed({"hsmr": torch.tensor(2.0), "spm": torch.tensor(3.0)}), episode, loss_cfg)
    ce = torch.log(torch.tensor(5.0)).item()
    assert result.loss.item() == pytest.approx(ce + 2.0 * loss_cfg["lambda_h"] + 3.0 * loss_cfg["lambda_s"])
    assert result.metrics["ce"] == pytest.approx(ce) and result.metrics["hsmr"] == 2.0
    with pytest.raises(KeyError, match="unweighted|no weight"):
        episode_step(Fixed({"mystery": torch.tensor(1.0)}), episode, loss_cfg)


def test_unknown_kind_and_heads_not_dividing_width_are_clear_errors():
    with pytest.raises(ClipspmError, match="unknown model.kind 'no-such-method'.*clipspm"):
        make_head(kind="no-such-method")
    with pytest.raises(ClipspmError, match="num_heads=5 does not divide .* C=32"):
        make_head(num_heads=5)
    with pytest.raises(ClipspmError, match=r"unknown config key model.num_heads \(model.kind=otam\)"):
        make_head(kind="otam", num_heads=5)       # OTAM has no attention, hence no such option


def test_episode_checks_its_shapes():
    episode = make_episode(shots=3)
    with pytest.raises(ValueError, match="class_text"):
        replace(episode, class_text=episode.class_text[:, :4])
    assert (episode.ways, episode.queries_per_class, episode.frames, episode.dim) == (5, 2, 8, DIM)
    assert episode.support_labels[0].tolist() == [n for n in range(5) for _ in range(3)]
