"""QC figure of nuclei segmentation: H&E thumbnail with spots, segmentation overlay of a window, cells per spot."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._base import new_figure


def _thumb_stride(shape, max_px: int) -> int:
    return max(1, int(np.ceil(max(shape[0], shape[1]) / max_px)))


def segmentation_qc(
    image,
    labels,
    spots: pd.DataFrame,
    spot_diameter_px: float,
    cells: pd.DataFrame | None = None,
    max_px: int = 800,
    window_px: int = 400,
    title: str = "",
) -> Figure:
    """Quality-control figure of a nuclei segmentation, in three panels.

    (1) A thumbnail of the image with the spots coloured by the number of cells kept (QC-filtered spots as red
    crosses), (2) label outlines over the image in a ``window_px`` window centred on the spot with most nuclei,
    with spot circles and the kept cells, (3) histogram of nuclei per QC-passing spot (before the cap).
    ``image`` / ``labels`` may be numpy or array-likes (zarr): only strided thumbnails and one window are read.

    Parameters
    ----------
    image : array-like
        ``(H, W, C)`` RGB(A) image, full resolution.
    labels : array-like
        ``(H, W)`` integer nucleus label image.
    spots : pandas.DataFrame
        The spots table of :func:`spatial_assets.segmentation.assign_cells_to_spots` (columns ``x``, ``y``,
        ``qc_pass``, ``n_cells``, ``n_cells_raw``).
    spot_diameter_px : float
        Spot diameter in full-resolution pixels.
    cells : pandas.DataFrame, optional
        Kept cells (columns ``x``, ``y``), drawn in the window.
    max_px : int, default 800
        Longest side of the thumbnail in pixels.
    window_px : int, default 400
        Side of the zoomed window in pixels.
    title : str, default ""
        Figure title (none when empty).

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    from matplotlib.patches import Circle
    from skimage.segmentation import find_boundaries

    H, W = int(image.shape[0]), int(image.shape[1])
    s = _thumb_stride((H, W), max_px)
    thumb = np.asarray(image[::s, ::s, :3])
    fig, ax = new_figure(1, 3, figsize=(15, 5))
    ax[0].imshow(thumb, extent=(0, W, H, 0))
    ok = spots["qc_pass"].to_numpy(bool)
    sc = ax[0].scatter(spots["x"][ok], spots["y"][ok], c=spots["n_cells"][ok], s=8, cmap="viridis")
    ax[0].scatter(spots["x"][~ok], spots["y"][~ok], marker="x", c="red", s=8, label="QC-filtered spot")
    fig.colorbar(sc, ax=ax[0], fraction=0.046, label="cells kept per spot")
    if (~ok).any():
        ax[0].legend(loc="lower right", fontsize=7)
    ax[0].set_title(f"H&E ({H} x {W} px) and spots")

    # window around the spot with most cells
    j = int(np.argmax(spots["n_cells_raw"].to_numpy())) if len(spots) else 0
    cx = int(spots["x"].iloc[j]) if len(spots) else W // 2
    cy = int(spots["y"].iloc[j]) if len(spots) else H // 2
    half = window_px // 2
    x0, y0 = max(0, min(W - window_px, cx - half)), max(0, min(H - window_px, cy - half))
    x1, y1 = min(W, x0 + window_px), min(H, y0 + window_px)
    win = np.asarray(image[y0:y1, x0:x1, :3]).copy()
    lab = np.asarray(labels[y0:y1, x0:x1])
    win[find_boundaries(lab, mode="outer")] = (0, 255, 0)
    ax[1].imshow(win, extent=(x0, x1, y1, y0))
    for _, r in spots[
        (spots.x > x0 - spot_diameter_px)
        & (spots.x < x1 + spot_diameter_px)
        & (spots.y > y0 - spot_diameter_px)
        & (spots.y < y1 + spot_diameter_px)
    ].iterrows():
        ax[1].add_patch(Circle((r.x, r.y), spot_diameter_px / 2, fill=False, ec="yellow", lw=1))
    if cells is not None and len(cells):
        c = cells[(cells.x >= x0) & (cells.x < x1) & (cells.y >= y0) & (cells.y < y1)]
        ax[1].scatter(c.x, c.y, s=4, c="cyan")
    ax[1].set_xlim(x0, x1)
    ax[1].set_ylim(y1, y0)
    ax[1].set_title("nuclei outlines (green), spots (yellow), kept cells (cyan)")

    n = spots.loc[ok, "n_cells_raw"].to_numpy()
    if len(n):
        ax[2].hist(n, bins=np.arange(n.max() + 2) - 0.5, color="steelblue")
    ax[2].set_xlabel("nuclei per spot (before cap)")
    ax[2].set_ylabel("spots (QC-passing)")
    ax[2].set_title(f"{int(ok.sum())} spots kept, {int((~ok).sum())} filtered")
    if title:
        fig.suptitle(title)
    return fig
