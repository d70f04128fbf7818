"""Cell-type identification (SpatialScope step 2): RCTD full-mode spot weights, then per-cell labels by a Potts
model (iterated conditional modes), all spots batched.

Pipeline of :func:`identify_cell_types`:

1. reference per-type profiles (per-cell-normalised means; types need ``min_cells_per_type`` cells, at most
   ``max_cells_per_type`` are used, seeded subsample), RCTD's DE gene sets (bulk and regression);
2. platform effect from the pooled slide (:func:`spatial_assets.rctd.fit_platform_effect`), kept per gene as
   ``estimated_be``;
3. sigma of the Poisson-lognormal likelihood (RCTD's search), then non-negative weights for every spot;
4. per-cell labels: each cell of a spot takes one of the spot's candidate types so as to minimise
   -log P(spot counts | sum of its cells' profiles x spot weight total x nUMI / n cells)
   + (nu / 2) x sum over cells of the fraction of the cell's k nearest cells (symmetrised) with another label. Iterated conditional modes over random
   pairs of cells of a spot (pairs chosen jointly over candidate pairs, single cells over candidates), all spots
   of one colour class of the spot-contact graph at once, up to ``max_sweeps`` sweeps, sigma refitted after each;
5. confidence of a cell: softmax of minus the energies of its candidate labels with all other labels fixed.

Also :func:`simulate_slide`, a seeded simulator of spots from real reference cells with known compositions
(spatially coherent domains), used by the tests and benchmark. No dagster import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .params import CellTypingParams
from .rctd import (
    MIN_LAMBDA, CellTypingInputError, PlatformEffect, as_counts, choose_sigma, de_genes, fit_platform_effect,
    fit_sigma, fit_spot_weights, get_likelihood, maybe_expm1, reference_profiles,
)

__all__ = [
    "CellTypingInputError", "CellTypingResult", "PottsResult", "identify_cell_types", "potts_labels",
    "knn_graph", "colour_spots", "simulate_slide", "extend_genes", "UNASSIGNED",
]

UNASSIGNED = "unassigned"


@dataclass
class CellTypingResult:
    """Output of :func:`identify_cell_types`.

    ``cells``: indexed by cell id; x, y, spot, cell_type, confidence, initial_type (the spot's top type),
    n_candidates ('unassigned' / NaN for cells of skipped spots or outside every spot). ``weights``: fitted spots x
    types, RCTD weights normalised to proportions (rows sum to 1); ``weights_raw``: unnormalised. ``platform_effect``:
    Series 'estimated_be' over all genes shared by slide and reference. ``profiles``: reference per-type mean of
    per-cell-normalised expression, shared genes x types (before the platform effect). ``genes_used``: the
    regression genes of the likelihood. ``info``: counts, skipped spots with reasons, sigma fit, sweeps, seed,
    timings.
    """

    cells: pd.DataFrame
    weights: pd.DataFrame
    weights_raw: pd.DataFrame
    platform_effect: pd.Series
    profiles: pd.DataFrame
    genes_used: list
    sigma: float
    info: dict = field(default_factory=dict)
    beads: pd.DataFrame | None = None  # doublet mode: RCTD's per-bead calls (spatial_assets.doublets)


@dataclass
class PottsResult:
    """Output of :func:`potts_labels`: per-cell labels / initial labels (type indices), confidence, the spots'
    candidate masks, final sigma and an info dict (sweeps, changes per sweep, sigma per sweep, colours)."""

    labels: np.ndarray
    initial: np.ndarray
    confidence: np.ndarray
    candidates: np.ndarray
    sigma: float
    info: dict


# ------------------------------------------------------------------------------------------------ graphs
def knn_graph(xy: np.ndarray, k: int) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency (CSR) joining each point to its ``k`` nearest others (KD-tree; linear memory)."""
    xy = np.asarray(xy, dtype=float)
    n = len(xy)
    if n < 2 or k < 1:
        return sp.csr_matrix((n, n))
    kk = min(k + 1, n)
    _, idx = cKDTree(xy).query(xy, k=kk)
    src = np.repeat(np.arange(n), kk - 1)
    dst = idx[:, 1:].ravel()
    ok = dst < n
    A = sp.csr_matrix((np.ones(ok.sum()), (src[ok], dst[ok])), shape=(n, n))
    A = ((A + A.T) > 0).astype(np.float64).tocsr()
    A.setdiag(0)
    A.eliminate_zeros()
    return A


def colour_spots(A: sp.csr_matrix, cell_spot: np.ndarray, n_spots: int, seed: int = 0) -> np.ndarray:
    """Colour classes of spots such that no two spots of a class have neighbouring cells (graph ``A``).

    Repeated random-priority maximal independent sets (Luby), vectorised with sparse products.
    """
    coo = A.tocoo()
    a, b = cell_spot[coo.row], cell_spot[coo.col]
    keep = a != b
    S = sp.csr_matrix((np.ones(keep.sum()), (a[keep], b[keep])), shape=(n_spots, n_spots))
    S = ((S + S.T) > 0).astype(np.float64).tocsr()
    rng = np.random.default_rng(seed)
    colour = np.full(n_spots, -1, dtype=np.int64)
    c = 0
    row_has = np.diff(S.indptr) > 0
    starts = S.indptr[:-1][row_has]
    while (colour < 0).any():
        avail = colour < 0
        while avail.any():
            pr = rng.random(n_spots)
            pr[~avail] = -1.0
            nbmax = np.full(n_spots, -1.0)
            if S.nnz:
                nbmax[row_has] = np.maximum.reduceat(pr[S.indices], starts)
            sel = avail & (pr > nbmax)
            colour[sel] = c
            avail &= ~sel
            avail &= ~((S @ sel.astype(np.float64)) > 0)
        c += 1
    return colour


# ------------------------------------------------------------------------------------------------ Potts labelling
def _segment_argmin(E: np.ndarray, row_m: np.ndarray, n_moves: int, starts: np.ndarray) -> np.ndarray:
    """Index (into E) of the first minimum of each contiguous segment."""
    mins = np.minimum.reduceat(E, starts)
    hit = np.flatnonzero(E <= mins[row_m])
    _, first = np.unique(row_m[hit], return_index=True)
    return hit[first]


def potts_labels(counts: np.ndarray, numi: np.ndarray, weights: np.ndarray, profiles: np.ndarray,
                 cell_spot: np.ndarray, cell_xy: np.ndarray, sigma: float, *, nu: float = 10.0,
                 n_neighbors: int = 10, max_sweeps: int = 8, max_cells_per_spot: int = 20, seed: int = 0,
                 sigma_spots: np.ndarray | None = None, refit_sigma: bool = True) -> PottsResult:
    """Per-cell type labels within spots: SpatialScope's likelihood + Potts energy minimised by batched ICM.

    ``counts`` spots x genes (informative genes), ``numi`` spot library sizes, ``weights`` spots x types (raw RCTD
    weights), ``profiles`` genes x types (platform-corrected), ``cell_spot`` the spot row of each cell,
    ``cell_xy`` cell positions (n, 2), or (n, 3) with z in the same unit for Potts neighbours in 3D. Candidates of a spot: w_k > min(sum w / (2 m), sum w / 5) (and its top type), m
    the largest number of cells in a spot, capped at ``max_cells_per_spot``. ``sigma_spots``: spots used to refit sigma after each sweep (default: all spots with cells).
    """
    t0 = time.perf_counter()
    Y = np.ascontiguousarray(counts, dtype=np.float64)
    W = np.asarray(weights, dtype=np.float64)
    P = np.asarray(profiles, dtype=np.float64)
    PT = np.ascontiguousarray(P.T)
    B, K = W.shape
    n = len(cell_spot)
    cell_spot = np.asarray(cell_spot, dtype=np.int64)
    ncell = np.bincount(cell_spot, minlength=B)
    wsum = W.sum(1)
    scale = wsum * np.asarray(numi, float) / np.maximum(ncell, 1)
    max_cells = max(1, min(int(max_cells_per_spot), int(ncell.max()) if B else 1))  # SpatialScope: max n cells
    thr = np.minimum(wsum / (2 * max_cells), wsum / 5)
    cand = W > thr[:, None]
    top = W.argmax(1)
    cand[np.arange(B), top] = True
    ncand = cand.sum(1)
    candlist = np.argsort(~cand, axis=1, kind="stable")  # candidates first, in type order
    labels = top[cell_spot].copy()
    initial = labels.copy()
    comp = np.bincount(cell_spot * K + labels, minlength=B * K).reshape(B, K).astype(np.float64)

    A = knn_graph(cell_xy, n_neighbors)
    deg = np.asarray(A.sum(1)).ravel()
    inv_deg = np.where(deg > 0, 1.0 / np.maximum(deg, 1), 0.0)
    # Global Potts energy (nu / 2) sum_c (fraction of c's neighbours with another label): changing c's label
    # changes its own term and its neighbours' terms, so edge (c, j) weighs (1/deg_c + 1/deg_j) / 2 -- about
    # SpatialScope's nu x (fraction of c's neighbours with another label) for similar degrees, but an exact
    # potential, so ICM lowers the total energy monotonically.
    Aw = A.tocoo()
    Aw = sp.csr_matrix((0.5 * (inv_deg[Aw.row] + inv_deg[Aw.col]), (Aw.row, Aw.col)), shape=(n, n))
    wtot = np.asarray(Aw.sum(1)).ravel()
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, K))
    cnt = np.asarray((Aw @ onehot).todense())  # cnt[c, k] = sum of edge weights to neighbours labelled k
    colour = colour_spots(A, cell_spot, B, seed)
    n_colours = int(colour.max()) + 1 if B else 0
    multi = ncand > 1
    rng = np.random.default_rng(seed)
    if sigma_spots is None:
        sigma_spots = np.flatnonzero(ncell > 0)
    sigma_spots = np.asarray(sigma_spots)[ncell[np.asarray(sigma_spots, dtype=np.int64)] > 0]
    lik = get_likelihood(sigma)

    def energies(ms, c1, c2):
        """Rows (move, k1, k2) of candidate labels for moves at spots ms with cells c1 (and c2 >= 0: pairs)."""
        M = len(ms)
        nc = ncand[ms]
        is_pair = c2 >= 0
        nrow = np.where(is_pair, nc * nc, nc)
        starts = np.concatenate([[0], np.cumsum(nrow)[:-1]])
        row_m = np.repeat(np.arange(M), nrow)
        local = np.arange(nrow.sum()) - starts[row_m]
        pr = is_pair[row_m]
        ncr = nc[row_m]
        i = np.where(pr, local // ncr, local)
        j = np.where(pr, local % ncr, -1)
        srow = ms[row_m]
        k1 = candlist[srow, i]
        k2 = np.where(j >= 0, candlist[srow, np.maximum(j, 0)], -1)
        l1 = labels[c1]
        l2 = np.where(is_pair, labels[np.maximum(c2, 0)], -1)
        base = comp[ms].copy()
        base[np.arange(M), l1] -= 1
        pm = np.flatnonzero(is_pair)
        base[pm, l2[pm]] -= 1
        base_lam = base @ PT  # (M, G): profile sum of the spot's other cells
        # the likelihood depends on the unordered label pair only: evaluate rows with i <= j, reuse for j > i
        uniq = ~pr | (i <= j)
        rev = np.flatnonzero(~uniq)
        twin = np.arange(len(row_m))
        twin[rev] = rev - (i[rev] - j[rev]) * (ncr[rev] - 1)  # row of (j, i) within the same move
        ui = np.flatnonzero(uniq)
        nll = np.empty(len(row_m))
        nll[ui] = lik.mixture_rows_nll(Y, srow[ui], base_lam, row_m[ui], PT, k1[ui], k2[ui], scale, MIN_LAMBDA)
        nll[rev] = nll[twin[rev]]
        # Potts: weighted disagreements of the moved cells with their neighbours (pairs: the mutual edge once)
        cc1 = c1[row_m]
        pot = wtot[cc1] - cnt[cc1, k1]
        rp = np.flatnonzero(pr)
        if len(rp):
            w12 = np.zeros(M)
            w12[pm] = np.asarray(Aw[c1[pm], c2[pm]]).ravel()
            mr = row_m[rp]
            cc2 = c2[mr]
            k1r, k2r = k1[rp], k2[rp]
            e12 = w12[mr]
            # terms excluding the mutual edge, which cnt counted with the partner's current label
            p1 = wtot[cc1[rp]] - e12 - (cnt[cc1[rp], k1r] - e12 * (l2[mr] == k1r))
            p2 = wtot[cc2] - e12 - (cnt[cc2, k2r] - e12 * (l1[mr] == k2r))
            pot[rp] = p1 + p2 + e12 * (k1r != k2r)
        E = nll + nu * pot
        is_cur = (k1 == l1[row_m]) & ((j < 0) | (k2 == l2[row_m]))
        return E, row_m, starts, k1, k2, is_cur

    def apply(cells_, new):
        old = labels[cells_]
        ch = np.flatnonzero(new != old)
        if len(ch) == 0:
            return 0
        cc, o, nw = cells_[ch], old[ch], new[ch]
        s = cell_spot[cc]
        np.add.at(comp, (s, o), -1.0)
        np.add.at(comp, (s, nw), 1.0)
        delta = sp.csr_matrix((np.concatenate([np.ones(len(cc)), -np.ones(len(cc))]),
                               (np.concatenate([np.arange(len(cc))] * 2), np.concatenate([nw, o]))),
                              shape=(len(cc), K))
        cnt[:] += np.asarray((Aw[cc].T @ delta).todense())
        labels[cc] = nw
        return len(ch)

    sweeps = []
    sig_hist = [float(sigma)]
    cell_multi = multi[cell_spot]
    for sweep in range(max_sweeps):
        key = rng.random(n)
        order = np.lexsort((key, cell_spot))
        grp_start = np.concatenate([[0], np.cumsum(ncell)[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - grp_start[cell_spot[order]]
        changed = 0
        for col in rng.permutation(n_colours):
            in_col = cell_multi & (colour[cell_spot] == col)
            if not in_col.any():
                continue
            cells_col = np.flatnonzero(in_col)
            rmax = int(rank[cells_col].max())
            for r in range(0, rmax + 1, 2):
                c1 = cells_col[rank[cells_col] == r]
                if len(c1) == 0:
                    continue
                second = np.full(B, -1, dtype=np.int64)
                c2c = cells_col[rank[cells_col] == r + 1]
                second[cell_spot[c2c]] = c2c
                ms = cell_spot[c1]
                c2 = second[ms]
                E, row_m, starts, k1, k2, is_cur = energies(ms, c1, c2)
                best = _segment_argmin(E, row_m, len(ms), starts)
                Ecur = np.full(len(ms), np.inf)
                ic = np.flatnonzero(is_cur)
                Ecur[row_m[ic]] = E[ic]
                better = E[best] < Ecur - 1e-9 * np.maximum(1.0, np.abs(Ecur))
                mv = np.flatnonzero(better)
                if len(mv) == 0:
                    continue
                changed += apply(c1[mv], k1[best[mv]])
                pm = mv[c2[mv] >= 0]
                changed += apply(c2[pm], k2[best[pm]])
        new_sigma = sig_hist[-1]
        if refit_sigma and len(sigma_spots):
            pred = scale[sigma_spots, None] * (comp[sigma_spots] @ PT)
            new_sigma, _ = choose_sigma(Y[sigma_spots], pred, sig_hist[-1], seed=seed + 1000 + sweep)
            lik = get_likelihood(new_sigma)
        sweeps.append(int(changed))
        sig_changed = new_sigma != sig_hist[-1]
        sig_hist.append(float(new_sigma))
        if changed == 0 and not sig_changed:
            break

    # confidence: softmax over candidates of the single-cell conditional energies
    conf = np.ones(n)
    cm = np.flatnonzero(cell_multi)
    if len(cm):
        E, row_m, starts, k1, _k2, _ = energies(cell_spot[cm], cm, np.full(len(cm), -1, dtype=np.int64))
        mins = np.minimum.reduceat(E, starts)
        p = np.exp(-(E - mins[row_m]))
        z = np.add.reduceat(p, starts)
        mine = k1 == labels[cm][row_m]
        conf[cm] = np.bincount(row_m[mine], weights=(p / z[row_m])[mine], minlength=len(cm))
    info = {"sweeps": len(sweeps), "labels_changed_per_sweep": sweeps, "sigma_per_sweep": sig_hist,
            "n_colour_classes": n_colours, "n_spots_multi_candidate": int(multi.sum()),
            "mean_candidates_per_spot": float(ncand[ncell > 0].mean()) if (ncell > 0).any() else 0.0,
            "mean_neighbours_per_cell": float(deg.mean()) if n else 0.0, "seed": int(seed),
            "seconds": time.perf_counter() - t0}
    return PottsResult(labels, initial, conf, cand, sig_hist[-1], info)


# ------------------------------------------------------------------------------------------------ entry point
def _check_cells(cells: pd.DataFrame) -> None:
    from .readers import require_columns

    require_columns(cells, "cells", ("x", "y", "spot"), "x, y, spot", CellTypingInputError)
    if not cells.index.is_unique:
        raise CellTypingInputError("cells: the index (cell ids) must be unique")
    xy = cells[["x", "y"]].to_numpy(dtype=float)
    if not np.isfinite(xy).all():
        raise CellTypingInputError("cells: x and y must be finite numbers")
    if "z" in cells.columns and not np.isfinite(pd.to_numeric(cells["z"], errors="coerce").to_numpy(float)).all():
        raise CellTypingInputError("cells['z']: expected finite heights (same unit as x and y)")


def identify_cell_types(slide: ad.AnnData, reference: ad.AnnData, cell_type_key: str, cells: pd.DataFrame,
                        params: CellTypingParams | None = None, max_cells_per_spot: int = 20, *,
                        min_shared_genes: int = 10, min_obs: float = 3, min_sigma_fit_spots: int = 20,
                        refit_sigma: bool = True, mode: str = "full", class_key: str | None = None,
                        confidence_threshold: float = 10.0, doublet_threshold: float = 25.0,
                        doublet_offset: float | None = None) -> CellTypingResult:
    """Cell types of the segmented cells of ``slide`` from ``reference`` (SpatialScope step 2; RCTD full + Potts).

    ``slide``: spots x genes, raw counts in X; ``reference``: cells x genes, counts (log1p accepted) in X, types
    in ``obs[cell_type_key]``, optional boolean ``var['Marker']``; ``cells``: indexed by cell id, columns x, y,
    spot (slide obs name; '' or NaN = outside every spot). Extra knobs: ``min_shared_genes`` (fewest shared genes
    accepted), ``min_obs`` (RCTD's MIN_OBS: slide counts a gene needs), ``min_sigma_fit_spots`` (below this many
    spots with UMI > ``sigma_fit_min_umi``, sigma is fitted on the highest-UMI spots instead, and info says so),
    ``refit_sigma`` (refit sigma between Potts sweeps, as SpatialScope).

    3D: when ``cells`` has a ``z`` column (same unit as x and y, e.g. stacked slices in micrometres), the Potts
    neighbours are the nearest cells in (x, y, z).

    ``mode="doublet"`` (Slide-seq beads): RCTD's doublet mode instead of the Potts labels -- each spot (bead) is a
    singlet, a certain or uncertain doublet, or rejected (:func:`spatial_assets.doublets.classify_beads`, with
    ``confidence_threshold`` / ``doublet_threshold``, and type classes from ``reference.obs[class_key]`` if given);
    ``cells`` then only supplies bead heights (``z``); the output cells are one per singlet bead and two per
    doublet bead, ``doublet_offset`` apart (:func:`spatial_assets.platforms.cells_from_beads`), rejected beads have
    none; ``result.beads`` holds the calls.
    """
    if mode not in ("full", "doublet"):
        raise CellTypingInputError(f"mode: expected 'full' or 'doublet', found '{mode}'")
    params = params or CellTypingParams()
    timings = {}
    t = time.perf_counter()
    seed = int(params.seed)
    rng = np.random.default_rng(seed)
    info: dict = {"seed": seed, "params": params.model_dump(), "max_cells_per_spot": int(max_cells_per_spot),
                  "mode": mode}

    # ---- reference ------------------------------------------------------------------------------
    if not isinstance(reference, ad.AnnData) or not isinstance(slide, ad.AnnData):
        raise CellTypingInputError("slide and reference: expected AnnData objects")
    if cell_type_key not in reference.obs.columns:
        raise CellTypingInputError(f"reference.obs: no cell-type column '{cell_type_key}' "
                                   f"(found columns {list(reference.obs.columns)})")
    if class_key is not None and class_key not in reference.obs.columns:
        raise CellTypingInputError(f"reference.obs: no cell-class column '{class_key}' (class_key; found columns "
                                   f"{list(reference.obs.columns)})")
    _check_cells(cells)
    spot_names = pd.Index(slide.obs_names.astype(str))
    spot_col = cells["spot"]
    blank = spot_col.isna().to_numpy() | (spot_col.astype(str).str.len() == 0).to_numpy()
    sname = spot_col.astype(str).to_numpy()
    pos_slide = spot_names.get_indexer(sname)
    unknown = (~blank) & (pos_slide < 0)
    if unknown.any():
        ex = pd.unique(sname[unknown])[:3]
        raise CellTypingInputError(f"cells['spot']: {int(unknown.sum())} cells name spots not in slide.obs_names "
                                   f"(e.g. {list(ex)})")
    types_raw = reference.obs[cell_type_key]
    ok_type = types_raw.notna().to_numpy()
    ref_X, ref_log = maybe_expm1(reference.X, "reference.X")
    ref_lib = np.asarray(ref_X.sum(1)).ravel()
    ok = ok_type & (ref_lib > 0)
    info["reference"] = {"log1p_input": ref_log, "cells_without_type": int((~ok_type).sum()),
                         "cells_with_zero_counts": int((ok_type & (ref_lib <= 0)).sum())}
    tnames = types_raw[ok].astype(str).to_numpy()
    vc = pd.Series(tnames).value_counts()
    if len(vc) < 2:
        raise CellTypingInputError(f"reference.obs['{cell_type_key}']: expected at least 2 cell types, found "
                                   f"{len(vc)} ({list(vc.index)})")
    small = vc[vc < params.min_cells_per_type]
    if len(small):
        desc = ", ".join(f"'{k}' ({v})" for k, v in small.items())
        raise CellTypingInputError(f"reference.obs['{cell_type_key}']: {len(small)} cell type(s) have fewer than "
                                   f"min_cells_per_type={params.min_cells_per_type} cells: {desc}")
    type_names = sorted(vc.index)
    K = len(type_names)
    codes_all = pd.Categorical(tnames, categories=type_names).codes
    ref_rows = np.flatnonzero(ok)
    # seeded subsample of types above max_cells_per_type
    order = rng.permutation(len(ref_rows))
    rank_in_type = np.empty(len(ref_rows), dtype=np.int64)
    srt = order[np.argsort(codes_all[order], kind="stable")]
    cnts = np.bincount(codes_all, minlength=K)
    rank_in_type[srt] = np.arange(len(srt)) - np.repeat(np.concatenate([[0], np.cumsum(cnts)[:-1]]), cnts)
    keep = rank_in_type < params.max_cells_per_type
    ref_rows, codes = ref_rows[keep], codes_all[keep]
    info["reference"].update({"n_cells_used": int(len(ref_rows)), "n_types": K,
                              "cells_per_type": {k: int(v) for k, v in zip(type_names, np.bincount(codes, minlength=K))},
                              "subsampled_types": [type_names[k] for k in np.flatnonzero(cnts > params.max_cells_per_type)]})
    ref_sub = ref_X[ref_rows]
    ref_genes = pd.Index(reference.var_names.astype(str))
    prof_all = reference_profiles(ref_sub, codes, type_names)  # all reference genes

    # ---- genes ----------------------------------------------------------------------------------
    slide_genes = pd.Index(slide.var_names.astype(str))
    shared_mask = slide_genes.isin(ref_genes)
    shared = slide_genes[shared_mask]
    if len(shared) < min_shared_genes:
        raise CellTypingInputError(f"slide and reference share {len(shared)} genes (var_names); expected at least "
                                   f"{min_shared_genes}")
    S_X, slide_log = as_counts(slide.X, "slide.X")
    numi_all = np.asarray(S_X.sum(1)).ravel()
    S_sh = S_X[:, np.flatnonzero(shared_mask)].tocsc()
    profiles = pd.DataFrame(prof_all[ref_genes.get_indexer(shared)], index=shared, columns=type_names)
    marker = None
    if "Marker" in reference.var.columns:
        marker = reference.var["Marker"].reindex(shared).fillna(False).astype(bool).to_numpy()
    bulk_counts = np.asarray(S_sh.sum(0)).ravel()
    Pm = profiles.to_numpy()
    # RCTD's names: *_reg = regression set (0.0002, 0.75); gene_cutoff/fc_cutoff = bulk set (0.000125, 0.5)
    # (RCTD's create.RCTD names them the other way round; the values follow METHODS.md)
    bulk_mask = de_genes(Pm, shared, bulk_counts, params.fc_cutoff, params.gene_cutoff, min_obs, marker)
    reg_mask = de_genes(Pm, shared, bulk_counts, params.fc_cutoff_reg, params.gene_cutoff_reg, min_obs, marker)
    info["genes"] = {"n_slide": int(len(slide_genes)), "n_shared": int(len(shared)),
                     "marker_column_used": marker is not None, "n_bulk": int(bulk_mask.sum()),
                     "n_regression": int(reg_mask.sum()), "slide_log1p_input": slide_log}
    if bulk_mask.sum() < 2 or reg_mask.sum() < 2:
        raise CellTypingInputError(
            f"genes: only {int(reg_mask.sum())} regression and {int(bulk_mask.sum())} bulk informative genes among "
            f"the {len(shared)} shared ones (DE thresholds gene_cutoff_reg/fc_cutoff_reg, min_obs={min_obs}); expected >= 2")
    timings["reference_and_genes"] = time.perf_counter() - t

    # ---- platform effect --------------------------------------------------------------------------
    t = time.perf_counter()
    # SpatialScope's estimated_be: library sizes over the shared genes on both sides
    ref_lib_shared = np.asarray(ref_X[:, ref_genes.get_indexer(shared)][ok].sum(1)).ravel()
    pe: PlatformEffect = fit_platform_effect(S_sh, shared, profiles, shared[bulk_mask],
                                             reference_mean_umi=float(ref_lib_shared.mean()))
    info["platform_effect"] = {**pe.info, "bulk_proportions": {k: float(v) for k, v in pe.proportions.items()}}
    genes_used = shared[reg_mask]
    P_used = profiles.loc[genes_used].to_numpy() * pe.ratio.loc[genes_used].to_numpy()[:, None]
    timings["platform_effect"] = time.perf_counter() - t

    # ---- spots: skips, sigma, weights ---------------------------------------------------------------
    t = time.perf_counter()
    Y_all = S_sh[:, np.flatnonzero(reg_mask)].toarray()
    reg_tot = Y_all.sum(1)
    skipped = {}
    for i in np.flatnonzero(numi_all <= 0):
        skipped[spot_names[i]] = "zero counts"
    for i in np.flatnonzero((numi_all > 0) & (reg_tot <= 0)):
        skipped[spot_names[i]] = f"no counts on the {len(genes_used)} informative genes"
    fit_rows = np.flatnonzero((numi_all > 0) & (reg_tot > 0))
    if len(fit_rows) == 0:
        raise CellTypingInputError("slide.X: no spot has counts on the informative genes")
    Y = Y_all[fit_rows]
    numi = numi_all[fit_rows]
    hi = np.flatnonzero(numi > params.sigma_fit_min_umi)
    if len(hi) >= min_sigma_fit_spots:
        pool = hi
        note = f"{len(hi)} spots with UMI > {params.sigma_fit_min_umi:g}"
    else:
        pool = np.argsort(-numi, kind="stable")[: params.sigma_fit_spots]
        note = (f"only {len(hi)} spots with UMI > {params.sigma_fit_min_umi:g} (< {min_sigma_fit_spots}); "
                f"fell back to the {len(pool)} highest-UMI spots (UMI >= {numi[pool].min():g})")
    sig_rows = np.sort(rng.choice(pool, size=min(params.sigma_fit_spots, len(pool)), replace=False))
    sf = fit_sigma(Y, numi, P_used, sig_rows, seed=seed)
    info["sigma_fit"] = {"n_spots": int(len(sig_rows)), "note": note, "history": sf.history,
                         "fallback": len(hi) < min_sigma_fit_spots}
    timings["sigma_fit"] = time.perf_counter() - t
    t = time.perf_counter()
    wf = fit_spot_weights(Y, numi, P_used, sf.sigma)
    info["weights"] = {"n_spots_fitted": int(len(fit_rows)), "newton_iterations_mean": float(wf.n_iter.mean()),
                       "newton_iterations_max": int(wf.n_iter.max()), "not_converged": int((~wf.converged).sum())}
    timings["spot_weights"] = time.perf_counter() - t
    fitted_names = spot_names[fit_rows]
    weights_raw = pd.DataFrame(wf.weights, index=fitted_names, columns=type_names)
    tot = weights_raw.sum(1).to_numpy()
    weights = weights_raw.div(np.where(tot > 0, tot, 1.0), axis=0)

    if mode == "doublet":
        return _doublet_mode(slide, reference, cell_type_key, class_key, cells, ref_rows, codes, type_names, Y,
                             numi, P_used, sf.sigma, wf, fit_rows, fitted_names, weights, weights_raw, pe, profiles,
                             genes_used, skipped, info, timings, seed, confidence_threshold, doublet_threshold,
                             doublet_offset)

    # ---- cells ----------------------------------------------------------------------------------
    t = time.perf_counter()
    row_of_slide = np.full(len(spot_names), -1, dtype=np.int64)
    row_of_slide[fit_rows] = np.arange(len(fit_rows))
    cspot = np.where(blank, -1, row_of_slide[np.maximum(pos_slide, 0)])
    lab = cspot >= 0
    reasons = np.where(blank, "outside every spot", np.where(lab, "", "spot skipped"))
    ncell_spot = np.bincount(cspot[lab], minlength=len(fit_rows))
    no_cells = fitted_names[ncell_spot == 0]
    out = cells.copy()
    out["cell_type"] = UNASSIGNED
    out["initial_type"] = UNASSIGNED
    out["confidence"] = np.nan
    out["n_candidates"] = 0
    sigma_final = sf.sigma
    potts_info = {}
    if lab.any():
        xy = cells[["x", "y", "z"] if "z" in cells.columns else ["x", "y"]].to_numpy(dtype=float)[lab]
        sig_spots = np.intersect1d(sig_rows, np.flatnonzero(ncell_spot > 0))
        pr = potts_labels(Y, numi, wf.weights, P_used, cspot[lab], xy, sf.sigma, nu=params.nu,
                          n_neighbors=params.n_neighbors, max_sweeps=params.max_sweeps,
                          max_cells_per_spot=max_cells_per_spot, seed=seed, sigma_spots=sig_spots,
                          refit_sigma=refit_sigma)
        tn = np.asarray(type_names, dtype=object)
        idx = np.flatnonzero(lab)
        out.iloc[idx, out.columns.get_loc("cell_type")] = tn[pr.labels]
        out.iloc[idx, out.columns.get_loc("initial_type")] = tn[pr.initial]
        out.iloc[idx, out.columns.get_loc("confidence")] = pr.confidence
        out.iloc[idx, out.columns.get_loc("n_candidates")] = pr.candidates.sum(1)[cspot[lab]]
        sigma_final = pr.sigma
        potts_info = pr.info
    timings["cell_labels"] = time.perf_counter() - t
    info.update({
        "n_spots": int(len(spot_names)), "n_spots_fitted": int(len(fit_rows)), "skipped_spots": skipped,
        "n_spots_without_cells": int(len(no_cells)), "spots_without_cells": [str(s) for s in no_cells],
        "n_cells": int(len(cells)), "n_cells_labelled": int(lab.sum()),
        "cells_unassigned": {r: int((reasons == r).sum()) for r in ("outside every spot", "spot skipped")
                             if (reasons == r).any()},
        "sigma_rctd": float(sf.sigma), "sigma": float(sigma_final), "potts": potts_info, "timings_s": timings,
    })
    return CellTypingResult(cells=out, weights=weights, weights_raw=weights_raw,
                            platform_effect=pe.estimated_be, profiles=profiles, genes_used=list(genes_used),
                            sigma=float(sigma_final), info=info)


def _doublet_mode(slide, reference, cell_type_key, class_key, cells, ref_rows, codes, type_names, Y, numi, P_used,
                  sigma, wf, fit_rows, fitted_names, weights, weights_raw, pe, profiles, genes_used, skipped, info,
                  timings, seed, confidence_threshold, doublet_threshold, doublet_offset) -> CellTypingResult:
    """The end of :func:`identify_cell_types` in doublet mode: RCTD's bead calls, then 1 or 2 cells per bead."""
    from .doublets import classify_beads
    from .platforms import cells_from_beads

    t = time.perf_counter()
    tn = np.asarray(type_names, dtype=object)
    type_class = None
    if class_key is not None:  # RCTD's class_df: each type's most frequent class in the reference
        tab = pd.crosstab(tn[codes], reference.obs[class_key].astype(str).to_numpy()[ref_rows])
        type_class = {str(k): str(v) for k, v in tab.idxmax(axis=1).items()}
    dr = classify_beads(Y, numi, P_used, sigma, type_names, weights=wf.weights, converged=wf.converged,
                        type_class=type_class, confidence_threshold=confidence_threshold,
                        doublet_threshold=doublet_threshold, bead_names=fitted_names)
    # bead positions (and heights) in the cells' unit: the mean of the bead's input cells, else the slide's
    cols = ["x", "y", "z"] if "z" in cells.columns else ["x", "y"]
    has_spot = cells["spot"].notna() & (cells["spot"].astype(str).str.len() > 0)
    pos = cells.loc[has_spot, cols].astype(float).groupby(cells.loc[has_spot, "spot"].astype(str)).mean()
    pos = pos.reindex(pd.Index(fitted_names, dtype=str))
    if pos[["x", "y"]].isna().any().any():
        if "spatial" not in slide.obsm:
            raise CellTypingInputError("cells / slide.obsm['spatial']: no position for some beads")
        sxy = np.asarray(slide.obsm["spatial"], dtype=float)[fit_rows, :2]
        miss = pos["x"].isna().to_numpy()
        pos.loc[miss, ["x", "y"]] = sxy[miss]
    bead_z = None
    if "z" in cols:
        if pos["z"].isna().any():
            raise CellTypingInputError(f"cells['z']: {int(pos['z'].isna().sum())} beads have no cell with a height")
        bead_z = pos["z"].to_numpy()
    out, cinfo = cells_from_beads(dr.beads, pos[["x", "y"]].to_numpy(), offset=doublet_offset, seed=seed,
                                  bead_z=bead_z)
    init = pd.Series(tn[wf.weights.argmax(1)], index=pd.Index(fitted_names, dtype=str))
    out.insert(out.columns.get_loc("confidence") + 1, "initial_type", init.reindex(out["spot"]).to_numpy())
    timings["cell_labels"] = time.perf_counter() - t
    info.update({
        "n_spots": int(slide.n_obs), "n_spots_fitted": int(len(fit_rows)), "skipped_spots": skipped,
        "n_cells": int(len(out)), "n_cells_labelled": int(len(out)), "n_input_cells": int(len(cells)),
        "doublet_mode": dr.info, "bead_cells": cinfo, "type_classes": type_class,
        "sigma_rctd": float(sigma), "sigma": float(sigma), "timings_s": timings,
    })
    return CellTypingResult(cells=out, weights=weights, weights_raw=weights_raw, platform_effect=pe.estimated_be,
                            profiles=profiles, genes_used=list(genes_used), sigma=float(sigma), info=info,
                            beads=dr.beads)


# ------------------------------------------------------------------------------------------------ simulation
def extend_genes(reference: ad.AnnData, cell_type_key: str, n_genes: int, seed: int = 0,
                 type_sd: float = 0.7) -> ad.AnnData:
    """Reference with simulated extra genes up to ``n_genes`` (documented simulation, for scale tests).

    Each extra gene copies a random real gene and multiplies its counts by a per-type factor exp(N(0, type_sd^2))
    (Poisson-resampled per cell), so it keeps real cell-to-cell variability and gets new type differences.
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
    out = ad.AnnData(X=sp.hstack([X, extra]).tocsr(), obs=reference.obs.copy(),
                     var=pd.DataFrame(index=list(reference.var_names.astype(str)) + names))
    return out


def simulate_slide(pool: ad.AnnData, cell_type_key: str, n_spots: int, mean_cells: float = 5.0,
                   max_cells: int = 20, n_domains: int | None = None, dominant: float = 0.75,
                   platform_sd: float = 0.3, seed: int = 0, pitch: float = 100.0,
                   diameter: float = 55.0) -> tuple[ad.AnnData, pd.DataFrame, pd.DataFrame, pd.Series]:
    """Visium-like slide whose spots sum real cells of ``pool`` (cells x genes counts, types in obs).

    Spots on a hexagonal lattice (``pitch``, coordinates in um = px); each spot holds 1..``max_cells`` cells
    (Poisson ``mean_cells``) at uniform positions in its ``diameter`` disk. Types are spatially coherent: the
    plane is cut into Voronoi domains, each with a dominant type (probability ``dominant``) and a secondary one
    (the rest), so spots on domain borders hold spatially segregated types. A cell's expression is a random real
    cell of its type; spot counts ~ Poisson(sum of its cells' counts x f_g) with a gene-wise platform effect
    f_g = exp(N(0, platform_sd^2)). Returns (slide, cells, true proportions, f).
    """
    from .geometry import hex_lattice

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
    slide = ad.AnnData(X=sp.csr_matrix(Yc), obs=pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]},
                                                              index=spot_names),
                       var=pd.DataFrame(index=pool.var_names.astype(str)))
    slide.obsm["spatial"] = xy.astype(float)
    cell_ids = [f"{spot_names[s]}_{k}" for s, k in zip(cs, np.arange(n) - np.repeat(_starts(nc), nc))]
    cells = pd.DataFrame({"x": cxy[:, 0], "y": cxy[:, 1], "spot": spot_names[cs], "true_type": tnames[ct]},
                         index=pd.Index(cell_ids, name="cell_id"))
    comp = np.bincount(cs * K + ct, minlength=B * K).reshape(B, K) / nc[:, None]
    props = pd.DataFrame(comp, index=spot_names, columns=tnames)
    return slide, cells, props, pd.Series(f, index=pool.var_names.astype(str), name="platform_factor")


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Start offsets of consecutive groups of the given sizes."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
