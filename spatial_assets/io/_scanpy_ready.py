"""Scanpy-ready outputs: ``obsm['spatial']`` + ``uns['spatial'][library_id]`` (images and scale factors), a
``counts`` layer in raw slide scale, and spot-level results mapped back to every input barcode.

``sc.pl.spatial`` / ``sq.pl.spatial_scatter`` read ``obsm['spatial']`` in full-resolution image pixels and
``uns['spatial'][library_id]`` = ``{'images': {'hires', 'lowres'}, 'scalefactors': {'tissue_hires_scalef',
'tissue_lowres_scalef', 'spot_diameter_fullres'}}``; the functions here give every output store that layout, taken
from the slide (a Space Ranger folder's own images) or, when the slide has no images, downsampled from the H&E.

No dagster import here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._readers import InputError

HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600

#: What ``X`` and the ``counts`` layer hold in each output store (also written to ``uns['X_description']``).
STORE_CONTENTS = {
    "decomposed_cells": (
        "X: decomposed expression per cell in the reference's normalised scale (expm1 of its log1p data; "
        "obs['spot_scale'] maps raw counts into it); layers['counts']: the same in raw slide-count scale "
        "(X * platform_effect / spot_scale); genes the slide lacks are imputed in both"
    ),
    "enhanced_subspots": (
        "X: soScope's enhanced sub-spot profiles (raw slide-count scale); layers['counts']: the conserved split, "
        "summing exactly to each spot's observed counts; layers['model_mean']: the model's own sub-spot means"
    ),
    "typed_spots": (
        "X: RCTD cell-type proportions per spot (rows sum to 1; NaN for spots not typed, see obs['typing_status'])"
    ),
}


def _downsample(image, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` (H, W, C; lazy arrays read strided, never whole) reduced by an integer stride to at most
    ``max_side`` pixels a side, as uint8, with its scale factor (``1 / stride``)."""
    H, W = int(image.shape[0]), int(image.shape[1])
    stride = max(1, math.ceil(max(H, W) / max_side))
    small = np.asarray(image[::stride, ::stride])
    if small.dtype != np.uint8:
        hi = float(np.nanmax(small)) if small.size else 1.0
        small = np.clip(small / (hi if hi > 0 else 1.0) * 255, 0, 255).astype(np.uint8)
    return small, 1.0 / stride


def spatial_uns(slide: ad.AnnData, image=None, library: str | None = None) -> tuple[str, dict[str, Any]]:
    """The scanpy ``uns['spatial']`` entry of a slide: ``(library_id, {'images', 'scalefactors', 'metadata'})``.

    Parameters
    ----------
    slide : anndata.AnnData
        The sample's spots, with ``uns['spatial'][library]['scalefactors']['spot_diameter_fullres']``.
    image : array-like, optional
        The full-resolution H&E (array-like, H x W x 3), used when the slide carries no hires / lowres images.
    library : str, optional
        The library id; default: the slide's first, or ``slide.uns['sample']['name']``, or ``'sample'``.

    Returns
    -------
    (str, dict)
        The library id and its entry; images are uint8 arrays, scale factors floats.

    Raises
    ------
    InputError
        The slide has no scale factors (``spot_diameter_fullres``) and none can be derived.
    """
    entries = slide.uns.get("spatial") if isinstance(slide.uns.get("spatial"), Mapping) else {}
    lib = library or (next(iter(entries)) if entries else None)
    lib = lib or str(dict(slide.uns.get("sample", {})).get("name", "sample"))
    src = dict(entries.get(lib, {})) if entries else {}
    sf = dict(src.get("scalefactors", {}))
    if "spot_diameter_fullres" not in sf:
        raise InputError(
            f"slide: uns['spatial']['{lib}']['scalefactors']['spot_diameter_fullres'] is missing; expected Visium "
            "scale factors (spot diameter in full-resolution pixels)"
        )
    images = {k: np.asarray(v) for k, v in dict(src.get("images", {})).items() if k in ("hires", "lowres")}
    if image is not None:
        for key, side, f in (
            ("hires", HIRES_MAX_SIDE, "tissue_hires_scalef"),
            ("lowres", LOWRES_MAX_SIDE, "tissue_lowres_scalef"),
        ):
            if key not in images or f not in sf:
                images[key], sf[f] = _downsample(image, side)
    sf = {k: float(v) for k, v in sf.items() if np.isscalar(v)}
    entry = {"images": images, "scalefactors": sf, "metadata": dict(src.get("metadata", {}))}
    return lib, entry


