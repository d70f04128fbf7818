"""Nuclei to spots: the cells of each spot (at most ``max_cells_per_spot``), their ids and positions, spot QC."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import geometry
from ..io._readers import InputError, scalefactors, validate_spatial
from ..io._readers import check_image_covers_spots as _check_cover
from ..params import SegmentationParams
from ._channels import as_rgb_image
from ._features import nucleus_features
from ._nuclei import SegmentationResult, segment_nuclei

log = logging.getLogger(__name__)

# Spots named in the cap warning and the summary.
N_EXAMPLE_SPOTS = 5


class CellCapWarning(UserWarning):
    """Many spots hold more nuclei than ``max_cells_per_spot``: cells are being dropped."""


def cap_report(n_raw: np.ndarray, qc_pass: np.ndarray, names: np.ndarray, cap: int, max_fraction: float) -> dict:
    """Fraction of QC-passing spots whose nuclei exceed the cap, example spots (most crowded first), warning text.

    Parameters
    ----------
    n_raw
        Nuclei inside each spot, before the cap.
    qc_pass
        Spots that passed the UMI QC (only those are capped).
    names
        Spot names.
    cap
        ``max_cells_per_spot``.
    max_fraction
        ``max_capped_fraction``: above it ``cap_warning`` is a message, else None.

    Returns
    -------
    dict
        ``fraction_spots_capped``, ``max_capped_fraction``, ``capped_spots_first`` (up to 5 names with their
        nuclei counts), ``cap_warning`` (str or None).
    """
    over = qc_pass & (n_raw > cap)
    n_ok = int(qc_pass.sum())
    frac = float(over.sum() / n_ok) if n_ok else 0.0
    o = np.flatnonzero(over)
    o = o[np.argsort(-n_raw[o], kind="stable")][:N_EXAMPLE_SPOTS]
    examples = [f"{names[i]} ({int(n_raw[i])} nuclei)" for i in o]
    msg = None
    if frac > max_fraction:
        msg = (
            f"{int(over.sum())} of {n_ok} spots ({frac:.0%}) hold more nuclei than max_cells_per_spot={cap} "
            f"(threshold max_capped_fraction={max_fraction:.0%}); cells over the cap were dropped, e.g. spots "
            f"{', '.join(examples)}. The nuclei model probably over-segments this image (check the QC figure, "
            "parameters.segmentation.model / prob_thresh / scale) or the cap is too low"
        )
    return {
        "fraction_spots_capped": frac,
        "max_capped_fraction": float(max_fraction),
        "capped_spots_first": examples,
        "cap_warning": msg,
    }


# ---------------------------------------------------------------------------------------------------------------
# spots
# ---------------------------------------------------------------------------------------------------------------
def spot_diameter_px(slide: ad.AnnData, library_id: str | None = None, source: str = "slide") -> float:
    """``uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']`` with errors naming the field.

    Parameters
    ----------
    slide : anndata.AnnData
        The slide with Visium-style ``uns['spatial']`` scalefactors.
    library_id : str or None
        Key of ``uns['spatial']``; the only one when None.
    source : str
        Name of the slide in error messages.

    Returns
    -------
    float
        The spot diameter in full-resolution pixels.

    Raises
    ------
    InputError
        If ``uns['spatial']``, the library or the scalefactor is missing.
    """
    return scalefactors(slide, source, library_id)["spot_diameter_fullres"]


def check_image_covers_spots(
    image_shape, slide: ad.AnnData, source: str = "slide", image_source: str = "image"
) -> None:
    """Every spot circle must lie inside the image; the error gives both extents.

    Parameters
    ----------
    image_shape : tuple of int
        The image's shape; its first two entries (H, W) are used.
    slide : anndata.AnnData
        The spots (``obsm['spatial']`` in full-resolution pixels, Visium scalefactors).
    source : str
        Name of the slide in error messages.
    image_source : str
        Name of the image in error messages.

    Raises
    ------
    InputError
        If the slide's coordinates or scalefactors are invalid, or some spot circle lies outside the image.
    """
    validate_spatial(slide, source)
    spot_diameter_px(slide, source=source)
    _check_cover(tuple(image_shape[:2]), slide, source=source, image_source=image_source)


def assign_cells_to_spots(
    nuclei: pd.DataFrame,
    slide: ad.AnnData,
    params: SegmentationParams | None = None,
    library_id: str | None = None,
    source: str = "slide",
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Assign nuclei to the spot whose circle contains the centroid; cap per spot; spot UMI QC.

    Returns ``cells`` (index ``<spot>_<k>``, k = 0.. by distance to the spot centre; columns x, y, area, label,
    spot, spot_distance, spot_n_cells, then any other numeric column of ``nuclei``, e.g. nucleus features)
    holding only cells kept (inside a QC-passing spot, within the cap); ``spots`` (index = slide obs names;
    n_cells_raw = nuclei inside, n_cells = kept, total_umi, qc_pass, qc_reason); and a summary of counts.

    Warns :class:`CellCapWarning` (and logs) when more than ``params.max_capped_fraction`` of the QC-passing
    spots exceed ``params.max_cells_per_spot``; the summary then holds the message in ``cap_warning``.

    Parameters
    ----------
    nuclei : pandas.DataFrame
        The nuclei table (columns x, y in full-resolution pixels; optionally label, area and other columns).
    slide : anndata.AnnData
        The spots (``obsm['spatial']`` in full-resolution pixels, Visium scalefactors) with their counts.
    params : SegmentationParams or None
        Cap (``max_cells_per_spot``), UMI QC bounds and ``max_capped_fraction``; the defaults when None.
    library_id : str or None
        Key of ``uns['spatial']``; the only one when None.
    source : str
        Name of the slide in error messages.

    Returns
    -------
    tuple
        ``(cells, spots, summary)``: the kept cells, the spots with their cell counts and QC, and a dict of
        counts (including :func:`cap_report`'s entries).

    Raises
    ------
    InputError
        If ``nuclei`` lacks x or y, or the slide's coordinates or scalefactors are invalid.
    """
    params = params or SegmentationParams()
    missing = [c for c in ("x", "y") if c not in nuclei.columns]
    if missing:
        raise InputError(f"nuclei table: columns {missing} missing; expected label, x, y, area")
    validate_spatial(slide, source)
    diam = spot_diameter_px(slide, library_id, source)
    spot_xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    names = np.asarray(slide.obs_names.astype(str))
    n_spots = len(names)
    X = slide.X
    umi = np.asarray(X.sum(1)).ravel().astype(float) if sp.issparse(X) else np.asarray(X).sum(1).astype(float)
    low, high = umi < params.min_umi, umi > params.max_umi
    qc_pass = ~(low | high)

    pts = nuclei[["x", "y"]].to_numpy(float)
    idx, dist = geometry.assign_to_spots(pts, spot_xy, diam / 2)
    inside = idx >= 0
    n_raw = np.bincount(idx[inside], minlength=n_spots)
    # rank within spot by distance to the centre (ties by label order): one lexsort, no per-spot loop
    cand = np.flatnonzero(inside)
    order = cand[np.lexsort((dist[cand], idx[cand]))]
    sidx = idx[order]
    first = np.searchsorted(sidx, sidx, side="left")
    rank = np.arange(len(order)) - first
    keep = (rank < params.max_cells_per_spot) & qc_pass[sidx]
    kept, kspot, krank = order[keep], sidx[keep], rank[keep]
    n_kept = np.bincount(kspot, minlength=n_spots)
    cell_ids = pd.Index(pd.Series(names[kspot]).str.cat(krank.astype(str), sep="_"), name="cell_id")
    cells = pd.DataFrame(
        {
            "x": pts[kept, 0],
            "y": pts[kept, 1],
            "area": nuclei["area"].to_numpy()[kept] if "area" in nuclei else np.nan,
            "label": nuclei["label"].to_numpy()[kept] if "label" in nuclei else kept,
            "spot": names[kspot],
            "spot_distance": dist[kept],
            "spot_n_cells": n_kept[kspot],
        },
        index=cell_ids,
    )
    extra = [c for c in nuclei.columns if c not in ("x", "y", "area", "label") and c not in cells.columns]
    for c in extra:
        cells[c] = nuclei[c].to_numpy()[kept]
    reason = np.where(low, f"umi<{params.min_umi:g}", np.where(high, f"umi>{params.max_umi:g}", ""))
    spots = pd.DataFrame(
        {
            "n_cells_raw": n_raw,
            "n_cells": n_kept,
            "total_umi": umi,
            "qc_pass": qc_pass,
            "qc_reason": reason,
            "x": spot_xy[:, 0],
            "y": spot_xy[:, 1],
        },
        index=pd.Index(names, name=slide.obs_names.name or "spot"),
    )
    in_failed = inside & ~qc_pass[np.maximum(idx, 0)]
    capped = (rank >= params.max_cells_per_spot) & qc_pass[sidx]
    summary = {
        "n_nuclei": int(len(pts)),
        "n_cells_kept": int(len(cells)),
        "n_outside_spots": int((~inside).sum()),
        "n_dropped_in_filtered_spots": int(in_failed.sum()),
        "n_dropped_over_cap": int(capped.sum()),
        "n_spots": int(n_spots),
        "n_spots_filtered": int((~qc_pass).sum()),
        "n_spots_low_umi": int(low.sum()),
        "n_spots_high_umi": int(high.sum()),
        "n_spots_capped": int((qc_pass & (n_raw > params.max_cells_per_spot)).sum()),
        "n_spots_without_cells": int((qc_pass & (n_kept == 0)).sum()),
        "filtered_spots_first": names[~qc_pass][:20].tolist(),
        "spot_diameter_px": diam,
        "max_cells_per_spot": params.max_cells_per_spot,
        "min_umi": params.min_umi,
        "max_umi": params.max_umi,
        "mean_cells_per_kept_spot": float(n_kept[qc_pass].mean()) if qc_pass.any() else 0.0,
    }
    summary.update(cap_report(n_raw, qc_pass, names, params.max_cells_per_spot, params.max_capped_fraction))
    if summary["cap_warning"]:
        log.warning(summary["cap_warning"])
        warnings.warn(summary["cap_warning"], CellCapWarning, stacklevel=2)
    return cells, spots, summary


