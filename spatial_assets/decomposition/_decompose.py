"""SpatialScope step 3: decompose every spot of a range into its cells, with replicates and retries."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..metrics import pearson_columns
from ..params import DecompositionParams
from ._inputs import DecompositionInput, _check_model, _targets, hidden_genes
from ._langevin import CLIP_CELL, CLIP_SPOT, EXPM1_MAX, annealed_langevin, noise_levels


# ----------------------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecompositionResult:
    """The decomposed cells of a spot set and the run's summary.

    Attributes
    ----------
    adata : anndata.AnnData
        Cells x model genes, X = posterior mean expression (reference scale).
    info : dict
        The run's summary (settings, counts, timings, recovery scores).
    """

    adata: ad.AnnData
    info: dict[str, Any]


def _segment_matrix(spot_idx: np.ndarray, n_spots: int) -> sp.csr_matrix:
    """Sparse (n_spots x n_cells) indicator: ``M @ cell_values`` = per-spot sums."""
    n = len(spot_idx)
    return sp.csr_matrix((np.ones(n), (spot_idx, np.arange(n))), shape=(n_spots, n))


def _empty_result(inputs: DecompositionInput, info: dict) -> DecompositionResult:
    obs = pd.DataFrame(
        {
            "spot": pd.Series([], dtype=str),
            "x": np.zeros(0),
            "y": np.zeros(0),
            "cell_type": pd.Series([], dtype=str),
            "replicate_spread": np.zeros(0),
            "n_retries": np.zeros(0, np.int64),
            "n_finite_replicates": np.zeros(0, np.int64),
            "spot_scale": np.zeros(0),
            "spot_rel_error": np.zeros(0),
        },
        index=pd.Index([], name="cell"),
    )
    var = pd.DataFrame(
        {
            "platform_effect": inputs.platform_effect,
            "in_slide": inputs.in_slide,
            "left_out": np.isin(inputs.genes, info.get("leave_out_genes", [])),
        },
        index=pd.Index(inputs.genes, name="gene"),
    )
    a = ad.AnnData(X=np.zeros((0, len(inputs.genes)), np.float32), obs=obs, var=var)
    a.uns["decomposition"] = info
    return DecompositionResult(a, info)


def decompose(
    inputs: DecompositionInput,
    model,
    params: DecompositionParams | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
    *,
    clip_spot: float = CLIP_SPOT,
    clip_cell: float = CLIP_CELL,
    prior=None,
) -> DecompositionResult:
    """Decompose every spot of ``inputs`` into its cells (SpatialScope step 3).

    ``params.estimator == "mixture"`` (default): :func:`decompose_mixture` under ``prior`` (a
    :class:`MixturePrior`, required). ``"langevin"``: annealed Langevin with ``params.n_replicates`` as below.

    The score model must live on ``device`` (None = the model's device). Genes hidden from the spot term are
    ``inputs.leave_out`` plus ``params.leave_out_genes``; their recovery is scored against the spot values
    (``info['leave_out_spot_r']``). Cells whose result is not finite are re-run with their spots (whole spot
    replicates) up to ``params.max_retries`` rounds with seeds ``seed + round``; the rest are reported and NaN.

    Parameters
    ----------
    inputs : DecompositionInput
        The prepared spots and cells (from :func:`prepare_spots`, with the same model).
    model : ScoreModel
        The fitted score model (the prior over each type's expression).
    params : DecompositionParams or None
        Estimator, replicates, seeds, genes left out etc.; the defaults when None.
    device : str or torch.device or None
        Device the decomposition must run on (Langevin); must be the model's device.
    log : callable or None
        Receives progress lines.
    clip_spot : float
        Bound on the absolute spot residual of the Langevin spot term.
    clip_cell : float
        Bound on the absolute per-cell Langevin spot term.
    prior : MixturePrior or None
        The mixture prior; required with ``params.estimator == "mixture"``.

    Returns
    -------
    DecompositionResult
        The decomposed cells and the run's summary.

    Raises
    ------
    TypeError
        If ``model`` lacks the score model interface.
    ValueError
        If the model's genes differ from the inputs', the mixture estimator is asked for without ``prior``,
        ``device`` is not the model's device, or every shared gene is left out.
    """
    params = params or DecompositionParams()
    _check_model(model)
    if list(model.genes) != list(inputs.genes):
        raise ValueError(
            f"score model genes ({len(model.genes)}) differ from the inputs' ({len(inputs.genes)}): "
            "prepare_spots was run with another checkpoint"
        )
    if params.estimator == "mixture":
        if prior is None:
            raise ValueError(
                "params.estimator='mixture' needs prior=fit_mixture_prior(reference, model) "
                "(or set estimator='langevin')"
            )
        from ._mixture import decompose_mixture

        return decompose_mixture(inputs, model, prior, params, log=log)
    if device is not None and torch.device(device).type != model.type_means.device.type:
        raise ValueError(f"device: asked for '{device}' but the score model is on '{model.type_means.device}'")
    genes, leave_out, hidden = hidden_genes(inputs, params.leave_out_genes)
    sig = model.sigmas.detach().float().cpu().numpy()
    levels = noise_levels(model, params.level_stride)
    info: dict[str, Any] = {k: v for k, v in inputs.info.items()}
    info.update(
        leave_out_genes=leave_out,
        replicates=int(params.n_replicates),
        seed=int(params.seed),
        levels=len(levels),
        levels_total=len(sig),
        level_stride=int(params.level_stride),
        steps_per_level=int(model.steps_per_level),
        decomposition_step=float(model.decomposition_step),
        sigma_power=float(params.sigma_power),
        sigma_begin=float(sig[levels[0]]),
        sigma_end=float(sig[-1]),
        device=str(model.type_means.device),
    )
    if inputs.n_cells == 0:
        info.setdefault("empty_reason", "no cells to decompose")
        info.update(cells=0, spots=0, non_finite_cells=[], retry_rounds=0)
        return _empty_result(inputs, info)
    if not (inputs.in_slide & ~hidden).any():
        raise ValueError("leave_out_genes: every shared gene is left out; at least one must constrain the spots")

    t_start, cpu_start = time.perf_counter(), time.process_time()
    dev = model.type_means.device
    target_np, spot_scale, observed = _targets(inputs, model, hidden)
    S, C, G, R = inputs.n_spots, inputs.n_cells, len(genes), int(params.n_replicates)
    n = inputs.spots["n_cells"].to_numpy(np.float64)
    tgt = torch.as_tensor(target_np + n[:, None], dtype=torch.float32)  # n_s (1 + y_s)
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    type_idx = inputs.cells["type_idx"].to_numpy(np.int64)
    mask = torch.as_tensor(observed, dtype=torch.float32)
    timings: dict = {}

    def run(rows_r: np.ndarray, rows_c: np.ndarray, seed: int) -> torch.Tensor:
        """Rows (replicate, cell); segments = the (replicate, spot) pairs present, renumbered."""
        seg_full = rows_r * S + spot_idx[rows_c]
        useg, seg = np.unique(seg_full, return_inverse=True)
        return annealed_langevin(
            model,
            torch.as_tensor(type_idx[rows_c]),
            seg=torch.as_tensor(seg, device=dev),
            target=tgt[torch.as_tensor(useg % S)],
            spot_mask=mask,
            levels=levels,
            sigma_power=params.sigma_power,
            seed=seed,
            batch_cells=params.batch_cells,
            clip_spot=clip_spot,
            clip_cell=clip_cell,
            timings=timings,
            log=log,
        ).cpu()

    def finite_rows(v: torch.Tensor) -> np.ndarray:
        # finite on the expression scale: log1p values above ~88 overflow float32 expm1 and count as non-finite
        return (torch.isfinite(v).all(-1) & (v.amax(-1) < EXPM1_MAX)).numpy()

    def seg_of(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return r * S + spot_idx[c]

    rr = np.repeat(np.arange(R), C)
    cc = np.tile(np.arange(C), R)

    res = run(rr, cc, params.seed).reshape(R, C, G)
    finite = finite_rows(res)  # (R, C)
    n_retries = np.zeros(C, np.int64)
    retry_seeds = []
    rounds = 0
    while not finite.all() and rounds < params.max_retries:
        rounds += 1
        bad_r, bad_c = np.nonzero(~finite)
        bad_seg = np.unique(seg_of(bad_r, bad_c))
        redo = np.isin(seg_of(rr, cc), bad_seg)
        seed = int(params.seed) + rounds
        retry_seeds.append(seed)
        if log is not None:
            log(
                f"decomposition: retry {rounds}: {len(np.unique(bad_c))} non-finite cells, "
                f"{len(bad_seg)} spot replicates re-run"
            )
        out = run(rr[redo], cc[redo], seed)
        res[torch.as_tensor(rr[redo]), torch.as_tensor(cc[redo])] = out
        n_retries[np.unique(cc[redo])] += 1
        finite = finite_rows(res)

    # posterior mean over finite replicates (in place: one (R, C, G) buffer)
    n_fin = finite.sum(0)
    w = torch.as_tensor(finite)[:, :, None]
    expr = res.expm1_().clamp_min_(0).masked_fill_(~w, 0)  # (R, C, G)
    denom = torch.as_tensor(np.maximum(n_fin, 1), dtype=torch.float32)[:, None]
    mean = (expr.sum(0) / denom).numpy().astype(np.float64)
    mean[n_fin == 0] = np.nan
    logv = expr.log1p_()
    logv.sub_(logv.sum(0) / denom).pow_(2).masked_fill_(~w, 0)
    var = logv.sum(0) / torch.as_tensor(np.maximum(n_fin - 1, 1), dtype=torch.float32)[:, None]
    spread = np.where(n_fin > 1, var.sqrt().mean(1).numpy().astype(np.float64), np.nan)
    del res, expr, logv

    seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    steps = max(timings.get("steps", 1), 1)
    info.update(
        estimator="langevin",
        rows_per_step=R * C,
        retry_rounds=rounds,
        retry_seeds=retry_seeds,
        cells_retried=int((n_retries > 0).sum()),
        langevin_steps=int(steps),
        seconds_per_step=(timings["network_s"] + timings["other_s"]) / steps,
        network_seconds_per_step=timings["network_s"] / steps,
        other_seconds_per_step=timings["other_s"] / steps,
        # CPU of the calling thread (equals the work done when torch runs on 1 thread; a load-independent figure)
        network_thread_cpu_seconds_per_step=timings["network_cpu_s"] / steps,
        other_thread_cpu_seconds_per_step=timings["other_cpu_s"] / steps,
    )
    return _finish(
        inputs, mean, spread, target_np, spot_scale, observed, hidden, info, n_retries, n_fin, seconds, cpu_seconds, log
    )


def _finish(
    inputs: DecompositionInput,
    mean: np.ndarray,
    spread: np.ndarray,
    target_np: np.ndarray,
    spot_scale: np.ndarray,
    observed: np.ndarray,
    hidden: np.ndarray,
    info: dict,
    n_retries: np.ndarray,
    n_fin: np.ndarray,
    seconds: float,
    cpu_seconds: float,
    log: Callable[[str], None] | None,
    layers: dict | None = None,
) -> DecompositionResult:
    """The result AnnData of any estimator: reconstruction of the spots and spot-level recovery of hidden genes."""
    genes = list(inputs.genes)
    S, C = inputs.n_spots, inputs.n_cells
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    non_finite = inputs.cells.index[n_fin == 0].astype(str).tolist()
    Mseg = _segment_matrix(spot_idx, S)
    sums = Mseg @ np.where(np.isfinite(mean), mean, 0.0)
    diff = (sums - target_np)[:, observed]
    tnorm = np.sqrt((target_np[:, observed] ** 2).sum(1))
    rel = np.sqrt((diff**2).sum(1)) / np.where(tnorm > 0, tnorm, 1)
    rel_all = float(np.sqrt((diff**2).sum()) / max(np.sqrt((target_np[:, observed] ** 2).sum()), 1e-30))
    held = inputs.in_slide & hidden
    held_r = pearson_columns(sums[:, held], target_np[:, held]) if held.any() else np.zeros(0)
    info.update(
        cells=C,
        spots=S,
        non_finite_cells=non_finite,
        reconstruction_rel_error=rel_all,
        reconstruction_rel_error_median_spot=float(np.median(rel)),
        leave_out_spot_r={str(g): float(r) for g, r in zip(np.asarray(genes)[held], held_r)},
        leave_out_spot_r_median=float(np.nanmedian(held_r))
        if held.any() and np.isfinite(held_r).any()
        else float("nan"),
        seconds_total=seconds,
        cpu_seconds_total=cpu_seconds,
        spots_per_second=S / seconds if seconds > 0 else float("nan"),
    )
    info.setdefault("retry_rounds", 0)
    obs = pd.DataFrame(
        {
            "spot": inputs.cells["spot"].to_numpy(str),
            "x": inputs.cells["x"].to_numpy(float),
            "y": inputs.cells["y"].to_numpy(float),
            "cell_type": inputs.cells["cell_type"].to_numpy(str),
            "replicate_spread": spread,
            "n_retries": n_retries,
            "n_finite_replicates": n_fin.astype(np.int64),
            "spot_scale": spot_scale[spot_idx],
            "spot_rel_error": rel[spot_idx],
        },
        index=pd.Index(inputs.cells.index.astype(str), name="cell"),
    )
    var = pd.DataFrame(
        {"platform_effect": inputs.platform_effect, "in_slide": inputs.in_slide, "left_out": hidden},
        index=pd.Index(genes, name="gene"),
    )
    out = ad.AnnData(X=mean.astype(np.float32), obs=obs, var=var, layers=layers or None)
    out.uns["decomposition"] = info
    if log is not None:
        log(f"decomposition: {C} cells in {S} spots, {seconds:.1f} s, spot reconstruction error {rel_all:.3g}")
    return DecompositionResult(out, info)
