"""Per-cell labels with a Potts (MRF) spatial prior: SpatialScope's pair moves over colour classes of spots."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..progress import Progress
from ._rctd import (
    MIN_LAMBDA,
    choose_sigma,
    get_likelihood,
)


@dataclass
class PottsResult:
    """Output of :func:`potts_labels`.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(n,)`` final type index of each cell.
    initial : numpy.ndarray
        ``(n,)`` initial type index (the spot's top type).
    confidence : numpy.ndarray
        ``(n,)`` softmax of minus the energies of the cell's candidate labels, all other labels fixed (1 for cells
        of single-candidate spots).
    candidates : numpy.ndarray
        ``(B, K)`` boolean candidate types of each spot.
    sigma : float
        Final sigma of the likelihood.
    info : dict
        Sweeps, labels changed per sweep, sigma per sweep, colour classes, candidates, neighbours, seed, seconds.
    """

    labels: np.ndarray
    initial: np.ndarray
    confidence: np.ndarray
    candidates: np.ndarray
    sigma: float
    info: dict


# ------------------------------------------------------------------------------------------------ graphs
def knn_graph(xy: np.ndarray, k: int) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency joining each point to its ``k`` nearest others (KD-tree; linear memory).

    Parameters
    ----------
    xy : numpy.ndarray
        ``(n, d)`` coordinates (any dimension).
    k : int
        Nearest neighbours per point (capped at ``n - 1``).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n, n)`` float64 adjacency, symmetrised (an edge when either point is among the other's ``k``
        nearest), zero diagonal; empty for ``n < 2`` or ``k < 1``.
    """
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
    """Colour classes of spots such that no two spots of a class have neighbouring cells.

    Repeated random-priority maximal independent sets (Luby's algorithm) on the spot-contact graph, vectorised with
    sparse products; spots of one class can then be updated at once.

    Parameters
    ----------
    A : scipy.sparse.csr_matrix
        ``(n, n)`` cell adjacency (:func:`knn_graph`).
    cell_spot : numpy.ndarray
        ``(n,)`` spot index of each cell.
    n_spots : int
        Number of spots.
    seed : int, default 0
        Seed of the priorities.

    Returns
    -------
    numpy.ndarray
        ``(n_spots,)`` int64 colour of each spot (0..C-1).
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


def potts_labels(
    counts: np.ndarray,
    numi: np.ndarray,
    weights: np.ndarray,
    profiles: np.ndarray,
    cell_spot: np.ndarray,
    cell_xy: np.ndarray,
    sigma: float,
    *,
    nu: float = 10.0,
    n_neighbors: int = 10,
    max_sweeps: int = 8,
    max_cells_per_spot: int = 20,
    seed: int = 0,
    sigma_spots: np.ndarray | None = None,
    refit_sigma: bool = True,
    log=None,
) -> PottsResult:
    """Per-cell type labels within spots: SpatialScope's likelihood + Potts energy minimised by batched ICM.

    Each cell of a spot takes one of the spot's candidate types so as to minimise -log P(spot counts | sum of its
    cells' profiles x spot weight total x nUMI / n cells) + (nu / 2) x the fraction of the cell's k nearest cells
    (symmetrised, degree-normalised) with another label. Iterated conditional modes over random pairs of cells of a
    spot (pairs chosen jointly over candidate pairs), all spots of one colour class (:func:`colour_spots`) at once,
    up to ``max_sweeps`` sweeps, sigma refitted after each. Candidates of a spot: ``w_k > min(sum w / (2 m), sum w
    / 5)`` and its top type, ``m`` the largest number of cells in a spot capped at ``max_cells_per_spot``. Cells
    start at their spot's top type.

    Parameters
    ----------
    counts : numpy.ndarray
        ``(B, G)`` spot counts on the informative genes.
    numi : numpy.ndarray
        ``(B,)`` spot library sizes.
    weights : numpy.ndarray
        ``(B, K)`` raw RCTD weights.
    profiles : numpy.ndarray
        ``(G, K)`` platform-corrected type profiles.
    cell_spot : numpy.ndarray
        ``(n,)`` spot row of each cell.
    cell_xy : numpy.ndarray
        ``(n, 2)`` cell positions, or ``(n, 3)`` with z in the same unit for Potts neighbours in 3D.
    sigma : float
        Initial sigma of the Poisson-lognormal likelihood.
    nu : float, default 10.0
        Weight of the Potts term.
    n_neighbors : int, default 10
        Nearest cells of each cell in the Potts graph.
    max_sweeps : int, default 8
        Maximum ICM sweeps (stops early when nothing changes).
    max_cells_per_spot : int, default 20
        Cap of ``m`` in the candidate rule.
    seed : int, default 0
        Seed of the move order and colouring (recorded).
    sigma_spots : numpy.ndarray, optional
        Spots used to refit sigma after each sweep (default: all spots with cells).
    refit_sigma : bool, default True
        Refit sigma after each sweep.
    log : callable, optional
        Receives progress lines (ICM sweeps done / total, time left) at most every 10 s; None = silent.

    Returns
    -------
    PottsResult
        Labels, initial labels, confidences, candidates, final sigma and info.
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
        delta = sp.csr_matrix(
            (
                np.concatenate([np.ones(len(cc)), -np.ones(len(cc))]),
                (np.concatenate([np.arange(len(cc))] * 2), np.concatenate([nw, o])),
            ),
            shape=(len(cc), K),
        )
        cnt[:] += np.asarray((Aw[cc].T @ delta).todense())
        labels[cc] = nw
        return len(ch)

    sweeps = []
    sig_hist = [float(sigma)]
    cell_multi = multi[cell_spot]
    prog = Progress(max_sweeps, f"Potts ICM sweeps ({n} cells)", log)
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
        prog.update()
        if changed == 0 and not sig_changed:
            prog.close("converged: no label changed")
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
    info = {
        "sweeps": len(sweeps),
        "labels_changed_per_sweep": sweeps,
        "sigma_per_sweep": sig_hist,
        "n_colour_classes": n_colours,
        "n_spots_multi_candidate": int(multi.sum()),
        "mean_candidates_per_spot": float(ncand[ncell > 0].mean()) if (ncell > 0).any() else 0.0,
        "mean_neighbours_per_cell": float(deg.mean()) if n else 0.0,
        "seed": int(seed),
        "seconds": time.perf_counter() - t0,
    }
    return PottsResult(labels, initial, conf, cand, sig_hist[-1], info)


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Start offsets of consecutive groups of the given sizes."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
