"""Imaging platforms and bead arrays where each spot is a cell: cells from spots, counts checks, units, imputation scores."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..constants import Platform
from ..geometry import VISIUM_SPOT_DIAMETER_UM
from ..metrics import pearson_columns


class PlatformInputError(ValueError):
    """Bad input to a platform helper; the message names the input / field and what was expected vs found."""


# ------------------------------------------------------------------------------------------------ image-free cells
def cells_from_spots(slide: ad.AnnData, platform: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One cell per spot at the spot's position: the cells table of image-free platforms.

    Each spot (Slide-seq bead, imaged cell) becomes cell ``<spot>_0``; Slide-seq doublets are split into two cells
    later, by cell typing's doublet mode (:func:`cells_from_beads`). Spots with no counts are marked as failing QC.

    Parameters
    ----------
    slide : anndata.AnnData
        Spots x genes counts with ``obsm['spatial']`` (x, y).
    platform : str
        Platform name, recorded in the summary.

    Returns
    -------
    cells : pandas.DataFrame
        Indexed by ``cell_id`` (``<spot>_0``), columns ``x``, ``y``, ``area`` (NaN), ``label`` (1..n), ``spot``,
        ``spot_distance`` (0).
    spots : pandas.DataFrame
        Indexed by spot name, columns ``n_cells``, ``n_cells_raw`` (both 1), ``total_umi``, ``qc_pass``
        (``total_umi > 0``).
    summary : dict
        ``cells_kept``, ``cells_outside_spots`` (0), ``spots_filtered`` (spots without counts) and ``platform``.
    """
    xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    names = slide.obs_names.astype(str)
    cells = pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "area": np.nan,
            "label": np.arange(1, len(names) + 1),
            "spot": names,
            "spot_distance": 0.0,
        },
        index=pd.Index(names + "_0", name="cell_id"),
    )
    umi = np.asarray(slide.X.sum(1)).ravel()
    spots = pd.DataFrame(
        {"n_cells": 1, "n_cells_raw": 1, "total_umi": umi, "qc_pass": umi > 0}, index=pd.Index(names, name="spot")
    )
    summary = {
        "cells_kept": len(cells),
        "cells_outside_spots": 0,
        "spots_filtered": int((umi <= 0).sum()),
        "platform": platform,
    }
    return cells, spots, summary


# ------------------------------------------------------------------------------------------------ units and counts
def microns_per_pixel(slide: ad.AnnData, platform: str = Platform.VISIUM) -> tuple[float, str]:
    """Micrometres per coordinate unit of ``obsm['spatial']``, and how it was found.

    In order: ``uns['spatial'][lib]['scalefactors']['microns_per_pixel']`` when present and positive; for Visium,
    55 um / ``spot_diameter_fullres``; else 1 (image-free platforms, whose coordinates are usually micrometres).

    Parameters
    ----------
    slide : anndata.AnnData
        The slide (its first ``uns['spatial']`` library is read).
    platform : str, default "visium"
        A :class:`spatial_assets.constants.Platform` value.

    Returns
    -------
    um_per_px : float
        Micrometres per coordinate unit.
    source : str
        Which rule gave it (for metadata and logs).
    """
    lib = next(iter(slide.uns.get("spatial", {}) or {}), None)
    sf = (slide.uns["spatial"][lib].get("scalefactors", {}) if lib is not None else {}) or {}
    if "microns_per_pixel" in sf and float(sf["microns_per_pixel"]) > 0:
        return float(sf["microns_per_pixel"]), "scalefactors['microns_per_pixel']"
    if platform == Platform.VISIUM and float(sf.get("spot_diameter_fullres", 0) or 0) > 0:
        return VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"]), "55 um / spot_diameter_fullres"
    return 1.0, "assumed: coordinates in micrometres"


