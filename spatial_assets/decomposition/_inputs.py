"""The spots of one range and their typed cells, on the score model's gene axis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..constants import UNASSIGNED

_MODEL_ATTRS = (
    "genes",
    "cell_types",
    "type_means",
    "sigmas",
    "decomposition_step",
    "steps_per_level",
    "ref_library_size",
    "score",
)


def _check_model(model) -> None:
    missing = [a for a in _MODEL_ATTRS if not hasattr(model, a)]
    if missing:
        raise TypeError(f"score model {type(model).__name__} lacks {missing}: expected the ScoreModel interface")
    T, G = len(model.cell_types), len(model.genes)
    if tuple(model.type_means.shape) != (T, G):
        raise ValueError(
            f"score model: type_means has shape {tuple(model.type_means.shape)}, expected (n_types={T}, n_genes={G})"
        )
    s = model.sigmas.detach().cpu().numpy()
    if s.ndim != 1 or len(s) < 1 or not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(np.diff(s) > 0):
        raise ValueError(
            "score model: sigmas must be positive, finite and descending; "
            f"found {len(s)} values from {s[:1]} to {s[-1:]}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Inputs: spots of a range with their typed cells
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecompositionInput:
    """The spots of one range and their typed cells, on the score model's gene axis.

    ``counts``: (S, G) slide counts divided by the platform effect (0 for model genes absent from the slide);
    ``cells``: index cell id, columns spot, spot_idx (row in ``spots``), type_idx (row in model.cell_types),
    cell_type, x, y, sorted by spot; ``spots``: index spot name (slide order), columns n_cells, x, y.

    Attributes
    ----------
    genes : list of str
        The score model's genes (the gene axis of ``counts``).
    counts : numpy.ndarray
        (S, G) slide counts divided by the platform effect; 0 for model genes absent from the slide.
    spots : pandas.DataFrame
        The range's spots kept, index spot name (slide order), columns n_cells, x, y.
    cells : pandas.DataFrame
        Their cells, index cell id, columns spot, spot_idx, type_idx, cell_type, x, y, sorted by spot.
    in_slide : numpy.ndarray
        Boolean per gene: measured on the slide.
    platform_effect : numpy.ndarray
        Platform effect per gene (1 where unknown or not in the slide).
    leave_out : list of str
        Genes hidden from the spot term.
    info : dict
        Summary of the selection (range, dropped cells, skipped spots, ...).
    """

    genes: list[str]
    counts: np.ndarray
    spots: pd.DataFrame
    cells: pd.DataFrame
    in_slide: np.ndarray
    platform_effect: np.ndarray
    leave_out: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return len(self.spots)

    @property
    def n_cells(self) -> int:
        return len(self.cells)


def _as_float_matrix(X, name: str) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numeric counts, found dtype {X.dtype}")
    return X.astype(np.float64)


def _check_counts(X, name: str) -> None:
    vals = X.data if sp.issparse(X) else np.asarray(X)
    if vals.size == 0:
        return
    if vals.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numeric counts, found dtype {vals.dtype}")
    n_bad = int(np.count_nonzero(~np.isfinite(vals)))
    if n_bad:
        raise ValueError(f"{name}: expected finite counts, found {n_bad} NaN/inf values")
    mn = float(vals.min())
    if mn < 0:
        raise ValueError(f"{name}: expected non-negative counts, found minimum {mn:g}")


def _platform_effect(platform_effect, genes: list[str]) -> np.ndarray:
    """Platform effect per gene (NaN, 0 or inf -> 1; genes absent from the series -> 1)."""
    if platform_effect is None:
        return np.ones(len(genes))
    if not isinstance(platform_effect, pd.Series):
        raise ValueError(
            f"platform_effect: expected a pandas Series indexed by gene (var 'estimated_be'), "
            f"found {type(platform_effect).__name__}"
        )
    be = pd.to_numeric(platform_effect, errors="coerce")
    be.index = be.index.astype(str)
    if be.index.has_duplicates:
        raise ValueError(f"platform_effect: duplicated genes {sorted(set(be.index[be.index.duplicated()]))[:5]}")
    v = be.reindex(genes).to_numpy(dtype=float)
    neg = np.isfinite(v) & (v < 0)
    if neg.any():
        bad = [g for g, b in zip(genes, neg) if b]
        raise ValueError(f"platform_effect: expected non-negative ratios, found negative values for {bad[:5]}")
    return np.where(np.isfinite(v) & (v > 0), v, 1.0)


def prepare_spots(
    slide: ad.AnnData,
    cells: pd.DataFrame,
    model,
    platform_effect: pd.Series | None = None,
    spot_range: tuple[int, int] | None = None,
    leave_out_genes: Sequence[str] = (),
    *,
    cell_type_key: str | None = None,
    type_column: str = "cell_type",
) -> DecompositionInput:
    """Select the spots ``spot_range = (start, stop)`` (slide order; None = all) and their typed cells.

    ``cells``: DataFrame indexed by cell id with columns ``spot`` (slide obs name), ``type_column`` and optionally
    ``x``, ``y``. Cells whose spot is not in the slide are dropped and counted; spots of the range without cells, or
    with no counts on the genes used, are skipped and listed in ``info``. A range starting beyond the last spot
    gives an empty input (``info['empty_reason']``). ``cell_type_key``: if given, checked against the model's.

    Parameters
    ----------
    slide : anndata.AnnData
        The sample's spots x genes (raw counts).
    cells : pandas.DataFrame
        Typed cells indexed by cell id, with columns ``spot``, ``type_column`` and optionally ``x``, ``y``.
    model : ScoreModel
        The fitted score model (its genes form the gene axis).
    platform_effect : pandas.Series or None
        Per-gene platform effect indexed by gene; 1 for all genes when None.
    spot_range : tuple of int or None
        ``(start, stop)`` spot positions in slide order; all spots when None.
    leave_out_genes : sequence of str
        Shared genes hidden from the spot term (to score their recovery).
    cell_type_key : str or None
        If given, checked against the model's cell type key.
    type_column : str
        Column of ``cells`` holding the cell type.

    Returns
    -------
    DecompositionInput
        The range's spots and cells on the model's gene axis.

    Raises
    ------
    TypeError
        If ``model`` lacks the score model interface.
    ValueError
        If the model, slide, cells, platform effect, ``leave_out_genes`` or ``spot_range`` are invalid, or no
        slide genes or cell spots match.
    """
    _check_model(model)
    if cell_type_key is not None and hasattr(model, "check_compatible"):
        model.check_compatible(cell_type_key=cell_type_key)
    if not isinstance(slide, ad.AnnData):
        raise ValueError(f"slide: expected an AnnData (spots x genes), found {type(slide).__name__}")
    if not isinstance(cells, pd.DataFrame):
        raise ValueError(f"cells: expected a pandas DataFrame, found {type(cells).__name__}")
    need = [c for c in ("spot", type_column) if c not in cells.columns]
    if need:
        raise ValueError(f"cells: missing column(s) {need}; found columns {list(cells.columns)}")
    if cells.index.has_duplicates:
        dup = cells.index[cells.index.duplicated()].astype(str)
        raise ValueError(f"cells: duplicated cell ids, e.g. {list(dup[:5])}")
    if slide.var_names.has_duplicates:
        dup = slide.var_names[slide.var_names.duplicated()]
        raise ValueError(f"slide.var_names: duplicated genes, e.g. {list(dup[:5])}")
    _check_counts(slide.X, "slide.X")

    genes = list(model.genes)
    slide_genes = pd.Index(slide.var_names.astype(str))
    col = slide_genes.get_indexer(genes)
    in_slide = col >= 0
    if not in_slide.any():
        raise ValueError(
            f"no genes shared between slide.var_names ({len(slide_genes)} genes, e.g. "
            f"{list(slide_genes[:3])}) and the score model's genes ({len(genes)}, e.g. {genes[:3]})"
        )
    leave_out = [str(g) for g in leave_out_genes]
    shared = set(np.asarray(genes)[in_slide])
    bad = [g for g in leave_out if g not in shared]
    if bad:
        raise ValueError(
            f"leave_out_genes: {bad[:10]} are not among the {len(shared)} genes shared by the slide and the score model"
        )
    hidden = np.isin(genes, leave_out)
    if not (in_slide & ~hidden).any():
        raise ValueError("leave_out_genes: every shared gene is left out; at least one must constrain the spots")
    be = _platform_effect(platform_effect, genes)
    be[~in_slide] = 1.0

    n_total = slide.n_obs
    info: dict[str, Any] = {
        "slide_spots": int(n_total),
        "genes": len(genes),
        "genes_in_slide": int(in_slide.sum()),
        "leave_out_genes": leave_out,
    }
    if spot_range is None:
        start, stop = 0, n_total
    else:
        try:
            start, stop = (int(v) for v in spot_range)
        except (TypeError, ValueError):
            raise ValueError(f"spot_range: expected (start, stop) integers, found {spot_range!r}") from None
        if start < 0 or stop < start:
            raise ValueError(f"spot_range: expected 0 <= start <= stop, found ({start}, {stop})")
    info["spot_range"] = [start, stop]
    stop = min(stop, n_total)
    spot_names = pd.Index(slide.obs_names.astype(str))

    cell_spot = cells["spot"].astype(str).to_numpy()
    pos_in_slide = spot_names.get_indexer(cell_spot)
    not_in_slide = int(np.count_nonzero(pos_in_slide < 0))
    info["cells_not_in_slide"] = not_in_slide
    if spot_range is None and not_in_slide == len(cells) and len(cells):
        raise ValueError(
            f"cells: none of the {len(cells)} cells' spots are slide spots (e.g. cells['spot'] = "
            f"{list(pd.unique(cell_spot))[:3]}, slide.obs_names e.g. {list(spot_names[:3])})"
        )

    def _empty(reason: str) -> DecompositionInput:
        info.update(empty_reason=reason, spots=0, cells=0, spots_skipped_no_cells=[], spots_skipped_zero_counts=[])
        return DecompositionInput(
            genes,
            np.zeros((0, len(genes))),
            pd.DataFrame(
                {"n_cells": np.zeros(0, int), "x": np.zeros(0), "y": np.zeros(0)}, index=pd.Index([], name="spot")
            ),
            pd.DataFrame({"spot": [], "spot_idx": [], "type_idx": [], "cell_type": [], "x": [], "y": []}),
            in_slide,
            be,
            leave_out,
            info,
        )

    if start >= n_total or start == stop:
        return _empty(f"spot range [{start}, {info['spot_range'][1]}) holds no spots: the slide has {n_total}")

    # cells of the range
    in_range = (pos_in_slide >= start) & (pos_in_slide < stop)
    # Spots with a cell that cell typing left 'unassigned' (e.g. a skipped spot) are skipped whole and reported:
    # decomposing only the typed cells of such a spot would give them the unassigned cells' counts.
    unassigned = cells[type_column].astype(str).to_numpy() == UNASSIGNED
    bad_spots = np.unique(cell_spot[in_range & unassigned])
    info["spots_skipped_unassigned_cells"] = bad_spots[:200].tolist()
    info["n_spots_skipped_unassigned_cells"] = int(len(bad_spots))
    if len(bad_spots):
        in_range &= ~np.isin(cell_spot, bad_spots)
    sel = cells.loc[in_range]
    types = sel[type_column]
    if types.isna().any():
        raise ValueError(
            f"cells['{type_column}']: {int(types.isna().sum())} cells of the range have no type, "
            f"e.g. {list(sel.index[types.isna()].astype(str)[:5])}"
        )
    types = types.astype(str).to_numpy()
    tix = pd.Index(model.cell_types).get_indexer(types)
    if (tix < 0).any():
        absent = sorted(set(types[tix < 0]))
        raise ValueError(
            f"cells['{type_column}']: cell types absent from the score model: {absent[:10]} "
            f"({int((tix < 0).sum())} cells); the model knows {len(model.cell_types)} types, "
            f"e.g. {list(model.cell_types)[:5]}"
        )
    local = pos_in_slide[in_range] - start
    n_cells = np.bincount(local, minlength=stop - start)

    # counts of the range on the model's gene axis, divided by the platform effect
    Xr = slide.X[start:stop]
    Xr = Xr.toarray() if sp.issparse(Xr) else np.asarray(Xr)
    counts = np.zeros((stop - start, len(genes)))
    counts[:, in_slide] = Xr[:, col[in_slide]].astype(np.float64) / be[in_slide]
    observed = in_slide & ~hidden
    lib = counts[:, observed].sum(1)
    names = spot_names[start:stop]
    no_cells = n_cells == 0
    zero = (~no_cells) & (lib <= 0)
    keep = ~no_cells & ~zero
    info["spots_skipped_no_cells"] = [str(s) for s in names[no_cells]]
    info["spots_skipped_zero_counts"] = [str(s) for s in names[zero]]
    info["cells_in_zero_count_spots"] = int(n_cells[zero].sum())
    if not keep.any():
        return _empty(
            f"no spot of range [{start}, {stop}) has both cells and counts "
            f"({int(no_cells.sum())} without cells, {int(zero.sum())} without counts)"
        )

    new_idx = np.cumsum(keep) - 1
    cell_keep = keep[local]
    xy = (
        np.asarray(slide.obsm["spatial"])[start:stop] if "spatial" in slide.obsm else np.full((stop - start, 2), np.nan)
    )
    spots = pd.DataFrame(
        {"n_cells": n_cells[keep], "x": xy[keep, 0].astype(float), "y": xy[keep, 1].astype(float)},
        index=pd.Index(names[keep], name="spot"),
    )
    sel = sel.loc[cell_keep]
    cell_df = pd.DataFrame(
        {
            "spot": np.asarray(names)[local[cell_keep]],
            "spot_idx": new_idx[local[cell_keep]].astype(np.int64),
            "type_idx": tix[cell_keep].astype(np.int64),
            "cell_type": types[cell_keep],
            "x": pd.to_numeric(sel["x"], errors="coerce").to_numpy(float) if "x" in sel else np.nan,
            "y": pd.to_numeric(sel["y"], errors="coerce").to_numpy(float) if "y" in sel else np.nan,
        },
        index=pd.Index(sel.index.astype(str), name="cell"),
    )
    cell_df = cell_df.sort_values("spot_idx", kind="stable")
    info.update(spots=int(keep.sum()), cells=len(cell_df))
    return DecompositionInput(genes, counts[keep], spots, cell_df, in_slide, be, leave_out, info)


def _targets(inputs: DecompositionInput, model, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-cell-scaled spots times n_cells (S, G), the per-spot scale of raw/platform counts, the observed mask.

    Each spot is scaled so that its observed genes sum to ``n_cells x`` the reference library on those genes
    (the model's ``ref_library_size`` times the observed genes' share of the mean type profile).
    """
    observed = inputs.in_slide & ~hidden
    prof = torch.expm1(model.type_means.detach().float().cpu()).clamp_min(0).mean(0).numpy().astype(np.float64)
    frac = prof[observed].sum() / prof.sum() if prof.sum() > 0 else 1.0
    ref_lib = float(model.ref_library_size) * float(frac)
    n = inputs.spots["n_cells"].to_numpy(float)
    lib = inputs.counts[:, observed].sum(1)
    scale = ref_lib * n / lib
    return inputs.counts * scale[:, None], scale, observed


def hidden_genes(inputs, leave_out_genes) -> tuple[list[str], list[str], np.ndarray]:
    """The genes hidden from the spot likelihood: the inputs' own (model genes missing from the slide) plus
    ``leave_out_genes`` (leave-genes-out validation).

    Parameters
    ----------
    inputs : DecompositionInput
        From :func:`prepare_spots`.
    leave_out_genes : sequence of str
        Extra genes to hide; each must be among the genes slide and model share.

    Returns
    -------
    genes : list of str
        The model's genes, in order.
    leave_out : list of str
        Every hidden gene.
    hidden : numpy.ndarray
        ``(G,)`` bool mask of the hidden genes.

    Raises
    ------
    ValueError
        A gene of ``leave_out_genes`` is not shared by slide and model.
    """
    genes = list(inputs.genes)
    extra = [g for g in leave_out_genes if g not in inputs.leave_out]
    bad = [g for g in extra if g not in set(np.asarray(genes)[inputs.in_slide])]
    if bad:
        raise ValueError(f"params.leave_out_genes: {bad[:10]} are not among the genes shared by slide and model")
    leave_out = list(inputs.leave_out) + extra
    return genes, leave_out, np.isin(genes, leave_out)
