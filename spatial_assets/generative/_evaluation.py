"""How close generated pseudo-cells are to real held-out cells, beside simple per-type baselines."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ._data import TrainingData, _type_labels, log_normalise, prepare_training_data
from ._model import ScoreModel


def heldout_log_data(model: ScoreModel, reference: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Held-out reference cells as the model sees them.

    Parameters
    ----------
    model : ScoreModel
        The trained model (its genes, types, type key and ``target_sum`` are used).
    reference : anndata.AnnData
        Held-out cells x genes (raw counts or log1p), with ``obs[model.cell_type_key]``.

    Returns
    -------
    x : numpy.ndarray
        ``(n, G)`` float32 log1p data on the model's genes (:func:`log_normalise`).
    type_idx : numpy.ndarray
        ``(n,)`` int64 index into ``model.cell_types``; -1 for types the model does not know.

    Raises
    ------
    ValueError
        If the type column or model genes are missing from ``reference``.
    """
    labels = _type_labels(reference, model.cell_type_key).astype(str).to_numpy()
    x = log_normalise(reference, model.genes, model.target_sum)
    idx = pd.Categorical(labels, categories=model.cell_types).codes.astype(np.int64)
    return x, idx


def diagonal_gaussian_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells: per-type, per-gene Gaussian fit on the training data, clipped at 0 (log1p scale).

    Parameters
    ----------
    data : TrainingData
        Training data giving the type means and residual variances.
    type_idx : numpy.ndarray
        ``(m,)`` type index of each pseudo-cell.
    seed : int, default 0
        Seed of the draws.

    Returns
    -------
    numpy.ndarray
        ``(m, G)`` float32 samples.
    """
    rng = np.random.default_rng(seed)
    sd = np.sqrt(data.type_variances())
    z = rng.standard_normal((len(type_idx), data.x.shape[1])).astype(np.float32)
    return np.maximum(data.type_means[type_idx] + z * sd[type_idx], 0)


def zero_inflated_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells with independent zero-inflated genes.

    Per type and gene: zero with the observed dropout fraction, else Gaussian with the expressing cells' mean and
    variance, clipped at 0 (log1p scale) (:meth:`TrainingData.zero_inflated_stats`).

    Parameters
    ----------
    data : TrainingData
        Training data giving the per-type statistics.
    type_idx : numpy.ndarray
        ``(m,)`` type index of each pseudo-cell.
    seed : int, default 0
        Seed of the draws.

    Returns
    -------
    numpy.ndarray
        ``(m, G)`` float32 samples.
    """
    rng = np.random.default_rng(seed)
    pi, m, v = data.zero_inflated_stats()
    shape = (len(type_idx), data.x.shape[1])
    expr = data.type_means[type_idx] + m[type_idx] + rng.standard_normal(shape) * np.sqrt(v[type_idx])
    return np.where(rng.random(shape) < pi[type_idx], 0.0, np.maximum(expr, 0)).astype(np.float32)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def two_sample_auc(real: np.ndarray, fake: np.ndarray, k: int = 15, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated kNN classifier AUC of real vs fake rows (0.5 = indistinguishable, 1 = separable).

    A k-nearest-neighbour classifier (scikit-learn) is trained to tell the two samples apart, with stratified
    ``folds``-fold cross-validated predicted probabilities; the ROC AUC of those is returned.

    Parameters
    ----------
    real, fake : numpy.ndarray
        ``(n, d)`` and ``(m, d)`` samples in the same space (e.g. PCA coordinates).
    k : int, default 15
        Neighbours (reduced when the samples are small).
    seed : int, default 0
        Seed of the fold split.
    folds : int, default 5
        Cross-validation folds (at most the smaller sample's size).

    Returns
    -------
    float
        The AUC.

    Raises
    ------
    ValueError
        If either sample has fewer than 2 rows.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    z = np.vstack([real, fake])
    y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    folds = int(min(folds, len(real), len(fake)))
    if folds < 2:
        raise ValueError(f"two_sample_auc needs >= 2 rows per sample, found {len(real)} real, {len(fake)} fake")
    k = int(min(k, len(z) * (folds - 1) // folds - 1))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(KNeighborsClassifier(k), z, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def _compare(
    real: np.ndarray, real_t: np.ndarray, fake: np.ndarray, fake_t: np.ndarray, types: list[str], pca, seed: int
) -> dict:
    per_type, w = {}, []
    for t in np.unique(real_t):
        r, f = real[real_t == t], fake[fake_t == t]
        per_type[types[t]] = {
            "n": int(len(r)),
            "mean_corr": _pearson(r.mean(0), f.mean(0)),
            "var_corr": _pearson(r.var(0), f.var(0)),
            "auc": two_sample_auc(pca.transform(r), pca.transform(f), seed=seed),
        }
        w.append(len(r))
    w = np.asarray(w, float) / np.sum(w)
    summary = {
        m: float(np.nansum(w * np.array([v[m] for v in per_type.values()]))) for m in ("mean_corr", "var_corr", "auc")
    }
    return summary | {"per_type": per_type}


def evaluate_samples(
    model: ScoreModel,
    heldout_x,
    heldout_type_idx=None,
    *,
    n_per_type: int = 200,
    seed: int = 0,
    level_stride: int = 1,
    train_data: TrainingData | None = None,
    min_cells: int = 10,
    n_pcs: int = 30,
    return_samples: bool = False,
    log=None,
) -> dict:
    """Compare generated pseudo-cells with held-out reference cells, per type, beside baselines.

    For each type with at least ``min_cells`` held-out cells, up to ``n_per_type`` of them are compared with as many
    samples of the model: Pearson correlation over genes of the means and of the variances, and a kNN two-sample
    classifier AUC (:func:`two_sample_auc`) in a PCA space (``n_pcs`` components, fit on the held-out cells).
    Summaries are weighted by the held-out counts. With ``train_data`` the same metrics are given for two
    baselines with independent genes (``diag_gaussian``: the per-type diagonal Gaussian, the default network's
    analytic part; ``zi_independent``: zero-inflated per gene) and for real training cells (``train_cells``: the
    floor of what is achievable with that many cells).

    Parameters
    ----------
    model : ScoreModel
        The trained score model.
    heldout_x : anndata.AnnData or numpy.ndarray
        Held-out reference cells (raw counts / log1p, normalised as the model's reference), or an ``(n, G)``
        log1p array on the model's genes.
    heldout_type_idx : numpy.ndarray, optional
        ``(n,)`` type index into ``model.cell_types``; required when ``heldout_x`` is an array.
    n_per_type : int, default 200
        Cells compared per type.
    seed : int, default 0
        Seed of the subsample, the sampler and the baselines (recorded).
    level_stride : int, default 1
        Use every ``level_stride``-th noise level when sampling (faster, coarser).
    train_data : TrainingData, optional
        The model's training data, for the baselines; must have the model's genes and types.
    min_cells : int, default 10
        Types with fewer held-out cells are left out.
    n_pcs : int, default 30
        PCA components of the AUC space.
    return_samples : bool, default False
        Also return the arrays ``samples`` (generated), ``real`` (the compared held-out cells) and ``type_idx``.
    log : callable, optional
        Receives the sampler's progress lines; None = silent.

    Returns
    -------
    dict
        ``model`` (``mean_corr``, ``var_corr``, ``auc``, ``per_type``), ``n_cells``, ``n_types``,
        ``nonfinite_fraction`` (non-finite samples, zeroed before scoring), ``sample_seconds``, ``seed``,
        ``level_stride``; with ``train_data`` also ``diag_gaussian``, ``zi_independent`` and ``train_cells`` in the
        same form.

    Raises
    ------
    ValueError
        If the held-out data has the wrong shape or no type indices, no type has ``min_cells`` cells, or
        ``train_data`` does not match the model.
    """
    from sklearn.decomposition import PCA

    if isinstance(heldout_x, AnnData):
        x, tidx = heldout_log_data(model, heldout_x)
    else:
        if heldout_type_idx is None:
            raise ValueError("heldout_type_idx is required when heldout_x is an array")
        x, tidx = np.asarray(heldout_x, dtype=np.float32), np.asarray(heldout_type_idx, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != len(model.genes) or len(tidx) != len(x):
        raise ValueError(
            f"heldout_x must be (n, {len(model.genes)}) with n type indices, found {x.shape} and "
            f"{len(tidx)} type indices"
        )
    rng = np.random.default_rng(seed)
    counts = np.bincount(tidx[tidx >= 0], minlength=len(model.cell_types))
    sel_types = np.flatnonzero(counts >= min_cells)
    if len(sel_types) == 0:
        raise ValueError(f"no cell type has >= {min_cells} held-out cells (counts {counts.tolist()})")
    rows = []
    for t in sel_types:  # loop over types (not cells) to pick a per-type subsample
        ix = np.flatnonzero(tidx == t)
        rows.append(rng.choice(ix, size=min(n_per_type, len(ix)), replace=False))
    rows = np.concatenate(rows)
    real, real_t = x[rows], tidx[rows]
    pca = PCA(n_components=int(min(n_pcs, x.shape[1], len(real) - 1)), random_state=seed).fit(real)
    t0 = time.perf_counter()
    fake = model.sample(torch.from_numpy(real_t), seed=seed, level_stride=level_stride, log=log).cpu().numpy()
    sample_s = time.perf_counter() - t0
    finite = np.isfinite(fake).all(1)
    fake = np.where(finite[:, None], fake, 0.0).astype(np.float32)
    out = {
        "model": _compare(real, real_t, fake, real_t, model.cell_types, pca, seed),
        "n_cells": int(len(real)),
        "n_types": int(len(sel_types)),
        "nonfinite_fraction": float(1 - finite.mean()),
        "sample_seconds": sample_s,
        "seed": seed,
        "level_stride": level_stride,
    }
    if train_data is not None:
        if train_data.genes != model.genes or train_data.cell_types != model.cell_types:
            raise ValueError("train_data must have the model's genes and cell types")
        base = diagonal_gaussian_samples(train_data, real_t, seed=seed + 1)
        out["diag_gaussian"] = _compare(real, real_t, base, real_t, model.cell_types, pca, seed)
        zi = zero_inflated_samples(train_data, real_t, seed=seed + 2)
        out["zi_independent"] = _compare(real, real_t, zi, real_t, model.cell_types, pca, seed)
        tr_rows = []
        for t in sel_types:
            ix = np.flatnonzero(train_data.type_idx == t)
            tr_rows.append(rng.choice(ix, size=min(int((real_t == t).sum()), len(ix)), replace=False))
        tr_rows = np.concatenate(tr_rows)
        out["train_cells"] = _compare(
            real, real_t, train_data.x[tr_rows], train_data.type_idx[tr_rows], model.cell_types, pca, seed
        )
    if return_samples:
        out |= {"samples": fake, "real": real, "type_idx": real_t}
    return out


def _pilot_seconds_per_cell(model: ScoreModel, level_stride: int, n_cells: int, seed: int) -> float:
    """Sampling seconds per pseudo-cell at ``level_stride``, from a short timed run (a few levels, few cells)."""
    n_levels = len(model.sigmas[::level_stride])
    pilot_stride = max(level_stride, len(model.sigmas) // 8)  # ~8 levels
    k = int(min(max(n_cells, 1), 1024))
    t = torch.zeros(k, dtype=torch.int64)
    t0 = time.perf_counter()
    model.sample(t, seed=seed, level_stride=pilot_stride)
    dt = time.perf_counter() - t0
    return dt / k * n_levels / max(len(model.sigmas[::pilot_stride]), 1)


def checkpoint_quality(
    model: ScoreModel,
    reference: AnnData,
    cell_type_key: str,
    params,
    *,
    n_per_type: int | None = None,
    seed: int = 0,
    margin: float = 0.05,
    level_stride: int | None = None,
    min_cells: int = 3,
    time_budget_s: float | None | str = "params",
    log=None,
) -> dict:
    """Whether a trained checkpoint is worth using: its pseudo-cells against the reference's, beside the Gaussian.

    The baseline is the per-type diagonal Gaussian (the network's analytic part, i.e. what training must improve
    on). Passes when the two-sample kNN AUC is at most the Gaussian's + ``margin`` and the per-type mean
    correlation at least the Gaussian's - ``margin`` (:func:`evaluate_samples` on the reference cells).

    The evaluation is bounded: at most ``params.quality_max_cells`` cells in all (cells per type lowered to fit,
    at least 2), and, with a time budget, a short timed pilot run of the sampler (~8 noise levels, up to 1,024
    cells) estimates the cost per pseudo-cell; cells per type are then lowered to fit the budget, down to
    ``params.quality_min_cells_per_type`` (below that the AUC is noise). When even that does not fit, the floor is
    kept and ``over_budget`` is set (the noise schedule is never coarsened: that fails good checkpoints). The budget
    covers the sampling only (not the pilot, PCA or classifier); the pilot's estimate is short and can be off by
    tens of percent on a loaded machine. A bounded evaluation is noisier (fewer cells): ``reason`` says so. What
    was evaluated and why is returned and logged.

    Parameters
    ----------
    model : ScoreModel
        The trained model.
    reference : anndata.AnnData
        Reference cells x genes (raw counts), with ``obs[cell_type_key]``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    params : spatial_assets.params.ScoreModelParams
        Parameters of the model's training data (cells per type, seed) and of the bounds (``quality_*``).
    n_per_type : int, optional
        Cells compared per type; default ``params.quality_cells_per_type``.
    seed : int, default 0
        Seed of the comparison (recorded).
    margin : float, default 0.05
        Tolerance of the pass rule.
    level_stride : int, optional
        Noise-level stride of the sampler; default ``params.quality_level_stride``.
    min_cells : int, default 3
        Types with fewer cells are left out.
    time_budget_s : float or None, default "params"
        Sampling-time budget in seconds; ``"params"`` = ``params.quality_time_budget_s``; None = no budget.
    log : callable, optional
        Receives what is evaluated (cells, types, stride, estimated seconds) and the sampler's progress lines.

    Returns
    -------
    dict
        ``auc``, ``mean_corr``, ``var_corr`` and their ``gaussian_`` counterparts, ``n_cells``, ``n_types``,
        ``n_per_type``, ``level_stride``, ``time_budget_s``, ``estimated_sample_seconds`` (None without a budget),
        ``sample_seconds``, ``over_budget`` (the estimate exceeds the budget even at the floor), ``bounded_by`` (``"max_cells"`` / ``"time_budget"`` when they lowered the work),
        ``seed``, ``margin``, ``against``, ``passed``, ``reason`` (what failed, with the values and the rule), and
        the ``samples`` / ``real`` / ``type_idx`` arrays for a figure (not JSON: drop them before saving).

    Raises
    ------
    KeyError
        If ``reference.obs`` has no ``cell_type_key`` column.
    """
    n_per_type = int(params.quality_cells_per_type if n_per_type is None else n_per_type)
    level_stride = int(params.quality_level_stride if level_stride is None else level_stride)
    budget = params.quality_time_budget_s if isinstance(time_budget_s, str) else time_budget_s
    if cell_type_key not in reference.obs:
        raise KeyError(f"reference.obs has no column {cell_type_key!r} (cell types)")
    counts = pd.Series(reference.obs[cell_type_key].astype(str).to_numpy()).value_counts()
    n_types = int(sum(int(counts.get(t, 0)) >= min_cells for t in model.cell_types))
    bounded = []
    if n_types and n_per_type * n_types > params.quality_max_cells:
        n_per_type, bounded = max(2, params.quality_max_cells // n_types), ["max_cells"]
    est = None
    if budget is not None and n_types:
        per_cell = _pilot_seconds_per_cell(model, level_stride, n_per_type * n_types, seed)
        est = per_cell * n_per_type * n_types
        if est > budget:
            bounded.append("time_budget")
            floor = min(n_per_type, params.quality_min_cells_per_type)
            n_per_type = max(floor, int(budget / (per_cell * n_types)))
            est = per_cell * n_per_type * n_types
            # still over budget at the floor: keep the floor and the schedule (a coarser schedule makes worse
            # samples and fails good checkpoints, bench_quality_budget.py) and say so
    if log is not None:
        log(
            f"checkpoint quality: {n_per_type} cells per type x {n_types} types, noise-level stride {level_stride}"
            + (f", estimated sampling {est:.0f} s (budget {budget:g} s)" if est is not None else "")
            + (f"; bounded by {' and '.join(bounded)}" if bounded else "")
            + ("; over budget even at the floor of cells per type" if est is not None and est > budget else "")
        )
    train = prepare_training_data(reference, cell_type_key, params, genes=model.genes, target_sum=model.target_sum)
    q = evaluate_samples(
        model,
        reference,
        n_per_type=n_per_type,
        level_stride=level_stride,
        seed=seed,
        return_samples=True,
        train_data=train,
        min_cells=min_cells,
        log=log,
    )
    metrics = {k: float(v) for k, v in q["model"].items() if isinstance(v, (int, float))}
    base = {f"gaussian_{k}": float(v) for k, v in q["diag_gaussian"].items() if isinstance(v, (int, float))}
    out = {
        **metrics,
        **base,
        "n_cells": q["n_cells"],
        "n_types": q["n_types"],
        "n_per_type": n_per_type,
        "level_stride": level_stride,
        "time_budget_s": budget,
        "estimated_sample_seconds": est,
        "sample_seconds": q["sample_seconds"],
        "over_budget": bool(est is not None and est > budget),
        "bounded_by": bounded,
        "seed": seed,
        "margin": margin,
        "against": "reference cells",
    }
    fails = []
    if not out.get("auc", 1.0) <= out.get("gaussian_auc", 0.0) + margin:
        fails.append(
            f"two-sample AUC {out.get('auc', float('nan')):.3f} > Gaussian's "
            f"{out.get('gaussian_auc', float('nan')):.3f} + {margin}"
        )
    if not out.get("mean_corr", 0.0) >= out.get("gaussian_mean_corr", 1.0) - margin:
        fails.append(
            f"per-type mean correlation {out.get('mean_corr', float('nan')):.3f} < Gaussian's "
            f"{out.get('gaussian_mean_corr', float('nan')):.3f} - {margin}"
        )
    out["passed"] = not fails
    out["reason"] = (
        "; ".join(fails)
        if fails
        else (
            f"AUC {out['auc']:.3f} (Gaussian {out['gaussian_auc']:.3f}) and mean correlation {out['mean_corr']:.3f} "
            f"(Gaussian {out['gaussian_mean_corr']:.3f}) within {margin} of the Gaussian or better"
        )
    )
    if bounded:
        out["reason"] += (
            f" [bounded evaluation ({' and '.join(bounded)}): {n_per_type} cells per type, noise-level stride "
            f"{level_stride}]"
        )
    out.update(samples=q["samples"], real=q["real"], type_idx=q["type_idx"])
    return out
