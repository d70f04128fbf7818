"""Figures of the decomposition (SpatialScope step 3): a Matplotlib Figure for materialization metadata. No dagster."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
from matplotlib.figure import Figure

from ._base import new_figure


def _adata(result) -> ad.AnnData:
    return result.adata if hasattr(result, "adata") else result


def decomposition_summary(result, gene: str | None = None) -> Figure:
    """Three panels summarising a decomposition.

    (1) Histogram of the per-spot relative reconstruction error (``obs['spot_rel_error']``), (2) histogram of the
    per-cell replicate spread (``obs['replicate_spread']``), (3) the cells at their positions coloured by one
    gene's decomposed expression (log1p). An empty result gives blank panels with its ``empty_reason``.

    Parameters
    ----------
    result : anndata.AnnData or object with an ``adata`` attribute
        The decomposition's cells x genes AnnData (or a result object holding it as ``.adata``).
    gene : str, optional
        Gene of the third panel; by default the observed gene (``var['in_slide']``) of largest log1p variance.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    a = _adata(result)
    fig, ax = new_figure(1, 3, figsize=(13, 3.8))
    if a.n_obs == 0:
        for x in ax:
            x.axis("off")
        ax[1].text(0.5, 0.5, str(a.uns.get("decomposition", {}).get("empty_reason", "no cells")), ha="center")
        return fig
    err = a.obs.groupby("spot", observed=True)["spot_rel_error"].first().to_numpy(float)
    ax[0].hist(err[np.isfinite(err)], bins=30, color="#4c72b0")
    ax[0].set(xlabel="relative error of spot sums", ylabel="spots", title=f"reconstruction ({len(err)} spots)")
    spread = a.obs["replicate_spread"].to_numpy(float)
    ax[1].hist(spread[np.isfinite(spread)], bins=30, color="#dd8452")
    ax[1].set(xlabel="replicate s.d. of log1p expression (mean over genes)", ylabel="cells", title="replicate spread")
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    if gene is None:
        obs_genes = a.var["in_slide"].to_numpy(bool) if "in_slide" in a.var else np.ones(a.n_vars, bool)
        v = np.where(obs_genes, np.nanvar(np.log1p(X), 0), -1)
        gene = str(a.var_names[int(np.argmax(v))])
    j = a.var_names.get_loc(gene)
    sc = ax[2].scatter(a.obs["x"], a.obs["y"], c=np.log1p(X[:, j]), s=6, cmap="viridis")
    ax[2].invert_yaxis()
    ax[2].set_aspect("equal")
    ax[2].set(title=f"decomposed {gene} (log1p)", xticks=[], yticks=[])
    fig.colorbar(sc, ax=ax[2], fraction=0.046)
    return fig


