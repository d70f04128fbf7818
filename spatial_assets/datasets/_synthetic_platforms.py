"""Simulated Slide-seq beads and MERFISH-like imaging samples from real cells, with truth."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..platforms._imaging import PlatformInputError, _xy_um


def simulate_beads(
    cells: ad.AnnData,
    *,
    type_key: str = "cell_type",
    doublet_fraction: float = 0.35,
    max_pair_distance_um: float = 30.0,
    n_beads: int | None = None,
    second_fraction: tuple[float, float] = (1.0, 1.0),
    bead_diameter_um: float = 10.0,
    um_per_px: float | None = None,
    class_key: str | None = "cell_class",
    random_positions: bool = False,
    pair_by: str = "type",
    seed: int = 0,
) -> tuple[ad.AnnData, pd.DataFrame]:
    """A Slide-seq-like bead set whose beads are real cells, with the truth.

    A singlet bead holds one cell, a doublet bead two neighbouring cells of different types (the second one's
    counts binomially thinned by a factor drawn uniformly from ``second_fraction``; (1, 1) = the plain sum).
    About ``doublet_fraction`` of the beads are doublets: anchor cells pair with their nearest non-anchor cell of
    another type (or class) within ``max_pair_distance_um`` among their 24 nearest cells (each cell used once;
    conflicts resolved in random order, so the realised fraction is a bit lower and is recorded in
    ``uns['simulation']``). Beads sit at the cell (singlet) or at the pair's midpoint, in micrometres
    (``microns_per_pixel`` 1); beads are shuffled and those without counts dropped.

    Parameters
    ----------
    cells : anndata.AnnData
        Real cells x genes raw counts, ``obs`` with positions (``x_um``, ``y_um``, or ``x``, ``y`` in px times
        ``um_per_px``) and ``type_key``.
    type_key : str, default "cell_type"
        Column of ``cells.obs`` with the cell types.
    doublet_fraction : float, default 0.35
        Target fraction of doublet beads, ``0 <= f < 1``.
    max_pair_distance_um : float, default 30.0
        Largest distance between a doublet's two cells.
    n_beads : int, optional
        Keep a random subset of this many beads (default: all).
    second_fraction : tuple of float, default (1.0, 1.0)
        Range ``(lo, hi)``, ``0 < lo <= hi <= 1``, of the fraction of the second cell's counts kept.
    bead_diameter_um : float, default 10.0
        Bead diameter, written as ``spot_diameter_fullres``.
    um_per_px : float, optional
        Micrometres per pixel of ``obs`` ``x``, ``y`` (default 1).
    class_key : str or None, default "cell_class"
        Column of coarser classes recorded in the truth (types stand in when absent).
    random_positions : bool, default False
        For cells without positions (dissociated scRNA-seq): scatter them uniformly at the density of a tissue
        section (one cell per 15 x 15 um), so doublet partners are random cells of another type.
    pair_by : {"type", "class"}, default "type"
        Doublet partners must differ in type, or in class (``class_key``).
    seed : int, default 0
        Seed of the simulation (recorded).

    Returns
    -------
    slide : anndata.AnnData
        Beads x genes (float32 CSR), ``obsm['spatial']`` (um), Visium-style ``uns['spatial']`` scale factors and
        ``uns['simulation']``.
    truth : pandas.DataFrame
        Indexed by bead: ``n_cells``, ``type1``, ``type2`` ('' for singlets), ``class1``, ``class2``, ``cell1``,
        ``cell2``, ``second_fraction``.

    Raises
    ------
    PlatformInputError
        If ``type_key`` is not a column, ``doublet_fraction`` / ``second_fraction`` / ``pair_by`` are out of range,
        or positions are missing.
    """
    if type_key not in cells.obs:
        raise PlatformInputError(f"cells.obs: no cell-type column '{type_key}' (found {list(cells.obs.columns)})")
    if not 0 <= doublet_fraction < 1:
        raise PlatformInputError(f"doublet_fraction: expected 0 <= f < 1, found {doublet_fraction}")
    lo, hi = second_fraction
    if not 0 < lo <= hi <= 1:
        raise PlatformInputError(f"second_fraction: expected 0 < lo <= hi <= 1, found {second_fraction}")
    rng = np.random.default_rng(seed)
    if random_positions:
        side = 15.0 * np.sqrt(cells.n_obs)
        xy = rng.uniform(0, side, (cells.n_obs, 2))
    else:
        xy = _xy_um(cells, um_per_px)
    n = len(xy)
    types = cells.obs[type_key].astype(str).to_numpy()
    classes = cells.obs[class_key].astype(str).to_numpy() if class_key and class_key in cells.obs else types
    names = cells.obs_names.astype(str).to_numpy()
    # anchors and their partners (nearest cell of another type), conflicts resolved in random order
    n_anchor = int(round(n * doublet_fraction / (1 + doublet_fraction)))
    anchors = rng.permutation(n)[:n_anchor]
    is_anchor = np.zeros(n, bool)
    is_anchor[anchors] = True
    kq = min(24, n)
    dist, nb = cKDTree(xy).query(xy[anchors], k=kq)
    if pair_by not in ("type", "class"):
        raise PlatformInputError(f"pair_by: expected 'type' or 'class', found '{pair_by}'")
    key = classes if pair_by == "class" else types
    nbc = np.minimum(nb, n - 1)
    ok = (key[nbc] != key[anchors, None]) & (dist <= max_pair_distance_um) & ~is_anchor[nbc] & (nb < n)
    has = ok.any(1)
    partner = np.where(has, nb[np.arange(len(anchors)), ok.argmax(1)], -1)
    a_ok, p_ok = anchors[has], partner[has]
    _, first_use = np.unique(p_ok, return_index=True)  # anchors come in random order: first claim wins
    a_ok, p_ok = a_ok[np.sort(first_use)], p_ok[np.sort(first_use)]
    used = np.zeros(n, bool)
    used[a_ok] = True
    used[p_ok] = True
    singles = np.flatnonzero(~used)
    X = sp.csr_matrix(cells.X, dtype=np.float64)
    frac = rng.uniform(lo, hi, len(a_ok)) if hi > lo else np.full(len(a_ok), lo)
    second = X[p_ok]
    if hi < 1 or lo < 1:
        second = second.tocoo()
        second = sp.csr_matrix(
            (rng.binomial(second.data.astype(np.int64), frac[second.row]).astype(np.float64), (second.row, second.col)),
            shape=second.shape,
        )
    Xd = X[a_ok] + second
    Xs = X[singles]
    counts = sp.vstack([Xs, Xd]).tocsr()
    counts.eliminate_zeros()
    nb_ = len(singles) + len(a_ok)
    bead_xy = np.vstack([xy[singles], 0.5 * (xy[a_ok] + xy[p_ok])])
    truth = pd.DataFrame(
        {
            "n_cells": np.r_[np.ones(len(singles), int), np.full(len(a_ok), 2)],
            "type1": np.r_[types[singles], types[a_ok]],
            "type2": np.r_[np.full(len(singles), ""), types[p_ok]],
            "class1": np.r_[classes[singles], classes[a_ok]],
            "class2": np.r_[np.full(len(singles), ""), classes[p_ok]],
            "cell1": np.r_[names[singles], names[a_ok]],
            "cell2": np.r_[np.full(len(singles), ""), names[p_ok]],
            "second_fraction": np.r_[np.full(len(singles), np.nan), frac],
        }
    )
    order = rng.permutation(nb_)
    if n_beads is not None:
        order = order[: int(n_beads)]
    keep_rows = order[np.asarray(counts[order].sum(1)).ravel() > 0]
    bead_names = np.array([f"bead{i:05d}" for i in range(len(keep_rows))])
    truth = truth.iloc[keep_rows].set_index(pd.Index(bead_names, name="bead"))
    slide = ad.AnnData(
        X=counts[keep_rows].astype(np.float32),
        obs=pd.DataFrame(index=pd.Index(bead_names)),
        var=pd.DataFrame(index=cells.var_names.astype(str)),
    )
    slide.obsm["spatial"] = bead_xy[keep_rows]
    slide.uns["spatial"] = {
        "beads": {"scalefactors": {"spot_diameter_fullres": float(bead_diameter_um), "microns_per_pixel": 1.0}}
    }
    slide.uns["simulation"] = {
        "kind": "slide-seq beads from real cells",
        "seed": int(seed),
        "doublet_fraction_target": float(doublet_fraction),
        "doublet_fraction": float((truth["n_cells"] == 2).mean()) if len(truth) else 0.0,
        "max_pair_distance_um": float(max_pair_distance_um),
        "second_fraction": [float(lo), float(hi)],
        "source_cells": int(n),
        "random_positions": bool(random_positions),
        "pair_by": pair_by,
    }
    return slide, truth


# ------------------------------------------------------------------------------------------------ imaging (MERFISH)
def simulate_imaging_sample(
    cells: ad.AnnData,
    *,
    n_measured: int | None = None,
    measured_genes: Sequence[str] | None = None,
    um_per_px: float = 1.0,
    cell_diameter_um: float = 10.0,
    seed: int = 0,
) -> tuple[ad.AnnData, list[str]]:
    """An imaging-based (MERFISH-like) sample from real cells: every cell is a spot measured on a gene subset.

    Parameters
    ----------
    cells : anndata.AnnData
        Cells x genes raw counts with ``obs`` ``x``, ``y`` (pixels).
    n_measured : int, optional
        Size of a seeded random panel, ``1 <= n < n_genes``; used when ``measured_genes`` is None.
    measured_genes : sequence of str, optional
        The measured panel (takes precedence over ``n_measured``).
    um_per_px : float, default 1.0
        Micrometres per pixel of ``x``, ``y``.
    cell_diameter_um : float, default 10.0
        Cell diameter, written as ``spot_diameter_fullres`` (in pixels).
    seed : int, default 0
        Seed of the random panel (recorded).

    Returns
    -------
    slide : anndata.AnnData
        Cells x measured genes (CSR float32), obs names = cell ids, ``obsm['spatial']`` = (x, y) px, scale
        factors with ``microns_per_pixel``, ``uns['simulation']``.
    held_out : list of str
        The genes not measured (to be imputed).

    Raises
    ------
    PlatformInputError
        If neither a valid ``n_measured`` nor known ``measured_genes`` is given, or ``obs`` lacks ``x`` / ``y``.
    """
    genes = pd.Index(cells.var_names.astype(str))
    if measured_genes is None:
        if n_measured is None or not 1 <= int(n_measured) < len(genes):
            raise PlatformInputError(f"n_measured: expected 1 <= n < {len(genes)} (genes of cells), found {n_measured}")
        rng = np.random.default_rng(seed)
        measured = list(genes[np.sort(rng.permutation(len(genes))[: int(n_measured)])])
    else:
        measured = [str(g) for g in measured_genes]
        missing = [g for g in measured if g not in genes]
        if missing:
            raise PlatformInputError(f"measured_genes: {missing[:5]} are not genes of cells ({len(missing)} missing)")
    held = [g for g in genes if g not in set(measured)]
    if not {"x", "y"} <= set(cells.obs.columns):
        raise PlatformInputError(f"cells.obs: expected columns x, y (px), found {list(cells.obs.columns)}")
    X = sp.csr_matrix(cells[:, measured].X, dtype=np.float32)
    slide = ad.AnnData(
        X=X, obs=pd.DataFrame(index=pd.Index(cells.obs_names.astype(str))), var=pd.DataFrame(index=pd.Index(measured))
    )
    slide.obsm["spatial"] = cells.obs[["x", "y"]].to_numpy(dtype=float)
    slide.uns["spatial"] = {
        "imaging": {
            "scalefactors": {
                "spot_diameter_fullres": cell_diameter_um / um_per_px,
                "microns_per_pixel": float(um_per_px),
            }
        }
    }
    slide.uns["simulation"] = {
        "kind": "imaging sample from real cells",
        "seed": int(seed),
        "measured_genes": measured,
        "held_out_genes": held,
    }
    return slide, held
