"""Visium HD: 2 / 8 / 16-um bins assigned to segmented nuclei of the H&E, giving imaging-like cells (each cell
its own spot, like an imaging panel), which are then typed / decomposed / imputed as on imaging platforms.

A bin belongs to the nucleus label under its centre; with ``expand_px`` > 0 nuclei are first grown by that many
pixels (``skimage.segmentation.expand_labels``, without merging neighbours) so that cytoplasm bins count too.
Vectorised: one sparse (cells x bins) assignment matrix times the bins' counts. No dagster import here.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import InputError


def bins_to_cells(
    bins: ad.AnnData,
    labels: np.ndarray,
    *,
    expand_px: int = 0,
    min_bins: int = 1,
) -> ad.AnnData:
    """Sum the counts of the bins under each segmented nucleus into one cell.

    Parameters
    ----------
    bins
        Bins x genes raw counts, ``obsm['spatial']`` the bin centres in the pixels of ``labels``.
    labels
        Nuclei label image (0 = background), same pixels as the bins' coordinates.
    expand_px
        Grow each nucleus by this many pixels before assigning bins (0: nuclei only).
    min_bins
        Cells with fewer bins are dropped.

    Returns
    -------
    AnnData
        Cells x genes (sparse counts); obs ``label``, ``n_bins``, ``x``, ``y`` (mean of their bins' centres, pixels);
        ``obsm['spatial']``; ``uns['bins_to_cells']`` with the fraction of bins and of counts assigned.

    Raises
    ------
    InputError
        ``obsm['spatial']`` is missing, or the bins lie outside the label image.
    """
    if "spatial" not in bins.obsm:
        raise InputError("Visium HD bins: obsm['spatial'] is missing; expected bin centres in image pixels")
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise InputError(f"nuclei labels: shape {lab.shape}; expected a 2-D label image")
    if expand_px > 0:
        from skimage.segmentation import expand_labels

        lab = expand_labels(lab, distance=expand_px)
    xy = np.asarray(bins.obsm["spatial"], dtype=float)[:, :2]
    col, row = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    H, W = lab.shape
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    if not inside.any():
        raise InputError(
            f"Visium HD bins: no bin centre lies inside the label image ({W} x {H} px; bins x "
            f"{xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}..{xy[:, 1].max():.0f}); are the "
            "bins in full-resolution pixels of this image?"
        )
    lbl = np.zeros(len(xy), dtype=np.int64)
    lbl[inside] = lab[row[inside], col[inside]]
    hit = np.flatnonzero(lbl > 0)
    uniq, cell_of = np.unique(lbl[hit], return_inverse=True)
    A = sp.csr_matrix((np.ones(len(hit)), (cell_of, hit)), shape=(len(uniq), bins.n_obs))
    n_bins = np.asarray(A.sum(1)).ravel()
    keep = n_bins >= min_bins
    A, uniq, n_bins = A[keep], uniq[keep], n_bins[keep]
    X = sp.csr_matrix(bins.X) if not sp.issparse(bins.X) else bins.X.tocsr()
    counts = (A @ X).tocsr()
    centre = (A @ xy) / n_bins[:, None]
    obs = pd.DataFrame(
        {"label": uniq, "n_bins": n_bins.astype(np.int64), "x": centre[:, 0], "y": centre[:, 1]},
        index=pd.Index([f"cell_{int(u)}" for u in uniq], name="cell"),
    )
    cells = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=bins.var.copy())
    cells.obsm["spatial"] = centre
    total = float(X.sum())
    cells.uns["bins_to_cells"] = {
        "bins": int(bins.n_obs),
        "bins_assigned": int(A.sum()),
        "fraction_bins_assigned": float(A.sum() / max(bins.n_obs, 1)),
        "fraction_counts_assigned": float(counts.sum() / total) if total > 0 else 0.0,
        "expand_px": int(expand_px),
        "cells": int(len(uniq)),
    }
    for k in ("spatial",):
        if k in bins.uns:
            cells.uns[k] = bins.uns[k]
    return cells


def segment_bins(
    bins: ad.AnnData,
    image,
    params=None,
    *,
    expand_um: float = 4.0,
    min_bins: int = 1,
    sample: str = "sample",
    log=None,
):
    """SpatialScope step 1 on Visium HD: segment the H&E's nuclei, sum the bins under each into a cell, and make
    every cell its own spot (as on an imaging panel) for cell typing and decomposition.

    Parameters
    ----------
    bins : anndata.AnnData
        Bins x genes raw counts, ``obsm['spatial']`` bin centres in the image's full-resolution pixels, and
        ``uns['spatial'][lib]['scalefactors']['microns_per_pixel']`` (for ``expand_um``).
    image : array-like or str or os.PathLike
        The (H, W, 3) H&E in whose pixels the bins are given.
    params : spatial_assets.params.SegmentationParams or None
        Segmentation parameters (method, model, thresholds); the defaults when None.
    expand_um : float
        Grow each nucleus by this many micrometres (without merging neighbours) before assigning bins, so that its
        cytoplasm's bins count too (0: bins under the nucleus only; 4, the default, was the best of 0 / 2 / 4 / 8 on
        synthetic slides with ambient RNA, ``benchmarks/bench_visium_hd.py``).
    min_bins : int
        Cells with fewer bins are dropped.
    sample : str
        The sample's name in error messages.
    log : callable or None
        Receives StarDist's tile / block progress lines (``segmentation.segment_nuclei``'s ``log``).

    Returns
    -------
    result : spatial_assets.segmentation.SampleCells
        ``cells`` (one per cell, ``<cell>_0``, with the nucleus ``label`` and ``area``), ``spots`` (each cell a
        spot: ``n_cells`` 1, ``total_umi``, ``qc_pass``), the nuclei ``labels``, ``summary`` and ``info``
        (segmentation's, plus ``bins_to_cells``).
    cells : anndata.AnnData
        Cells x genes (the summed bins' counts), ``obsm['spatial']`` in pixels, ``uns['spatial']`` of the bins.

    Raises
    ------
    InputError
        No image, no ``microns_per_pixel`` (with ``expand_um`` > 0), bins outside the image, or no nucleus holding
        a bin.
    """
    from ..segmentation import SampleCells, as_rgb_image, segment_nuclei
    from ._imaging import cells_from_spots, microns_per_pixel

    if image is None:
        raise InputError(
            f"sample '{sample}': platform visium_hd needs an H&E image (samples[{sample}].image) for nuclei "
            "segmentation"
        )
    if expand_um < 0:
        raise InputError(f"sample '{sample}': expand_um = {expand_um}; expected >= 0 micrometres")
    um_per_px, how = microns_per_pixel(bins, "visium_hd")
    if expand_um > 0 and how.startswith("assumed"):
        raise InputError(
            f"sample '{sample}': the bins' uns['spatial'][lib]['scalefactors']['microns_per_pixel'] is missing; "
            f"expected the image's micrometres per pixel (Space Ranger's scalefactors_json.json has it) to grow the "
            f"nuclei by expand_um={expand_um:g} um"
        )
    expand_px = int(round(expand_um / um_per_px)) if expand_um > 0 else 0
    img = as_rgb_image(image)
    res = segment_nuclei(img, params, log=log)
    cells = bins_to_cells(bins, np.asarray(res.labels), expand_px=expand_px, min_bins=min_bins)
    if cells.n_obs == 0:
        raise InputError(
            f"sample '{sample}': no segmented nucleus holds a bin centre ({res.info.get('n_nuclei', 0)} nuclei, "
            f"{bins.n_obs} bins); are the bins in the full-resolution pixels of the image?"
        )
    if "sample" in bins.uns:
        cells.uns["sample"] = dict(bins.uns["sample"])
    table, spots, summary = cells_from_spots(cells, platform="visium_hd")
    area = res.nuclei.set_index("label")["area"] if "area" in res.nuclei else None
    table["label"] = cells.obs["label"].to_numpy()
    if area is not None:
        table["area"] = area.reindex(cells.obs["label"].to_numpy()).to_numpy(float)
    b2c = dict(cells.uns["bins_to_cells"])
    summary.update({k: b2c[k] for k in ("bins", "fraction_bins_assigned", "fraction_counts_assigned")})
    info = {**res.info, "bins_to_cells": b2c, "expand_um": float(expand_um)}
    return SampleCells(table, spots, res.labels, summary, info), cells
