"""Decomposition under an empirical mixture prior: each cell's profile is one of its type's reference clusters.

The proportional split of a spot among its typed cells is the posterior mean under a point-mass prior at each
type's mean. Here the prior of a type-t cell is a mixture over ``n_components`` clusters of the type's reference
cells (k-means on log1p normalised expression; component profile = the cluster's mean expression). The spot's
raw counts are multinomial over genes with proportions ``sum_c profile_c`` (platform effect divided out), so the
responsibility of cluster k for cell c compares how well ``profile_k + (the other cells' current means)`` explains
the spot. Mean-field coordinate updates, damped and run for all cells of all spots at once (cells x components x
genes tensors, chunked). Shares: each observed gene of a spot is split among its cells in proportion to their
posterior-mean profiles (the spot sum is kept exactly); hidden genes (left out / missing from an imaging panel)
are the posterior-mean profiles scaled to the spot, i.e. a responsibility-weighted average of reference clusters.

Uncertainty: ``replicate_spread`` is the posterior standard deviation of the cell's log1p profile (mean over
genes), computed from the responsibilities.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from ..params import DecompositionParams
from ..progress import Progress
from ._inputs import hidden_genes


@dataclass
class MixturePrior:
    """Per-type reference clusters on a model's gene axis.

    ``profiles``: (K, G) mean normalised expression (not log) of each cluster, in the model's ``target_sum``
    scale; ``type_idx``: (K,) row of the cluster's type in ``cell_types``; ``log_weights``: (K,) log of the
    cluster's share of its type's reference cells.

    Attributes
    ----------
    genes : list of str
        The model's genes (the gene axis of ``profiles``).
    cell_types : list of str
        The model's cell types.
    profiles : numpy.ndarray
        (K, G) mean normalised expression (not log) of each cluster, in the model's ``target_sum`` scale.
    type_idx : numpy.ndarray
        (K,) row of each cluster's type in ``cell_types``.
    log_weights : numpy.ndarray
        (K,) log of each cluster's share of its type's reference cells.
    info : dict
        Summary of the fit.
    library : numpy.ndarray or None
        (K,) mean library size (raw counts over all genes) of each cluster's reference cells relative to the
        reference's mean; None when the reference held log1p data (no library sizes).
    """

    genes: list[str]
    cell_types: list[str]
    profiles: np.ndarray
    type_idx: np.ndarray
    log_weights: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    library: np.ndarray | None = None


def _kmeans(x: np.ndarray, k: int, seed: int, n_iter: int = 30) -> np.ndarray:
    """Labels of a seeded k-means (k-means++ init) of the rows of ``x``; k is capped by the number of rows."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(x)))
    if k <= 1:
        return np.zeros(len(x), np.int64)
    return KMeans(n_clusters=k, n_init=1, max_iter=n_iter, random_state=seed).fit_predict(x).astype(np.int64)


