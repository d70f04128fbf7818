"""Decomposition of one spot range of a sample, and the combination of a sample's finished ranges."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anndata as ad
import pandas as pd

from ..constants import UNASSIGNED, Platform
from ..params import DecompositionParams
from ._decompose import DecompositionResult, decompose
from ._inputs import prepare_spots


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
) -> DecompositionResult:
    """SpatialScope step 3 for the spots ``spot_range = (start, stop)`` of a sample (slide order).

    On image-free platforms a cell that typing left ``unassigned`` (no counts on informative genes) is its own
    spot, so it is dropped rather than letting its spot be skipped; on imaging panels, model genes missing from the
    slide get no spot term and are imputed (``info['genes_imputed']``).
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
    res = decompose(inputs, model, params, device=device, log=log)
    res.info.update(extra)
    res.adata.uns["decomposition"] = res.info
    return res


def combine_ranges(ranges: Mapping[str, ad.AnnData]) -> ad.AnnData:
    """All decomposed spot ranges of a sample (``{range key: AnnData}``) in one AnnData of every cell, in range
    order; ``uns['spot_ranges']`` lists the keys. Raises ValueError if a cell id appears in two ranges."""
    keys = sorted(ranges)
    parts = [ranges[k] for k in keys if ranges[k].n_obs]
    combined = ad.concat(parts, merge="same", uns_merge=None) if parts else ad.AnnData()
    if combined.n_obs and combined.obs_names.has_duplicates:
        dup = combined.obs_names[combined.obs_names.duplicated()]
        raise ValueError(
            f"decomposed ranges {keys}: {len(dup)} cell ids appear in more than one range (e.g. "
            f"{list(dup[:3])}); the ranges come from different partition schemes"
        )
    combined.uns["spot_ranges"] = keys
    combined.uns["cells_per_range"] = {k: int(ranges[k].n_obs) for k in keys}
    return combined