def integer_counts(slide: ad.AnnData) -> tuple[ad.AnnData, dict]:
    """The slide with its counts rounded to integers, for RCTD's Poisson likelihood.

    Imaging panels (MERFISH and alike) are often volume-normalised, so their counts are not integers. The slide is
    copied only when something changes (sparse zeros created by rounding are eliminated; a dense matrix becomes
    float32).

    Parameters
    ----------
    slide : anndata.AnnData
        Spots x genes counts, dense or sparse ``X``.

    Returns
    -------
    slide : anndata.AnnData
        ``slide`` itself when every value is already an integer, else a rounded copy.
    info : dict
        ``values_rounded`` (number of stored values that changed) and ``max_rounding`` (largest absolute change).
    """
    X = slide.X
    vals = X.data if sp.issparse(X) else np.asarray(X)
    r = np.round(vals)
    changed = int(np.count_nonzero(r != vals))
    info = {"values_rounded": changed, "max_rounding": float(np.abs(r - vals).max()) if vals.size else 0.0}
    if changed == 0:
        return slide, info
    out = slide.copy()
    if sp.issparse(out.X):
        out.X = out.X.copy()
        out.X.data = np.round(out.X.data).astype(out.X.dtype)
        out.X.eliminate_zeros()
    else:
        out.X = np.round(np.asarray(out.X)).astype(np.float32)
    return out, info


# ------------------------------------------------------------------------------------------------ Slide-seq simulation
def _xy_um(cells: ad.AnnData, um_per_px: float | None) -> np.ndarray:
    if {"x_um", "y_um"} <= set(cells.obs.columns):
        return cells.obs[["x_um", "y_um"]].to_numpy(dtype=float)
    if {"x", "y"} <= set(cells.obs.columns):
        return cells.obs[["x", "y"]].to_numpy(dtype=float) * float(um_per_px or 1.0)
    raise PlatformInputError("cells.obs: expected columns x_um, y_um (or x, y) with cell positions")


