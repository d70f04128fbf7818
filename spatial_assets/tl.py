"""Tools (``sa.tl``), scanpy-style: each stage of SpatialScope and soScope as one call over AnnData, with
scanpy-ready results (``obsm['spatial']``, ``uns['spatial']``, ``layers['counts']``).

These are the same science functions the Dagster assets call, chained the way the assets chain them (QC-passing
spots for typing, the platform effect into the decomposition, sub-spots conserving spot sums), for notebooks.
No dagster import here.
"""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad
import pandas as pd

from . import io as sio
from .constants import Platform
from .params import CellTypingParams, DecompositionParams, SoScopeParams


def cell_types(
    slide: ad.AnnData,
    reference: ad.AnnData,
    cell_type_key: str,
    segmented,
    params: CellTypingParams | None = None,
    *,
    platform: str | Platform = Platform.VISIUM,
    class_key: str | None = None,
    max_cells_per_spot: int = 20,
):
    """SpatialScope step 2: RCTD spot proportions and a type per segmented cell (Potts prior).

    Parameters
    ----------
    slide
        The sample's spots (raw counts, ``obsm['spatial']``).
    reference
        Single-cell reference with raw counts and ``obs[cell_type_key]``.
    cell_type_key
        The reference's cell-type column.
    segmented
        :class:`spatial_assets.segmentation.SampleCells` (from ``sa.seg.segment_sample``) or a cells DataFrame.
    params
        Cell typing parameters (:class:`spatial_assets.params.CellTypingParams`).
    platform, class_key, max_cells_per_spot
        As for :func:`spatial_assets.celltyping.type_sample`.

    Returns
    -------
    CellTypingResult
        ``cells``, ``weights``, ``platform_effect``, ``info``; plus ``spots``: the scanpy-ready spots x types
        AnnData over every input barcode (``obs['typing_status']`` says why a spot was not typed).

    Raises
    ------
    InputError
        Slide and reference share too few genes (the message says why: Ensembl vs symbols, species' case).
    """
    from . import celltyping

    sio.check_gene_ids(slide, reference.var_names)
    cells = segmented.cells if hasattr(segmented, "cells") else segmented
    spots = getattr(segmented, "spots", None)
    typed_slide, typed_cells, _ = celltyping.typing_inputs(slide, cells, spots, platform)
    res = celltyping.type_sample(
        typed_slide,
        reference,
        cell_type_key,
        typed_cells,
        params,
        platform=platform,
        class_key=class_key,
        max_cells_per_spot=max_cells_per_spot,
    )
    res.spots = sio.spot_weights_anndata(res.weights, slide, spots=spots, skipped=res.info.get("skipped_spots"))
    return res


def decompose(
    slide: ad.AnnData,
    typed,
    reference: ad.AnnData | None = None,
    cell_type_key: str = "cell_type",
    params: DecompositionParams | None = None,
    *,
    model=None,
    platform: str | Platform = Platform.VISIUM,
    image=None,
    device=None,
    log: Callable[[str], None] | None = None,
) -> ad.AnnData:
    """SpatialScope step 3: decompose every spot into its typed cells' expression.

    Parameters
    ----------
    slide
        The sample's spots.
    typed
        The result of :func:`cell_types` (``cells`` and ``platform_effect`` are used).
    reference, cell_type_key
        The reference (raw counts) and its cell-type column: the default ``estimator="mixture"`` fits its prior
        on it; with ``estimator="langevin"`` and no ``model`` an analytic per-type Gaussian prior is built from it
        (train a score model with :func:`spatial_assets.generative.train_score_model` for the published method).
    params
        Decomposition parameters.
    model
        A score model (:class:`spatial_assets.generative.ScoreModel` or ``GaussianScoreModel``).
    platform, device, log
        As for :func:`spatial_assets.decomposition.decompose_range`.
    image
        Full-resolution H&E, only used for ``uns['spatial']`` images when the slide has none.

    Returns
    -------
    AnnData
        Cells x genes, scanpy-ready; ``X`` / ``layers['counts']`` as in ``uns['X_description']``.

    Raises
    ------
    ValueError
        Neither ``model`` nor ``reference`` is given.
    """
    from . import decomposition, generative

    if model is None:
        if reference is None:
            raise ValueError("decompose: give a score model (model=) or the reference to build a Gaussian prior from")
        model = generative.GaussianScoreModel.from_reference(reference, cell_type_key)
    cells = typed.cells if hasattr(typed, "cells") else typed
    pe = getattr(typed, "platform_effect", None)
    res = decomposition.decompose_range(
        slide, cells, model, pe, params=params, platform=platform, device=device, log=log, reference=reference
    )
    out = res.adata
    if out.n_obs:
        sio.make_scanpy_ready(out, slide, image, store="decomposed_cells", counts=sio.decomposed_counts(out))
    return out


def enhance(
    slide: ad.AnnData,
    params: SoScopeParams | None = None,
    *,
    nuclei: pd.DataFrame | None = None,
    image=None,
    platform: str | Platform = Platform.VISIUM,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    grid_subdivision: int = 3,
) -> ad.AnnData:
    """soScope: enhance spots into sub-spots (graph VAE); each spot is the sum of its sub-spots.

    Parameters
    ----------
    slide
        The sample's spots.
    params
        soScope parameters (``image_features='none'`` uses only nuclei counts / areas from ``nuclei``).
    nuclei
        Segmented cells (``sa.seg.segment_sample(...).cells``), for nuclei features.
    image
        The H&E (image features, and ``uns['spatial']`` images when the slide has none).
    platform, device, log, grid_subdivision
        As for :func:`spatial_assets.soscope.enhance`.

    Returns
    -------
    AnnData
        Sub-spots x genes, scanpy-ready; ``layers['counts']`` sums exactly to each spot.
    """
    from . import soscope

    params = params or SoScopeParams()
    use_image = image if params.image_features != "none" else None
    res = soscope.enhance(
        slide,
        params,
        platform=Platform(platform).value,
        image=use_image,
        nuclei=nuclei,
        device=device,
        log=log,
        grid_subdivision=grid_subdivision,
    )
    out = res.adata
    sio.make_scanpy_ready(out, slide, image, store="enhanced_subspots", counts=out.layers.get("conserved"))
    return out


__all__ = ["cell_types", "decompose", "enhance"]
