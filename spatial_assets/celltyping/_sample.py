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
    """The spots and cells cell typing sees: spots failing segmentation QC (``spots['qc_pass']``) are dropped
    with their cells; imaging counts (often volume-normalised) are rounded to integers for RCTD.

    Returns ``(slide, cells, info)``; ``info`` counts what was dropped or rounded.
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
) -> CellTypingResult:
    """Cell types of one sample: RCTD full mode + Potts labels, or RCTD doublet mode on Slide-seq beads."""
    platform = Platform(platform)
    return identify_cell_types(
        slide,
        reference,
        cell_type_key,
        cells,
        params,
        max_cells_per_spot=max_cells_per_spot,
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
) -> tuple[CellTypingResult, dict]:
    """One slice of a group of aligned slices, typed jointly with all of them: the slides are stacked in
    micrometres with their heights ``z_um``, so the Potts neighbours are found in 3D; only slice ``name``'s cells
    and spots are returned (with its own pixel coordinates), and ``info`` describes the group.

    Raises
    ------
    CellTypingInputError
        The slices of the group are of different platforms.
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
        **_mode_kwargs(kinds[name], class_key),
    )
    info = {
        "slices": ", ".join(slices),
        "z_um": float(z_um[name]),
        "um_per_px": um[name],
        "cells_all_slices": int(len(joint.cells)),
    }
    return unstack_result(joint, name, um[name]), info
