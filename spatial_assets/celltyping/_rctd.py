"""RCTD "full mode" spot decomposition (Cable et al. 2022), batched over all spots.

Pieces, each usable on its own:

* :class:`PoissonLognormal` -- log P(y | lambda) of y ~ Poisson(lambda e^eps), eps ~ N(0, sigma^2), and its first
  and second derivatives in lambda, computed here by adaptive Gauss-Hermite quadrature (no precomputed tables to
  load), cached per sigma on a grid of integer counts x log-lambda and interpolated (cubic Hermite in log lambda).
* :func:`reference_profiles`, :func:`de_genes` -- per-type mean of per-cell-normalised expression; RCTD's
  differentially-expressed gene sets.
* :func:`fit_platform_effect` -- the pooled slide fitted as a mixture of type profiles (log-scale least squares,
  as RCTD's bulk mode), per-gene ratio observed / fitted bulk, and ``estimated_be`` (SpatialScope).
* :func:`fit_spot_weights` -- non-negative per-spot type weights by maximum likelihood, all spots at once:
  batched Newton steps whose bound-constrained quadratic sub-problems are solved exactly by a batched active-set
  (Lawson-Hanson / Bro-de Jong) NNLS on the Hessian, with a batched Armijo line search on the true likelihood.
  ``allowed_types`` restricts each spot to a subset of types (for RCTD's doublet mode).
* :func:`choose_sigma`, :func:`fit_sigma` -- RCTD's sigma search on its grid (0.10..0.70 by 0.01, 0.72..2.00 by
  0.02, start 1.0, +-8 grid steps per epoch, prediction multipliers 0.8..1.2, up to 8 epochs).

Everything is float64 numpy; the per-entry likelihood and the small per-spot QPs are numba-compiled kernels run in
parallel (numba ships with scanpy); no per-spot Python loops. No dagster import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from numba import njit, prange
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

__all__ = [
    "CellTypingInputError",
    "PoissonLognormal",
    "get_likelihood",
    "SIGMA_GRID",
    "reference_profiles",
    "de_genes",
    "PlatformEffect",
    "fit_platform_effect",
    "WeightFit",
    "fit_spot_weights",
    "choose_sigma",
    "fit_sigma",
    "SigmaFit",
    "as_counts",
    "maybe_expm1",
]

# RCTD's sigma grid (its Q-matrix names / 100).
SIGMA_GRID = np.round(np.concatenate([np.arange(10, 71), np.arange(36, 101) * 2]) / 100.0, 2)
MIN_LAMBDA = 1e-4  # RCTD's lower bound on predicted counts


class CellTypingInputError(ValueError):
    """Bad input to cell typing; the message names the input / field and what was expected vs found."""


# ------------------------------------------------------------------------------------------------ input scale
def maybe_expm1(X, name: str) -> tuple[sp.csr_matrix, bool]:
    """The matrix as float64 CSR, exponentiated back (expm1) when it looks like log1p data.

    Rule (SpatialScope): a matrix whose maximum is < 30 is log1p data -- applied only when it also holds
    non-integer values, so a shallow raw-count matrix (integers, max < 30) is not misread as log data.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix
        Counts or log1p data.
    name : str
        Name of the input in error messages (e.g. ``"reference.X"``).

    Returns
    -------
    X : scipy.sparse.csr_matrix
        Linear-scale float64 matrix.
    was_log1p : bool
        Whether it was exponentiated back.

    Raises
    ------
    CellTypingInputError
        If ``X`` holds non-finite or negative values.
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    if X.nnz and not np.all(np.isfinite(X.data)):
        raise CellTypingInputError(f"{name}: expected finite values, found NaN or inf")
    if X.nnz and X.data.min() < 0:
        raise CellTypingInputError(f"{name}: expected non-negative counts, found minimum {X.data.min():g}")
    mx = X.data.max() if X.nnz else 0.0
    integer = bool(np.all(X.data == np.round(X.data)))
    if mx < 30 and not integer:
        X = X.copy()
        X.data = np.expm1(X.data)
        return X, True
    return X, False


def as_counts(X, name: str, atol: float = 1e-3) -> tuple[sp.csr_matrix, bool]:
    """Raw integer counts as float64 CSR (log1p input exponentiated back first); non-integers raise.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix
        Counts or log1p data.
    name : str
        Name of the input in error messages.
    atol : float, default 1e-3
        Largest distance to an integer accepted (values are then rounded).

    Returns
    -------
    counts : scipy.sparse.csr_matrix
        Integer-valued float64 counts (explicit zeros removed).
    was_log1p : bool
        Whether the input was log1p data.

    Raises
    ------
    CellTypingInputError
        If values are non-finite, negative, or not integers (after exponentiating log1p data back).
    """
    X, was_log = maybe_expm1(X, name)
    if X.nnz:
        r = np.round(X.data)
        bad = np.abs(X.data - r) > atol
        if bad.any():
            v = X.data[np.flatnonzero(bad)[0]]
            raise CellTypingInputError(
                f"{name}: expected raw integer counts, found {int(bad.sum())} non-integer values (e.g. {v:.4g})"
                + (" after exponentiating log1p data back" if was_log else "")
            )
        X = X.copy()
        X.data = r
        X.eliminate_zeros()
    return X, was_log


