"""The final cell-type list of a reference, decided once: what to do with types that have too few cells.

RCTD needs ``min_cells_per_type`` cells per type for a usable profile (25); the repository's 44-subtype MOp
reference has 16 types below it. :func:`prepare_reference_types` applies the configured policy
(``CellTypingParams.small_types``) before anything is trained, so the score model, cell typing and decomposition
all see the same types:

* ``"error"`` -- stop, naming the small types and their cells;
* ``"drop"`` -- remove the cells of the small types (a warning names them and the cells they hold);
* ``"merge"`` -- relabel a small type's cells to its class in ``obs[class_key]`` (the class most of its cells
  have), e.g. 'Sst Calb2' (18 cells) -> 'Sst'; a class name that is already a type joins it. Groups still below
  the minimum after merging are dropped, with a warning.

Cells counted are those with a type label and some counts (the cells typing can use). Pure: the input is not
modified; the original label is kept in ``obs[<cell_type_key>_original]``. No dagster import.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._rctd import CellTypingInputError


class SmallTypesError(CellTypingInputError):
    """The reference has cell types below ``min_cells_per_type`` and the policy is "error" (or cannot apply)."""


class SmallTypesWarning(UserWarning):
    """Small reference types were dropped or merged."""


def _by_size(counts: pd.Series) -> pd.Series:
    """Largest first, ties by name (deterministic messages)."""
    order = sorted(counts.index, key=lambda k: (-int(counts[k]), str(k)))
    return counts.reindex(order)


def _describe(counts: pd.Series) -> str:
    return ", ".join(f"'{k}' ({int(v)})" for k, v in counts.items())


def prepare_reference_types(
    reference: ad.AnnData,
    cell_type_key: str,
    params=None,
    class_key: str | None = None,
    *,
    policy: str | None = None,
    min_cells_per_type: int | None = None,
) -> tuple[ad.AnnData, dict]:
    """Apply the small-types policy to a reference, once, before anything is trained.

    Types with fewer than ``min_cells_per_type`` usable cells (with a label and some counts) are handled by the
    policy: ``"error"`` stops naming them; ``"drop"`` removes their cells (with a :class:`SmallTypesWarning`);
    ``"merge"`` relabels them to the class most of their cells have in ``obs[class_key]`` (RCTD's ``class_df``
    rule), then drops groups still too small. Pure: the input is not modified; the original labels are kept in
    ``obs[<cell_type_key>_original]``.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes counts with the types in ``obs``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    params : spatial_assets.params.CellTypingParams, optional
        Its ``small_types`` and ``min_cells_per_type`` are used; default ``CellTypingParams()``.
    class_key : str, optional
        The reference's coarser class column (``references[].class_key``), needed by "merge".
    policy : {"error", "drop", "merge"}, optional
        Overrides ``params.small_types``.
    min_cells_per_type : int, optional
        Overrides ``params.min_cells_per_type``.

    Returns
    -------
    reference : anndata.AnnData
        ``reference`` itself when no type is small, else a copy with the final types.
    report : dict
        Plain types: ``policy``, ``min_cells_per_type``, ``class_key``, ``small_types`` {type: cells},
        ``merged`` {type: class}, ``dropped`` {type: cells}, ``n_cells_dropped``, ``final_types`` {type: cells},
        ``messages``.

    Raises
    ------
    SmallTypesError
        If the policy is unknown, the reference is not an AnnData or lacks the type column, there are small types
        and the policy is "error", "merge" has no class column, or fewer than 2 types remain.
    """
    from ..params import CellTypingParams

    params = params or CellTypingParams()
    policy = policy or params.small_types
    min_cells = int(min_cells_per_type if min_cells_per_type is not None else params.min_cells_per_type)
    if policy not in ("error", "drop", "merge"):
        raise SmallTypesError(f"small_types: expected 'error', 'drop' or 'merge', found '{policy}'")
    if not isinstance(reference, ad.AnnData):
        raise SmallTypesError("reference: expected an AnnData object")
    if cell_type_key not in reference.obs.columns:
        raise SmallTypesError(
            f"reference.obs: no cell-type column '{cell_type_key}' (found columns {list(reference.obs.columns)})"
        )
    raw = reference.obs[cell_type_key]
    has_type = raw.notna().to_numpy()
    X = reference.X
    lib = np.asarray(X.sum(1)).ravel() if sp.issparse(X) else np.asarray(X).sum(1)
    usable = has_type & (lib > 0)
    types = raw.astype(str).to_numpy()
    vc = pd.Series(types[usable]).value_counts()
    small = _by_size(vc[vc < min_cells])
    report = {
        "policy": policy,
        "min_cells_per_type": min_cells,
        "class_key": class_key,
        "small_types": {str(k): int(v) for k, v in small.items()},
        "merged": {},
        "dropped": {},
        "n_cells_dropped": 0,
        "final_types": {},
        "messages": [],
    }
    head = (
        f"reference.obs['{cell_type_key}']: {len(small)} cell type(s) have fewer than "
        f"min_cells_per_type={min_cells} cells: {_describe(small)}"
    )
    if len(small) == 0:
        report["final_types"] = {str(k): int(v) for k, v in vc.sort_index().items()}
        return reference, report
    if policy == "error":
        raise SmallTypesError(head + " (set cell_typing.small_types to 'drop' or 'merge' to go on without them)")
    new = types.copy()
    if policy == "merge":
        if class_key is None or class_key not in reference.obs.columns:
            raise SmallTypesError(
                head + f"; small_types='merge' needs a class column (class_key = {class_key!r}, "
                f"found columns {list(reference.obs.columns)})"
            )
        cls = reference.obs[class_key].astype(str).to_numpy()
        in_small = np.isin(types, small.index) & usable
        tab = pd.crosstab(types[in_small], cls[in_small])
        target = tab.idxmax(axis=1)  # the class most of the type's cells have (RCTD's class_df rule)
        report["merged"] = {str(k): str(target[k]) for k in small.index}
        new[in_small] = target.reindex(types[in_small]).to_numpy()
        msg = (
            head
            + "; merged into their class ('"
            + class_key
            + "'): "
            + ", ".join(f"'{k}' -> '{target[k]}'" for k in small.index)
        )
        report["messages"].append(msg)
        warnings.warn(msg, SmallTypesWarning, stacklevel=2)
        vc2 = pd.Series(new[usable]).value_counts()
        still = _by_size(vc2[vc2 < min_cells])
        drop_types = list(still.index)
        if len(still):
            msg = (
                f"reference.obs['{cell_type_key}']: after merging, {len(still)} group(s) still have fewer than "
                f"min_cells_per_type={min_cells} cells and are dropped: {_describe(still)}"
            )
            report["messages"].append(msg)
            warnings.warn(msg, SmallTypesWarning, stacklevel=2)
        dropped = still
    else:
        drop_types = list(small.index)
        dropped = small
        msg = head + f"; dropped with their {int(small.sum())} cells (small_types='drop')"
        report["messages"].append(msg)
        warnings.warn(msg, SmallTypesWarning, stacklevel=2)
    keep = ~(np.isin(new, drop_types) & has_type)
    report["dropped"] = {str(k): int(v) for k, v in dropped.items()}
    report["n_cells_dropped"] = int((~keep).sum())
    out = reference[keep].copy()
    orig = raw.to_numpy()[keep]
    labels = np.where(has_type[keep], new[keep], None)
    out.obs[f"{cell_type_key}_original"] = pd.Categorical(orig)
    out.obs[cell_type_key] = pd.Categorical(labels)
    final = pd.Series(new[usable & keep]).value_counts().sort_index()
    report["final_types"] = {str(k): int(v) for k, v in final.items()}
    if len(final) < 2:
        raise SmallTypesError(
            f"reference.obs['{cell_type_key}']: after small_types='{policy}' only "
            f"{len(final)} type(s) remain ({list(final.index)}); expected at least 2"
        )
    return out, report
