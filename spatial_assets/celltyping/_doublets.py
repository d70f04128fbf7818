"""RCTD "doublet" mode (Cable et al. 2022) for high-resolution beads (Slide-seq): each bead is a singlet or a
doublet of two cell types, batched over all beads.

Per bead, as RCTD's ``process_bead_doublet`` (with ``constrain = FALSE``, as ``fitPixels`` calls it):

1. full-mode weights over all types (:func:`spatial_assets.celltyping.fit_spot_weights`); candidate types: weight >
   ``initial_weight_thresh`` (0.01), at least two (RCTD pads with the first types of its list; here with the next
   highest weights);
2. a score -- the negative log-likelihood after fitting non-negative weights -- for every candidate alone and for
   every pair of candidates. All (bead, candidate) and (bead, pair) fits of all beads are rows of one batched
   Newton / active-set solve (:func:`fit_subset_weights`), with rctd's Poisson-lognormal likelihood;
3. the best pair (first minimum in candidate order); each of its types is "confident" when every pair within
   ``confidence_threshold`` (10) of the best contains it (or, with type classes, a type of its class -- RCTD's
   ``class_df``); none confident -> "reject", one -> "doublet_uncertain", both -> "doublet_certain"; finally
   "singlet" when the confident type's singlet score is within ``doublet_threshold`` (25) of the best pair's.

No per-bead Python loops: per-bead reductions are segment reductions over sorted rows. No dagster import.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._rctd import (
    MIN_LAMBDA,
    CellTypingInputError,
    PoissonLognormal,
    WeightFit,
    fit_spot_weights,
    get_likelihood,
    projected_newton_step,
)

__all__ = ["SPOT_CLASSES", "DoubletResult", "fit_subset_weights", "classify_beads"]

SPOT_CLASSES = ("reject", "singlet", "doublet_certain", "doublet_uncertain")


@dataclass
class DoubletResult:
    """Output of :func:`classify_beads`.

    Attributes
    ----------
    beads : pandas.DataFrame
        One row per bead (index = bead names): ``spot_class`` (categorical, RCTD's levels :data:`SPOT_CLASSES`),
        ``first_type``, ``second_type``, ``first_class`` / ``second_class`` (True where only the type's class is
        certain, as RCTD), ``weight_first`` / ``weight_second`` (the best pair's weights, normalised),
        ``min_score`` (best pair's negative log-likelihood), ``singlet_score`` (RCTD's, of the confident type),
        ``best_singlet_score`` (best candidate alone), ``doublet_evidence`` (``best_singlet_score - min_score``:
        the log-likelihood gain of a second type), ``n_candidates``, ``confidence_first`` /
        ``confidence_second``, ``converged_full`` / ``converged_pair``.
    pair_scores : pandas.DataFrame
        Long table (``bead``, ``type1``, ``type2``, ``score``) of every pair fitted.
    info : dict
        Counts per class, thresholds, rows fitted, timings.
    """

    beads: pd.DataFrame
    pair_scores: pd.DataFrame
    info: dict = field(default_factory=dict)


def _dense(X) -> np.ndarray:
    return np.ascontiguousarray(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=np.float64)


def fit_subset_weights(
    counts,
    numi,
    profiles,
    types: np.ndarray,
    sigma: float | PoissonLognormal,
    *,
    rows: np.ndarray | None = None,
    max_iter: int = 25,
    min_change: float = 1e-3,
    chunk: int = 4096,
) -> WeightFit:
    """Non-negative weights of a few given types per fit (RCTD's ``decompose_sparse``, ``constrain = FALSE``).

    Maximises ``sum_g log P(y_g | nUMI x sum_j w_j profile_{g, types_j})`` by the same batched Newton steps as
    :func:`fit_spot_weights` (PSD Hessian, exact bound-constrained QP, Armijo search), but with per-fit (m x G)
    profile blocks, so memory is R x m x G per chunk, never R x K x K. Start: equal weights 1/m (RCTD's initial
    ``doublet_mat`` of 0.5).

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix
        Beads x genes counts.
    numi : numpy.ndarray
        ``(beads,)`` library sizes.
    profiles : numpy.ndarray
        ``(genes, K)`` platform-corrected profiles.
    types : numpy.ndarray
        ``(R, m)`` type indices per fit, -1 = unused slot (each fit needs at least one type).
    sigma : float or PoissonLognormal
        The lognormal standard deviation, or a likelihood object.
    rows : numpy.ndarray, optional
        ``(R,)`` bead of each fit; default fit r is bead r.
    max_iter : int, default 25
        Newton iterations (RCTD's score mode).
    min_change : float, default 1e-3
        Stopping threshold on the L2 change of a fit's weights.
    chunk : int, default 4096
        Fits per batch.

    Returns
    -------
    WeightFit
        ``(R, m)`` weights, negative log-likelihoods, iterations and convergence flags.

    Raises
    ------
    CellTypingInputError
        If shapes disagree, type or bead indices are out of range, or a fit has no type.
    """
    lik = sigma if isinstance(sigma, PoissonLognormal) else get_likelihood(float(sigma))
    Y = _dense(counts)
    P = np.asarray(profiles, dtype=np.float64)
    n_beads, G = Y.shape
    if P.ndim != 2 or P.shape[0] != G:
        raise CellTypingInputError(f"profiles: expected {G} genes (rows) as counts has, found shape {P.shape}")
    K = P.shape[1]
    T = np.asarray(types, dtype=np.int64)
    if T.ndim != 2:
        raise CellTypingInputError(f"types: expected a 2-D array (fits x slots), found shape {T.shape}")
    if T.size and (T.max() >= K or T.min() < -1):
        raise CellTypingInputError(f"types: expected indices in -1..{K - 1}, found {T.min()}..{T.max()}")
    R, m = T.shape
    rows = np.arange(R) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.shape != (R,):
        raise CellTypingInputError(f"rows: expected {R} bead indices (one per fit), found shape {rows.shape}")
    if R and (rows.min() < 0 or rows.max() >= n_beads):
        raise CellTypingInputError(f"rows: expected bead indices in 0..{n_beads - 1}")
    valid = T >= 0
    if R and not valid.any(1).all():
        raise CellTypingInputError("types: every fit needs at least one type (a row of -1 only was given)")
    nu = np.asarray(numi, dtype=np.float64).reshape(-1)
    if len(nu) != n_beads:
        raise CellTypingInputError(f"numi: expected {n_beads} values (one per bead), found {len(nu)}")
    PT = np.ascontiguousarray(P.T)
    W = np.zeros((R, m))
    nll = np.zeros(R)
    iters = np.zeros(R, dtype=np.int64)
    conv = np.zeros(R, dtype=bool)

    for start in range(0, R, chunk):
        sl = slice(start, min(start + chunk, R))
        Yc = Y[rows[sl]]
        nuc = nu[rows[sl]]
        thr = np.maximum(nuc * 1e-7, MIN_LAMBDA)
        vc = valid[sl]
        Pr = PT[np.maximum(T[sl], 0)] * vc[:, :, None]  # (c, m, G)
        Wc = vc / vc.sum(1, keepdims=True)

        def objective(idx, w):  # used within this chunk's iteration only (B023 is safe here)
            lam = np.maximum(nuc[idx, None] * np.einsum("rm,rmg->rg", w, Pr[idx]), thr[idx, None])  # noqa: B023
            return -lik.logpmf(Yc[idx], lam).sum(1)  # noqa: B023

        c = len(Yc)
        act = np.ones(c, dtype=bool)
        itc = np.zeros(c, dtype=np.int64)
        fc = objective(np.arange(c), Wc)
        for _ in range(max_iter):
            ia = np.flatnonzero(act)
            if len(ia) == 0:
                break
            wb, Pb, nub, alb = Wc[ia], Pr[ia], nuc[ia], vc[ia]
            lam_raw = nub[:, None] * np.einsum("rm,rmg->rg", wb, Pb)
            clamped = lam_raw < thr[ia, None]
            _, d1, d2 = lik.derivatives(Yc[ia], np.maximum(lam_raw, thr[ia, None]))
            d1[clamped] = 0.0
            d2[clamped] = 0.0
            grad = -nub[:, None] * np.einsum("rg,rmg->rm", d1, Pb)
            H = -(nub**2)[:, None, None] * np.einsum("rg,rmg,rlg->rml", d2, Pb, Pb)
            wnew, fc[ia], accepted, change = projected_newton_step(
                H, grad, wb, alb, fc[ia], lambda todo, wt, ia=ia: objective(ia[todo], wt)
            )
            Wc[ia] = wnew
            itc[ia] += 1
            act[ia[(change < min_change) | ~accepted]] = False
        W[sl] = Wc
        nll[sl] = fc
        iters[sl] = itc
        conv[sl] = ~act
    return WeightFit(W, nll, iters, conv)


def _segment_first_min(values: np.ndarray, seg: np.ndarray, n_seg: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by segment: (minimum, index of its first occurrence) per segment (every segment non-empty)."""
    starts = np.searchsorted(seg, np.arange(n_seg))
    mins = np.minimum.reduceat(values, starts)
    hit = np.flatnonzero(values <= mins[seg])
    _, first = np.unique(seg[hit], return_index=True)
    return mins, hit[first]


def classify_beads(
    counts,
    numi,
    profiles,
    sigma: float | PoissonLognormal,
    type_names: Sequence[str],
    *,
    weights: np.ndarray | None = None,
    converged: np.ndarray | None = None,
    type_class: Mapping[str, str] | Sequence[str] | None = None,
    confidence_threshold: float = 10.0,
    doublet_threshold: float = 25.0,
    initial_weight_thresh: float = 0.01,
    max_candidates: int | None = None,
    bead_names: Sequence[str] | None = None,
    chunk: int = 4096,
) -> DoubletResult:
    """RCTD doublet mode on every bead at once: spot class, first and second type, scores.

    As RCTD's ``process_bead_doublet`` (``constrain = FALSE``), batched: candidates from the full-mode weights
    (weight > ``initial_weight_thresh``, at least two), every candidate alone and every candidate pair fitted in one
    batched solve (:func:`fit_subset_weights`), then RCTD's confidence rule (a type is confident when every pair
    within ``confidence_threshold`` of the best contains it, or a type of its class) and singlet rule.
    Confidence (an addition to RCTD's flags): with pair scores s, the probability that a type is in the bead, sum
    over pairs containing it of ``exp(-(s - min s))`` / sum over all pairs; for singlets, the softmax of minus the
    candidates' singlet scores.

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix
        Beads x genes integer counts on the regression genes.
    numi : numpy.ndarray
        ``(beads,)`` library sizes (all genes).
    profiles : numpy.ndarray
        ``(genes, K)`` platform-corrected profiles.
    sigma : float or PoissonLognormal
        The fitted lognormal standard deviation, or a likelihood object.
    type_names : sequence of str
        The K types (at least 2).
    weights : numpy.ndarray, optional
        ``(beads, K)`` full-mode raw weights if already fitted (else fitted here).
    converged : numpy.ndarray, optional
        ``(beads,)`` their convergence flags.
    type_class : mapping or sequence of str, optional
        Class of each type (type -> class, or a sequence aligned with ``type_names``; RCTD's ``class_df``);
        default: each type is its own class.
    confidence_threshold : float, default 10.0
        Score margin within which every pair must contain a type for it to be confident.
    doublet_threshold : float, default 25.0
        A bead is a singlet when its confident type's singlet score is within this of the best pair's.
    initial_weight_thresh : float, default 0.01
        Full-mode weight above which a type is a candidate (at least two candidates per bead).
    max_candidates : int, optional
        Keep at most this many candidates per bead (highest weights; None = all above the threshold, as RCTD).
    bead_names : sequence of str, optional
        Index of the result; default ``bead0``, ``bead1``, ...
    chunk : int, default 4096
        Fits per batch.

    Returns
    -------
    DoubletResult
        Per-bead calls, pair scores and info.

    Raises
    ------
    CellTypingInputError
        If shapes disagree with ``counts`` / ``type_names``, there are fewer than 2 types, or ``type_class``
        misses types.
    """
    t0 = time.perf_counter()
    lik = sigma if isinstance(sigma, PoissonLognormal) else get_likelihood(float(sigma))
    Y = _dense(counts)
    P = np.asarray(profiles, dtype=np.float64)
    B, G = Y.shape
    type_names = [str(t) for t in type_names]
    K = len(type_names)
    if P.shape != (G, K):
        raise CellTypingInputError(
            f"profiles: expected shape (genes={G}, types={K}) matching counts and type_names, found {P.shape}"
        )
    if K < 2:
        raise CellTypingInputError(f"type_names: doublet mode needs at least 2 cell types, found {K}")
    nu = np.asarray(numi, dtype=np.float64).reshape(-1)
    if len(nu) != B:
        raise CellTypingInputError(f"numi: expected {B} values (one per bead), found {len(nu)}")
    if bead_names is None:
        bead_names = [f"bead{i}" for i in range(B)]
    bead_names = pd.Index([str(b) for b in bead_names])
    if len(bead_names) != B:
        raise CellTypingInputError(f"bead_names: expected {B} names, found {len(bead_names)}")
    if type_class is None:
        cls = np.arange(K)
    else:
        if isinstance(type_class, Mapping):
            missing = [t for t in type_names if t not in type_class]
            if missing:
                raise CellTypingInputError(f"type_class: no class for type(s) {missing[:5]} ({len(missing)} missing)")
            labels = [str(type_class[t]) for t in type_names]
        else:
            labels = [str(c) for c in type_class]
            if len(labels) != K:
                raise CellTypingInputError(f"type_class: expected {K} classes (one per type), found {len(labels)}")
        cls = pd.factorize(pd.Index(labels))[0]
    info: dict = {
        "n_beads": int(B),
        "n_types": int(K),
        "confidence_threshold": float(confidence_threshold),
        "doublet_threshold": float(doublet_threshold),
        "initial_weight_thresh": float(initial_weight_thresh),
        "n_type_classes": int(cls.max() + 1),
        "sigma": float(lik.sigma),
    }
    if B == 0:
        empty = pd.DataFrame(columns=["spot_class", "first_type", "second_type"], index=bead_names)
        return DoubletResult(empty, pd.DataFrame(columns=["bead", "type1", "type2", "score"]), info)

    # 1. full mode and candidates
    if weights is None:
        wf = fit_spot_weights(Y, nu, P, lik)
        weights, converged = wf.weights, wf.converged
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (B, K):
        raise CellTypingInputError(f"weights: expected shape {(B, K)}, found {weights.shape}")
    converged = np.ones(B, bool) if converged is None else np.asarray(converged, bool)
    order = np.argsort(-weights, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(K)[None, :].repeat(B, 0), axis=1)
    cand = (weights > initial_weight_thresh) | (rank < 2)
    if max_candidates is not None:
        cand &= rank < max(2, int(max_candidates))
    ncand = cand.sum(1)
    cb, ct = np.nonzero(cand)  # row-major: by bead, then type order (RCTD's candidate order)
    cstart = np.concatenate([[0], np.cumsum(ncand)[:-1]])

    # 2. rows: every (bead, candidate) single and (bead, pair) pair, sorted by bead then (i, j)
    pb, pi, pj = [], [], []
    for c in np.unique(ncand):  # loop over distinct candidate counts (<= K), not beads
        bs = np.flatnonzero(ncand == c)
        ii, jj = np.triu_indices(int(c), 1)
        pb.append(np.repeat(bs, len(ii)))
        pi.append(np.tile(ii, len(bs)))
        pj.append(np.tile(jj, len(bs)))
    pb, pi, pj = (np.concatenate(v) for v in (pb, pi, pj))
    srt = np.lexsort((pj, pi, pb))
    pb, pi, pj = pb[srt], pi[srt], pj[srt]
    k1 = ct[cstart[pb] + pi]
    k2 = ct[cstart[pb] + pj]
    n_single, n_pair = len(cb), len(pb)
    types = np.concatenate([np.stack([ct, np.full(n_single, -1)], 1), np.stack([k1, k2], 1)])
    fit = fit_subset_weights(Y, nu, P, types, lik, rows=np.concatenate([cb, pb]), chunk=chunk)
    single_score = np.full((B, K), np.inf)
    single_score[cb, ct] = fit.nll[:n_single]
    pscore = fit.nll[n_single:]
    pw = fit.weights[n_single:]
    pconv = fit.converged[n_single:]

    # 3. best pair, confident types, classes
    min_score, best = _segment_first_min(pscore, pb, B)
    first, second = k1[best], k2[best]
    near = pscore < min_score[pb] + confidence_threshold
    bidx = np.arange(B)

    def presence(my: np.ndarray):
        """RCTD's check_pairs_type for type ``my`` of every bead: (all_pairs, all_pairs_class, singlet_score)."""
        myr = my[pb]
        contains = (k1 == myr) | (k2 == myr)
        all_pairs = np.bincount(pb[near & ~contains], minlength=B) == 0
        same1, same2 = cls[k1] == cls[myr], cls[k2] == cls[myr]
        all_class = np.bincount(pb[near & ~same1 & ~same2], minlength=B) == 0
        other = np.zeros((B, K), dtype=bool)
        other[bidx, my] = True
        other[pb[near & same1], k1[near & same1]] = True
        other[pb[near & same2], k2[near & same2]] = True
        ss = single_score[bidx, my]
        use = all_class & ~all_pairs & (other.sum(1) > 1)
        ss = np.where(use, np.where(other, single_score, np.inf).min(1), ss)
        return all_pairs, all_class, ss

    ap1, apc1, ss1 = presence(first)
    ap2, apc2, ss2 = presence(second)
    spot_class = np.full(B, "doublet_certain", dtype=object)
    singlet_score = np.minimum(ss1, ss2)
    first_class = ~ap1
    second_class = ~ap2
    swap = ss2 < ss1
    reject = ~apc1 & ~apc2
    unc1 = apc1 & ~apc2
    unc2 = ~apc1 & apc2
    swap = np.where(unc1, False, np.where(unc2, True, np.where(reject, False, swap)))
    spot_class[reject] = "reject"
    spot_class[unc1 | unc2] = "doublet_uncertain"
    singlet_score = np.where(reject, min_score + 2 * doublet_threshold, singlet_score)
    singlet_score = np.where(unc1, ss1, np.where(unc2, ss2, singlet_score))
    fc_new = np.where(swap, ~ap2, ~ap1)
    sc_new = np.where(swap, ~ap1, ~ap2)
    first_class = np.where(unc1 | unc2 | ~reject, fc_new, False)
    second_class = np.where(~reject & ~(unc1 | unc2), sc_new, False)
    f_type = np.where(swap, second, first)
    s_type = np.where(swap, first, second)
    w_best = pw[best]
    wsum = w_best.sum(1)
    w_norm = w_best / np.where(wsum > 0, wsum, 1)[:, None]
    w_first = np.where(swap, w_norm[:, 1], w_norm[:, 0])
    spot_class[(singlet_score - min_score) < doublet_threshold] = "singlet"

    # confidences: marginal probability of a type over the pair scores / softmax of singlet scores
    pp = np.exp(-(pscore - min_score[pb]))
    ztot = np.bincount(pb, weights=pp, minlength=B)
    conf1 = np.bincount(pb, weights=pp * ((k1 == f_type[pb]) | (k2 == f_type[pb])), minlength=B) / ztot
    conf2 = np.bincount(pb, weights=pp * ((k1 == s_type[pb]) | (k2 == s_type[pb])), minlength=B) / ztot
    smin = single_score.min(1)
    sp_ = np.exp(-(single_score - smin[:, None]))  # inf -> 0
    conf_single = sp_[bidx, f_type] / sp_.sum(1)
    is_single = spot_class == "singlet"
    conf1 = np.where(is_single, conf_single, conf1)
    conf2 = np.where(is_single, np.nan, conf2)

    tn = np.asarray(type_names, dtype=object)
    beads = pd.DataFrame(
        {
            "spot_class": pd.Categorical(spot_class, categories=list(SPOT_CLASSES)),
            "first_type": tn[f_type],
            "second_type": tn[s_type],
            "first_class": first_class.astype(bool),
            "second_class": second_class.astype(bool),
            "weight_first": w_first,
            "weight_second": 1.0 - w_first,
            "min_score": min_score,
            "singlet_score": singlet_score,
            "best_singlet_score": single_score.min(1),
            "doublet_evidence": single_score.min(1) - min_score,
            "n_candidates": ncand.astype(np.int64),
            "confidence_first": conf1,
            "confidence_second": conf2,
            "converged_full": converged,
            "converged_pair": pconv[best],
        },
        index=bead_names,
    )
    pair_scores = pd.DataFrame({"bead": bead_names[pb], "type1": tn[k1], "type2": tn[k2], "score": pscore})
    counts_ = beads["spot_class"].value_counts()
    info.update(
        {
            "classes": {k: int(counts_.get(k, 0)) for k in SPOT_CLASSES},
            "rows_fitted": {"singles": int(n_single), "pairs": int(n_pair)},
            "mean_candidates": float(ncand.mean()),
            "max_candidates": int(ncand.max()),
            "pair_fit_iterations_mean": float(fit.n_iter.mean()) if len(fit.n_iter) else 0.0,
            "not_converged_fits": int((~fit.converged).sum()),
            "seconds": time.perf_counter() - t0,
        }
    )
    return DoubletResult(beads, pair_scores, info)
