"""Per-cell type labels from nucleus morphology, learnt across the slide jointly with the spots' compositions.

Inside a spot the counts say which types are present and in what proportion, not which cell is which; the
nucleus of each cell (size, shape, darkness) can. No reference holds nucleus images, so the per-type nucleus
model is learnt from the slide itself, with the spots' fitted compositions as the only supervision ("learning
from label proportions"):

* model: a cell c of spot s has type k with prior probability pi_sk, and nucleus features f_c ~ N(mu_k, S_k)
  given its type. pi_s mixes the spot's RCTD proportions with the composition of its Potts labels
  (``(1 - a) w_s + a c_s``, ``a = potts_mix``; the Potts labels already weigh the spot's counts, cell by cell,
  and the neighbours' labels), floored at ``prior_floor`` and renormalised;
* fit: EM over all cells of all spots at once -- E-step, posteriors r_ck ~ pi_sk N(f_c; mu_k, S_k) (one
  (cells x types) array); M-step, weighted means and covariances, each covariance shrunk towards the pooled one
  with ``shrinkage`` pseudo-cells (types with few cells stay well-posed);
* labels: the posterior mode of each cell, confidence = its posterior probability;
* gate: morphology is only used if the nuclei really depend on the spots' types. The in-sample gain of the
  fitted model, mean over cells of log sum_k pi_sk N(f_c; k) - log sum_k pibar_k N(f_c; k) (pibar: the mean
  prior, i.e. the same Gaussians without the spot's information), is compared with its permutation null: the
  same fit on features shuffled across cells (``n_permutations`` times, seeded). Shuffled fits overfit exactly
  as much as the real one, so the test keeps its power on small slides and many types (a held-out split, tried
  first, lost most of it: half the cells to fit 12 full-covariance Gaussians). z = (gain - null mean) / null sd
  must exceed ``min_z``, and the gain over the null's mean must reach ``min_gain`` nats per cell (an effect
  size: on a large slide a tiny but real dependence -- e.g. nucleus sizes capped by crowding, which varies with
  the spots' types -- becomes significant without being worth relabelling for; measured on the realistic
  slides: 0.01-0.05 nats with shuffled nuclei, 0.23-0.5 with nuclei that differ by type). Otherwise the cells
  keep their Potts labels.

Features: any numeric per-cell columns; strictly positive ones are log-transformed, all are standardised (median,
sd). :func:`measure_nucleus_features` measures a minimal set from a label image and the H&E (area, axis ratio,
eccentricity, hematoxylin mean and sd), block-wise with ``np.bincount`` (linear memory, no per-cell loop). It is
a stand-in until segmentation measures per-cell nucleus features itself (branch ``nuclei``), which should then
replace it.

Also the constrained variant suggested for this step (each spot's label counts forced to follow its weights):
:func:`sinkhorn_posteriors`, the entropic relaxation of that per-spot assignment (column sums n_s pi_s), batched
over spots. On the realistic slides it is less accurate than the free posterior (RCTD's compositions are off by
~0.08 per type, and forcing them moves correctly-looking cells), so it is reported in the benchmark, not used.

No dagster import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Columns written by :func:`measure_nucleus_features`, and used by default by cell typing.
NUCLEUS_FEATURES = ("nucleus_area", "nucleus_axis_ratio", "nucleus_h_mean")


class MorphologyInputError(ValueError):
    """Bad input to morphology-aware labelling; the message names the input and what was expected."""


# ------------------------------------------------------------------------------------------------ measurement
def measure_nucleus_features(labels, image, label_ids=None, block_rows: int | None = None) -> pd.DataFrame:
    """Per-nucleus features from a label image (0 = background) and the RGB H&E of the same shape.

    Columns (index = label): nucleus_area (px), nucleus_axis_ratio (minor / major axis of the ellipse with the
    same second moments), nucleus_eccentricity, nucleus_h_mean and nucleus_h_sd (hematoxylin optical density of
    the nucleus' pixels, :func:`spatial_assets.segmentation.hematoxylin`). Row bands of the images are read in
    turn and reduced by ``np.bincount`` (linear memory; numpy or zarr arrays). ``label_ids``: labels to report
    (default all present); absent ones get NaN. Minimal stand-in for segmentation's per-cell nucleus features.
    """
    from ..segmentation import hematoxylin

    H, W = int(labels.shape[0]), int(labels.shape[1])
    if tuple(image.shape[:2]) != (H, W):
        raise MorphologyInputError(f"image: shape {tuple(image.shape)}; expected the labels' (H, W) = ({H}, {W})")
    block_rows = block_rows or max(16, 2_000_000 // max(W, 1))
    m = 0
    for r0 in range(0, H, block_rows):
        m = max(m, int(np.asarray(labels[r0 : r0 + block_rows]).max(initial=0)))
    m += 1
    acc = np.zeros((8, m))  # n, sx, sy, sxx, syy, sxy, sh, shh
    xs = np.arange(W, dtype=np.float64)
    for r0 in range(0, H, block_rows):
        band = np.asarray(labels[r0 : r0 + block_rows])
        lab = band.ravel().astype(np.int64)
        fg = lab > 0
        lab = lab[fg]
        yy = np.repeat(np.arange(r0, r0 + band.shape[0], dtype=np.float64), W)[fg]
        xx = np.tile(xs, band.shape[0])[fg]
        h = hematoxylin(np.asarray(image[r0 : r0 + band.shape[0]])).astype(np.float64).ravel()[fg]
        for i, v in enumerate((None, xx, yy, xx * xx, yy * yy, xx * yy, h, h * h)):
            acc[i] += np.bincount(lab, weights=v, minlength=m)[:m]
    n = acc[0]
    ids = np.flatnonzero(n[1:] > 0) + 1 if label_ids is None else np.asarray(label_ids, dtype=np.int64)
    ok = (ids > 0) & (ids < m)
    ii = np.where(ok, ids, 0)
    nn = np.where(ok, n[ii], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = acc[1, ii] / nn, acc[2, ii] / nn
        cxx = acc[3, ii] / nn - mx**2 + 1 / 12  # + pixel's own extent
        cyy = acc[4, ii] / nn - my**2 + 1 / 12
        cxy = acc[5, ii] / nn - mx * my
        tr, det = cxx + cyy, cxx * cyy - cxy**2
        disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
        l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
        hm = acc[6, ii] / nn
        hs = np.sqrt(np.maximum(acc[7, ii] / nn - hm**2, 0))
        out = pd.DataFrame(
            {
                "nucleus_area": nn,
                "nucleus_axis_ratio": np.sqrt(l2 / l1),
                "nucleus_eccentricity": np.sqrt(1 - l2 / l1),
                "nucleus_h_mean": hm,
                "nucleus_h_sd": hs,
            },
            index=pd.Index(ids, name="label"),
        )
    out[nn <= 0] = np.nan
    return out


# ------------------------------------------------------------------------------------------------ model
def standardise_features(F: np.ndarray, names) -> tuple[np.ndarray, dict]:
    """Standardise nucleus features: log of strictly positive columns, then (x - median) / sd per column.

    Rows with a NaN stay NaN; the median and sd are computed over the rows finite in every column.

    Parameters
    ----------
    F : numpy.ndarray
        ``(n, d)`` raw features.
    names : sequence of str
        The ``d`` feature names (for messages and the transform record).

    Returns
    -------
    Z : numpy.ndarray
        ``(n, d)`` standardised features.
    transform : dict
        ``features``, ``log`` (per column), ``centre``, ``scale`` (plain lists, for the info).

    Raises
    ------
    MorphologyInputError
        If fewer than 10 cells have finite values for all features, or a feature is constant.
    """
    F = np.asarray(F, dtype=np.float64)
    ok = np.isfinite(F).all(1)
    if ok.sum() < 10:
        raise MorphologyInputError(
            f"nucleus features {list(names)}: only {int(ok.sum())} cells with finite values for all; expected >= 10"
        )
    G = F[ok]
    log = (G > 0).all(0)
    Z = F.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        Z[:, log] = np.log(F[:, log])
    centre = np.median(Z[ok], 0)
    scale = Z[ok].std(0)
    const = ~(scale > 1e-12)
    if const.any():
        raise MorphologyInputError(
            f"nucleus features: {[n for n, c in zip(names, const) if c]} are constant over "
            f"the cells; expected varying values"
        )
    Z = (Z - centre) / scale
    return Z, {
        "features": [str(n) for n in names],
        "log": log.tolist(),
        "centre": centre.tolist(),
        "scale": scale.tolist(),
    }


@dataclass
class MorphologyModel:
    """Per-type Gaussians of standardised nucleus features (fitted by :func:`fit_morphology_model`).

    Attributes
    ----------
    means : numpy.ndarray
        ``(K, d)`` mean per type.
    covs : numpy.ndarray
        ``(K, d, d)`` covariance per type (shrunk towards the pooled one).
    n_iter : int
        EM iterations run.
    loglik_per_cell : list of float
        Mean log-likelihood per cell after each iteration.
    """

    means: np.ndarray
    covs: np.ndarray
    n_iter: int
    loglik_per_cell: list

    def loglik(self, Z: np.ndarray, chunk: int = 20_000) -> np.ndarray:
        """Log density of every cell's features under every type's Gaussian.

        Parameters
        ----------
        Z : numpy.ndarray
            ``(n, d)`` standardised features.
        chunk : int, default 20000
            Cells per chunk (memory ``chunk x K x d``).

        Returns
        -------
        numpy.ndarray
            ``(n, K)`` ``log N(z_c; mu_k, S_k)``.
        """
        K, d = self.means.shape
        L = np.linalg.cholesky(self.covs)
        logdet = 2 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(1)
        Linv = np.linalg.inv(L)
        out = np.empty((len(Z), K))
        for s in range(0, len(Z), chunk):
            X = Z[None, s : s + chunk, :] - self.means[:, None, :]  # (K, c, d)
            q = np.matmul(X, Linv.transpose(0, 2, 1))  # whitened: L^-1 x per type
            out[s : s + chunk] = (-0.5 * (q**2).sum(2) - 0.5 * logdet[:, None] - 0.5 * d * np.log(2 * np.pi)).T
        return out


def _softmax_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row softmax and row log-sum-exp."""
    m = a.max(1, keepdims=True)
    e = np.exp(a - m)
    s = e.sum(1, keepdims=True)
    return e / s, (m + np.log(s))[:, 0]


def _m_step(Z: np.ndarray, R: np.ndarray, shrinkage: float, mu0: np.ndarray, S0: np.ndarray, chunk: int = 20_000):
    Nk = R.sum(0)
    means = (R.T @ Z + shrinkage * mu0) / (Nk + shrinkage)[:, None]
    K, d = means.shape
    S = np.zeros((K, d, d))
    for s in range(0, len(Z), chunk):  # weighted scatter per type, cells chunked (memory chunk x K x d)
        X = Z[None, s : s + chunk, :] - means[:, None, :]  # (K, c, d)
        S += np.matmul((X * R[s : s + chunk].T[:, :, None]).transpose(0, 2, 1), X)
    dm = mu0[None] - means
    S += shrinkage * (S0[None] + dm[:, :, None] * dm[:, None, :])
    covs = S / (Nk + shrinkage)[:, None, None] + 1e-6 * np.eye(Z.shape[1])
    return means, covs


def fit_morphology_model(
    Z: np.ndarray, log_prior: np.ndarray, *, n_iter: int = 100, tol: float = 1e-6, shrinkage: float = 10.0
) -> tuple[MorphologyModel, np.ndarray]:
    """EM for the per-type nucleus Gaussians given per-cell prior type probabilities.

    Starts from the prior as responsibilities; M-step: weighted means and covariances, each shrunk towards the
    pooled mean / covariance with ``shrinkage`` pseudo-cells; E-step: posteriors ``~ prior x N(z; mu_k, S_k)``.
    Stops when the mean log-likelihood per cell changes by less than ``tol``.

    Parameters
    ----------
    Z : numpy.ndarray
        ``(n, d)`` standardised features (finite).
    log_prior : numpy.ndarray
        ``(n, K)`` log prior type probabilities of each cell (e.g. from its spot's composition).
    n_iter : int, default 100
        Maximum EM iterations.
    tol : float, default 1e-6
        Convergence tolerance on the mean log-likelihood per cell.
    shrinkage : float, default 10.0
        Pseudo-cells pulling each type's mean and covariance to the pooled ones.

    Returns
    -------
    model : MorphologyModel
        The fitted Gaussians.
    posterior : numpy.ndarray
        ``(n, K)`` posterior type probabilities of the cells.
    """
    mu0 = Z.mean(0)
    S0 = np.cov(Z.T).reshape(Z.shape[1], Z.shape[1])
    R, _ = _softmax_rows(log_prior)
    hist: list = []
    it = 0
    for it in range(1, n_iter + 1):
        means, covs = _m_step(Z, R, shrinkage, mu0, S0)
        model = MorphologyModel(means, covs, it, hist)
        R, lse = _softmax_rows(log_prior + model.loglik(Z))
        hist.append(float(lse.mean()))
        if len(hist) > 1 and abs(hist[-1] - hist[-2]) < tol:
            break
    model.n_iter = it
    return model, R


def _fit_gain(Z: np.ndarray, log_prior: np.ndarray, **fit_kw) -> float:
    """Mean per-cell log-likelihood gain of the features from the spot priors, in sample: the model fitted by
    EM, then log sum_k pi_sk N(z; k) - log sum_k pibar_k N(z; k) (pibar = mean prior: same Gaussians, no spot
    information)."""
    model, _ = fit_morphology_model(Z, log_prior, **fit_kw)
    ll = model.loglik(Z)
    pib = np.exp(log_prior).mean(0)
    _, with_spot = _softmax_rows(log_prior + ll)
    _, without = _softmax_rows(np.log(pib / pib.sum())[None] + ll)
    return float((with_spot - without).mean())


def morphology_gain(
    Z: np.ndarray, log_prior: np.ndarray, *, n_permutations: int = 19, seed: int = 0, max_cells: int = 5_000, **fit_kw
) -> dict:
    """Evidence that nuclei depend on the spots' types: the in-sample gain against its permutation null.

    The gain is the mean per cell of ``log sum_k pi_sk N(z; k) - log sum_k pibar_k N(z; k)`` for the model fitted
    by EM (``pibar``: the mean prior, i.e. the same Gaussians without the spot's information). The null refits the
    model on features shuffled across cells (a slide whose nuclei say nothing about the type); shuffled fits
    overfit exactly as much as the real one, so the comparison is fair at any number of cells or types.

    Parameters
    ----------
    Z : numpy.ndarray
        ``(n, d)`` standardised features (finite).
    log_prior : numpy.ndarray
        ``(n, K)`` log prior type probabilities.
    n_permutations : int, default 19
        Shuffled refits of the null.
    seed : int, default 0
        Seed of the subsample and the permutations (recorded).
    max_cells : int, default 5000
        At most this many cells (seeded subsample; 5,000 cells already put nuclei that differ by type at z > 20).
    **fit_kw
        Passed on to :func:`fit_morphology_model` (``n_iter``, ``tol``, ``shrinkage``).

    Returns
    -------
    dict
        ``mean`` (observed gain, nats per cell), ``null_mean``, ``null_sd``, ``z`` = (observed - null mean) /
        null sd, ``p_value`` = (1 + #null >= observed) / (1 + n_permutations), ``n_cells``, ``n_permutations``,
        ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = len(Z)
    if n > max_cells:
        pick = np.sort(rng.choice(n, max_cells, replace=False))
        Z, log_prior = Z[pick], log_prior[pick]
    obs = _fit_gain(Z, log_prior, **fit_kw)
    null = np.array([_fit_gain(Z[rng.permutation(len(Z))], log_prior, **fit_kw) for _ in range(n_permutations)])
    sd = float(null.std(ddof=1)) if n_permutations > 1 else float("nan")
    z = (obs - float(null.mean())) / sd if sd > 0 else (float("inf") if obs > null.max() else 0.0)
    return {
        "mean": obs,
        "null_mean": float(null.mean()),
        "null_sd": sd,
        "z": float(z),
        "p_value": float((1 + (null >= obs).sum()) / (1 + n_permutations)),
        "n_cells": len(Z),
        "n_permutations": int(n_permutations),
        "seed": int(seed),
    }


def sinkhorn_posteriors(
    loglik: np.ndarray, log_prior: np.ndarray, cell_spot: np.ndarray, n_iter: int = 200
) -> np.ndarray:
    """Posteriors constrained to each spot's expected composition (batched Sinkhorn over all spots).

    ``q_ck ~ exp(loglik_ck) v_sk`` with row sums 1 and, per spot, column sums ``n_s pi_sk`` (``pi_s`` =
    ``exp(log_prior)`` of the spot's cells): the entropic relaxation of assigning each spot's cells to its type
    slots. Segment sums over spots; no per-spot loop.

    Parameters
    ----------
    loglik : numpy.ndarray
        ``(n, K)`` log-likelihood of each cell's features under each type.
    log_prior : numpy.ndarray
        ``(n, K)`` log prior of each cell (the same row for all cells of a spot).
    cell_spot : numpy.ndarray
        ``(n,)`` spot index of each cell (0..B-1).
    n_iter : int, default 200
        Sinkhorn iterations.

    Returns
    -------
    numpy.ndarray
        ``(n, K)`` constrained posteriors (rows sum to 1).
    """
    cs = np.asarray(cell_spot, dtype=np.int64)
    B = int(cs.max()) + 1 if len(cs) else 0
    K = loglik.shape[1]
    prior = np.exp(log_prior)
    n_s = np.bincount(cs, minlength=B).astype(float)
    target = np.zeros((B, K))
    np.add.at(target, cs, prior)  # n_s pi_s when all cells of a spot share its prior
    E = np.exp(loglik - loglik.max(1, keepdims=True))
    v = target / np.maximum(n_s, 1)[:, None]
    for _ in range(n_iter):
        q = E * v[cs]
        q /= np.maximum(q.sum(1, keepdims=True), 1e-300)
        col = np.zeros((B, K))
        np.add.at(col, cs, q)
        v = v * np.where(col > 0, target / np.maximum(col, 1e-300), 0.0)
    q = E * v[cs]
    return q / np.maximum(q.sum(1, keepdims=True), 1e-300)


# ------------------------------------------------------------------------------------------------ labelling
@dataclass
class MorphologyResult:
    """Output of :func:`morphology_labels`.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(n,)`` type index of each cell (the Potts labels when morphology was not used).
    confidence : numpy.ndarray
        ``(n,)`` posterior probability of the label (the Potts confidence when not used).
    used : bool
        Whether the morphology labels were used.
    posterior : numpy.ndarray or None
        ``(n, K)`` posteriors (NaN rows for cells without features); None when not used.
    model : MorphologyModel or None
        The fitted Gaussians; None when not used.
    info : dict
        Mode, features, transform, the gate (:func:`morphology_gain`), EM history, reason when not used, timing.
    """

    labels: np.ndarray
    confidence: np.ndarray
    used: bool
    posterior: np.ndarray | None
    model: MorphologyModel | None
    info: dict = field(default_factory=dict)


def morphology_labels(
    features: np.ndarray,
    feature_names,
    cell_spot: np.ndarray,
    weights: np.ndarray,
    potts_labels: np.ndarray,
    potts_confidence: np.ndarray,
    *,
    mode: str = "auto",
    potts_mix: float = 0.5,
    prior_floor: float = 1e-3,
    min_z: float = 3.0,
    shrinkage: float = 10.0,
    n_iter: int = 100,
    seed: int = 0,
    assignment: str = "posterior",
    n_permutations: int = 19,
    min_gain: float = 0.1,
) -> MorphologyResult:
    """Morphology-aware labels for the cells of the fitted spots (learning from label proportions).

    Per-type nucleus Gaussians are learnt by EM across the slide with each cell's prior
    ``(1 - potts_mix) x RCTD proportions + potts_mix x composition of the spot's Potts labels`` (floored at
    ``prior_floor``); a cell's label is its posterior mode and its confidence that posterior. A permutation gate
    (:func:`morphology_gain`) decides whether the nuclei tell the spot's types apart (see
    :mod:`spatial_assets.celltyping`); otherwise the Potts labels stay.

    Parameters
    ----------
    features : numpy.ndarray
        ``(n, d)`` raw nucleus features (NaN allowed: such cells keep their Potts label).
    feature_names : sequence of str
        The ``d`` feature names.
    cell_spot : numpy.ndarray
        ``(n,)`` row of each cell's spot in ``weights``.
    weights : numpy.ndarray
        ``(B, K)`` spot proportions (RCTD weights).
    potts_labels : numpy.ndarray
        ``(n,)`` current type index of each cell.
    potts_confidence : numpy.ndarray
        ``(n,)`` current confidence.
    mode : {"auto", "on", "off"}, default "auto"
        "auto": use morphology when the gate passes; "on": always; "off": never.
    potts_mix : float, default 0.5
        Weight ``a`` of the Potts composition in the prior, in [0, 1].
    prior_floor : float, default 1e-3
        Floor of the prior per type.
    min_z : float, default 3.0
        z-score of the gain against the null that "auto" requires.
    shrinkage : float, default 10.0
        Pseudo-cells pulling each type's Gaussian to the pooled one.
    n_iter : int, default 100
        Maximum EM iterations.
    seed : int, default 0
        Seed of the gate (recorded).
    assignment : {"posterior", "sinkhorn"}, default "posterior"
        Labels from the free posteriors, or from :func:`sinkhorn_posteriors` (each spot's label counts held to its
        prior composition).
    n_permutations : int, default 19
        Shuffled refits of the gate's null.
    min_gain : float, default 0.1
        Least gain over the null's mean (nats per cell) for "auto".

    Returns
    -------
    MorphologyResult
        Labels, confidences, whether morphology was used, posteriors, model and info.

    Raises
    ------
    MorphologyInputError
        If ``mode``, ``assignment`` or ``potts_mix`` is invalid, ``features`` has the wrong number of rows, or the
        features cannot be standardised (:func:`standardise_features`).
    """
    if mode not in ("auto", "on", "off"):
        raise MorphologyInputError(f"morphology mode: expected 'auto', 'on' or 'off', found '{mode}'")
    t0 = time.perf_counter()
    if assignment not in ("posterior", "sinkhorn"):
        raise MorphologyInputError(f"assignment: expected 'posterior' or 'sinkhorn', found '{assignment}'")
    if not 0 <= potts_mix <= 1:
        raise MorphologyInputError(f"potts_mix: expected a fraction in [0, 1], found {potts_mix}")
    cs = np.asarray(cell_spot, dtype=np.int64)
    W = np.asarray(weights, dtype=np.float64)
    B, K = W.shape
    F = np.asarray(features, dtype=np.float64)
    n = len(cs)
    if F.shape[0] != n:
        raise MorphologyInputError(f"features: expected {n} rows (one per cell), found {F.shape[0]}")
    labels = np.asarray(potts_labels).copy()
    conf = np.asarray(potts_confidence, dtype=float).copy()
    info: dict = {
        "mode": mode,
        "features": [str(x) for x in feature_names],
        "potts_mix": float(potts_mix),
        "assignment": assignment,
        "prior_floor": float(prior_floor),
        "min_z": float(min_z),
        "min_gain": float(min_gain),
        "shrinkage": float(shrinkage),
        "seed": int(seed),
    }
    if mode == "off":
        return MorphologyResult(labels, conf, False, None, None, {**info, "used": False, "reason": "mode off"})
    Z, transform = standardise_features(F, feature_names)
    info["transform"] = transform
    ok = np.isfinite(Z).all(1)
    info["n_cells"], info["n_cells_without_features"] = int(n), int((~ok).sum())
    comp = np.zeros((B, K))
    np.add.at(comp, (cs, labels), 1.0)
    comp /= np.maximum(comp.sum(1, keepdims=True), 1)
    tot = W.sum(1, keepdims=True)
    prior = (1 - potts_mix) * W / np.where(tot > 0, tot, 1) + potts_mix * comp
    prior = np.maximum(prior, prior_floor)
    log_prior = np.log(prior / prior.sum(1, keepdims=True))[cs]
    fit_kw = dict(n_iter=n_iter, shrinkage=shrinkage)
    gate = morphology_gain(Z[ok], log_prior[ok], seed=seed, n_permutations=n_permutations, **fit_kw)
    info["gate"] = gate
    gate["excess_gain"] = gate["mean"] - gate["null_mean"]
    use = mode == "on" or (gate["z"] > min_z and gate["excess_gain"] >= min_gain)
    info["used"] = bool(use)
    if not use:
        info["seconds"] = time.perf_counter() - t0
        info["reason"] = (
            f"morphology gain {gate['mean']:.3g} nats/cell vs {gate['null_mean']:.3g} +- "
            f"{gate['null_sd']:.2g} with shuffled nuclei (z = {gate['z']:.2f}, min_z = {min_z:g}; excess "
            f"{gate['excess_gain']:.3g}, min_gain = {min_gain:g}): "
            "nuclei do not tell the spot's types apart; Potts labels kept"
        )
        return MorphologyResult(labels, conf, False, None, None, info)
    model, R = fit_morphology_model(Z[ok], log_prior[ok], **fit_kw)
    info["em"] = {"iterations": int(model.n_iter), "loglik_per_cell": [round(v, 6) for v in model.loglik_per_cell]}
    if assignment == "sinkhorn":
        R = sinkhorn_posteriors(model.loglik(Z[ok]), log_prior[ok], cs[ok])
    post = np.full((n, K), np.nan)
    post[ok] = R
    idx = np.flatnonzero(ok)
    labels[idx] = R.argmax(1)
    conf[idx] = R.max(1)
    info["n_labels_changed_from_potts"] = int((labels != np.asarray(potts_labels)).sum())
    info["seconds"] = time.perf_counter() - t0
    return MorphologyResult(labels, conf, True, post, model, info)


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> tuple[pd.DataFrame, float]:
    """Reliability of per-cell confidences, and the expected calibration error.

    Equal-width bins of confidence over [0, 1]; per bin the number of cells, mean confidence and observed accuracy.
    NaN confidences are left out.

    Parameters
    ----------
    confidence : numpy.ndarray
        ``(n,)`` confidence of each label, in [0, 1].
    correct : numpy.ndarray
        ``(n,)`` whether each label is right.
    n_bins : int, default 10
        Number of bins.

    Returns
    -------
    table : pandas.DataFrame
        One row per bin: ``bin_low``, ``bin_high``, ``n_cells``, ``mean_confidence``, ``accuracy`` (NaN for empty
        bins).
    ece : float
        Cell-weighted mean of ``|accuracy - confidence|`` over the bins.
    """
    c = np.asarray(confidence, dtype=float)
    y = np.asarray(correct, dtype=bool)
    ok = np.isfinite(c)
    c, y = c[ok], y[ok]
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    cnt = np.bincount(b, minlength=n_bins)
    mc = np.bincount(b, weights=c, minlength=n_bins) / np.maximum(cnt, 1)
    acc = np.bincount(b, weights=y.astype(float), minlength=n_bins) / np.maximum(cnt, 1)
    tab = pd.DataFrame(
        {
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "n_cells": cnt,
            "mean_confidence": np.where(cnt > 0, mc, np.nan),
            "accuracy": np.where(cnt > 0, acc, np.nan),
        }
    )
    ece = float((cnt * np.abs(acc - mc)).sum() / max(cnt.sum(), 1))
    return tab, ece
