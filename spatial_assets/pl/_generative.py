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
    """Two panels (real | generated) of cells in one embedding fit on both, coloured by type; a Matplotlib Figure.

    ``method="pca"``: the first two principal components of the real cells (sklearn). ``"umap"``: scanpy's UMAP
    on 30 PCs of the pooled cells (slower).
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
