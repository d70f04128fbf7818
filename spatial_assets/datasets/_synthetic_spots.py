"""Synthetic spots drawn from a reference pool (tests and benchmarks of cell typing)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..celltyping._potts import _starts


# ------------------------------------------------------------------------------------------------ simulation
def extend_genes(
    reference: ad.AnnData, cell_type_key: str, n_genes: int, seed: int = 0, type_sd: float = 0.7
) -> ad.AnnData:
    """Reference with simulated extra genes up to ``n_genes`` (a documented simulation, for scale tests).

    Each extra gene (named ``sim<i>_<source gene>``) copies a random real gene and multiplies its counts by a
    per-type factor ``exp(N(0, type_sd^2))`` (Poisson-resampled per cell), so it keeps real cell-to-cell
    variability and gets new type differences.

    Parameters
    ----------
    reference : anndata.AnnData
        Cells x genes raw counts.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    n_genes : int
        Number of genes of the result; at most the reference's count just keeps its first ``n_genes`` genes.
    seed : int, default 0
        Seed of the simulation.
    type_sd : float, default 0.7
        Standard deviation of the log per-type factors.

    Returns
    -------
    anndata.AnnData
        Cells x ``n_genes``: the real genes first, then the simulated ones (CSR float64), with the reference's
        ``obs``; with ``n_genes`` at most the reference's count, a copy of its first ``n_genes`` genes.
    """
    X = sp.csr_matrix(reference.X, dtype=np.float64)
    G = X.shape[1]
    if n_genes <= G:
        return reference[:, :n_genes].copy()
    rng = np.random.default_rng(seed)
    m = n_genes - G
    src = rng.integers(0, G, m)
    codes = pd.Categorical(reference.obs[cell_type_key].astype(str)).codes
    fac = np.exp(rng.normal(0, type_sd, (codes.max() + 1, m)))
    Xs = X[:, src].tocoo()
    lam = Xs.data * fac[codes[Xs.row], Xs.col]
    extra = sp.csr_matrix((rng.poisson(lam).astype(np.float64), (Xs.row, Xs.col)), shape=(X.shape[0], m))
    extra.eliminate_zeros()
    names = [f"sim{i}_{reference.var_names[s]}" for i, s in enumerate(src)]
    out = ad.AnnData(
        X=sp.hstack([X, extra]).tocsr(),
        obs=reference.obs.copy(),
        var=pd.DataFrame(index=list(reference.var_names.astype(str)) + names),
    )
    return out


def simulate_slide(
    pool: ad.AnnData,
    cell_type_key: str,
    n_spots: int,
    mean_cells: float = 5.0,
    max_cells: int = 20,
    n_domains: int | None = None,
    dominant: float = 0.75,
    platform_sd: float = 0.3,
    seed: int = 0,
    pitch: float = 100.0,
    diameter: float = 55.0,
) -> tuple[ad.AnnData, pd.DataFrame, pd.DataFrame, pd.Series]:
    """Visium-like slide whose spots sum real cells of a reference pool, with the truth.

    Spots on a hexagonal lattice (``pitch``, coordinates in um = px); each spot holds 1..``max_cells`` cells
    (Poisson ``mean_cells``) at uniform positions in its ``diameter`` disk. Types are spatially coherent: the
    plane is cut into Voronoi domains, each with a dominant type (probability ``dominant``) and a secondary one
    (the rest), so spots on domain borders hold spatially segregated types. A cell's expression is a random real
    cell of its type; spot counts ~ Poisson(sum of its cells' counts x f_g) with a gene-wise platform effect
    ``f_g = exp(N(0, platform_sd^2))``.

    Parameters
    ----------
    pool : anndata.AnnData
        Real cells x genes raw counts with their types in ``obs``.
    cell_type_key : str
        Column of ``pool.obs`` with the cell types.
    n_spots : int
        Number of spots.
    mean_cells : float, default 5.0
        Poisson mean of the number of cells per spot (at least 1).
    max_cells : int, default 20
        Cap on the cells per spot.
    n_domains : int, optional
        Number of Voronoi domains; default ``max(4, n_spots // 12)``.
    dominant : float, default 0.75
        Probability that a cell takes its domain's dominant type.
    platform_sd : float, default 0.3
        Standard deviation of the log platform effect per gene.
    seed : int, default 0
        Seed of the simulation.
    pitch : float, default 100.0
        Spot centre-to-centre distance (um = px).
    diameter : float, default 55.0
        Spot diameter (um = px).

    Returns
    -------
    slide : anndata.AnnData
        Spots x genes counts (CSR float32), ``obs`` ``array_row`` / ``array_col``, ``obsm['spatial']``.
    cells : pandas.DataFrame
        Indexed by ``<spot>_<k>``, columns ``x``, ``y``, ``spot``, ``true_type``.
    proportions : pandas.DataFrame
        Spots x types true cell fractions.
    platform_factor : pandas.Series
        The per-gene platform effect ``f``.
    """
    from ..geometry import hex_lattice

    rng = np.random.default_rng(seed)
    side = pitch * np.sqrt(n_spots * 1.2)
    xy, rc = hex_lattice(0, side, 0, side, pitch)
    xy, rc = xy[:n_spots], rc[:n_spots]
    B = len(xy)
    types = pool.obs[cell_type_key].astype(str).to_numpy()
    tnames = np.unique(types)
    K = len(tnames)
    codes = pd.Categorical(types, categories=tnames).codes
    nc = np.clip(rng.poisson(mean_cells, B), 1, max_cells)
    n = int(nc.sum())
    cs = np.repeat(np.arange(B), nc)
    r = diameter / 2 * np.sqrt(rng.random(n))
    th = 2 * np.pi * rng.random(n)
    cxy = xy[cs] + np.stack([r * np.cos(th), r * np.sin(th)], 1)
    nd = n_domains or max(4, B // 12)
    centres = rng.uniform(xy.min(0) - pitch, xy.max(0) + pitch, (nd, 2))
    dom = cKDTree(centres).query(cxy)[1]
    dom_main = rng.integers(0, K, nd)
    dom_second = (dom_main + rng.integers(1, K, nd)) % K
    ct = np.where(rng.random(n) < dominant, dom_main[dom], dom_second[dom])
    # a random real cell of each type
    flat = np.argsort(codes, kind="stable")
    size = np.bincount(codes, minlength=K)
    pick = flat[_starts(size)[ct] + (rng.random(n) * size[ct]).astype(np.int64)]
    X = sp.csr_matrix(pool.X, dtype=np.float64)[pick]
    G = X.shape[1]
    f = np.exp(rng.normal(0, platform_sd, G))
    assign = sp.csr_matrix((np.ones(n), (cs, np.arange(n))), shape=(B, n))
    lam = (assign @ X).toarray() * f[None, :]
    Yc = rng.poisson(lam).astype(np.float32)
    spot_names = np.array([f"s{i:05d}" for i in range(B)])
    slide = ad.AnnData(
        X=sp.csr_matrix(Yc),
        obs=pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]}, index=spot_names),
        var=pd.DataFrame(index=pool.var_names.astype(str)),
    )
    slide.obsm["spatial"] = xy.astype(float)
    cell_ids = [f"{spot_names[s]}_{k}" for s, k in zip(cs, np.arange(n) - np.repeat(_starts(nc), nc))]
    cells = pd.DataFrame(
        {"x": cxy[:, 0], "y": cxy[:, 1], "spot": spot_names[cs], "true_type": tnames[ct]},
        index=pd.Index(cell_ids, name="cell_id"),
    )
    comp = np.bincount(cs * K + ct, minlength=B * K).reshape(B, K) / nc[:, None]
    props = pd.DataFrame(comp, index=spot_names, columns=tnames)
    return slide, cells, props, pd.Series(f, index=pool.var_names.astype(str), name="platform_factor")