def truth_comparison(
    result, truth_scaled: np.ndarray, baseline: np.ndarray | None = None, genes: Sequence[str] | None = None
) -> Figure:
    """Decomposed vs true expression (log1p scatter with the Pearson r), with a baseline panel beside it.

    Parameters
    ----------
    result : anndata.AnnData or object with an ``adata`` attribute
        The decomposition's cells x genes AnnData.
    truth_scaled : numpy.ndarray
        True expression, cells x genes in the same rows, columns and scale as ``result``.
    baseline : numpy.ndarray, optional
        A baseline prediction of the same shape (e.g. the type-mean baseline), drawn in a second panel.
    genes : sequence of str, optional
        Restrict to these genes (default: all).

    Returns
    -------
    matplotlib.figure.Figure
        One panel per prediction (decomposed, then baseline).
    """
    a = _adata(result)
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    cols = slice(None) if genes is None else a.var_names.get_indexer(list(genes))
    preds = [("decomposed", X[:, cols])] + (
        [("type-mean baseline", np.asarray(baseline)[:, cols])] if baseline is not None else []
    )
    t = np.log1p(np.asarray(truth_scaled)[:, cols]).ravel()
    fig, ax = new_figure(1, len(preds), figsize=(4.2 * len(preds), 4), squeeze=False)
    lim = float(np.nanmax(t)) if t.size else 1.0
    for axis, (name, p) in zip(ax[0], preds):
        p = np.log1p(np.clip(p, 0, None)).ravel()
        ok = np.isfinite(p) & np.isfinite(t)
        r = np.corrcoef(p[ok], t[ok])[0, 1] if ok.sum() > 2 else np.nan
        axis.scatter(t[ok], p[ok], s=3, alpha=0.3)
        axis.plot([0, lim], [0, lim], "k--", lw=0.8)
        axis.set(xlabel="truth (log1p)", ylabel=f"{name} (log1p)", title=f"{name}: r = {r:.3f}")
    return fig


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def decomposed_maps(slide, decomposed, genes: Sequence[str] | None = None, n_genes: int = 3) -> Figure:
    """Where users look first: rows = marker genes (default: the most variable among the well expressed observed
    genes, :func:`spatial_assets.pl.pick_markers`); left: the spots' counts at the spot centres, right: the
    decomposed cells at their positions; last row: each cell's uncertainty (replicate spread) and the relative
    error of its spot's reconstruction. Image y axis down.

    Parameters
    ----------
    slide
        The spots (AnnData with ``obsm['spatial']``).
    decomposed
        Decomposed cells (AnnData, or a result with ``.adata``) with ``obs`` ``x``, ``y``, ``spot``,
        ``replicate_spread`` and ``spot_rel_error``.
    genes
        The genes to map; default: ``n_genes`` picked among genes both objects hold.
    n_genes
        How many genes to pick.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        When no gene is in both the slide and the decomposed cells, or there are no cells.
    """
    from ._soscope import pick_markers

    a = _adata(decomposed)
    if a.n_obs == 0:
        raise ValueError("decomposed: no cells to map")
    shared = [g for g in a.var_names if g in set(slide.var_names)]
    if genes is None:
        genes = pick_markers(a[:, shared], n_genes) if shared else []
    genes = [g for g in genes if g in set(shared)]
    if not genes:
        raise ValueError("genes: none of the requested genes is in both the slide and the decomposed cells")
    sxy = np.asarray(slide.obsm["spatial"], float)[:, :2]
    cx, cy = a.obs["x"].to_numpy(float), a.obs["y"].to_numpy(float)
    s_spot = max(4.0, 1.5e4 / max(slide.n_obs, 1))
    s_cell = max(1.0, 6e3 / max(a.n_obs, 1))
    fig, axes = new_figure(len(genes) + 1, 2, figsize=(8.5, 3.6 * (len(genes) + 1)), squeeze=False)
    S = _dense(slide[:, genes].X)
    C = _dense(a[:, genes].X)
    for r, g in enumerate(genes):
        for axis, (xy, v, size, what) in zip(
            axes[r], [(sxy, S[:, r], s_spot, "spots"), (np.c_[cx, cy], C[:, r], s_cell, "decomposed cells")]
        ):
            sc = axis.scatter(xy[:, 0], xy[:, 1], c=np.log1p(np.clip(v, 0, None)), s=size, cmap="viridis")
            axis.set_title(f"{g}: {what} (log1p)", fontsize=9)
            fig.colorbar(sc, ax=axis, fraction=0.046)
    spread = a.obs["replicate_spread"].to_numpy(float) if "replicate_spread" in a.obs else np.full(a.n_obs, np.nan)
    err = a.obs["spot_rel_error"].to_numpy(float) if "spot_rel_error" in a.obs else np.full(a.n_obs, np.nan)
    for axis, v, title, cmap in [
        (axes[-1][0], spread, "per-cell uncertainty (replicate s.d.)", "magma"),
        (axes[-1][1], err, "spot reconstruction error (rel.)", "cividis"),
    ]:
        sc = axis.scatter(cx, cy, c=v, s=s_cell, cmap=cmap)
        axis.set_title(title, fontsize=9)
        fig.colorbar(sc, ax=axis, fraction=0.046)
    for axis in np.ravel(axes):
        axis.invert_yaxis()
        axis.set_aspect("equal")
        axis.set(xticks=[], yticks=[])
    return fig
