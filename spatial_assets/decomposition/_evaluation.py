"""Decomposed cells against true cells."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..metrics import pearson_columns
from ._decompose import DecompositionResult, _segment_matrix


def evaluate_against_truth(
    result: DecompositionResult | ad.AnnData,
    truth: ad.AnnData,
    genes: Sequence[str] | None = None,
    *,
    prediction: np.ndarray | None = None,
    multi_cell_only: bool = False,
) -> dict[str, float]:
    """Compare decomposed cells with true cells (raw counts, obs names = cell ids) in the decomposition's scale.

    Truth is brought to the reference scale like the slide: ``counts / platform_effect * spot_scale``. Returns the
    median over genes of the Pearson r across cells (linear and log1p), the median over cells of the Pearson r
    across genes (linear and log1p), and the relative error of per-spot sums. ``genes`` restricts the genes scored (e.g. held-out
    ones); ``prediction`` (cells x genes of the result) scores another estimate (e.g. a baseline) on the same cells.

    Parameters
    ----------
    result : DecompositionResult or anndata.AnnData
        The decomposition (or its ``adata``): cells x genes with ``spot`` and ``spot_scale`` in ``obs``.
    truth : anndata.AnnData
        True cells x genes (raw counts), obs names = cell ids.
    genes : sequence of str or None
        Genes to score; all genes in both (and, if marked, in the slide) when None.
    prediction : numpy.ndarray or None
        Another estimate (cells x genes of the result) to score instead of the result's ``X``.
    multi_cell_only : bool
        Score only cells whose spot holds more than one scored cell.

    Returns
    -------
    dict
        ``cells`` and ``genes`` (counts scored), ``gene_r_median``, ``gene_r_log1p_median``, ``cell_r_median``,
        ``cell_r_log1p_median``, ``spot_rel_error`` and ``rmse_log1p``.

    Raises
    ------
    ValueError
        If ``truth`` is not an AnnData, shares no cell ids with the decomposition, or lacks some of ``genes``.
    """
    a = result.adata if isinstance(result, DecompositionResult) else result
    if not isinstance(truth, ad.AnnData):
        raise ValueError(f"truth: expected an AnnData of cells x genes, found {type(truth).__name__}")
    common = a.obs_names[a.obs_names.isin(truth.obs_names)]
    if len(common) == 0:
        raise ValueError(
            f"truth: no cell ids shared with the decomposition (truth e.g. {list(truth.obs_names[:3])}, "
            f"decomposed e.g. {list(a.obs_names[:3])})"
        )
    gl = list(a.var_names[a.var["in_slide"].to_numpy(bool)]) if "in_slide" in a.var else list(a.var_names)
    gl = [g for g in gl if g in set(truth.var_names)]
    if genes is not None:
        missing = [g for g in genes if g not in set(gl)]
        if missing:
            raise ValueError(f"genes: {missing[:10]} are not in both the decomposition and the truth")
        gl = list(genes)
    rows = a.obs_names.get_indexer(common)
    pred = np.asarray(a.X if prediction is None else prediction, dtype=np.float64)[rows][:, a.var_names.get_indexer(gl)]
    t = truth[common, gl].X
    t = (t.toarray() if sp.issparse(t) else np.asarray(t)).astype(np.float64)
    be = a.var["platform_effect"].reindex(gl).to_numpy(float) if "platform_effect" in a.var else np.ones(len(gl))
    t = t / be * a.obs["spot_scale"].to_numpy(float)[rows, None]
    spot = a.obs["spot"].to_numpy(str)[rows]
    if multi_cell_only:
        _, inv, cnt = np.unique(spot, return_inverse=True, return_counts=True)
        keep = cnt[inv] > 1
        pred, t, spot = pred[keep], t[keep], spot[keep]
    ok = np.isfinite(pred).all(1)
    pred, t, spot = pred[ok], t[ok], spot[ok]
    gene_r = pearson_columns(pred, t)
    gene_r_log = pearson_columns(np.log1p(pred), np.log1p(t))
    cell_r = pearson_columns(pred.T, t.T)
    cell_r_log = pearson_columns(np.log1p(pred).T, np.log1p(t).T)
    _, sinv = np.unique(spot, return_inverse=True)
    Mseg = _segment_matrix(sinv, int(sinv.max()) + 1 if len(sinv) else 0)
    ds, ts = Mseg @ pred, Mseg @ t
    spot_err = float(np.sqrt(((ds - ts) ** 2).sum()) / max(np.sqrt((ts**2).sum()), 1e-30))

    def med(v):
        return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")

    return {
        "cells": int(len(pred)),
        "genes": len(gl),
        "gene_r_median": med(gene_r),
        "gene_r_log1p_median": med(gene_r_log),
        "cell_r_median": med(cell_r),
        "cell_r_log1p_median": med(cell_r_log),
        "spot_rel_error": spot_err,
        "rmse_log1p": float(np.sqrt(np.mean((np.log1p(pred) - np.log1p(t)) ** 2))),
    }
