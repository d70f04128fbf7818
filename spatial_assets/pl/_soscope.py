"""soScope figures: spot-level vs enhanced sub-spot maps of a few marker features (Matplotlib figures)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from matplotlib.figure import Figure

from ._base import new_figure


def _col(adata, gene) -> np.ndarray:
    j = int(np.flatnonzero(np.asarray(adata.var_names) == gene)[0])
    x = adata.X[:, j]
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=float).ravel()


def pick_markers(enhanced, n: int = 3) -> list[str]:
    """Features worth mapping: the most variable ones among the well expressed.

    Ranks the features whose mean is in the top half by coefficient of variation across sub-spots, so a map never
    shows a near-zero gene.

    Parameters
    ----------
    enhanced : anndata.AnnData
        Enhanced sub-spots x features.
    n : int, default 3
        Number of features.

    Returns
    -------
    list of str
        The names of the ``n`` features of largest coefficient of variation.
    """
    x = enhanced.X.toarray() if sp.issparse(enhanced.X) else np.asarray(enhanced.X)
    m = x.mean(0)
    expressed = m >= np.median(m) if len(m) else m > 0
    cv = np.where((m > 0) & expressed, x.std(0) / np.where(m > 0, m, 1), -1)
    return [str(g) for g in np.asarray(enhanced.var_names)[np.argsort(-cv)[:n]]]


def enhanced_maps(slide, enhanced, genes: list[str] | None = None, n_genes: int = 3) -> Figure:
    """Spot-level vs enhanced sub-spot maps of a few features.

    Rows = features; left: the spot values at the spot centres; right: the enhanced sub-spot values at the
    sub-spot centres. Image orientation (y down); colour scale 0..99th percentile of each map.

    Parameters
    ----------
    slide : anndata.AnnData
        The spot-level slide (``obsm['spatial']``).
    enhanced : anndata.AnnData
        The enhanced sub-spots (``obsm['spatial']``), same features.
    genes : list of str, optional
        Features to map (those absent from either AnnData are skipped); default :func:`pick_markers`.
    n_genes : int, default 3
        Number of features picked when ``genes`` is None.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.

    Raises
    ------
    ValueError
        If none of the features is in both AnnData objects.
    """
    genes = list(genes) if genes is not None else pick_markers(enhanced, n_genes)
    genes = [g for g in genes if g in set(slide.var_names) and g in set(enhanced.var_names)]
    if not genes:
        raise ValueError("genes: none of the requested features is in both the slide and the enhanced AnnData")
    sxy = np.asarray(slide.obsm["spatial"], float)[:, :2]
    exy = np.asarray(enhanced.obsm["spatial"], float)[:, :2]
    k = max(1, enhanced.n_obs // max(slide.n_obs, 1))
    span = max(np.ptp(sxy[:, 0]), np.ptp(sxy[:, 1]), 1.0)
    s_spot = max(2.0, 2.2e4 / max(slide.n_obs, 1) * (1 if span > 0 else 1))
    fig, axes = new_figure(len(genes), 2, figsize=(8, 3.6 * len(genes)), squeeze=False)
    for r, g in enumerate(genes):
        sv, ev = _col(slide, g), _col(enhanced, g)
        vmax = max(np.percentile(sv, 99), 1e-9)
        for c, (xy, v, vm, title, size) in enumerate(
            [
                (sxy, sv, vmax, f"{g}: spots", s_spot),
                (exy, ev, max(np.percentile(ev, 99), 1e-9), f"{g}: soScope sub-spots", s_spot / k),
            ]
        ):
            ax = axes[r, c]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=size, cmap="viridis", vmin=0, vmax=vm, linewidths=0)
            ax.set_title(title, fontsize=9)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    return fig


def loss_curves(info: dict) -> Figure:
    """Training curves of a soScope enhancement.

    Left: the spot-level VGAE loss; right: soScope's reconstruction, KL and image-regulariser terms (symlog
    scale), against the epoch.

    Parameters
    ----------
    info : dict
        ``EnhancementResult.info``: ``loss_history`` (a dict of lists with keys ``vgae_loss``, ``recon``, ``kl``,
        ``reg``; missing or empty ones are skipped) and optionally ``loss_history_every`` (epochs between records,
        default 1).

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    hist, every = info["loss_history"], info.get("loss_history_every", 1)
    fig, axes = new_figure(1, 2, figsize=(9, 3.2))
    if hist.get("vgae_loss"):
        axes[0].plot(np.arange(len(hist["vgae_loss"])) * every, hist["vgae_loss"])
    axes[0].set_title("spot-level VGAE loss", fontsize=9)
    for key in ("recon", "kl", "reg"):
        if hist.get(key):
            axes[1].plot(np.arange(len(hist[key])) * every, hist[key], label=key)
    axes[1].set_yscale("symlog")
    axes[1].legend(fontsize=8)
    axes[1].set_title("soScope losses", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
    return fig
