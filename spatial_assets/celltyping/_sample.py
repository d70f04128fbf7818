"""Cell typing of one sample, or of one slice typed jointly with the other aligned slices of its group."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import pandas as pd

from ..constants import Platform
from ..params import CellTypingParams
from ..platforms._imaging import integer_counts, microns_per_pixel
from ..platforms._slices import stack_slices, unstack_result
from ._identify import CellTypingResult, identify_cell_types
from ._rctd import CellTypingInputError


def typing_inputs(
    slide: ad.AnnData,
    cells: pd.DataFrame,
    spots: pd.DataFrame | None = None,
    platform: str | Platform = Platform.VISIUM,
) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """The spots and cells cell typing sees.

    Spots failing segmentation QC (``spots['qc_pass']``) are dropped with their cells; imaging (MERFISH) counts,
    often volume-normalised, are rounded to integers for RCTD (:func:`spatial_assets.platforms.integer_counts`).

    Parameters
    ----------
    slide : anndata.AnnData
        Spots x genes counts.
    cells : pandas.DataFrame
        Cells table with ``spot``.
    spots : pandas.DataFrame, optional
        Segmentation's spots table (indexed by spot, with ``qc_pass``); without it no spot is dropped.
    platform : str or spatial_assets.constants.Platform, default "visium"
        The slide's platform.

    Returns
    -------
    slide : anndata.AnnData
        The kept spots (a copy when spots were dropped or counts rounded).
    cells : pandas.DataFrame
        The cells of the kept spots.
    info : dict
        ``spots_in``, ``spots_qc_dropped`` (with a QC table) and ``rounding`` (MERFISH).

    Raises
    ------
    CellTypingInputError
        If slide spots have no row in the spots table (the segmented slide is out of date).
    ValueError
        If ``platform`` is not a known platform.
    """
    platform = Platform(platform)
    info: dict = {"spots_in": int(slide.n_obs)}
    if spots is not None and "qc_pass" in spots:
        missing = slide.obs_names.difference(spots.index)
        if len(missing):
            raise CellTypingInputError(
                f"spots table: {len(missing)} slide spots have no QC row (e.g. "
                f"{list(missing[:3])}); the segmented slide is out of date"
            )
        keep = spots.loc[slide.obs_names, "qc_pass"].astype(bool).to_numpy()
        slide = slide[keep].copy()
        cells = cells[cells["spot"].isin(slide.obs_names)]
        info["spots_qc_dropped"] = int((~keep).sum())
    if platform.imaging:
        slide, rinfo = integer_counts(slide)
        info["rounding"] = rinfo
    return slide, cells, info


def _mode_kwargs(platform: Platform, class_key: str | None) -> dict:
    # Slide-seq beads: RCTD doublet mode (1 or 2 cells per bead); other platforms: full mode + Potts labels
    if platform == Platform.SLIDESEQ:
        return {"mode": "doublet", "class_key": class_key}
    return {"mode": "full"}


def type_sample(
    slide: ad.AnnData,
    reference: ad.AnnData,
    cell_type_key: str,
    cells: pd.DataFrame,
    params: CellTypingParams | None = None,
    *,
    platform: str | Platform = Platform.VISIUM,
    class_key: str | None = None,
    max_cells_per_spot: int = 20,
    log=None,
) -> CellTypingResult:
    """Cell types of one sample: RCTD full mode + Potts labels, or RCTD doublet mode on Slide-seq beads.

    SpatialScope step 2 (:func:`identify_cell_types`): ``mode="doublet"`` with ``class_key`` on Slide-seq,
    ``mode="full"`` on every other platform.

    Parameters
    ----------
    slide : anndata.AnnData
        Spots x genes raw counts with ``obsm['spatial']``.
    reference : anndata.AnnData
        Cells x genes counts with the types in ``obs[cell_type_key]``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    cells : pandas.DataFrame
        Segmented cells indexed by cell id, columns ``x``, ``y``, ``spot`` (optional ``z`` and nucleus
        features).
    params : spatial_assets.params.CellTypingParams, optional
        Default ``CellTypingParams()``.
    platform : str or spatial_assets.constants.Platform, default "visium"
        The slide's platform.
    class_key : str, optional
        Reference class column (doublet mode's type classes; small-types merging).
    max_cells_per_spot : int, default 20
        Cap on the cells per spot.
    log : callable, optional
        Receives progress lines (Potts sweeps done / total, time left); None = silent.

    Returns
    -------
    CellTypingResult
        Labels, weights, platform effect, profiles and info.

    Raises
    ------
    CellTypingInputError
        On bad input (see :func:`identify_cell_types`).
    ValueError
        If ``platform`` is not a known platform.
    """
    platform = Platform(platform)
    return identify_cell_types(
        slide,
        reference,
        cell_type_key,
        cells,
        params,
        max_cells_per_spot=max_cells_per_spot,
        log=log,
        **_mode_kwargs(platform, class_key),
    )


def type_slice_jointly(
    name: str,
    slices: Mapping[str, tuple[ad.AnnData, pd.DataFrame]],
    z_um: Mapping[str, float],
    platforms: Mapping[str, str | Platform],
    reference: ad.AnnData,
    cell_type_key: str,
    params: CellTypingParams | None = None,
    *,
    class_key: str | None = None,
    max_cells_per_spot: int = 20,
    log=None,
) -> tuple[CellTypingResult, dict]:
    """One slice of a group of aligned slices, typed jointly with all of them.

    The slides are stacked in micrometres with their heights ``z_um`` (:func:`spatial_assets.platforms.stack_slices`),
    so the Potts neighbours are found in 3D; only slice ``name``'s cells and spots are returned, with its own
    pixel coordinates (:func:`spatial_assets.platforms.unstack_result`).

    Parameters
    ----------
    name : str
        The slice to return.
    slices : mapping of str to (anndata.AnnData, pandas.DataFrame)
        Every slice of the group: name -> (slide, cells).
    z_um : mapping of str to float
        Height of each slice in micrometres.
    platforms : mapping of str to str or Platform
        Platform of each slice; all must be the same.
    reference : anndata.AnnData
        Cells x genes counts with the types in ``obs[cell_type_key]``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    params : spatial_assets.params.CellTypingParams, optional
        Default ``CellTypingParams()``.
    class_key : str, optional
        Reference class column.
    max_cells_per_spot : int, default 20
        Cap on the cells per spot.
    log : callable, optional
        Receives progress lines (Potts sweeps done / total, time left); None = silent.

    Returns
    -------
    result : CellTypingResult
        The typing of slice ``name``.
    info : dict
        ``slices`` (the group), ``z_um`` and ``um_per_px`` of the slice, ``cells_all_slices``.

    Raises
    ------
    CellTypingInputError
        If the slices of the group are of different platforms, or on bad input to the typing.
    """
    kinds = {n: Platform(p) for n, p in platforms.items()}
    other = sorted({k.value for k in kinds.values()} - {kinds[name].value})
    if other:
        raise CellTypingInputError(
            f"slices group of '{name}': it is {kinds[name].value} but other slices are {other}; "
            "slices of a group must share a platform"
        )
    um = {n: microns_per_pixel(slices[n][0], kinds[n].value)[0] for n in slices}
    joint_slide, joint_cells = stack_slices(slices, z_um, um)
    joint = identify_cell_types(
        joint_slide,
        reference,
        cell_type_key,
        joint_cells,
        params,
        max_cells_per_spot=max_cells_per_spot,
        log=log,
        **_mode_kwargs(kinds[name], class_key),
    )
    info = {
        "slices": ", ".join(slices),
        "z_um": float(z_um[name]),
        "um_per_px": um[name],
        "cells_all_slices": int(len(joint.cells)),
    }
    return unstack_result(joint, name, um[name]), info
