"""A sample's and a reference's inputs, read and validated as one step (what the input assets store)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from ..constants import Platform
from ._readers import InputError, check_image_covers_spots, read_image, read_spatial, scalefactors, validate_counts


def load_reference(path: str | os.PathLike, cell_type_key: str) -> ad.AnnData:
    """A single-cell reference (.h5ad): raw counts with a cell-type column, validated.

    Raises
    ------
    InputError
        The file cannot be read, ``obs`` lacks ``cell_type_key``, or the counts are negative / non-finite.
    """
    path = Path(path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:
        raise InputError(f"{path}: could not be read as an AnnData .h5ad ({type(e).__name__}: {e})") from None
    if cell_type_key not in adata.obs:
        raise InputError(
            f"{path}: obs has no cell-type column '{cell_type_key}' (cell_type_key); columns: {list(adata.obs.columns)}"
        )
    validate_counts(adata, str(path), require_integer=False)
    adata.var_names_make_unique()
    return adata


@dataclass
class SlideInputs:
    """A sample's spots (AnnData, ``obsm['spatial']`` in full-resolution image pixels) and its image, if any."""

    slide: ad.AnnData
    image: Any | None = None  # (H, W, 3) array-like, read lazily for TIFFs
    info: dict[str, Any] = field(default_factory=dict)


def load_slide(
    spatial: str | os.PathLike,
    platform: str | Platform = Platform.VISIUM,
    image: str | os.PathLike | None = None,
    *,
    name: str | None = None,
) -> SlideInputs:
    """Read and validate a sample: counts (raw integers, except imaging panels), coordinates, scale factors, and
    that the image (if given) covers the spots.

    Parameters
    ----------
    spatial
        ``.h5ad``, AnnData ``.zarr`` or a Space Ranger output folder.
    platform
        One of :class:`spatial_assets.constants.Platform`; MERFISH-like imaging may hold non-integer counts.
    image
        The full-resolution H&E (tif / jpg / png) in whose pixels ``obsm['spatial']`` is given.
    name
        The sample's name, recorded in ``slide.uns['sample']``.
    """
    platform = Platform(platform)
    slide = read_spatial(spatial)
    validate_counts(slide, str(spatial), require_integer=platform != Platform.MERFISH)
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
    }
    img = None
    if image is not None:
        scalefactors(slide, str(spatial))
        img = read_image(image)
        check_image_covers_spots(img.shape[:2], slide, str(spatial), str(image))
        info["image_hw"] = [int(img.shape[0]), int(img.shape[1])]
    return SlideInputs(slide, img, info)
