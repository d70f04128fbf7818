"""Figures of the cell-typing stage (PNG bytes): typed cells over the tissue, per-type spot proportion maps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import fig_to_png, plt

UNASSIGNED = "unassigned"


def _type_colours(types: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20" if len(types) <= 20 else "gist_ncar")
    n = max(len(types), 1)
    cols = {t: cmap(i % 20) if len(types) <= 20 else cmap(i / n) for i, t in enumerate(types)}
    cols[UNASSIGNED] = (0.75, 0.75, 0.75, 1.0)
    return cols


def cell_types_png(cells: pd.DataFrame, type_col: str = "cell_type", title: str = "Cell types",
                   max_legend: int = 40, point_size: float | None = None) -> bytes:
    """Scatter of cells at (x, y) coloured by ``type_col`` (image orientation: y down); unassigned in grey."""
    for c in ("x", "y", type_col):
        if c not in cells.columns:
            raise ValueError(f"cells: column '{c}' missing; expected x, y and '{type_col}'")
    lab = cells[type_col].astype(str)
    types = sorted(t for t in lab.unique() if t != UNASSIGNED)
    cols = _type_colours(types)
    fig, ax = plt.subplots(figsize=(8, 7))
    s = point_size or float(np.clip(4000 / max(len(cells), 1), 0.5, 30))
    for t in types + ([UNASSIGNED] if (lab == UNASSIGNED).any() else []):
        m = (lab == t).to_numpy()
        ax.scatter(cells["x"].to_numpy()[m], cells["y"].to_numpy()[m], s=s, color=cols[t], label=f"{t} ({m.sum()})",
                   linewidths=0)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_title(f"{title} ({len(cells)} cells)")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if len(types) <= max_legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=max(1, 20 / s) ** 0.5,
                  frameon=False)
    return fig_to_png(fig)


def spot_proportions_png(weights: pd.DataFrame, spot_xy: np.ndarray | pd.DataFrame, max_types: int = 12,
                         title: str = "Spot proportions") -> bytes:
    """Per-type maps of the spot proportions (``weights`` spots x types, rows summing to 1) at ``spot_xy``.

    Shows the ``max_types`` types with the largest total proportion, one panel each (colour = proportion 0..1).
    """
    xy = np.asarray(spot_xy.loc[weights.index].to_numpy() if isinstance(spot_xy, pd.DataFrame) else spot_xy,
                    dtype=float)
    if xy.shape != (len(weights), 2):
        raise ValueError(f"spot_xy: expected shape ({len(weights)}, 2) matching weights, found {xy.shape}")
    order = weights.sum(0).sort_values(ascending=False).index[:max_types]
    n = len(order)
    ncol = min(4, max(n, 1))
    nrow = int(np.ceil(n / ncol)) or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    s = float(np.clip(3000 / max(len(weights), 1), 2, 60))
    sc = None
    for ax, t in zip(axes.ravel(), order):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=weights[t].to_numpy(), s=s, cmap="viridis", vmin=0, vmax=1,
                        linewidths=0)
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
    return fig_to_png(fig)