def segment_slide(
    image,
    slide: ad.AnnData,
    params: SegmentationParams | None = None,
    library_id: str | None = None,
    labels_out=None,
    **kwargs,
) -> tuple[SegmentationResult, pd.DataFrame, pd.DataFrame, dict]:
    """Check coverage, segment, assign to spots, measure the kept cells' nucleus features.

    Parameters
    ----------
    image
        RGB H&E (path, numpy or array-like (H, W, 3)).
    slide
        Spots (``obsm['spatial']`` in full-resolution pixels, Visium scalefactors).
    params
        Segmentation parameters; ``params.nucleus_features`` adds :data:`FEATURE_COLUMNS` to ``cells``.
    library_id
        Key of ``uns['spatial']`` (default: the only one).
    labels_out
        Optional pre-allocated (H, W) integer array (zarr) for the labels.
    **kwargs
        Passed to :func:`segment_nuclei`.

    Returns
    -------
    tuple
        (SegmentationResult, cells, spots, summary), as :func:`assign_cells_to_spots`.

    Raises
    ------
    InputError
        The image does not cover the spots, or is not an RGB image.
    """
    params = params or SegmentationParams()
    img = as_rgb_image(image)
    check_image_covers_spots(img.shape, slide)
    res = segment_nuclei(img, params, labels_out=labels_out, **kwargs)
    cells, spots, summary = assign_cells_to_spots(res.nuclei, slide, params, library_id)
    if params.nucleus_features:
        feats = nucleus_features(res.labels, img, cells["label"].to_numpy())
        for c in feats.columns:
            cells[c] = feats[c].to_numpy()
        res.info["nucleus_features"] = list(feats.columns)
    return res, cells, spots, summary
