"""Figures of the score model: real vs generated cells in a shared 2-D embedding (Matplotlib figures)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from matplotlib.figure import Figure

from ._base import new_figure, type_palette


def real_vs_generated(
    real: np.ndarray,
    real_types: np.ndarray,
    generated: np.ndarray,
    generated_types: np.ndarray,
    type_names: Sequence[str],
    *,
    method: Literal["pca", "umap"] = "pca",
    title: str = "",
    seed: int = 0,
) -> Figure:
    """Real and generated cells in one 2-D embedding, side by side, coloured by type.

    ``method="pca"``: the first two principal components of the real cells (scikit-learn), applied to both sets.
    ``method="umap"``: scanpy's UMAP on up to 30 PCs of the pooled cells (slower).

    Parameters
    ----------
    real : numpy.ndarray
        ``(n, G)`` real (e.g. held-out) cells, in the same feature space as ``generated`` (e.g. log1p).
    real_types : numpy.ndarray
        ``(n,)`` integer type index of each real cell into ``type_names``.
    generated : numpy.ndarray
        ``(m, G)`` generated cells.
    generated_types : numpy.ndarray
        ``(m,)`` integer type index of each generated cell.
    type_names : sequence of str
        Names of the types.
    method : {"pca", "umap"}, default "pca"
        Embedding.
    title : str, default ""
        Figure title (none when empty).
    seed : int, default 0
        Random state of the PCA / UMAP.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels (real | generated) sharing axes.

    Raises
    ------
    ValueError
        If the arrays are not 2-D with the same number of features, or ``method`` is unknown.
    """
    real, generated = np.asarray(real, float), np.asarray(generated, float)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"real and generated must be (n, G) with the same G, found {real.shape} and {generated.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(real)
        emb_r, emb_g = pca.transform(real), pca.transform(generated)
        axis = ("PC1", "PC2")
    elif method == "umap":
        import anndata as ad
        import scanpy as sc

        pooled = ad.AnnData(np.vstack([real, generated]).astype(np.float32))
        sc.pp.pca(pooled, n_comps=int(min(30, real.shape[1] - 1, len(pooled) - 1)), random_state=seed)
        sc.pp.neighbors(pooled, random_state=seed)
        sc.tl.umap(pooled, random_state=seed)
        emb = pooled.obsm["X_umap"]
        emb_r, emb_g = emb[: len(real)], emb[len(real) :]
        axis = ("UMAP1", "UMAP2")
    else:
        raise ValueError(f"method must be 'pca' or 'umap', found {method!r}")
    cols = type_palette([str(t) for t in type_names])
    fig, axes = new_figure(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    for ax, emb, types, name in (
        (axes[0], emb_r, real_types, "real (held-out)"),
        (axes[1], emb_g, generated_types, "generated"),
    ):
        types = np.asarray(types)
        for t in np.unique(types):
            m = types == t
            ax.scatter(emb[m, 0], emb[m, 1], s=4, alpha=0.6, color=cols[str(type_names[t])], label=str(type_names[t]))
        ax.set_title(f"{name}: {len(emb)} cells")
        ax.set_xlabel(axis[0])
        ax.set_ylabel(axis[1])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)
    if title:
        fig.suptitle(title)
    return fig
