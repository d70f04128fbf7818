"""A sample's and a reference's inputs, read and validated as one step (what the input assets store)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from ..constants import Platform
from ._readers import (
    InputError,
    check_image_covers_spots,
    library_id,
    read_image,
    read_spatial,
    scalefactors,
    validate_counts,
)
from ._validate import check_not_empty, check_raw_counts, check_unique_names, read_h5ad_file, zero_count_spots


def load_reference(path: str | os.PathLike, cell_type_key: str, *, require_integer: bool = True) -> ad.AnnData:
    """A single-cell reference (.h5ad): raw counts with a cell-type column, validated.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5ad`` file.
    cell_type_key : str
        The ``obs`` column of cell types.
    require_integer : bool
        Counts must be raw integers (log-normalised / scaled references make the decomposed cells sum to many
        times their spot's counts); ``False`` only for notebook use on already-normalised data.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    InputError
        The file cannot be read (missing, a folder, truncated), has no cells or genes, duplicated gene or cell
        names, ``obs`` lacks ``cell_type_key`` (or it is all empty), or the counts are negative, non-finite or
        (``require_integer``) not integers.
    """
    path = Path(path)
    adata = read_h5ad_file(path, "reference")
    check_not_empty(adata, str(path), "cells")
    check_unique_names(adata.var_names, str(path), "var_names (genes)")
    check_unique_names(adata.obs_names, str(path), "obs_names (cell ids)")
    if cell_type_key not in adata.obs:
        raise InputError(
            f"{path}: obs has no cell-type column '{cell_type_key}' (cell_type_key); columns: {list(adata.obs.columns)}"
        )
    if adata.obs[cell_type_key].isna().all():
        raise InputError(f"{path}: obs['{cell_type_key}'] (cell_type_key) is empty for every cell; expected cell types")
    if require_integer:
        check_raw_counts(adata, str(path))
    else:
        validate_counts(adata, str(path), require_integer=False)
    return adata


#: Nuclei (about 8 um across) fewer pixels across than this segment poorly (StarDist is trained at ~0.25-0.5 um/px).
MIN_NUCLEUS_PX = 6.0
NUCLEUS_UM = 8.0


def _rescale_to_image(slide: ad.AnnData, source: str, image_scale: float | str) -> dict[str, Any]:
    """Bring ``obsm['spatial']`` and the scale factors into the pixels of an image at ``image_scale`` x full res."""
    lib = library_id(slide, source)
    sf = slide.uns["spatial"][lib].setdefault("scalefactors", {})
    if isinstance(image_scale, str):
        if image_scale not in sf:
            raise InputError(
                f"{source}: image_scale '{image_scale}' is not in uns['spatial']['{lib}']['scalefactors'] "
                f"(keys: {sorted(sf)}); expected e.g. 'tissue_hires_scalef' or a number"
            )
        factor = float(sf[image_scale])
    else:
        factor = float(image_scale)
    if not np.isfinite(factor) or factor <= 0:
        raise InputError(f"{source}: image_scale = {factor}; expected a positive factor (image px / full-res px)")
    um_full = float(sf["microns_per_pixel"]) if "microns_per_pixel" in sf else 55.0 / float(sf["spot_diameter_fullres"])
    slide.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=float) * factor
    slide.uns["sample"]["fullres_to_image_scale"] = factor
    for k in ("spot_diameter_fullres", "fiducial_diameter_fullres"):
        if k in sf:
            sf[k] = float(sf[k]) * factor
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        if k in sf:
            sf[k] = float(sf[k]) / factor
    sf["microns_per_pixel"] = um_full / factor
    nucleus_px = NUCLEUS_UM / sf["microns_per_pixel"]
    if nucleus_px < MIN_NUCLEUS_PX:
        warnings.warn(
            f"{source}: at image_scale {factor:.4g} a pixel is {sf['microns_per_pixel']:.2f} um, so nuclei are about "
            f"{nucleus_px:.1f} px across (fewer than {MIN_NUCLEUS_PX:g}); segmentation will miss or merge nuclei. "
            "Give the full-resolution image if you have it.",
            UserWarning,
            stacklevel=3,
        )
    return {"image_scale": factor, "microns_per_pixel_image": sf["microns_per_pixel"], "nucleus_px": nucleus_px}


@dataclass
class SlideInputs:
    """A sample's spots (AnnData, ``obsm['spatial']`` in full-resolution image pixels) and its image, if any.

    Attributes
    ----------
    slide : anndata.AnnData
        The validated spots x genes, zero-count spots removed, with ``uns['sample']``.
    image : array-like or None
        The (H, W, 3) H&E (a lazy ``zarr.Array`` for TIFFs), or ``None`` without an image.
    info : dict
        What was read (spots, genes, platform, median UMI, skipped zero-count spots, image size, rescaling).
    """

    slide: ad.AnnData
    image: Any | None = None  # (H, W, 3) array-like, read lazily for TIFFs
    info: dict[str, Any] = field(default_factory=dict)


def load_slide(
    spatial: str | os.PathLike,
    platform: str | Platform = Platform.VISIUM,
    image: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    image_scale: float | str | None = None,
    table: str = "table",
    bin_size: int = 2,
) -> SlideInputs:
    """Read and validate a sample: counts (raw integers, except imaging panels), coordinates, scale factors, and
    that the image (if given) covers the spots.

    Parameters
    ----------
    spatial : str or os.PathLike
        ``.h5ad``, AnnData ``.zarr``, a SpatialData ``.zarr`` (see ``table``) or a Space Ranger output folder.
    platform : str or Platform
        One of :class:`spatial_assets.constants.Platform`; MERFISH-like imaging may hold non-integer counts.
    image : str or os.PathLike, optional
        The full-resolution H&E (tif / jpg / png) in whose pixels ``obsm['spatial']`` is given.
    name : str, optional
        The sample's name, recorded in ``slide.uns['sample']``.
    table : str
        The table to read when ``spatial`` is a SpatialData zarr.
    bin_size : int
        The bins (2 / 8 / 16 um) to read when ``spatial`` is a Visium HD folder.
    image_scale : float or str, optional
        ``image`` is the full-resolution image scaled by this factor (e.g. a Space Ranger folder's
        ``spatial/tissue_hires_image.png`` with ``'tissue_hires_scalef'``, read from the scale factors, or a
        number). Coordinates and ``spot_diameter_fullres`` are rescaled into that image's pixels (the originals are
        kept in ``uns['sample']``), so segmentation runs at that resolution; a warning is given when nuclei would be
        fewer than :data:`MIN_NUCLEUS_PX` pixels across.

    Returns
    -------
    SlideInputs
        Spots with zero counts are skipped (``info['zero_count_spots_skipped']`` and examples report them).

    Raises
    ------
    InputError
        Unreadable files, no spots, duplicated barcodes or genes, non-integer / negative counts, every spot empty,
        missing scale factors, a missing SpatialData table, an unknown ``image_scale`` key, or an image that does
        not cover the spots; the message names file and field.
    """
    platform = Platform(platform)
    slide = read_spatial(spatial, table=table, bin_size=bin_size)
    check_not_empty(slide, str(spatial), "spots")
    if platform.imaging:
        validate_counts(slide, str(spatial), require_integer=False)
    else:
        check_raw_counts(slide, str(spatial))
    zero = zero_count_spots(slide)
    zero_names = [str(n) for n in slide.obs_names[zero]]
    if zero.all():
        raise InputError(f"{spatial}: X: all {slide.n_obs} spots have zero counts; expected counts in some spots")
    if zero.any():  # reported and skipped: no cell can be typed or decomposed from nothing
        slide = slide[~zero].copy()
    slide.uns["sample"] = {
        "name": name or Path(spatial).stem,
        "platform": platform.value,
        "source": str(spatial),
        "image": str(image) if image else "none",
    }
    info: dict[str, Any] = {
        "spots": slide.n_obs,
        "genes": slide.n_vars,
        "platform": platform.value,
        "median_umi": float(np.median(np.asarray(slide.X.sum(1)).ravel())) if slide.n_obs else 0.0,
        "zero_count_spots_skipped": len(zero_names),
    }
    if zero_names:
        info["zero_count_spots_examples"] = ", ".join(zero_names[:10])
    img = None
    if image is not None and image_scale is not None:
        info.update(_rescale_to_image(slide, str(spatial), image_scale))
    if image is not None:
        scalefactors(slide, str(spatial))
        img = read_image(image)
        try:  # touch the last tile: a truncated TIFF fails here, naming the file, not later deep in a copy
            np.asarray(img[-1:, -1:])
        except Exception as e:
            raise InputError(f"{image}: unreadable image (truncated?) ({type(e).__name__}: {str(e)[:200]})") from None
        check_image_covers_spots(img.shape[:2], slide, str(spatial), str(image))
        info["image_hw"] = [int(img.shape[0]), int(img.shape[1])]
    return SlideInputs(slide, img, info)
