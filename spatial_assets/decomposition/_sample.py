"""Decomposition of one spot range of a sample, and the combination of a sample's finished ranges."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..constants import UNASSIGNED, Platform
from ..params import DecompositionParams
from ._decompose import DecompositionResult, decompose
from ._inputs import prepare_spots
from ._mixture import fit_mixture_prior


def decompose_range(
    slide: ad.AnnData,
    cells: pd.DataFrame,
    model,
    platform_effect: pd.Series | None = None,
    spot_range: tuple[int, int] | None = None,
    params: DecompositionParams | None = None,
    *,
    platform: str | Platform = Platform.VISIUM,
    device=None,
    log: Callable[[str], None] | None = None,
    reference: ad.AnnData | None = None,
) -> DecompositionResult:
    """SpatialScope step 3 for the spots ``spot_range = (start, stop)`` of a sample (slide order).

    On image-free platforms a cell that typing left ``unassigned`` (no counts on informative genes) is its own
    spot, so it is dropped rather than letting its spot be skipped; on imaging panels, model genes missing from the
    slide get no spot term and are imputed (``info['genes_imputed']``).

    ``params.estimator == "mixture"`` (default) fits the mixture prior on ``reference`` (required then: raw
    counts with the model's cell-type column) with ``params.mixture_components`` clusters per type.

    Parameters
    ----------
    slide : anndata.AnnData
        The sample's spots x genes (raw counts).
    cells : pandas.DataFrame
        The sample's typed cells with their spots (see :func:`prepare_spots`).
    model : ScoreModel
        The fitted score model.
    platform_effect : pandas.Series or None
        Per-gene platform effect (slide / reference scale); none when None.
    spot_range : tuple of int or None
        ``(start, stop)`` spot positions in slide order; all spots when None.
    params : DecompositionParams or None
        Decomposition settings; the defaults when None.
    platform : str or Platform
        The slide's platform (decides how untyped cells and missing genes are handled).
    device : str or torch.device or None
        Device to run on (see :func:`decompose`).
    log : callable or None
        Receives progress lines.
    reference : anndata.AnnData or None
        The reference cells (raw counts) to fit the mixture prior on; required with the mixture estimator.

    Returns
    -------
    DecompositionResult
        The range's decomposed cells; its ``info`` is also stored in ``adata.uns['decomposition']``.

    Raises
    ------
    ValueError
        If the mixture estimator is asked for without ``reference``, or the inputs are invalid (see
        :func:`prepare_spots` and :func:`decompose`).
    """
    params = params or DecompositionParams()
    platform = Platform(platform)
    extra: dict = {}
    if platform.image_free:
        untyped = cells["cell_type"].astype(str).to_numpy() == UNASSIGNED
        cells = cells.loc[~untyped]
        extra["cells_untyped_not_decomposed"] = int(untyped.sum())
    inputs = prepare_spots(
        slide, cells, model, platform_effect, spot_range=spot_range, leave_out_genes=params.leave_out_genes
    )
    if platform.imaging:
        extra.update(genes_measured=int(inputs.in_slide.sum()), genes_imputed=int((~inputs.in_slide).sum()))
    prior = None
    if params.estimator == "mixture":
        if reference is None:
            raise ValueError("params.estimator='mixture' needs the reference (decompose_range(..., reference=...))")
        prior = fit_mixture_prior(reference, model, n_components=params.mixture_components, seed=params.seed)
    res = decompose(inputs, model, params, device=device, log=log, prior=prior)
    res.info.update(extra)
    res.adata.uns["decomposition"] = res.info
    return res


def combine_ranges(
    ranges: Mapping[str, ad.AnnData],
    *,
    expected_ranges: Sequence[str] | None = None,
    slide: ad.AnnData | None = None,
    source: str = "decomposed ranges",
) -> ad.AnnData:
    """All decomposed spot ranges of a sample in one AnnData of every cell, in range order.

    Parameters
    ----------
    ranges
        ``{range key: AnnData}`` of the finished ranges.
    expected_ranges
        The range keys of the current partition scheme: every one must be given, no other.
    slide
        The sample's slide: every cell's ``obs['spot']`` must be one of its spots.
    source
        Where the ranges come from, for the messages.

    Returns
    -------
    anndata.AnnData
        ``uns['spot_ranges']`` lists the keys, ``uns['cells_per_range']`` the cells of each.

    Raises
    ------
    ValueError
        Ranges are missing or unexpected, a cell id appears in two ranges, a spot's cells are split over two
        ranges (ranges of different partition schemes), or a cell's spot is not in the slide.
    """
    keys = sorted(ranges)
    if expected_ranges is not None:
        want = sorted(map(str, expected_ranges))
        missing = [k for k in want if k not in ranges]
        extra = [k for k in keys if k not in set(want)]
        if missing or extra:
            raise ValueError(
                f"{source}: spot ranges {keys} do not match the current partition scheme ({len(want)} ranges "
                f"{want[0]}..{want[-1]}): missing {missing}, unexpected {extra}; materialize decomposed_cells "
                "for the missing ranges first"
            )
    parts = [ranges[k] for k in keys if ranges[k].n_obs]
    combined = ad.concat(parts, merge="same", uns_merge=None) if parts else ad.AnnData()
    if combined.n_obs and combined.obs_names.has_duplicates:
        dup = combined.obs_names[combined.obs_names.duplicated()]
        raise ValueError(
            f"{source}: {len(dup)} cell ids appear in more than one of the ranges {keys} (e.g. "
            f"{list(dup[:3])}); expected unique cell ids (the ranges come from different partition schemes)"
        )
    if combined.n_obs and "spot" in combined.obs:
        spot = combined.obs["spot"].astype(str).to_numpy()
        owner = np.repeat(np.arange(len(parts)), [p.n_obs for p in parts])
        df = pd.DataFrame({"spot": spot, "owner": owner}).drop_duplicates()
        split = df["spot"][df["spot"].duplicated()].unique()
        if len(split):
            raise ValueError(
                f"{source}: the cells of {len(split)} spots are split over several ranges (e.g. {list(split[:3])}); "
                "expected each spot in exactly one range (ranges of different partition schemes)"
            )
        if slide is not None:
            unknown = np.unique(spot[~np.isin(spot, np.asarray(slide.obs_names, dtype=str))])
            if len(unknown):
                raise ValueError(
                    f"{source}: cells of {len(unknown)} spots not in the slide (e.g. {list(unknown[:3])}); "
                    "expected every cell's obs['spot'] among the slide's obs_names (stale ranges of another slide?)"
                )
    combined.uns["spot_ranges"] = keys
    combined.uns["cells_per_range"] = {k: int(ranges[k].n_obs) for k in keys}
    return combined
