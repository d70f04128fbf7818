"""The cells of one sample: nuclei segmentation of its image, or one cell per spot on image-free platforms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import pandas as pd

from ..constants import Platform
from ..io._readers import InputError
from ..params import SegmentationParams
from ..platforms._imaging import cells_from_spots
from ._spots import segment_slide


@dataclass
class SampleCells:
    """Cells of a sample (``cells``: id, x, y, area, spot, ...), spots with their cell counts and QC (``spots``),
    the label image (None on image-free platforms), and what ran (``info``, ``summary``).

    Attributes
    ----------
    cells : pandas.DataFrame
        The sample's cells: id, x, y, area, spot, ...
    spots : pandas.DataFrame
        The spots with their cell counts and QC.
    labels : numpy.ndarray or zarr.Array or None
        The nuclei label image; None on image-free platforms.
    summary : dict
        Counts of the assignment to spots.
    info : dict
        What ran (segmentation method, model, ...).
    """

    cells: pd.DataFrame
    spots: pd.DataFrame
    labels: Any | None
    summary: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def segment_sample(
    slide: ad.AnnData,
    image=None,
    platform: str | Platform = Platform.VISIUM,
    params: SegmentationParams | None = None,
    *,
    sample: str = "sample",
    labels_out=None,
    log=None,
) -> SampleCells:
    """SpatialScope step 1 for a sample of any platform.

    Visium-like platforms segment the nuclei of ``image`` (:func:`segment_slide`); on image-free platforms
    (Slide-seq beads, imaged cells) every spot is one cell (:func:`spatial_assets.platforms.cells_from_spots`).

    Parameters
    ----------
    slide : anndata.AnnData
        The sample's spots x genes.
    image : str or os.PathLike or array-like or None
        The H&E image; required on platforms that are not image-free.
    platform : str or Platform
        The sample's platform.
    params : SegmentationParams or None
        Segmentation parameters; the defaults when None.
    sample : str
        The sample's name in error messages.
    labels_out : array-like or None
        Pre-allocated (H, W) integer array (e.g. zarr) for the labels.
    log : callable or None
        Receives StarDist's tile / block progress lines (see :func:`segment_nuclei`); None = silent.

    Returns
    -------
    SampleCells
        The sample's cells, spots, label image and what ran.

    Raises
    ------
    InputError
        A platform that needs an image has none, or the inputs are invalid (see :func:`segment_slide`).
    """
    platform = Platform(platform)
    if platform.image_free:
        cells, spots, summary = cells_from_spots(slide, platform=platform.value)
        return SampleCells(
            cells,
            spots,
            None,
            summary,
            {"method": "none", "reason": f"{platform.value}: each spot/bead is a cell (no image)"},
        )
    if image is None:
        raise InputError(
            f"sample '{sample}': platform {platform.value} needs an H&E image (samples[{sample}].image) "
            "for nuclei segmentation"
        )
    res, cells, spots, summary = segment_slide(image, slide, params, labels_out=labels_out, log=log)
    return SampleCells(cells, spots, res.labels, summary, res.info)