# ------------------------------------------------------------------------------------------------ likelihood
# Kernels are numba-compiled (numba ships with scanpy): one fused pass per entry instead of ~40 tensor passes.
@njit(cache=True)
def _agh_scalar(y, t, sigma, nodes, logw):
    """Adaptive Gauss-Hermite for one (y, t = log lambda): (log P, a, b, c), the derivatives of log P in t.

    The integrand g(e) = y (t + e) - e^(t+e) - lgamma(y+1) - e^2 / (2 s^2) is strictly concave in e, so a rule
    centred at its mode and scaled by its curvature is accurate for any y, lambda. With u = y - v, v = e^(t+e):
    a = E[u], b = Var[u] - E[v], c = E[(u - a)^3] - 3 Cov(u, v) - E[v] (posterior moments of e).
    """
    s2 = sigma * sigma
    m = 0.0
    if y > 0:  # start right of the root of g' (concave, decreasing): Newton then converges monotonically
        m = max(0.0, min(y * s2, math.log(y) - t))
    for _ in range(100):
        e = math.exp(t + m)
        step = (y - e - m / s2) / (e + 1.0 / s2)
        m += step
        if abs(step) < 1e-13 * (1.0 + abs(m)):
            break
    sc = math.sqrt(2.0 / (math.exp(t + m) + 1.0 / s2))
    n = nodes.shape[0]
    lw = np.empty(n)
    v = np.empty(n)
    lg = math.lgamma(y + 1.0)
    mx = -np.inf
    for i in range(n):
        eps = m + sc * nodes[i]
        v[i] = math.exp(t + eps)
        lw[i] = logw[i] + y * (t + eps) - v[i] - lg - eps * eps / (2 * s2)
        mx = max(mx, lw[i])
    tot = 0.0
    for i in range(n):
        lw[i] = math.exp(lw[i] - mx)
        tot += lw[i]
    logp = mx + math.log(tot) + math.log(sc) - 0.5 * math.log(2 * math.pi * s2)
    a = 0.0
    ev = 0.0
    for i in range(n):
        lw[i] /= tot
        a += lw[i] * (y - v[i])
        ev += lw[i] * v[i]
    m2 = 0.0
    m3 = 0.0
    cuv = 0.0
    for i in range(n):
        du = y - v[i] - a
        m2 += lw[i] * du * du
        m3 += lw[i] * du * du * du
        cuv += lw[i] * du * (v[i] - ev)
    return logp, a, m2 - ev, m3 - 3.0 * cuv - ev


