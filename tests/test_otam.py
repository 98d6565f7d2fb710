"""OTAM (SPEC section 2.1): the vectorised cumulative cost against the cell-by-cell recursion."""

from __future__ import annotations

import math

import pytest
import torch

from clipspm.pipeline.otam import frame_distances, otam_cumulative, otam_cumulative_recursive, otam_distance

SHAPES = [(2, 2), (3, 3), (8, 8), (16, 16), (3, 8), (8, 3), (16, 2), (2, 16)]


def _value_and_grad(fn, dists: torch.Tensor, lam: float, weights: torch.Tensor):
    dists = dists.detach().clone().requires_grad_()
    value = fn(dists, lam)
    (grad,) = torch.autograd.grad((value * weights.to(value.dtype)).sum(), dists)
    return value, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_otam_matches_recursion(shape, lam, dtype):
    # The reference is the recursion in float64 on the same values: the float32 recursion itself
    # strays ~2e-5 from it in gradient at T=16, λ=0.1, which is float32 rounding, not OTAM.
    generator = torch.Generator().manual_seed(hash((shape, lam)) % 2**31)
    dists = (2 * torch.rand(3, 4, *shape, generator=generator, dtype=torch.float64)).to(dtype)
    weights = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    value, grad = _value_and_grad(otam_cumulative, dists, lam, weights)
    expected, expected_grad = _value_and_grad(otam_cumulative_recursive, dists.double(), lam, weights)
    assert value.dtype == grad.dtype == dtype
    torch.testing.assert_close(value.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=0)


def test_otam_hand_computed_2x2():
    a, b, c, d = 0.2, 1.0, 0.6, 0.1
    lam = 0.5

    def smin(*values):
        return -lam * math.log(sum(math.exp(-v / lam) for v in values))

    # Zero-padded grid [[0, a, b, 0], [0, c, d, 0]]; row 0 is a plain cumulative sum.
    row0 = [0.0, a, a + b, a + b]
    g11 = c + smin(row0[0], row0[1], 0.0)          # first column: diagonal, up, and the left pad
    g12 = d + smin(row0[1], g11)                   # middle column: diagonal and left
    g13 = 0.0 + smin(row0[2], row0[3], g12)        # last (pad) column: diagonal, up, left
    dists = torch.tensor([[a, b], [c, d]], dtype=torch.float64)
    assert otam_cumulative(dists, lam).item() == pytest.approx(g13, abs=1e-12)
    assert otam_cumulative_recursive(dists, lam).item() == pytest.approx(g13, abs=1e-12)


@pytest.mark.parametrize("fill", ["random", "zeros", "twos", "alternating"])
def test_otam_is_stable_for_small_lambda(fill):
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 32, 32)
    dists = {"random": 2 * torch.rand(shape, generator=generator), "zeros": torch.zeros(shape),
             "twos": torch.full(shape, 2.0),
             "alternating": 2.0 * (torch.arange(32)[:, None] + torch.arange(32)).remainder(2).expand(shape)}[fill]
    value, grad = _value_and_grad(otam_cumulative, dists, 0.05, torch.ones(2, 3))
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    expected, expected_grad = _value_and_grad(otam_cumulative_recursive, dists.double(), 0.05, torch.ones(2, 3))
    torch.testing.assert_close(value.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=0)


def test_otam_promotes_half_precision():
    dists = 2 * torch.rand(2, 8, 8)
    value = otam_cumulative(dists.to(torch.bfloat16), 0.5)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, otam_cumulative(dists.to(torch.bfloat16).float(), 0.5))


@pytest.mark.parametrize("query_frames", [8, 6])
def test_otam_bidirectional_is_sum_of_directions(query_frames):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 5, query_frames, 16, generator=generator)
    protos = torch.randn(2, 3, 8, 16, generator=generator)
    dists = frame_distances(query[:, :, None], protos[:, None])                     # [E, Q, P, Tq, Ts]
    forward = otam_cumulative(dists, 0.5)
    backward = otam_cumulative(dists.transpose(-1, -2), 0.5)
    torch.testing.assert_close(otam_distance(query, protos, 0.5, bidirectional=False), forward)
    torch.testing.assert_close(otam_distance(query, protos, 0.5), forward + backward)
    assert otam_distance(query, protos).shape == (2, 5, 3)


def test_frame_distances_are_one_minus_cosine():
    generator = torch.Generator().manual_seed(2)
    query, support = torch.randn(3, 4, 16, generator=generator), torch.randn(3, 5, 16, generator=generator)
    expected = 1 - torch.cosine_similarity(query[:, :, None], support[:, None], dim=-1)
    torch.testing.assert_close(frame_distances(query, support), expected)


def test_identical_sequences_are_closest():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 10, 8, 32, generator=generator)
    for q in range(10):
        protos = torch.stack([query[0, q], query[0, q].flip(0)])[None]              # itself, time-reversed
        distance = otam_distance(query[:, q:q + 1], protos)[0, 0]
        assert distance[0] < distance[1]