def make_scanpy_ready(
    adata: ad.AnnData,
    slide: ad.AnnData,
    image=None,
    *,
    store: str,
    counts=None,
    library: str | None = None,
    xy: tuple[str, str] = ("x", "y"),
) -> ad.AnnData:
    """Give an output AnnData scanpy's spatial layout, in place: ``obsm['spatial']`` (full-resolution pixels, from
    ``obs[xy]`` when absent), ``uns['spatial'][library]`` from the slide, ``layers['counts']`` and
    ``uns['X_description']``.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells, sub-spots or spots of the sample.
    slide : anndata.AnnData
        The sample's slide (its ``uns['spatial']`` scale factors and images).
    image : array-like, optional
        Full-resolution H&E, used only when the slide has no images.
    store : str
        Key of :data:`STORE_CONTENTS` naming what ``X`` / ``counts`` hold.
    counts : array-like or scipy.sparse matrix, optional
        The raw-scale matrix for ``layers['counts']`` (same shape as ``X``); None leaves layers as they are.
    library : str, optional
        Library id (default: the slide's).
    xy : tuple of str
        ``obs`` columns holding full-resolution pixel coordinates.

    Returns
    -------
    AnnData
        ``adata`` itself.

    Raises
    ------
    InputError
        No coordinates (neither ``obsm['spatial']`` nor ``obs[xy]``), or the slide has no scale factors.
    ValueError
        ``counts`` is not of the shape of ``adata``.
    """
    if "spatial" not in adata.obsm:
        missing = [c for c in xy if c not in adata.obs]
        if missing:
            raise InputError(
                f"{store}: neither obsm['spatial'] nor obs columns {list(xy)} (missing {missing}); expected "
                "coordinates in full-resolution image pixels"
            )
        adata.obsm["spatial"] = adata.obs[list(xy)].to_numpy(dtype=float)
    else:
        adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    lib, entry = spatial_uns(slide, image, library)
    adata.uns["spatial"] = {lib: entry}
    if "library_id" not in adata.obs:
        adata.obs["library_id"] = pd.Categorical([lib] * adata.n_obs)
    if counts is not None:
        if tuple(counts.shape) != tuple(adata.shape):
            raise ValueError(f"{store}: counts have shape {tuple(counts.shape)}, expected {tuple(adata.shape)}")
        adata.layers["counts"] = counts
    if store in STORE_CONTENTS:
        adata.uns["X_description"] = STORE_CONTENTS[store]
    return adata


def decomposed_counts(cells: ad.AnnData) -> np.ndarray:
    """Decomposed cells' expression back in raw slide-count scale: ``X * var['platform_effect'] / obs['spot_scale']``
    (the inverse of the scaling the decomposition applies; genes without a platform effect keep factor 1).

    Parameters
    ----------
    cells : anndata.AnnData
        Output of :func:`spatial_assets.decomposition.decompose_range` / ``combine_ranges``.

    Returns
    -------
    numpy.ndarray
        float32, cells x genes.

    Raises
    ------
    InputError
        ``obs['spot_scale']`` is missing.
    """
    if "spot_scale" not in cells.obs:
        raise InputError("decomposed cells: obs['spot_scale'] is missing; expected the output of decompose_range")
    X = cells.X.toarray() if sp.issparse(cells.X) else np.asarray(cells.X)
    pe = cells.var["platform_effect"].to_numpy(float) if "platform_effect" in cells.var else np.ones(cells.n_vars)
    pe = np.where(np.isfinite(pe) & (pe > 0), pe, 1.0)
    scale = cells.obs["spot_scale"].to_numpy(float)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
    return (X * pe[None, :] / scale[:, None]).astype(np.float32)


def spot_weights_anndata(
    weights: pd.DataFrame,
    slide: ad.AnnData,
    *,
    spots: pd.DataFrame | None = None,
    skipped: Mapping[str, str] | None = None,
    image=None,
) -> ad.AnnData:
    """Typed cells' spot weights as a scanpy-ready spots x types AnnData over **every input barcode**.

    Spots that were not typed keep NaN weights and say why in ``obs['typing_status']``: ``'typed'``,
    ``'segmentation QC: <reason>'`` (``spots['qc_reason']``), ``'skipped: <reason>'`` (cell typing's skipped spots)
    or ``'not fitted'``.

    Parameters
    ----------
    weights : pandas.DataFrame
        Fitted spots x types proportions (``CellTypingResult.weights``).
    slide : anndata.AnnData
        The whole input slide (all barcodes, ``obsm['spatial']``, scale factors).
    spots : pandas.DataFrame, optional
        Segmentation's spot table (``qc_pass``, ``qc_reason``), if any.
    skipped : mapping of str to str, optional
        ``{spot: reason}`` of spots cell typing skipped (``CellTypingResult.info['skipped_spots']``).
    image : array-like, optional
        Full-resolution H&E, used only when the slide has no images.

    Returns
    -------
    AnnData
        ``X`` float32 proportions; obs ``typing_status``, ``n_cells`` (when ``spots`` is given); ``obsm['spatial']``
        and ``uns['spatial']``.

    Raises
    ------
    InputError
        ``weights`` names spots absent from the slide.
    """
    extra = pd.Index(weights.index.astype(str)).difference(slide.obs_names)
    if len(extra):
        raise InputError(
            f"typed cells weights: {len(extra)} spots are not in the slide (e.g. {list(extra[:3])}); the typed "
            "cells are out of date"
        )
    W = weights.reindex(slide.obs_names).to_numpy(dtype=np.float32)
    status = pd.Series("not fitted", index=slide.obs_names, dtype=object)
    if spots is not None and "qc_pass" in spots:
        q = spots.reindex(slide.obs_names)
        bad = ~q["qc_pass"].fillna(False).astype(bool).to_numpy()
        reason = q.get("qc_reason", pd.Series("", index=q.index)).fillna("").astype(str).to_numpy()
        status[bad] = np.char.add("segmentation QC: ", np.where(reason == "", "failed", reason).astype(str))[bad]
    for spot, why in dict(skipped or {}).items():
        if spot in status.index:
            status[spot] = f"skipped: {why}"
    status[weights.index.astype(str)] = "typed"
    obs = pd.DataFrame({"typing_status": pd.Categorical(status.to_numpy(str))}, index=slide.obs_names.copy())
    if spots is not None and "n_cells" in spots:
        obs["n_cells"] = spots["n_cells"].reindex(slide.obs_names).fillna(0).to_numpy(np.int64)
    out = ad.AnnData(X=W, obs=obs, var=pd.DataFrame(index=pd.Index(weights.columns.astype(str), name="cell_type")))
    out.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    return make_scanpy_ready(out, slide, image, store="typed_spots")