def fit_mixture_prior(
    reference: ad.AnnData,
    model,
    cell_type_key: str | None = None,
    *,
    n_components: int = 16,
    min_cells_per_component: int = 10,
    seed: int = 0,
) -> MixturePrior:
    """Cluster each type's reference cells (k-means on log1p of counts normalised to ``model.target_sum``).

    Parameters
    ----------
    reference : AnnData
        Reference cells x genes, raw counts (or normalised), with ``obs[cell_type_key]``.
    model
        A score model (or :class:`~spatial_assets.generative.GaussianScoreModel`): its ``genes``, ``cell_types``,
        ``target_sum`` and ``cell_type_key`` define the axes and scale.
    cell_type_key : str, optional
        Reference column of the types; default the model's ``cell_type_key``.
    n_components : int
        Clusters per type (at most one per ``min_cells_per_component`` cells of the type; 1 = the type mean,
        which makes the decomposition the proportional split).
    min_cells_per_component : int
        Minimum reference cells per cluster on average.
    seed : int
        Seed of k-means.

    Returns
    -------
    MixturePrior

    Raises
    ------
    ValueError
        If the column is missing, the reference lacks model genes, or a model type has no reference cell.
    """
    from ..generative._data import log_normalise

    key = cell_type_key or getattr(model, "cell_type_key", "cell_type")
    if key not in reference.obs:
        raise ValueError(f"reference.obs has no column '{key}' (columns: {list(reference.obs)})")
    if n_components < 1:
        raise ValueError(f"n_components: expected >= 1, got {n_components}")
    genes = list(model.genes)
    types = list(model.cell_types)
    labels = reference.obs[key].astype(str).to_numpy()
    absent = [t for t in types if not (labels == t).any()]
    if absent:
        raise ValueError(f"reference.obs['{key}']: model types without reference cells: {absent[:10]}")
    target_sum = float(getattr(model, "target_sum", None) or model.ref_library_size)
    logx = log_normalise(reference, genes, target_sum)  # (N, G) float32
    from ..generative._data import LOG_INPUT_MAX

    X = reference.X
    xmax = float(X.max()) if X.shape[0] and X.shape[1] else 0.0
    libs = np.asarray(X.sum(1), dtype=np.float64).ravel() if xmax >= LOG_INPUT_MAX else None
    profiles, tidx, logw, clib = [], [], [], []
    for t, name in enumerate(types):  # one k-means per type (tens of types), not a per-cell loop
        rows = np.flatnonzero(labels == name)
        k = max(1, min(n_components, len(rows) // max(min_cells_per_component, 1)))
        lab = _kmeans(logx[rows], k, seed + t)
        onehot = sp.csr_matrix((np.ones(len(rows)), (lab, np.arange(len(rows)))), shape=(lab.max() + 1, len(rows)))
        cnt = np.asarray(onehot.sum(1)).ravel()
        keep = cnt > 0
        prof = (onehot @ np.expm1(logx[rows].astype(np.float64))) / np.maximum(cnt, 1)[:, None]
        profiles.append(prof[keep])
        tidx.append(np.full(int(keep.sum()), t, np.int64))
        logw.append(np.log(cnt[keep] / cnt.sum()))
        if libs is not None:
            clib.append(((onehot @ libs[rows]) / np.maximum(cnt, 1))[keep] / max(libs.mean(), 1e-30))
    P = np.concatenate(profiles).astype(np.float32)
    return MixturePrior(
        genes,
        types,
        P,
        np.concatenate(tidx),
        np.concatenate(logw),
        info={
            "n_components": int(n_components),
            "components_total": int(len(P)),
            "target_sum": target_sum,
            "seed": int(seed),
            "cell_type_key": key,
        },
        library=np.concatenate(clib) if libs is not None else None,
    )


def mixture_posterior(
    raw: torch.Tensor,
    seg: torch.Tensor,
    n_seg: int,
    cand: torch.Tensor,
    cand_logw: torch.Tensor,
    *,
    n_iter: int = 30,
    damping: float = 0.5,
    temperature: float = 1.0,
    size_factors: bool = True,
    size_shrink: float = 0.0,
    spot_values: torch.Tensor | None = None,
    batch_rows: int = 2_000_000,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-field responsibilities of every cell's candidate components given its spot's counts (all batched).

    Parameters
    ----------
    raw : Tensor (S, G)
        Spot counts on the genes of the likelihood (weights of the multinomial log-likelihood).
    seg : Tensor (C,)
        Spot row of each cell.
    n_seg : int
        Number of spots S.
    cand : Tensor (C, K, G)
        Candidate profiles per cell (expression scale, positive; padded candidates have ``cand_logw = -inf``).
    cand_logw : Tensor (C, K)
        Log prior weight of each candidate.
    n_iter, damping, temperature : int, float, float
        Coordinate rounds, the share of the new responsibilities taken each round, and the exponent of the
        likelihood (< 1 tempers it for overdispersed counts).
    size_factors : bool
        Fit a size factor per cell (its library relative to the reference's), by multiplicative Poisson updates
        (``s_c <- s_c * sum_g m_cg y_sg / lambda_sg / sum_g m_cg``) alternating with the responsibilities.
    size_shrink : float
        Shrinkage of log size factors towards 0 after each update, in [0, 1) (0 = none).
    spot_values : Tensor (S, G), optional
        The spots on the candidates' gene scale for the size updates (default ``raw``).
    batch_rows : int
        Cells x candidates per chunk (bounds memory: chunk x G floats).
    log : callable, optional
        Receives progress lines (rounds done / total, time left) at most every 10 s and at the end.

    Returns
    -------
    resp : Tensor (C, K)
        Responsibilities (rows sum to 1).
    mean : Tensor (C, G)
        Posterior-mean profile of each cell (reference library).
    size : Tensor (C,)
        Size factor of each cell (ones when ``size_factors`` is False).
    """
    C, K, G = cand.shape
    resp = torch.softmax(cand_logw, 1)
    chunk = max(1, min(C, int(batch_rows // max(K, 1))))
    tot = raw.sum(1)
    size = torch.ones(C, dtype=cand.dtype)
    ymat = raw if spot_values is None else spot_values
    ytot = ymat.sum(1)
    prog = Progress(int(n_iter), f"mixture posterior rounds ({C} cells x {K} components)", log)
    for _ in range(n_iter):
        mean = torch.einsum("ck,ckg->cg", resp, cand)
        sm = size[:, None] * mean
        lam = torch.zeros(n_seg, G, dtype=cand.dtype).index_add_(0, seg, sm)
        if size_factors:
            # Poisson / KL multiplicative update (spot counts y over the cells' scaled means)
            ratio = (ymat / lam.clamp_min(1e-12)) * (lam.sum(1, keepdim=True) / ytot.clamp_min(1e-12)[:, None])
            u = (mean * ratio[seg]).sum(1) / mean.sum(1).clamp_min(1e-12)
            size = (size * u).clamp(1e-2, 1e2)
            if size_shrink > 0:
                size = size.log().mul_(1 - size_shrink).exp_()
            sm = size[:, None] * mean
            lam = torch.zeros(n_seg, G, dtype=cand.dtype).index_add_(0, seg, sm)
        new = torch.empty_like(resp)
        for a in range(0, C, chunk):
            b = min(C, a + chunk)
            rest = (lam[seg[a:b]] - sm[a:b]).clamp_min_(0)  # (c, G) the other cells of the spot
            mix = rest[:, None, :] + size[a:b, None, None] * cand[a:b]  # (c, K, G)
            # multinomial log-likelihood of the spot's counts over genes: sum_g y_g log(mix_g / sum mix)
            ll = (raw[seg[a:b]][:, None, :] * mix.log()).sum(-1) - tot[seg[a:b]][:, None] * mix.sum(-1).log()
            new[a:b] = torch.softmax(cand_logw[a:b] + temperature * ll, 1)
        resp = (1 - damping) * resp + damping * new
        prog.update()
    mean = torch.einsum("ck,ckg->cg", resp, cand)
    return resp, mean, size


def neighbour_mean(xy: np.ndarray, type_idx: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``values`` over each cell's ``k`` nearest other cells of the same type (its own row if alone).

    Parameters
    ----------
    xy : ndarray (C, 2)
        Cell positions.
    type_idx : ndarray (C,)
        Type of each cell.
    values : ndarray (C, K)
        Per-cell rows to average.
    k : int
        Neighbours per cell.

    Returns
    -------
    ndarray (C, K)
    """
    from scipy.spatial import cKDTree

    out = values.copy()
    for t in np.unique(type_idx):  # one tree per type (tens), queries vectorised over the type's cells
        rows = np.flatnonzero(type_idx == t)
        kk = min(k, len(rows) - 1)
        if kk < 1:
            continue
        _, nb = cKDTree(xy[rows]).query(xy[rows], k=kk + 1)
        out[rows] = values[rows[nb[:, 1:]]].mean(1)
    return out


def binomial_log1p_moments(
    y: np.ndarray, w: np.ndarray, k: np.ndarray, max_exact: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``log1p(k t)`` for ``t ~ Binomial(y, w)``, elementwise.

    Parameters
    ----------
    y : ndarray
        Counts (rounded to integers).
    w : ndarray
        Success probabilities (clipped to [0, 1]).
    k : ndarray
        Scale of ``t`` (raw molecules to the reference scale).
    max_exact : int
        Counts up to this are summed exactly over the binomial's support (``max_exact + 1`` vectorised passes);
        larger ones use the second-order delta method.

    Returns
    -------
    mean, var : ndarray
        Same shape as ``y``.
    """
    from scipy.stats import binom

    y = np.rint(np.clip(y, 0, None)).astype(np.int64)
    w = np.clip(w, 0.0, 1.0)
    k = np.broadcast_to(k, y.shape)
    mu, var_t = y * w, y * w * (1 - w)
    m_big = np.log1p(k * mu) - k**2 * var_t / (2 * (1 + k * mu) ** 2)
    v_big = k**2 * var_t / (1 + k * mu) ** 2
    small = y <= max_exact
    m1 = np.zeros(y.shape)
    m2 = np.zeros(y.shape)
    top = int(min(max_exact, y.max(initial=0)))
    ys, ws, ks = np.where(small, y, 0), np.where(small, w, 0), np.where(small, k, 0)
    for j in range(1, top + 1):  # over the support (<= max_exact + 1 values), vectorised over cells x genes
        pj = binom.pmf(j, ys, ws)
        lj = np.log1p(ks * j)
        m1 += pj * lj
        m2 += pj * lj * lj
    mean = np.where(small, m1, m_big)
    var = np.where(small, m2 - m1**2, v_big)
    return mean, np.clip(var, 0, None)


def mixture_profiles(
    inputs,
    model,
    prior: MixturePrior,
    params: DecompositionParams,
    observed: np.ndarray,
    target: np.ndarray,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, dict]:
    """Each cell's posterior-mean profile under the mixture prior, before the exact split of its spot.

    Parameters
    ----------
    inputs : DecompositionInput
        From :func:`prepare_spots` with the same ``model``.
    model
        The score model (or Gaussian stand-in) the prior was fitted on.
    prior : MixturePrior
        From :func:`fit_mixture_prior`.
    params : DecompositionParams
        The mixture's settings.
    observed : ndarray of bool (G,)
        Genes of the likelihood (in the slide, not hidden).
    target : ndarray (S, G)
        The spots in the decomposition's scale (``n_cells x`` the reference library on the observed genes).
    log : callable, optional
        Progress messages.

    Returns
    -------
    mean : ndarray (C, G)
        ``size x`` posterior-mean profile of each cell (decomposition scale; spot sums approximate the spot).
    spread : ndarray (C,)
        Posterior sd of the log1p profile over the clusters (mean over genes).
    resp : Tensor (C, K)
        Responsibilities over the cell's type's clusters (padded).
    size : Tensor (C,)
        Size factors.
    extra : dict
        Summary entries for the run's info.
    """
    extra: dict[str, Any] = {}
    S = inputs.n_spots
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    type_idx = inputs.cells["type_idx"].to_numpy(np.int64)

    # candidates per type, padded to the largest type: (T, Kmax, G)
    T = len(model.cell_types)
    kt = np.bincount(prior.type_idx, minlength=T)
    kmax = int(kt.max())
    order = np.argsort(prior.type_idx, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.concatenate([[0], np.cumsum(kt)[:-1]]), kt)
    P = torch.as_tensor(prior.profiles, dtype=torch.float32)
    # profiles on observed genes normalised to the reference library there, so every candidate has the same total
    obs_t = torch.as_tensor(observed)
    eps = 1e-3 * float(P[:, obs_t].sum(1).mean()) / max(int(observed.sum()), 1)
    Pn = P + eps
    Pn = (
        Pn
        / Pn[:, obs_t].sum(1, keepdim=True)
        * float(target[:, observed].sum(1).mean() / np.mean(inputs.spots["n_cells"]))
    )
    if params.mixture_library_prior and prior.library is not None:
        # the clusters' relative reference library sizes as the prior scale of a cell's expression
        Pn = Pn * torch.as_tensor(prior.library, dtype=torch.float32)[:, None]
        extra["mixture_library_prior"] = True
    cand_t = torch.ones(T, kmax, len(inputs.genes))  # padding: positive (finite logs), excluded by log weight -inf
    logw_t = torch.full((T, kmax), -torch.inf)
    cand_t[prior.type_idx[order], slot] = Pn[order]
    logw_t[prior.type_idx[order], slot] = torch.as_tensor(prior.log_weights[order], dtype=torch.float32)
    # likelihood weights: the spot's counts on observed genes (platform effect back in = raw counts)
    raw = torch.as_tensor(inputs.counts[:, observed] * inputs.platform_effect[observed], dtype=torch.float32)
    ti = torch.as_tensor(type_idx)

    def posterior(logw: torch.Tensor):
        return mixture_posterior(
            raw,
            torch.as_tensor(spot_idx),
            S,
            cand_t[ti][:, :, obs_t],
            logw,
            n_iter=params.mixture_iterations,
            damping=params.mixture_damping,
            temperature=params.mixture_temperature,
            size_factors=params.mixture_size_factors,
            size_shrink=params.mixture_size_shrink,
            spot_values=torch.as_tensor(inputs.counts[:, observed], dtype=torch.float32),
            batch_rows=params.batch_cells,
            log=log,
        )

    resp, _, size = posterior(logw_t[ti])
    k_nb = int(params.mixture_spatial_neighbours)
    xy = inputs.cells[["x", "y"]].to_numpy(float)
    if k_nb > 0 and np.isfinite(xy).all():
        # spatial empirical prior: the responsibilities of the nearest cells of the same type (not the cell itself)
        q = neighbour_mean(xy, type_idx, resp.numpy(), k_nb)
        a = float(params.mixture_spatial_weight)
        prior_w = (1 - a) * torch.softmax(logw_t[ti], 1) + a * torch.as_tensor(q, dtype=torch.float32)
        resp, _, size = posterior(prior_w.clamp_min(1e-12).log().masked_fill(~torch.isfinite(logw_t[ti]), -torch.inf))
        extra["mixture_spatial_neighbours"] = k_nb
    cand_all = cand_t[ti]  # (C, K, G)
    mean = (torch.einsum("ck,ckg->cg", resp, cand_all) * size[:, None]).double().numpy()
    logc = torch.log1p(cand_all)
    lm = torch.einsum("ck,ckg->cg", resp, logc)
    var = torch.einsum("ck,ckg->cg", resp, (logc - lm[:, None, :]) ** 2)
    spread = var.clamp_min(0).sqrt().mean(1).double().numpy()
    del cand_all, logc

    return mean, spread, resp, size, extra


def decompose_mixture(
    inputs,
    model,
    prior: MixturePrior,
    params: DecompositionParams | None = None,
    log: Callable[[str], None] | None = None,
):
    """Decompose every spot of ``inputs`` under the mixture prior (see the module docstring).

    Parameters
    ----------
    inputs : DecompositionInput
        From :func:`prepare_spots` with the same ``model``.
    model
        The score model (or Gaussian stand-in) whose gene axis, types and scale ``prior`` was fitted on.
    prior : MixturePrior
        From :func:`fit_mixture_prior`.
    params : DecompositionParams, optional
        ``mixture_iterations``, ``mixture_damping``, ``mixture_temperature``, ``leave_out_genes``,
        ``batch_cells`` are used.
    log : callable, optional
        Progress messages.

    Returns
    -------
    DecompositionResult
        As :func:`decompose`: X = the cells' shares (reference scale; observed genes sum exactly to the spot),
        ``layers['log1p_posterior']`` = the posterior mean of log1p expression (the binomial allocation of the
        spot's molecules by the shares; the estimate to use for log-scale comparisons),
        ``obs['replicate_spread']`` = posterior sd of the log1p profile (clusters and allocation, mean over genes).

    Raises
    ------
    ValueError
        If the prior's genes or types differ from the model's, or every gene is left out.
    """
    from ._decompose import _empty_result, _finish

    params = params or DecompositionParams()
    if list(prior.genes) != list(inputs.genes) or list(prior.cell_types) != list(model.cell_types):
        raise ValueError(
            "mixture prior: its genes / cell types differ from the score model's; fit it with the same model "
            f"(prior {len(prior.genes)} genes, {len(prior.cell_types)} types; model {len(inputs.genes)} genes, "
            f"{len(model.cell_types)} types)"
        )
    genes, leave_out, hidden = hidden_genes(inputs, params.leave_out_genes)
    info: dict[str, Any] = dict(inputs.info)
    info.update(
        estimator="mixture",
        leave_out_genes=leave_out,
        seed=int(params.seed),
        mixture_components=int(prior.info.get("n_components", 0)),
        mixture_components_total=int(len(prior.profiles)),
        mixture_iterations=int(params.mixture_iterations),
        mixture_damping=float(params.mixture_damping),
        mixture_temperature=float(params.mixture_temperature),
        replicates=1,
    )
    if inputs.n_cells == 0:
        info.setdefault("empty_reason", "no cells to decompose")
        info.update(cells=0, spots=0, non_finite_cells=[], retry_rounds=0)
        return _empty_result(inputs, info)
    observed = inputs.in_slide & ~hidden
    if not observed.any():
        raise ValueError("leave_out_genes: every shared gene is left out; at least one must constrain the spots")
    t0, c0 = time.perf_counter(), time.process_time()
    from ._inputs import _targets

    target, spot_scale, _ = _targets(inputs, model, hidden)
    S, C = inputs.n_spots, inputs.n_cells
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    mean, spread, resp, size, extra = mixture_profiles(inputs, model, prior, params, observed, target, log=log)
    info.update(extra)

    # exact split of observed genes by the posterior means; hidden genes: the means scaled to the spot
    from ._decompose import _segment_matrix

    M = _segment_matrix(spot_idx, S)
    ssum = M @ mean
    with np.errstate(invalid="ignore", divide="ignore"):
        share = mean / np.where(ssum > 0, ssum, 1)[spot_idx]
    n = inputs.spots["n_cells"].to_numpy(float)
    share = np.where(ssum[spot_idx] > 0, share, 1.0 / n[spot_idx, None])
    tot = ssum[:, observed].sum(1)
    factor = target[:, observed].sum(1) / np.where(tot > 0, tot, 1)
    out = mean * factor[spot_idx, None]
    out[:, observed] = (share * target[spot_idx])[:, observed]
    # allocation uncertainty: a cell's molecules of gene g ~ Binomial(spot's raw count, its share)
    raw_all = inputs.counts * inputs.platform_effect
    k = spot_scale[:, None] / np.where(inputs.platform_effect > 0, inputs.platform_effect, 1)[None, :]
    lmean, lvar = binomial_log1p_moments(raw_all[spot_idx][:, observed], share[:, observed], k[spot_idx][:, observed])
    log_post = np.log1p(np.clip(out, 0, None))
    log_post[:, observed] = lmean
    alloc_sd = np.sqrt(np.clip(lvar, 0, None)).mean(1)
    spread = np.sqrt(spread**2 + alloc_sd**2)
    info["mixture_size_factor_cv"] = float(size.std() / size.mean())
    info["mixture_entropy_median"] = float(np.median(-(resp.clamp_min(1e-30).log() * resp).sum(1).numpy()))
    return _finish(
        inputs,
        out,
        spread,
        target,
        spot_scale,
        observed,
        hidden,
        info,
        np.zeros(C, np.int64),
        np.ones(C, np.int64),
        time.perf_counter() - t0,
        time.process_time() - c0,
        log,
        layers={"log1p_posterior": log_post.astype(np.float32)},
    )
