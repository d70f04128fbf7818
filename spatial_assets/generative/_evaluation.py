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
    """Held-out reference cells as the model sees them: (log1p data on model genes, type index; -1 = unknown)."""
    labels = _type_labels(reference, model.cell_type_key).astype(str).to_numpy()
    x = log_normalise(reference, model.genes, model.target_sum)
    idx = pd.Categorical(labels, categories=model.cell_types).codes.astype(np.int64)
    return x, idx


def diagonal_gaussian_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells: per-type, per-gene Gaussian fit on the training data, clipped at 0 (log1p scale)."""
    rng = np.random.default_rng(seed)
    sd = np.sqrt(data.type_variances())
    z = rng.standard_normal((len(type_idx), data.x.shape[1])).astype(np.float32)
    return np.maximum(data.type_means[type_idx] + z * sd[type_idx], 0)


def zero_inflated_samples(data: TrainingData, type_idx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Baseline pseudo-cells with independent genes: per type and gene, zero with the observed dropout fraction,
    else Gaussian with the expressing cells' mean and variance (clipped at 0)."""
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
    """Cross-validated kNN classifier AUC of real vs fake rows (0.5 = indistinguishable, 1 = separable)."""
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
) -> dict:
    """Compare generated pseudo-cells with held-out reference cells, per type.

    ``heldout_x``: an AnnData of held-out reference cells (raw counts / log1p, normalised as the model's
    reference), or a (n, G) log1p array on the model's genes with ``heldout_type_idx``. For each type with at least
    ``min_cells`` held-out cells, up to ``n_per_type`` of them are compared with as many samples: Pearson
    correlation over genes of the means and of the variances, and a kNN two-sample classifier AUC in the PCA space
    (``n_pcs``, fit on the held-out cells). Summaries are weighted by the held-out counts. With ``train_data``
    the same metrics are given for two baselines with independent genes (``diag_gaussian``: per-type diagonal
    Gaussian, the default network's analytic part; ``zi_independent``: zero-inflated per gene) and for real
    training cells (``train_cells``: the floor of what is achievable with that many cells). ``return_samples``
    adds the arrays ``samples`` (generated), ``real`` (the compared held-out cells) and ``type_idx`` (their
    types).
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
    fake = model.sample(torch.from_numpy(real_t), seed=seed, level_stride=level_stride).cpu().numpy()
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


def checkpoint_quality(
    model: ScoreModel,
    reference: AnnData,
    cell_type_key: str,
    params,
    *,
    n_per_type: int = 100,
    seed: int = 0,
    margin: float = 0.05,
    level_stride: int = 1,
    min_cells: int = 3,
) -> dict:
    """Is a trained checkpoint worth using? Its generated pseudo-cells against the reference cells, beside the
    per-type diagonal Gaussian (the network's analytic part, i.e. what training must improve on).

    Passes when the two-sample kNN AUC is at most the Gaussian's + ``margin`` and the per-type mean correlation
    at least the Gaussian's - ``margin``. Returns the figures (``auc``, ``mean_corr``, ``var_corr`` and their
    ``gaussian_`` counterparts), ``passed``, ``reason`` (what failed, with the values and the rule), the cells
    compared, and ``samples`` / ``real`` / ``type_idx`` arrays for a figure (not JSON: drop before saving).
    """
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
    )
    metrics = {k: float(v) for k, v in q["model"].items() if isinstance(v, (int, float))}
    base = {f"gaussian_{k}": float(v) for k, v in q["diag_gaussian"].items() if isinstance(v, (int, float))}
    out = {
        **metrics,
        **base,
        "n_cells": q["n_cells"],
        "level_stride": level_stride,
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
    out.update(samples=q["samples"], real=q["real"], type_idx=q["type_idx"])
    return out
