"""Figures of the cell-typing stage (Matplotlib figures): typed cells over the tissue, per-type spot proportion maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..constants import UNASSIGNED
from ._base import new_figure, type_palette


def cell_types(
    cells: pd.DataFrame,
    type_col: str = "cell_type",
    title: str = "Cell types",
    max_legend: int = 60,
    point_size: float | None = None,
    ax=None,
) -> Figure:
    """Scatter of cells at (x, y) coloured by ``type_col`` (image orientation: y down); unassigned in grey.

    Parameters
    ----------
    cells
        A table with columns ``x``, ``y`` (full-resolution pixels) and ``type_col``.
    type_col
        The column of types; colours from scanpy's palettes (distinct up to 102 types).
    title, max_legend, point_size
        Title; no legend above ``max_legend`` types; marker size (default: from the number of cells).
    ax
        Draw into this Matplotlib axes (e.g. in a notebook); a new figure otherwise.

    Returns
    -------
    The figure drawn into.
    """
    for c in ("x", "y", type_col):
        if c not in cells.columns:
            raise ValueError(f"cells: column '{c}' missing; expected x, y and '{type_col}'")
    lab = cells[type_col].astype(str)
    types = sorted(t for t in lab.unique() if t != UNASSIGNED)
    cols = type_palette(types)
    if ax is None:
        fig, ax = new_figure(figsize=(8, 7))
    fig = ax.figure
    s = point_size or float(np.clip(4000 / max(len(cells), 1), 0.5, 30))
    for t in types + ([UNASSIGNED] if (lab == UNASSIGNED).any() else []):
        m = (lab == t).to_numpy()
        ax.scatter(
            cells["x"].to_numpy()[m],
            cells["y"].to_numpy()[m],
            s=s,
            color=cols[t],
            label=f"{t} ({m.sum()})",
            linewidths=0,
        )
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_title(f"{title} ({len(cells)} cells)")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if len(types) <= max_legend:
        ax.legend(
            loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=max(1, 20 / s) ** 0.5, frameon=False
        )
    return fig


def spot_proportions(
    weights: pd.DataFrame, spot_xy: np.ndarray | pd.DataFrame, max_types: int = 12, title: str = "Spot proportions"
) -> Figure:
    """Per-type maps of the spot proportions (``weights`` spots x types, rows summing to 1) at ``spot_xy``.

    Shows the ``max_types`` types with the largest total proportion, one panel each (colour = proportion 0..1).
    """
    xy = np.asarray(
        spot_xy.loc[weights.index].to_numpy() if isinstance(spot_xy, pd.DataFrame) else spot_xy, dtype=float
    )
    if xy.shape != (len(weights), 2):
        raise ValueError(f"spot_xy: expected shape ({len(weights)}, 2) matching weights, found {xy.shape}")
    order = weights.sum(0).sort_values(ascending=False).index[:max_types]
    n = len(order)
    ncol = min(4, max(n, 1))
    nrow = int(np.ceil(n / ncol)) or 1
    fig, axes = new_figure(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    s = float(np.clip(3000 / max(len(weights), 1), 2, 60))
    sc = None
    for ax, t in zip(axes.ravel(), order):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=weights[t].to_numpy(), s=s, cmap="viridis", vmin=0, vmax=1, linewidths=0)
        ax.set_title(f"{t} (mean {weights[t].mean():.2f})", fontsize=8)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.6, label="proportion")
    fig.suptitle(f"{title} ({len(weights)} spots, top {n} types)")
    return fig


def slices_side_by_side(view: pd.DataFrame, title: str = "Slices by height (um)") -> Figure:
    """The typed cells of aligned slices (a :func:`spatial_assets.platforms.combined_view` table: x_um, y_um,
    z_um, slice, cell_type) side by side in micrometres, ordered by height."""
    width = float(view["x_um"].max() - view["x_um"].min()) * 1.1 + 1.0
    z = view.groupby("slice", observed=True)["z_um"].first().sort_values()
    order = {n: i for i, n in enumerate(z.index)}
    df = pd.DataFrame(
        {
            "x": view["x_um"].to_numpy() + view["slice"].map(order).to_numpy() * width,
            "y": view["y_um"].to_numpy(),
            "cell_type": view["cell_type"].astype(str).to_numpy(),
        }
    )
    return cell_types(df, title=title)
