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
    """Scatter of cells at (x, y) coloured by type (image orientation: y down); unassigned in grey.

    Parameters
    ----------
    cells : pandas.DataFrame
        A table with columns ``x``, ``y`` (full-resolution pixels) and ``type_col``.
    type_col : str, default "cell_type"
        The column of types; colours from :func:`type_palette` (distinct up to 102 types).
    title : str, default "Cell types"
        Axes title (the number of cells is appended).
    max_legend : int, default 60
        No legend when there are more types than this.
    point_size : float, optional
        Marker size; by default from the number of cells (``4000 / n`` clipped to 0.5..30).
    ax : matplotlib.axes.Axes, optional
        Draw into this axes (e.g. in a notebook); a new figure otherwise.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn into.

    Raises
    ------
    ValueError
        If ``cells`` lacks ``x``, ``y`` or ``type_col``.
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
    """Per-type maps of the spot proportions, one panel per type.

    Shows the ``max_types`` types with the largest total proportion (colour = proportion, 0..1), four panels a
    row, image orientation (y down).

    Parameters
    ----------
    weights : pandas.DataFrame
        Spots x types proportions (rows summing to 1), e.g. RCTD weights.
    spot_xy : numpy.ndarray or pandas.DataFrame
        Spot centres: an ``(n_spots, 2)`` array in the row order of ``weights``, or a DataFrame indexed by spot
        name (its two columns are read at ``weights.index``).
    max_types : int, default 12
        Number of types shown.
    title : str, default "Spot proportions"
        Figure title (numbers of spots and types are appended).

    Returns
    -------
    matplotlib.figure.Figure
        The figure.

    Raises
    ------
    ValueError
        If ``spot_xy`` does not have one (x, y) row per row of ``weights``.
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
    """The typed cells of aligned slices side by side in micrometres, ordered by height.

    Parameters
    ----------
    view : pandas.DataFrame
        A :func:`spatial_assets.platforms.combined_view` table with columns ``x_um``, ``y_um``, ``z_um``,
        ``slice`` and ``cell_type``.
    title : str, default "Slices by height (um)"
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        A :func:`cell_types` figure with the slices laid out left to right by increasing ``z_um``.
    """
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