@njit(parallel=True, cache=True)
def _build_rows(rows, tmin, h, n_t, sigma, nodes, logw, L, A, B, C):
    for j in prange(rows.shape[0] * n_t):
        r = rows[j // n_t]
        i = j - (j // n_t) * n_t
        lp, a, b, c = _agh_scalar(float(r), tmin + i * h, sigma, nodes, logw)
        L[r, i] = lp
        A[r, i] = a
        B[r, i] = b
        C[r, i] = c


@njit(cache=True, inline="always")
def _lookup(y, lam, L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, derivs):
    """(log P, d logP/d lambda, d2 logP/d lambda2) at one entry: table + cubic Hermite in t, or direct AGH."""
    t = math.log(max(lam, math.exp(tmin)))
    yi = int(y)
    if yi < nrows and t <= tmax:
        pos = (t - tmin) / h
        i = min(int(pos), L.shape[1] - 2)
        f = pos - i
        omf = 1.0 - f
        h00 = (1.0 + 2.0 * f) * omf * omf
        h10 = f * omf * omf * h
        h01 = f * f * (3.0 - 2.0 * f)
        h11 = f * f * (f - 1.0) * h
        A0 = A[yi, i]
        A1 = A[yi, i + 1]
        lp = h00 * L[yi, i] + h10 * A0 + h01 * L[yi, i + 1] + h11 * A1
        if not derivs:
            return lp, 0.0, 0.0
        B0 = B[yi, i]
        B1 = B[yi, i + 1]
        a = h00 * A0 + h10 * B0 + h01 * A1 + h11 * B1
        b = h00 * B0 + h10 * C[yi, i] + h01 * B1 + h11 * C[yi, i + 1]
    else:
        lp, a, b, _c = _agh_scalar(y, t, sigma, nodes, logw)
        if not derivs:
            return lp, 0.0, 0.0
    lt = math.exp(t)
    return lp, a / lt, (b - a) / (lt * lt)


@njit(parallel=True, cache=True)
def _eval_flat(y, lam, L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, derivs, out_lp, out_d1, out_d2):
    for j in prange(y.shape[0]):
        lp, d1, d2 = _lookup(y[j], lam[j], L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, derivs)
        out_lp[j] = lp
        if derivs:
            out_d1[j] = d1
            out_d2[j] = d2


@njit(parallel=True, cache=True)
def _sum_scaled(y, lam, mults, min_lambda, L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, out):
    n = y.shape[0]
    nch = out.shape[0]
    for ch in prange(nch):
        for j in range(ch * n // nch, (ch + 1) * n // nch):
            for mi in range(mults.shape[0]):
                lp, _a, _b = _lookup(
                    y[j],
                    max(lam[j] * mults[mi], min_lambda),
                    L,
                    A,
                    B,
                    C,
                    tmin,
                    tmax,
                    h,
                    nrows,
                    sigma,
                    nodes,
                    logw,
                    False,
                )
                out[ch, mi] += lp


@njit(parallel=True, cache=True)
def _mixture_rows(
    Y, spot, base, base_row, PT, k1, k2, scale, min_lambda, L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, out
):
    for r in prange(spot.shape[0]):
        s = spot[r]
        m = base_row[r]
        a = k1[r]
        b = k2[r]
        sc = scale[s]
        tot = 0.0
        for g in range(Y.shape[1]):
            lam = base[m, g] + PT[a, g]
            if b >= 0:
                lam += PT[b, g]
            lp, _a, _b = _lookup(
                Y[s, g], max(lam * sc, min_lambda), L, A, B, C, tmin, tmax, h, nrows, sigma, nodes, logw, False
            )
            tot += lp
        out[r] = -tot


class PoissonLognormal:
    """log P(y | lambda) for y ~ Poisson(lambda e^eps), eps ~ N(0, sigma^2), with d/dlambda and d2/dlambda2.

    RCTD's likelihood (Cable et al. 2022). Values for integer ``y <= max_table_count`` and lambda in
    [``lambda_min``, ``lambda_max``] come from a table on a log-lambda grid (``points_per_unit`` nodes per unit of
    ln lambda) interpolated by cubic Hermite splines that use the exact derivatives; other entries are computed
    directly by adaptive Gauss-Hermite quadrature (``n_quad`` nodes). lambda below ``lambda_min`` is clamped to
    it. Rows of the table are built on demand, for the counts present in the data.

    Parameters
    ----------
    sigma : float
        Standard deviation of the lognormal noise (> 0).
    max_table_count : int, default 255
        Largest count tabulated.
    lambda_min, lambda_max : float, default 1e-5, 1e5
        Range of the table in lambda.
    points_per_unit : int, default 16
        Table nodes per unit of ln lambda.
    n_quad : int, default 40
        Gauss-Hermite nodes.

    Raises
    ------
    CellTypingInputError
        If ``sigma`` is not positive.
    """

    def __init__(
        self,
        sigma: float,
        max_table_count: int = 255,
        lambda_min: float = 1e-5,
        lambda_max: float = 1e5,
        points_per_unit: int = 16,
        n_quad: int = 40,
    ):
        if not (sigma > 0):
            raise CellTypingInputError(f"sigma: expected > 0, found {sigma}")
        self.sigma = float(sigma)
        self.max_table_count = int(max_table_count)
        self.tmin, self.tmax = math.log(lambda_min), math.log(lambda_max)
        self.n_t = int(round((self.tmax - self.tmin) * points_per_unit)) + 1
        self.h = (self.tmax - self.tmin) / (self.n_t - 1)
        t, w = np.polynomial.hermite.hermgauss(int(n_quad))
        self._nodes, self._logw = t.astype(np.float64), (np.log(w) + t**2).astype(np.float64)
        n_rows = self.max_table_count + 1
        self._tabs = [np.zeros((n_rows, self.n_t)) for _ in range(4)]
        self._built = np.zeros(n_rows, dtype=bool)
        self._prefix = 0  # rows 0.._prefix-1 are all built
        self._rows = n_rows

    def _ensure_rows(self, y: np.ndarray) -> None:
        """Build the table rows of the integer counts present in ``y`` (only those: large counts are sparse)."""
        if y.size == 0 or y.max() < self._prefix:
            return
        yi = y[y <= self.max_table_count].astype(np.int64)
        need = (np.bincount(yi, minlength=self._rows) > 0) & ~self._built
        need[: self._prefix] = False
        if need.any():
            rows = np.flatnonzero(need)
            _build_rows(rows, self.tmin, self.h, self.n_t, self.sigma, self._nodes, self._logw, *self._tabs)
            self._built[rows] = True
        nb = np.flatnonzero(~self._built)
        self._prefix = int(nb[0]) if len(nb) else self._rows

    def _args(self):
        return (*self._tabs, self.tmin, self.tmax, self.h, self._rows, self.sigma, self._nodes, self._logw)

    def _prep(self, y, lam):
        y, lam = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(lam, dtype=np.float64))
        shape = y.shape
        y, lam = np.ascontiguousarray(y).reshape(-1), np.ascontiguousarray(lam).reshape(-1)
        if y.size and (y.min() < 0 or not np.isfinite(lam).all()):
            raise CellTypingInputError("likelihood: counts must be >= 0 and lambdas finite")
        self._ensure_rows(y)
        return y, lam, shape

    def logpmf(self, y, lam) -> np.ndarray:
        """log P(y | lambda), elementwise (broadcast).

        Parameters
        ----------
        y : array-like
            Integer-valued counts (>= 0).
        lam : array-like
            Expected counts lambda (finite), broadcast against ``y``.

        Returns
        -------
        numpy.ndarray
            log P of the broadcast shape.

        Raises
        ------
        CellTypingInputError
            If a count is negative or a lambda is not finite.
        """
        y, lam, shape = self._prep(y, lam)
        lp = np.empty_like(y)
        _eval_flat(y, lam, *self._args(), False, lp, lp, lp)
        return lp.reshape(shape)

    def derivatives(self, y, lam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """log P and its first and second derivatives in lambda, elementwise (broadcast).

        Parameters
        ----------
        y : array-like
            Integer-valued counts (>= 0).
        lam : array-like
            Expected counts lambda (finite).

        Returns
        -------
        logp : numpy.ndarray
            log P(y | lambda).
        d1 : numpy.ndarray
            d log P / d lambda.
        d2 : numpy.ndarray
            d2 log P / d lambda2.

        Raises
        ------
        CellTypingInputError
            If a count is negative or a lambda is not finite.
        """
        y, lam, shape = self._prep(y, lam)
        lp, d1, d2 = np.empty_like(y), np.empty_like(y), np.empty_like(y)
        _eval_flat(y, lam, *self._args(), True, lp, d1, d2)
        return lp.reshape(shape), d1.reshape(shape), d2.reshape(shape)

    def sum_logpmf_scaled(
        self, y: np.ndarray, lam: np.ndarray, mults: np.ndarray, min_lambda: float = 0.0
    ) -> np.ndarray:
        """``sum_j log P(y_j | max(lam_j x m, min_lambda))`` for each multiplier m, in one pass without temporaries.

        Parameters
        ----------
        y : numpy.ndarray
            Counts.
        lam : numpy.ndarray
            Predictions, same shape.
        mults : numpy.ndarray
            ``(M,)`` multipliers of the predictions.
        min_lambda : float, default 0.0
            Floor of the scaled predictions.

        Returns
        -------
        numpy.ndarray
            ``(M,)`` summed log-likelihoods.
        """
        y, lam, _ = self._prep(y, lam)
        mults = np.ascontiguousarray(mults, dtype=np.float64)
        out = np.zeros((64, len(mults)))
        _sum_scaled(y, lam, mults, float(min_lambda), *self._args(), out)
        return out.sum(0)

    def mixture_rows_nll(
        self,
        Y: np.ndarray,
        spot: np.ndarray,
        base: np.ndarray,
        base_row: np.ndarray,
        PT: np.ndarray,
        k1: np.ndarray,
        k2: np.ndarray,
        scale: np.ndarray,
        min_lambda: float = 0.0,
    ) -> np.ndarray:
        """Negative log-likelihood of spot counts under candidate label rows (the Potts energies' data term).

        For rows r: ``-sum_g log P(Y[spot_r, g] | max(scale[spot_r] (base[base_row_r] + PT[k1_r] + PT[k2_r]),
        min_lambda))``, with ``PT[k2]`` left out where ``k2 < 0``.

        Parameters
        ----------
        Y : numpy.ndarray
            ``(spots, G)`` counts.
        spot : numpy.ndarray
            ``(R,)`` spot of each row.
        base : numpy.ndarray
            ``(M, G)`` profile sums of the other cells of each move.
        base_row : numpy.ndarray
            ``(R,)`` row of ``base`` of each row.
        PT : numpy.ndarray
            ``(types, G)`` profiles.
        k1, k2 : numpy.ndarray
            ``(R,)`` candidate types of the moved cell(s); ``k2 < 0`` for single-cell moves.
        scale : numpy.ndarray
            ``(spots,)`` scale of each spot's prediction.
        min_lambda : float, default 0.0
            Floor of the predictions.

        Returns
        -------
        numpy.ndarray
            ``(R,)`` negative log-likelihoods.
        """
        Y = np.ascontiguousarray(Y, dtype=np.float64)
        self._ensure_rows(Y.reshape(-1))
        out = np.empty(len(spot))
        _mixture_rows(
            Y,
            np.ascontiguousarray(spot, dtype=np.int64),
            np.ascontiguousarray(base, dtype=np.float64),
            np.ascontiguousarray(base_row, dtype=np.int64),
            np.ascontiguousarray(PT, dtype=np.float64),
            np.ascontiguousarray(k1, dtype=np.int64),
            np.ascontiguousarray(k2, dtype=np.int64),
            np.ascontiguousarray(scale, dtype=np.float64),
            float(min_lambda),
            *self._args(),
            out,
        )
        return out

    def direct(self, y: float, lam: float) -> tuple[float, float, float]:
        """log P and its derivatives at one entry by quadrature, bypassing the table (for checks).

        Parameters
        ----------
        y : float
            Count.
        lam : float
            Expected count (> 0).

        Returns
        -------
        tuple of float
            ``(log P, d log P / d lambda, d2 log P / d lambda2)``.
        """
        lp, a, b, _ = _agh_scalar(float(y), math.log(lam), self.sigma, self._nodes, self._logw)
        return lp, a / lam, (b - a) / lam**2


@lru_cache(maxsize=48)
def get_likelihood(sigma: float) -> PoissonLognormal:
    """The cached :class:`PoissonLognormal` for ``sigma`` (rounded to 1e-6).

    Parameters
    ----------
    sigma : float
        Lognormal standard deviation.

    Returns
    -------
    PoissonLognormal
        A shared instance (its table grows as counts are met).
    """
    return PoissonLognormal(round(float(sigma), 6))


# ------------------------------------------------------------------------------------------------ profiles, genes
def reference_profiles(counts: sp.csr_matrix, types: np.ndarray, type_names: Sequence[str]) -> np.ndarray:
    """Per-type mean of per-cell-normalised expression (counts / cell total).

    Parameters
    ----------
    counts : scipy.sparse.csr_matrix
        Cells x genes counts on all reference genes (so each row's total is the cell's library size; no empty
        cell).
    types : numpy.ndarray
        ``(n_cells,)`` integer codes into ``type_names``.
    type_names : sequence of str
        The K types.

    Returns
    -------
    numpy.ndarray
        ``(genes, K)`` profiles.
    """
    counts = sp.csr_matrix(counts, dtype=np.float64)
    lib = np.asarray(counts.sum(1)).ravel()
    norm = sp.diags(1.0 / lib) @ counts
    k = len(type_names)
    ind = sp.csr_matrix((np.ones(len(types)), (types, np.arange(len(types)))), shape=(k, len(types)))
    n = np.asarray(ind.sum(1)).ravel()
    return np.asarray((sp.diags(1.0 / n) @ ind @ norm).todense()).T


def de_genes(
    profiles: np.ndarray,
    genes: Sequence[str],
    bulk_counts: np.ndarray,
    fc_thresh: float,
    expr_thresh: float,
    min_obs: float = 3,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """RCTD's informative genes, as a boolean mask over ``genes``.

    A gene is kept when, for some type, ``log(p_type + 1e-9) - log(mean of the other types + 1e-9) > fc_thresh``
    and ``p_type > expr_thresh``, it has at least ``min_obs`` counts on the whole slide, it is not mitochondrial
    ("mt-"), and (when given) ``candidates`` is True for it (the reference's ``var['Marker']``).

    Parameters
    ----------
    profiles : numpy.ndarray
        ``(G, K)`` reference profiles.
    genes : sequence of str
        The G gene names.
    bulk_counts : numpy.ndarray
        ``(G,)`` total counts of each gene on the slide.
    fc_thresh : float
        Log fold-change threshold.
    expr_thresh : float
        Expression threshold on the profile.
    min_obs : float, default 3
        RCTD's MIN_OBS.
    candidates : numpy.ndarray, optional
        ``(G,)`` booleans restricting the genes.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` boolean mask.
    """
    eps = 1e-9
    k = profiles.shape[1]
    other = (profiles.sum(1, keepdims=True) - profiles) / max(k - 1, 1)
    logfc = np.log(profiles + eps) - np.log(other + eps)
    de = ((logfc > fc_thresh) & (profiles > expr_thresh)).any(1)
    mt = np.array([str(g).lower().startswith("mt-") for g in genes], dtype=bool)
    keep = de & (np.asarray(bulk_counts) >= min_obs) & ~mt
    if candidates is not None:
        keep &= np.asarray(candidates, dtype=bool)
    return keep


# ------------------------------------------------------------------------------------------------ platform effect
@dataclass
class PlatformEffect:
    """Gene-wise platform effect between reference and slide (:func:`fit_platform_effect`).

    Attributes
    ----------
    ratio : pandas.Series
        Observed bulk / fitted bulk per gene (the factor RCTD multiplies profiles by).
    estimated_be : pandas.Series
        ``ratio x (mean slide spot UMI / mean reference cell UMI)`` (SpatialScope's var column; NaN where the
        reference never expresses the gene).
    bulk_weights : pandas.Series
        The fitted bulk mixture (raw, per type).
    proportions : pandas.Series
        The same normalised to sum 1.
    info : dict
        ``n_bulk_genes``, ``library_size_ratio``, ``mean_slide_umi``, ``mean_reference_umi``.
    """

    ratio: pd.Series
    estimated_be: pd.Series
    bulk_weights: pd.Series
    proportions: pd.Series
    info: dict = field(default_factory=dict)


def _fit_bulk(bulk: np.ndarray, total_umi: float, P: np.ndarray) -> np.ndarray:
    """Non-negative w minimising sum_g (log(total_umi * P w)_g - log bulk_g)^2 (RCTD bulk mode)."""
    k = P.shape[1]
    logb = np.log(bulk)
    S = P * total_umi

    def fg(w):
        pred = np.maximum(S @ w, 1e-300)
        r = np.log(pred) - logb
        return float(r @ r), 2 * S.T @ (r / pred)

    # weights are fractions of the pooled UMI (sum ~ 1): the upper bound only keeps line searches finite
    res = minimize(
        fg,
        np.full(k, 1.0 / k),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0, 1e3)] * k,
        options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
    )
    return res.x


def fit_platform_effect(
    slide_counts,
    genes: Sequence[str],
    profiles: pd.DataFrame,
    bulk_genes: Sequence[str],
    reference_mean_umi: float,
    slide_umi: np.ndarray | None = None,
) -> PlatformEffect:
    """Fit the pooled slide as a mixture of type profiles (RCTD ``fitBulk``) and return the gene-wise effect.

    Non-negative mixture weights minimise the squared log difference between the slide's pooled counts and
    ``total UMI x profiles @ w`` on the bulk genes (L-BFGS-B); the per-gene ratio of observed to fitted bulk is the
    platform effect.

    Parameters
    ----------
    slide_counts : array-like or scipy.sparse matrix
        Spots x ``genes`` raw counts.
    genes : sequence of str
        The slide genes (columns of ``slide_counts``).
    profiles : pandas.DataFrame
        Genes x types reference per-type normalised means, indexed by gene and covering ``genes``.
    bulk_genes : sequence of str
        The genes the bulk mixture is fitted on (a subset of ``genes``, each with counts on the slide).
    reference_mean_umi : float
        Mean library size of the reference cells.
    slide_umi : numpy.ndarray, optional
        Per-spot library sizes; default the row sums of ``slide_counts``.

    Returns
    -------
    PlatformEffect
        Ratios, ``estimated_be``, bulk weights and proportions.

    Raises
    ------
    CellTypingInputError
        If the shapes disagree, profiles miss slide genes, the slide has no counts, or ``bulk_genes`` is empty,
        not a subset of the slide genes, or holds genes without counts.
    """
    genes = pd.Index([str(g) for g in genes])
    X = sp.csr_matrix(slide_counts, dtype=np.float64)
    if X.shape[1] != len(genes):
        raise CellTypingInputError(f"slide_counts: expected {len(genes)} gene columns, found {X.shape[1]}")
    missing = genes.difference(profiles.index)
    if len(missing):
        raise CellTypingInputError(f"profiles: missing {len(missing)} of the slide genes (e.g. {missing[0]})")
    umi = np.asarray(X.sum(1)).ravel() if slide_umi is None else np.asarray(slide_umi, dtype=float)
    bulk = np.asarray(X.sum(0)).ravel()
    total = float(umi.sum())
    if total <= 0:
        raise CellTypingInputError("slide_counts: the slide has no counts at all")
    P = profiles.loc[genes].to_numpy(float)
    bidx = genes.get_indexer(pd.Index([str(g) for g in bulk_genes]))
    if (bidx < 0).any() or len(bidx) == 0:
        raise CellTypingInputError(
            f"bulk_genes: expected a non-empty subset of the slide genes, found {len(bidx)} "
            f"genes of which {int((bidx < 0).sum())} are not slide genes"
        )
    if (bulk[bidx] <= 0).any():
        raise CellTypingInputError("bulk_genes: every bulk gene needs counts on the slide (RCTD's MIN_OBS)")
    w = _fit_bulk(bulk[bidx], total, P[bidx])
    prop = w / w.sum()
    fitted = P @ prop
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (bulk / total) / fitted
    ratio[~np.isfinite(ratio)] = np.nan
    lib_ratio = float(umi.mean()) / float(reference_mean_umi)
    types = profiles.columns
    return PlatformEffect(
        ratio=pd.Series(ratio, index=genes, name="bulk_ratio"),
        estimated_be=pd.Series(ratio * lib_ratio, index=genes, name="estimated_be"),
        bulk_weights=pd.Series(w, index=types, name="bulk_weight"),
        proportions=pd.Series(prop, index=types, name="bulk_proportion"),
        info={
            "n_bulk_genes": int(len(bidx)),
            "library_size_ratio": lib_ratio,
            "mean_slide_umi": float(umi.mean()),
            "mean_reference_umi": float(reference_mean_umi),
        },
    )


# ------------------------------------------------------------------------------------------------ batched NNQP
@njit(cache=True)
def _solve_passive(H, c, Pm):
    """Solve H[P, P] s_P = c[P] by Cholesky (H positive definite); s = 0 off the passive set P."""
    K = c.shape[0]
    idx = np.empty(K, dtype=np.int64)
    k = 0
    for a in range(K):
        if Pm[a]:
            idx[k] = a
            k += 1
    Lc = np.zeros((k, k))
    for a in range(k):
        for b in range(a + 1):
            v = H[idx[a], idx[b]]
            for q in range(b):
                v -= Lc[a, q] * Lc[b, q]
            if a == b:
                Lc[a, a] = math.sqrt(max(v, 1e-300))
            else:
                Lc[a, b] = v / Lc[b, b]
    x = np.empty(k)
    for a in range(k):
        v = c[idx[a]]
        for q in range(a):
            v -= Lc[a, q] * x[q]
        x[a] = v / Lc[a, a]
    for a in range(k - 1, -1, -1):
        v = x[a]
        for q in range(a + 1, k):
            v -= Lc[q, a] * x[q]
        x[a] = v / Lc[a, a]
    s = np.zeros(K)
    for a in range(k):
        s[idx[a]] = x[a]
    return s


@njit(cache=True)
def _nnqp_kernel(H, c, allowed, max_iter, out):
    nb, K = c.shape
    for bi in range(nb):
        Hb = H[bi]
        cb = c[bi]
        z = np.zeros(K)
        Pm = np.zeros(K, dtype=np.bool_)
        blocked = ~allowed[bi]
        scale = np.abs(cb).max()
        if scale == 0.0:
            out[bi] = z
            continue
        tol = 1e-12 * scale
        it = 0
        w = np.empty(K)
        while it < max_iter:
            for a in range(K):
                v = cb[a]
                for q in range(K):
                    v -= Hb[a, q] * z[q]
                w[a] = v
            j = -1
            best = tol
            for k in range(K):
                if not Pm[k] and not blocked[k] and w[k] > best:
                    best = w[k]
                    j = k
            if j < 0:
                break
            Pm[j] = True
            first = True
            while it < max_iter:
                it += 1
                s = _solve_passive(Hb, cb, Pm)
                feas = True
                for k in range(K):
                    if Pm[k] and s[k] <= 0.0:
                        feas = False
                if feas:
                    z = s
                    break
                alpha = 1.0
                for k in range(K):
                    if Pm[k] and s[k] <= 0.0:
                        d = z[k] - s[k]
                        if d > 0.0:
                            alpha = min(alpha, z[k] / d)
                        else:
                            alpha = 0.0
                zmax = 0.0
                for k in range(K):
                    z[k] = z[k] + alpha * (s[k] - z[k])
                    zmax = max(zmax, abs(z[k]))
                for k in range(K):
                    if Pm[k] and z[k] <= 1e-14 * max(zmax, 1e-300):
                        Pm[k] = False
                        z[k] = 0.0
                        if first and k == j:  # numerically useless direction: never add it again
                            blocked[k] = True
                first = False
        for k in range(K):
            out[bi, k] = max(z[k], 0.0) if Pm[k] else 0.0


def nnqp(H: np.ndarray, c: np.ndarray, allowed: np.ndarray | None = None, max_iter: int | None = None) -> np.ndarray:
    """Batched non-negative quadratic programs: ``min 0.5 z'Hz - c'z`` subject to ``z >= 0``.

    Active-set method of Lawson-Hanson in the normal-equation form of Bro & de Jong (fast NNLS), one compiled
    solver per batch element, run in parallel.

    Parameters
    ----------
    H : numpy.ndarray
        ``(B, K, K)`` positive-definite matrices.
    c : numpy.ndarray
        ``(B, K)`` linear terms.
    allowed : numpy.ndarray, optional
        ``(B, K)`` booleans; ``z`` is fixed at 0 where False. Default: all allowed.
    max_iter : int, optional
        Iteration cap per problem; default ``3 K + 10``.

    Returns
    -------
    numpy.ndarray
        ``(B, K)`` solutions.
    """
    H = np.ascontiguousarray(H, dtype=np.float64)
    c = np.ascontiguousarray(c, dtype=np.float64)
    nb, K = c.shape
    allowed = np.ones((nb, K), dtype=bool) if allowed is None else np.ascontiguousarray(allowed, dtype=bool)
    out = np.zeros((nb, K))
    _nnqp_kernel(H, c, allowed, int(max_iter or 3 * K + 10), out)
    return out


def _make_pd(H: np.ndarray, rel: float = 1e-8) -> np.ndarray:
    """Positive-definite versions of symmetric matrices (B, K, K): a 1e-7 x max-diagonal ridge (as RCTD's
    normalised 1e-7 I), and for the matrices that are still not positive definite (batched Cholesky test) the
    eigenvalues clipped at ``rel`` x the largest |eigenvalue| (RCTD's ``psd``)."""
    H = 0.5 * (H + H.transpose(0, 2, 1))
    d = np.einsum("bkk->bk", H)
    H = H + (1e-7 * np.maximum(np.abs(d).max(1), 1e-300))[:, None, None] * np.eye(H.shape[1])
    _, info = torch.linalg.cholesky_ex(torch.from_numpy(H))
    bad = np.flatnonzero(info.numpy() > 0)
    if len(bad):
        with threadpool_limits(1):  # tiny LAPACK calls: threads only add overhead
            ev, V = np.linalg.eigh(H[bad])
        ev = np.maximum(ev, np.maximum(np.abs(ev).max(1, keepdims=True) * rel, 1e-300))
        H[bad] = (V * ev[:, None, :]) @ V.transpose(0, 2, 1)
    return H


# ------------------------------------------------------------------------------------------------ spot weights
@dataclass
class WeightFit:
    """Result of :func:`fit_spot_weights`.

    Attributes
    ----------
    weights : numpy.ndarray
        ``(spots, K)`` raw (not normalised) non-negative weights.
    nll : numpy.ndarray
        ``(spots,)`` negative log-likelihood at the weights.
    n_iter : numpy.ndarray
        ``(spots,)`` Newton iterations used.
    converged : numpy.ndarray
        ``(spots,)`` whether each spot met the stopping rule.
    """

    weights: np.ndarray
    nll: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray


def _dense(X) -> np.ndarray:
    return np.ascontiguousarray(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=np.float64)


def fit_spot_weights(
    counts,
    numi,
    profiles,
    sigma: float | PoissonLognormal,
    allowed_types_mask: np.ndarray | None = None,
    init: np.ndarray | None = None,
    max_iter: int = 50,
    min_change: float = 1e-3,
    chunk: int = 1024,
) -> WeightFit:
    """Per-spot non-negative type weights by maximum likelihood (RCTD full mode), all spots at once.

    Maximises ``sum_g log P(y_g | nUMI x sum_k w_k profile_gk)`` under the Poisson-lognormal likelihood. Each
    iteration: gradient and PSD-projected Hessian of the negative log-likelihood, the bound-constrained quadratic
    model solved exactly (:func:`nnqp`), Armijo backtracking on the true likelihood. A spot stops when its weights
    change by less than ``min_change`` (L2), as RCTD. Spots are processed in chunks, batched within.

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix
        Spots x genes integer counts on the informative genes.
    numi : numpy.ndarray
        ``(spots,)`` library sizes (all genes).
    profiles : numpy.ndarray
        ``(genes, K)`` platform-corrected profiles.
    sigma : float or PoissonLognormal
        The lognormal standard deviation, or a likelihood object.
    allowed_types_mask : numpy.ndarray, optional
        ``(spots, K)`` booleans; weights of other types are fixed at 0 (e.g. RCTD's doublet mode fits pairs).
    init : numpy.ndarray, optional
        ``(spots, K)`` starting weights; default uniform over the allowed types.
    max_iter : int, default 50
        Newton iterations per spot.
    min_change : float, default 1e-3
        Stopping threshold on the L2 change of a spot's weights.
    chunk : int, default 1024
        Spots per batch.

    Returns
    -------
    WeightFit
        Weights, negative log-likelihoods, iterations and convergence flags.

    Raises
    ------
    CellTypingInputError
        If the shapes of ``profiles``, ``numi`` or ``allowed_types_mask`` disagree with ``counts``, or a spot has
        no allowed type.
    """
    lik = sigma if isinstance(sigma, PoissonLognormal) else get_likelihood(float(sigma))
    Y = _dense(counts)
    P = np.ascontiguousarray(np.asarray(profiles, dtype=np.float64))
    n_spots, G = Y.shape
    if P.ndim != 2 or P.shape[0] != G:
        raise CellTypingInputError(f"profiles: expected {G} genes (rows) as counts has, found shape {P.shape}")
    K = P.shape[1]
    nu = np.asarray(numi, dtype=np.float64).reshape(-1)
    if len(nu) != n_spots:
        raise CellTypingInputError(f"numi: expected {n_spots} values (one per spot), found {len(nu)}")
    if allowed_types_mask is None:
        allowed = np.ones((n_spots, K), dtype=bool)
    else:
        allowed = np.asarray(allowed_types_mask, dtype=bool)
        if allowed.shape != (n_spots, K):
            raise CellTypingInputError(f"allowed_types_mask: expected shape {(n_spots, K)}, found {allowed.shape}")
        if not allowed.any(1).all():
            raise CellTypingInputError("allowed_types_mask: every spot needs at least one allowed type")
    if init is None:
        W = allowed / allowed.sum(1, keepdims=True)
    else:
        W = np.asarray(init, dtype=np.float64) * allowed
    W = np.array(W, dtype=np.float64)
    PT = np.ascontiguousarray(P.T)
    PP = (P[:, :, None] * P[:, None, :]).reshape(G, K * K)
    thr = np.maximum(nu * 1e-7, MIN_LAMBDA)
    nll = np.zeros(n_spots)
    iters = np.zeros(n_spots, dtype=np.int64)
    conv = np.zeros(n_spots, dtype=bool)

    def objective(Yb, wb, nub, thrb):
        lam = np.maximum(nub[:, None] * (wb @ PT), thrb[:, None])
        return -lik.logpmf(Yb, lam).sum(1)

    for start in range(0, n_spots, chunk):
        sl = slice(start, min(start + chunk, n_spots))
        Yc, Wc, nuc, thrc, alc = Y[sl], W[sl].copy(), nu[sl], thr[sl], allowed[sl]
        m = len(Yc)
        act = np.ones(m, dtype=bool)
        itc = np.zeros(m, dtype=np.int64)
        fc = objective(Yc, Wc, nuc, thrc)
        for _ in range(max_iter):
            ia = np.flatnonzero(act)
            if len(ia) == 0:
                break
            Yb, wb, nub, thrb, alb = Yc[ia], Wc[ia], nuc[ia], thrc[ia], alc[ia]
            lam_raw = nub[:, None] * (wb @ PT)
            clamped = lam_raw < thrb[:, None]
            _, d1, d2 = lik.derivatives(Yb, np.maximum(lam_raw, thrb[:, None]))
            d1[clamped] = 0.0
            d2[clamped] = 0.0
            grad = -nub[:, None] * (d1 @ P)
            H = -(nub**2)[:, None, None] * (d2 @ PP).reshape(-1, K, K)
            wnew, fc[ia], accepted, change = projected_newton_step(
                H,
                grad,
                wb,
                alb,
                fc[ia],
                lambda todo, wt, Yb=Yb, nub=nub, thrb=thrb: objective(Yb[todo], wt, nub[todo], thrb[todo]),
            )
            Wc[ia] = wnew
            itc[ia] += 1
            act[ia[(change < min_change) | ~accepted]] = False
        W[sl] = Wc
        nll[sl] = fc
        iters[sl] = itc
        conv[sl] = ~act
    return WeightFit(W, nll, iters, conv)


def projected_newton_step(
    H: np.ndarray,
    grad: np.ndarray,
    w: np.ndarray,
    allowed: np.ndarray,
    f0: np.ndarray,
    objective_at,
    max_halvings: int = 12,
):
    """One batched projected Newton step for non-negative weights, with Armijo backtracking per row.

    Parameters
    ----------
    H : numpy.ndarray
        ``(B, K, K)`` Hessians of the objective at ``w`` (made positive definite here).
    grad : numpy.ndarray
        ``(B, K)`` gradients at ``w``.
    w : numpy.ndarray
        ``(B, K)`` current weights.
    allowed : numpy.ndarray
        ``(B, K)`` types each row may use.
    f0 : numpy.ndarray
        ``(B,)`` objective at ``w``.
    objective_at : callable
        ``objective_at(rows, w_rows)`` evaluates the objective of the given rows at new weights.
    max_halvings : int, default 12
        Step halvings before a row's step is rejected.

    Returns
    -------
    w_new : numpy.ndarray
        ``(B, K)`` new weights (unchanged for rejected rows).
    f_new : numpy.ndarray
        ``(B,)`` objective at ``w_new``.
    accepted : numpy.ndarray
        ``(B,)`` whether a step was accepted.
    change : numpy.ndarray
        ``(B,)`` L2 norm of the weight change.
    """
    am = allowed[:, :, None] & allowed[:, None, :]
    H = _make_pd(np.where(am, H, np.eye(w.shape[1])))
    grad = np.where(allowed, grad, 0.0)
    cvec = np.einsum("bkl,bl->bk", H, w) - grad
    delta = nnqp(H, cvec, allowed) - w
    slope = (grad * delta).sum(1)
    step = np.ones(len(w))
    accepted = np.zeros(len(w), dtype=bool)
    fnew = f0.copy()
    for _ in range(max_halvings):
        todo = np.flatnonzero(~accepted)
        if len(todo) == 0:
            break
        wt = np.maximum(w[todo] + step[todo, None] * delta[todo], 0.0)
        ft = objective_at(todo, wt)
        ok = ft <= f0[todo] + 1e-4 * step[todo] * slope[todo] + 1e-10 * np.abs(f0[todo])
        accepted[todo[ok]] = True
        fnew[todo[ok]] = ft[ok]
        step[todo[~ok]] *= 0.5
    step = np.where(accepted, step, 0.0)
    wnew = np.maximum(w + step[:, None] * delta, 0.0)
    return wnew, np.where(accepted, fnew, f0), accepted, np.linalg.norm(wnew - w, axis=1)


# ------------------------------------------------------------------------------------------------ sigma
def choose_sigma(
    counts, prediction, sigma: float, seed: int = 0, max_entries: int = 250_000, window: int = 8
) -> tuple[float, dict]:
    """RCTD's ``chooseSigma``: the grid sigma near ``sigma`` minimising the negative log-likelihood of the counts.

    Each prediction is scaled by the best of 0.8..1.2. The grid (:data:`SIGMA_GRID`) is descended step by step
    from ``sigma`` within +-``window`` steps (same answer as RCTD's exhaustive window when the score is unimodal
    there, at 3 evaluations instead of 17 once sigma has settled). Entries are pooled, up to ``max_entries``
    sampled with ``seed`` (RCTD: 1,000,000; 250,000 pins sigma to its 0.01-0.02 grid step at a quarter of the
    cost).

    Parameters
    ----------
    counts : array-like
        Observed counts.
    prediction : array-like
        Predicted counts, same number of entries (floored at 1e-4).
    sigma : float
        Current sigma (start of the descent).
    seed : int, default 0
        Seed of the entry subsample.
    max_entries : int, default 250000
        Entries used at most.
    window : int, default 8
        Grid steps searched on either side.

    Returns
    -------
    sigma : float
        The chosen grid value.
    scores : dict of float to float
        Negative log-likelihood of every sigma evaluated.

    Raises
    ------
    CellTypingInputError
        If ``counts`` and ``prediction`` have different numbers of entries.
    """
    Y = _dense(counts).reshape(-1)
    X = np.maximum(_dense(prediction).reshape(-1), MIN_LAMBDA)
    if len(Y) != len(X):
        raise CellTypingInputError(f"prediction: expected the shape of counts ({len(Y)} entries), found {len(X)}")
    if len(Y) > max_entries:
        pick = np.random.default_rng(int(seed)).choice(len(Y), size=max_entries, replace=False)
        Y, X = Y[pick], X[pick]
    mults = np.array([0.8, 0.9, 1.0, 1.1, 1.2])
    si = int(np.argmin(np.abs(SIGMA_GRID - sigma)))
    lo, hi = max(0, si - window), min(len(SIGMA_GRID) - 1, si + window)
    scores: dict[float, float] = {}

    def score(i):
        s = float(SIGMA_GRID[i])
        if s not in scores:
            scores[s] = float(-get_likelihood(s).sum_logpmf_scaled(Y, X, mults, MIN_LAMBDA).max())
        return scores[s]

    i = si
    for direction in (-1, 1):
        while lo <= i + direction <= hi and score(i + direction) < score(i):
            i += direction
    return float(SIGMA_GRID[i]), scores


@dataclass
class SigmaFit:
    """Result of :func:`fit_sigma`.

    Attributes
    ----------
    sigma : float
        The chosen sigma.
    history : list of float
        Sigma after each epoch (starting value first).
    spots : numpy.ndarray
        Row indices of the spots used.
    weights : numpy.ndarray
        ``(len(spots), K)`` their weights at the last epoch.
    """

    sigma: float
    history: list
    spots: np.ndarray
    weights: np.ndarray


def fit_sigma(
    counts, numi, profiles, spots: np.ndarray, sigma0: float = 1.0, n_epochs: int = 8, seed: int = 0
) -> SigmaFit:
    """RCTD's ``choose_sigma_c``: alternate weight fits and :func:`choose_sigma` until sigma repeats.

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix
        Spots x genes counts on the informative genes.
    numi : numpy.ndarray
        ``(spots,)`` library sizes.
    profiles : numpy.ndarray
        ``(genes, K)`` platform-corrected profiles.
    spots : numpy.ndarray
        Row indices of the spots to fit on.
    sigma0 : float, default 1.0
        Starting sigma (snapped to the grid).
    n_epochs : int, default 8
        Maximum epochs.
    seed : int, default 0
        Seed of :func:`choose_sigma`'s subsample (plus the epoch).

    Returns
    -------
    SigmaFit
        The chosen sigma, its history, the spots and their weights.
    """
    Y = _dense(counts)[np.asarray(spots)]
    nu = np.asarray(numi, dtype=float)[spots]
    sigma = float(SIGMA_GRID[int(np.argmin(np.abs(SIGMA_GRID - sigma0)))])
    history = [sigma]
    W = None
    P = np.asarray(profiles, dtype=float)
    for epoch in range(n_epochs):
        fit = fit_spot_weights(Y, nu, P, sigma, init=W)
        W = fit.weights
        pred = nu[:, None] * (W @ P.T)
        new, _ = choose_sigma(Y, pred, sigma, seed=seed + epoch)
        history.append(new)
        if new == sigma:
            break
        sigma = new
    return SigmaFit(sigma, history, np.asarray(spots), W)
