"""OTAM sequence distance (Cao et al., CVPR 2020), the SeqDis of SPEC section 2.1.

The cumulative cost Γ over the zero-padded grid [Tq, Ts+2] is computed one anti-diagonal at a
time (cell (l, m) depends only on cells with a smaller l + m), so Tq + Ts vectorised steps replace
the Tq * (Ts+2) Python steps of the recursion. The backward pass is written out rather than
recorded by autograd: dΓ_final/dD[l,m] is the soft-min path weight of cell (l, m), propagated back
over the same anti-diagonals with each cell's share exp((smin(child) - Γ[cell]) / λ) of its
children's soft-mins: the quantities autograd would form from the recursion, without its graph of
hundreds of nodes. Costs are kept as g = -Γ/λ in float64 and combined with logaddexp, so no exp
overflows or underflows for small λ.

`otam_cumulative_recursive` is the cell-by-cell recursion of the public TRX / CLIP-FSAR code
(`OTAM_cum_dist`), kept as the reference for tests and `benchmarks/otam.py`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable


class _Diagonals(NamedTuple):
    """Index and mask tables of the padded grid [Tq, Ts+2] laid out as [K = Tq+Ts+1 diagonals, Tq rows]."""

    rows: Tensor        # [K, Tq] l
    cols: Tensor        # [K, Tq] m = k - l, clamped into the grid
    valid: Tensor       # [K, Tq, 1] 1.0 on computed cells, 1 <= m <= Ts+1 (column 0 is the zero pad)
    up: Tensor          # [K, Tq, 1] additive 0 / -inf: does the cell take its upper predecessor
    children: Tensor    # [3, K, Tq] bool: (l, m+1), (l+1, m), (l+1, m+1) take (l, m) as that predecessor
    grad_index: tuple[Tensor, Tensor]  # ([Tq, Ts], [Tq, Ts]): the (diagonal, row) of cell (l, m), 1 <= m <= Ts


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where `mask`, -inf elsewhere: added to a log-domain term, it switches the term off."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


@lru_cache(maxsize=64)
def _diagonals(tq: int, ts: int, device: torch.device, dtype: torch.dtype) -> _Diagonals:
    k = torch.arange(tq + ts + 1, device=device)[:, None]
    l = torch.arange(tq, device=device)[None, :]
    m = k - l
    valid = (m >= 1) & (m <= ts + 1)
    edge = (m == 1) | (m == ts + 1)      # the first real and the last (pad) column also take "up"
    below = l + 1 <= tq - 1
    grid_l = torch.arange(tq, device=device)[:, None]
    grid_m = torch.arange(1, ts + 1, device=device)[None, :]
    return _Diagonals(
        rows=l.expand_as(m),
        cols=m.clamp(0, ts + 1),
        valid=valid.to(dtype)[..., None],
        up=_additive(valid & edge, dtype)[..., None],
        children=torch.stack([valid & (m <= ts), valid & below & edge, valid & below & (m <= ts)]),
        grad_index=((grid_l + grid_m).expand(tq, ts), grid_l.expand(tq, ts)),
    )


class _OTAMCumulative(torch.autograd.Function):
    """Works on [K diagonals, Tq rows, B] with the batch flattened last: per-step slices are cheap views."""

    @staticmethod
    def forward(ctx, dists: Tensor, lam: float) -> Tensor:
        *batch, tq, ts = dists.shape
        ctx.input_dtype, out_dtype = dists.dtype, torch.promote_types(dists.dtype, torch.float32)
        dists = dists.to(torch.float32 if dists.device.type == "mps" else torch.float64)  # MPS has no float64
        tab = _diagonals(tq, ts, dists.device, dists.dtype)
        num_diagonals = tq + ts + 1
        scaled = rearrange(F.pad(dists, (1, 1)) / -lam, "... l m -> l m (...)")  # [Tq, Ts+2, B] = -D/λ
        s = scaled[tab.rows, tab.cols] * tab.valid                                # [K, Tq, B]
        # g[k+1, l+1] = -Γ[l, k-l]/λ. The extra leading diagonal and the row l = -1 lie outside the grid;
        # -inf there drops the upper and diagonal predecessors of row 0 from every soft-min.
        g = s.new_zeros(num_diagonals + 1, tq + 1, s.shape[-1])
        g[:, 0] = -math.inf
        smin = torch.zeros_like(s)                                                # -smin/λ of every cell
        for k in range(1, num_diagonals):
            left_or_diag = torch.logaddexp(g[k, 1:], g[k - 1, :-1])
            torch.logaddexp(left_or_diag, g[k, :-1] + tab.up[k], out=smin[k])
            torch.addcmul(s[k], smin[k], tab.valid[k], out=g[k + 1, 1:])       # 0 off the grid and on the pad column
        # The backward reads the soft-mins as computed: recomputing them as g - s would cost an ulp of g.
        ctx.save_for_backward(smin, g[1:, 1:])
        ctx.tab, ctx.batch, ctx.out_dtype = tab, batch, out_dtype
        return (-lam * g[-1, -1]).reshape(batch).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        smin, g = ctx.saved_tensors                            # [K, Tq, B] each
        tab = ctx.tab
        num_diagonals, tq = g.shape[:2]
        smin = F.pad(smin, (0, 0, 0, 1, 0, 2))                 # [K+2, Tq+1, B]
        child_smin = torch.stack([smin[1:num_diagonals + 1, :tq], smin[1:num_diagonals + 1, 1:], smin[2:, 1:]])
        # exp((smin(child) - Γ(cell)) / λ): the share of a cell in its left / lower / diagonal child's soft-min.
        # Only the exponent needs the accumulation precision; the weights, in (0, 1], do not.
        exponent = (g - child_smin).to(ctx.out_dtype).masked_fill(~tab.children[..., None], -math.inf)
        w_left, w_up, w_diag = exponent.exp()
        grad = w_left.new_zeros(num_diagonals + 2, tq + 1, g.shape[-1])
        grad[num_diagonals - 1, tq - 1] = 1.0                  # the end cell (Tq-1, Ts+1)
        for k in range(num_diagonals - 2, 0, -1):
            out = torch.mul(w_left[k], grad[k + 1, :tq], out=grad[k, :tq])
            out.addcmul_(w_up[k], grad[k + 1, 1:]).addcmul_(w_diag[k], grad[k + 2, 1:])
        grad = grad[tab.grad_index] * grad_output.reshape(-1).to(ctx.out_dtype)   # [Tq, Ts, B]
        return rearrange(grad, "l m b -> b l m").reshape(*ctx.batch, *grad.shape[:2]).to(ctx.input_dtype), None


def otam_cumulative(dists: Tensor, lam: float = 0.5) -> Tensor:
    """One-direction OTAM cost Γ[Tq-1, Ts+1] of frame distances `dists` [..., Tq, Ts] -> [...].

    Accumulated in float64 and returned in the input dtype, at least float32: with float32 costs the
    soft-min weights, and so the gradients, are off by ~1e-5 at T=16, λ=0.1 (the public float32
    recursion too). Float64 costs little here: the tensors are small and the step count is fixed.
    """
    return _OTAMCumulative.apply(dists, lam)


def _smin(*values: Tensor, lam: float) -> Tensor:
    """Soft-min -λ log Σ exp(-x/λ), in logsumexp form (the public code's plain exp underflows for small λ)."""
    return -lam * torch.logsumexp(torch.stack(values) / -lam, dim=0)


def otam_cumulative_recursive(dists: Tensor, lam: float = 0.5) -> Tensor:
    """The same value by the plain cell-by-cell recursion (reference; O(Tq*Ts) Python steps)."""
    dists = F.pad(dists, (1, 1))       # [..., Tq, Ts+2]
    rows, cols = dists.shape[-2:]
    cum = torch.zeros_like(dists)
    for m in range(1, cols):
        cum[..., 0, m] = dists[..., 0, m] + cum[..., 0, m - 1]
    for l in range(1, rows):
        cum[..., l, 1] = dists[..., l, 1] + _smin(cum[..., l - 1, 0], cum[..., l - 1, 1], cum[..., l, 0], lam=lam)
        for m in range(2, cols - 1):
            cum[..., l, m] = dists[..., l, m] + _smin(cum[..., l - 1, m - 1], cum[..., l, m - 1], lam=lam)
        cum[..., l, -1] = dists[..., l, -1] + _smin(cum[..., l - 1, -2], cum[..., l - 1, -1], cum[..., l, -2], lam=lam)
    return cum[..., -1, -1]


def frame_distances(query: Tensor, support: Tensor, eps: float = 0.0) -> Tensor:
    """1 - cosine between every query frame and support frame: [..., Tq, C], [..., Ts, C] -> [..., Tq, Ts].

    eps > 0: 1 - x·y / (|x||y| + eps), the released CLIP-SPM cosine (models/myRes.py cos_sim, eps 0.01),
    which pulls the similarity of short vectors towards 0. Leading dims broadcast. At least float32 with
    autocast off: OTAM sums Tq*Ts of these.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        query, support = query.to(dtype), support.to(dtype)
        if eps == 0:
            query, support = F.normalize(query, dim=-1), F.normalize(support, dim=-1)
            return 1 - torch.einsum("...ic,...jc->...ij", query, support)
        norms = query.norm(dim=-1)[..., :, None] * support.norm(dim=-1)[..., None, :]   # [..., Tq, Ts]
        return 1 - torch.einsum("...ic,...jc->...ij", query, support) / (norms + eps)


def otam_distance(query: Tensor, protos: Tensor, lam: float = 0.5, bidirectional: bool = True,
                  cosine_eps: float = 0.0) -> Tensor:
    """SeqDis between every query and prototype of each episode: [E, Q, T, C], [E, P, T, C] -> [E, Q, P].

    Bidirectional (the default) is OTAM(D) + OTAM(D^T), D rows indexed by query frames; `cosine_eps`
    as `eps` of `frame_distances`.
    """
    dists = frame_distances(rearrange(query, "e q t c -> e q 1 t c"), rearrange(protos, "e p s c -> e 1 p s c"),
                            cosine_eps)
    if not bidirectional:
        return otam_cumulative(dists, lam)
    if dists.shape[-1] == dists.shape[-2]:
        # Square D: both directions in one batched call halves the sequential steps.
        return otam_cumulative(torch.stack([dists, dists.transpose(-1, -2)]), lam).sum(0)
    return otam_cumulative(dists, lam) + otam_cumulative(dists.transpose(-1, -2), lam)