def imputation_scores(
    decomposed: ad.AnnData,
    truth: ad.AnnData,
    genes: Sequence[str],
    *,
    reference: ad.AnnData | None = None,
    reference_type_key: str = "cell_type",
) -> dict:
    """Imputed genes against real counts, per gene (Pearson r across cells), on the raw count scale.

    The decomposition's expression (reference scale) is brought back to counts by
    ``X x platform_effect / spot_scale`` and compared with the real counts of the same cells. Baselines (with
    ``reference``): each cell = its library (its total over the measured genes) times the reference's pooled mean
    profile (``mean``, library size only) or its called type's mean profile (``type_mean``), each normalised over
    the measured genes. Cells with non-finite predictions are left out.

    Parameters
    ----------
    decomposed : anndata.AnnData
        The decomposition's cells x genes (obs ``spot_scale``, ``cell_type``, ``spot``; var ``platform_effect``,
        ``in_slide``; missing scale columns count as 1).
    truth : anndata.AnnData
        Real counts of the same cells; obs names are the decomposition's cell ids or their spot names (as for
        one-cell spots).
    genes : sequence of str
        The held-out (imputed) genes to score; they must be in both ``decomposed`` and ``truth``.
    reference : anndata.AnnData, optional
        Single-cell reference (raw counts) for the two baselines; without it no baseline is computed.
    reference_type_key : str, default "cell_type"
        Column of ``reference.obs`` with the cell types.

    Returns
    -------
    dict
        ``cells``, ``genes``, ``r`` / ``r_log1p`` (per gene), ``r_median``, ``r_log1p_median``, ``r_pooled_log1p``
        (over all cell x gene entries: also scores each gene's level) and, with ``reference``,
        ``baseline_{mean,type_mean}_r`` (per gene), ``baseline_{...}_r_median`` and
        ``baseline_{...}_r_log1p_median``.

    Raises
    ------
    PlatformInputError
        If a gene is missing, no cell is in common, ``reference_type_key`` is not a column, or (with a reference)
        ``decomposed.var['in_slide']`` leaves no measured gene to scale the baselines by.
    """
    genes = [str(g) for g in genes]
    miss = [g for g in genes if g not in decomposed.var_names or g not in truth.var_names]
    if miss:
        raise PlatformInputError(f"genes: {miss[:5]} are not in both the decomposition and the truth")
    ids = decomposed.obs_names.astype(str)
    pos = truth.obs_names.get_indexer(ids)
    if (pos < 0).any() and "spot" in decomposed.obs:
        alt = truth.obs_names.get_indexer(decomposed.obs["spot"].astype(str))
        pos = np.where(pos < 0, alt, pos)
    ok = pos >= 0
    if not ok.any():
        raise PlatformInputError(
            f"truth: no cells in common with the decomposition (e.g. {list(ids[:3])} vs {list(truth.obs_names[:3])})"
        )
    gi = decomposed.var_names.get_indexer(genes)
    pred = np.asarray(
        decomposed.X[ok][:, gi] if not sp.issparse(decomposed.X) else decomposed.X[ok][:, gi].toarray(),
        dtype=np.float64,
    )
    be = decomposed.var["platform_effect"].to_numpy(float)[gi] if "platform_effect" in decomposed.var else 1.0
    scale = decomposed.obs["spot_scale"].to_numpy(float)[ok] if "spot_scale" in decomposed.obs else np.ones(ok.sum())
    pred = pred * be / scale[:, None]
    tX = truth.X[pos[ok]]
    T = np.asarray(tX.toarray() if sp.issparse(tX) else tX, dtype=np.float64)[:, truth.var_names.get_indexer(genes)]
    fin = np.isfinite(pred).all(1)
    pred, T = pred[fin], T[fin]
    out = {"cells": int(len(T)), "genes": genes}
    r = pearson_columns(pred, T)
    rl = pearson_columns(np.log1p(np.maximum(pred, 0)), np.log1p(T))
    pooled = pearson_columns(np.log1p(np.maximum(pred, 0)).reshape(-1, 1), np.log1p(T).reshape(-1, 1))[0]
    out.update(
        r=dict(zip(genes, map(float, r))),
        r_log1p=dict(zip(genes, map(float, rl))),
        r_median=float(np.nanmedian(r)),
        r_log1p_median=float(np.nanmedian(rl)),
        r_pooled_log1p=float(pooled),
    )
    if reference is not None:
        if reference_type_key not in reference.obs:
            raise PlatformInputError(f"reference.obs: no column '{reference_type_key}'")
        measured = (
            [
                g
                for g in decomposed.var_names[decomposed.var["in_slide"].to_numpy(bool)]
                if g in truth.var_names and g in reference.var_names and g not in set(genes)
            ]
            if "in_slide" in decomposed.var
            else []
        )
        if not measured:
            raise PlatformInputError("decomposed.var['in_slide']: no measured genes to scale the baselines by")
        R = sp.csr_matrix(reference.X, dtype=np.float64)
        lib = np.asarray(R.sum(1)).ravel()
        Rn = sp.diags(1.0 / np.where(lib > 0, lib, 1)) @ R
        rtypes = reference.obs[reference_type_key].astype(str).to_numpy()
        tn, codes = np.unique(rtypes, return_inverse=True)
        M = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(tn), len(codes)))
        prof = np.asarray((M @ Rn).todense()) / np.bincount(codes)[:, None]  # types x genes
        pooled = np.asarray(Rn.mean(0)).ravel()
        rg = reference.var_names.get_indexer(genes)
        rm = reference.var_names.get_indexer(measured)
        Tm = truth.X[pos[ok]][:, truth.var_names.get_indexer(measured)]
        obs_lib = np.asarray(Tm.sum(1)).ravel()[fin]
        base_mean = obs_lib[:, None] * pooled[rg][None, :] / max(pooled[rm].sum(), 1e-30)
        called = decomposed.obs["cell_type"].astype(str).to_numpy()[ok][fin]
        ti = pd.Index(tn).get_indexer(called)
        P = np.where(ti[:, None] >= 0, prof[np.maximum(ti, 0)], pooled[None, :])
        base_type = obs_lib[:, None] * P[:, rg] / np.maximum(P[:, rm].sum(1, keepdims=True), 1e-30)
        for name, b in (("mean", base_mean), ("type_mean", base_type)):
            rb = pearson_columns(b, T)
            rbl = pearson_columns(np.log1p(b), np.log1p(T))
            out[f"baseline_{name}_r"] = dict(zip(genes, map(float, rb)))
            out[f"baseline_{name}_r_median"] = float(np.nanmedian(rb))
            out[f"baseline_{name}_r_log1p_median"] = float(np.nanmedian(rbl))
    return out
