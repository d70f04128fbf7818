"""Annealed Langevin dynamics with SpatialScope's spot term, all spots at once (segment sums)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from ..progress import Progress

CLIP_SPOT = 1.0  # spot residual r_s clipped to [-1, 1] (SpatialScope)


CLIP_CELL = 2.0  # per-cell spot term g_c clipped to [-2, 2] (SpatialScope)


EXP_CAP = 80.0  # x + mu is capped here before exp (float32 overflow); the clipped spot term is saturated anyway


EXPM1_MAX = float(np.log(np.finfo(np.float32).max))  # log1p results above this overflow expm1: non-finite


EXP_FLOOR = -60.0  # ... and floored here (exp(-60) ~ 1e-26: no denormal floats, which are ~100x slower on CPUs)


# ----------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------
def spot_term(
    x: torch.Tensor,
    mu: torch.Tensor,
    seg: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_spot: float = CLIP_SPOT,
    clip_cell: float = CLIP_CELL,
    out: torch.Tensor | None = None,
    seg_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell spot term g (M, G) of SpatialScope's likelihood, all spots at once (segment sums).

    ``r_s = clip(sum_{c in s} (exp(x_c + mu_c) - 1) - y_s n_s, +-clip_spot) * mask`` with ``target`` = n_s (1 + y_s)
    (K, G) and ``seg`` (M,) the segment of each row; ``g_c = clip(exp(x_c + mu_c) r_s(c), +-clip_cell)``.
    ``out`` (M, G) and ``seg_sum`` (K, G) are optional work buffers.

    Parameters
    ----------
    x : torch.Tensor
        Current state (M, G), log1p expression minus ``mu``.
    mu : torch.Tensor
        Type mean of each row (M, G), log1p scale.
    seg : torch.Tensor
        Segment (spot) index of each row (M,).
    target : torch.Tensor
        Per-segment target n_s (1 + y_s) (K, G).
    mask : torch.Tensor
        Per-gene weight of the spot residual (G,); 0 switches a gene's spot term off.
    clip_spot : float
        Bound on the absolute spot residual r_s.
    clip_cell : float
        Bound on the absolute per-cell term g_c.
    out : torch.Tensor or None
        Work buffer (M, G) for the result; a new tensor when None.
    seg_sum : torch.Tensor or None
        Work buffer (K, G) for the segment sums; a new tensor when None.

    Returns
    -------
    torch.Tensor
        The per-cell spot term g (M, G) (``out`` when given).
    """
    e = torch.add(x, mu, out=out) if out is not None else x + mu
    e.clamp_(EXP_FLOOR, EXP_CAP).exp_()
    if seg_sum is None:
        seg_sum = torch.zeros_like(target)
    else:
        seg_sum.zero_()
    seg_sum.index_add_(0, seg, e)
    r = seg_sum.sub_(target).clamp_(-clip_spot, clip_spot).mul_(mask)
    return e.mul_(r.index_select(0, seg)).clamp_(-clip_cell, clip_cell)


def noise_levels(model, level_stride: int = 1) -> np.ndarray:
    """Indices of the noise levels used: every ``level_stride``-th, always ending on the last (sigma_end).

    Parameters
    ----------
    model : score model
        The prior model; only the length of its ``sigmas`` is used.
    level_stride : int
        Keep every ``level_stride``-th level, counted back from the last.

    Returns
    -------
    numpy.ndarray
        Increasing level indices, the last being ``len(model.sigmas) - 1``.
    """
    L = len(model.sigmas)
    return np.arange(L - 1, -1, -int(level_stride))[::-1].copy()


def annealed_langevin(
    model,
    type_idx: torch.Tensor,
    *,
    seg: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    n_seg: int | None = None,
    spot_mask: torch.Tensor | None = None,
    levels: np.ndarray | None = None,
    step: float | None = None,
    sigma_power: float = 1.0,
    seed: int = 0,
    batch_cells: int = 20_000,
    clip_spot: float = CLIP_SPOT,
    clip_cell: float = CLIP_CELL,
    timings: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Annealed Langevin over rows (cells), returning log1p expression ``x + mu`` (M, G).

    Without ``target`` this samples the prior (no spot term). With it, rows belong to segments ``seg`` (spots)
    whose summed ``exp(x + mu) - 1`` must match ``target - n_cells`` i.e. ``target`` = n_s (1 + y_s) (K, G); genes
    where ``spot_mask`` is 0 get no spot term. ``step`` defaults to the model's decomposition step. ``log``
    receives progress lines (noise levels done / total, time left) at most every 10 s and at the end.

    Parameters
    ----------
    model : score model
        The fitted prior (``type_means``, ``sigmas``, ``steps_per_level``, ``decomposition_step`` and the score
        network).
    type_idx : torch.Tensor
        Cell type index of each row (M,).
    seg : torch.Tensor or None
        Segment (spot) index of each row (M,); needed with ``target``.
    target : torch.Tensor or None
        Per-segment target n_s (1 + y_s) (K, G); None samples the prior.
    n_seg : int or None
        Number of segments; ``target.shape[0]`` when None.
    spot_mask : torch.Tensor or None
        Per-gene weight of the spot term (G,); all ones when None.
    levels : numpy.ndarray or None
        Noise level indices to run; :func:`noise_levels` of the model when None.
    step : float or None
        Langevin step size at sigma_end; the model's ``decomposition_step`` when None.
    sigma_power : float
        The spot term is weighted by ``1 / sigma ** sigma_power``.
    seed : int
        Seed of the random generator (initial state and noise).
    batch_cells : int
        Rows per batch of score network evaluations.
    clip_spot : float
        Bound on the absolute spot residual (see :func:`spot_term`).
    clip_cell : float
        Bound on the absolute per-cell spot term (see :func:`spot_term`).
    timings : dict or None
        If given, network / other wall and CPU seconds and the step count are added to it.
    log : callable or None
        Receives progress lines.

    Returns
    -------
    torch.Tensor
        Sampled log1p expression ``x + mu`` (M, G), on the model's device.
    """
    dev = model.type_means.device
    type_idx = type_idx.to(dev)
    M, G = len(type_idx), model.type_means.shape[1]
    sig = model.sigmas.detach().float().cpu().numpy()
    levels = noise_levels(model) if levels is None else np.asarray(levels)
    sigma_end = float(sig[-1])
    step = float(model.decomposition_step if step is None else step)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    mu = model.type_means.float().index_select(0, type_idx)
    x = torch.randn(M, G, generator=gen, device=dev)
    score = torch.empty_like(x) if M > batch_cells else None
    noise = torch.empty_like(x)
    use_spot = target is not None
    if use_spot:
        seg = seg.to(dev)
        target = target.to(dev, torch.float32)
        n_seg = int(target.shape[0]) if n_seg is None else n_seg
        mask = torch.ones(G, device=dev) if spot_mask is None else spot_mask.to(dev, torch.float32)
        ssum = torch.empty(n_seg, G, device=dev)
        e = torch.empty_like(x)
    t_net = t_other = c_net = c_other = 0.0  # wall and main-thread CPU seconds
    n_steps = 0
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # honest timings

    def _score(sigma: float) -> torch.Tensor:
        nonlocal t_net, c_net
        t0, c0 = time.perf_counter(), time.thread_time()
        if M <= batch_cells:
            out = model.score(x, type_idx, sigma)
        else:
            out = score
            for i in range(0, M, batch_cells):
                out[i : i + batch_cells] = model.score(x[i : i + batch_cells], type_idx[i : i + batch_cells], sigma)
        sync()
        t_net += time.perf_counter() - t0
        c_net += time.thread_time() - c0
        return out

    def _spot_term() -> torch.Tensor:
        return spot_term(x, mu, seg, target, mask, clip_spot=clip_spot, clip_cell=clip_cell, out=e, seg_sum=ssum)

    prog = Progress(len(levels), f"decomposition Langevin noise levels ({M} rows)", log)
    with torch.no_grad():
        for lev in levels:
            sigma = float(sig[lev])
            eta = step * (sigma / sigma_end) ** 2
            lam = 1.0 / sigma**sigma_power
            for _ in range(int(model.steps_per_level)):
                sc = _score(sigma)
                t0, c0 = time.perf_counter(), time.thread_time()
                x.add_(sc, alpha=eta)
                if use_spot:
                    x.add_(_spot_term(), alpha=-eta * lam)
                x.add_(noise.normal_(generator=gen), alpha=math.sqrt(2 * eta))
                sync()
                t_other += time.perf_counter() - t0
                c_other += time.thread_time() - c0
                n_steps += 1
            prog.update()
        # final denoising step at sigma_end
        sc = _score(sigma_end)
        t0, c0 = time.perf_counter(), time.thread_time()
        x.add_(sc, alpha=sigma_end**2)
        if use_spot:
            x.add_(_spot_term(), alpha=-(sigma_end**2) / sigma_end**sigma_power)
        x.add_(mu)
        t_other += time.perf_counter() - t0
        c_other += time.thread_time() - c0
    if timings is not None:
        timings["network_s"] = timings.get("network_s", 0.0) + t_net
        timings["other_s"] = timings.get("other_s", 0.0) + t_other
        timings["network_cpu_s"] = timings.get("network_cpu_s", 0.0) + c_net
        timings["other_cpu_s"] = timings.get("other_cpu_s", 0.0) + c_other
        timings["steps"] = timings.get("steps", 0) + n_steps + 1
    return x
