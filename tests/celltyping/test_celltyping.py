"""Cell typing (RCTD full mode + Potts labels): likelihood, solvers, accuracy on simulated slides, bad input."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import integrate
from scipy.optimize import brentq, nnls
from scipy.special import gammaln

from spatial_assets import pl as _pl
from spatial_assets.celltyping import (
    CellTypingInputError,
    PoissonLognormal,
    choose_sigma,
    colour_spots,
    fit_platform_effect,
    fit_sigma,
    fit_spot_weights,
    identify_cell_types,
    knn_graph,
    nnqp,
    potts_labels,
    reference_profiles,
)
from spatial_assets.constants import UNASSIGNED
from spatial_assets.datasets import data_path, simulate_slide
from spatial_assets.params import CellTypingParams
from tests.helpers import png_of

cell_types_png = png_of(_pl.cell_types)
spot_proportions_png = png_of(_pl.spot_proportions)

MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")
KEY = "cell_class"


@pytest.fixture(scope="module")
def mop_halves():
    """The MOp scRNA reference split at random into a reference half and a pool of cells to build spots from."""
    ref = ad.read_h5ad(MOP)
    ref.obs[KEY] = ref.obs[KEY].astype(str)
    half = np.random.default_rng(0).random(ref.n_obs) < 0.5
    return ref[half].copy(), ref[~half].copy()


@pytest.fixture(scope="module")
def mop_profiles(mop_halves):
    ref, _ = mop_halves
    types = sorted(ref.obs[KEY].unique())
    codes = pd.Categorical(ref.obs[KEY], categories=types).codes
    return reference_profiles(ref.X, codes, types), types


@pytest.fixture(scope="module")
def coherent_run(mop_halves):
    """A 160-spot slide with spatially coherent types (40 Voronoi domains of one type each, so ~1/4 of the spots
    straddle a border), typed end to end."""
    ref, pool = mop_halves
    slide, cells, props, f = simulate_slide(
        pool, KEY, 160, mean_cells=4, dominant=1.0, platform_sd=0.3, seed=3, n_domains=40
    )
    res = identify_cell_types(slide, ref, KEY, cells[["x", "y", "spot"]], CellTypingParams(seed=5))
    return slide, cells, props, f, res


# ------------------------------------------------------------------------------------------------ likelihood
def _numerical_logp(y, lam, s):
    """log of int Poisson(y | lam e^e) N(e; 0, s^2) de by adaptive quadrature around the integrand's mode."""

    def g(e):
        return (
            y * (math.log(lam) + e)
            - lam * math.exp(e)
            - gammaln(y + 1)
            - e * e / (2 * s * s)
            - math.log(s * math.sqrt(2 * math.pi))
        )

    m = brentq(lambda e: y - lam * math.exp(e) - e / (s * s), -60, 60)
    sd = 1 / math.sqrt(lam * math.exp(m) + 1 / s**2)
    v, _ = integrate.quad(
        lambda e: math.exp(g(e) - g(m)), m - 40 * sd, m + 40 * sd, points=[m], limit=400, epsabs=0, epsrel=1e-12
    )
    return math.log(v) + g(m)


@pytest.mark.parametrize("sigma", [0.15, 0.6, 1.3])
def test_likelihood_matches_numerical_integration(sigma):
    lik = PoissonLognormal(sigma)
    ys = np.array([0, 1, 3, 12, 60, 254, 400, 2000], dtype=float)  # table rows and direct (> 255) entries
    lams = np.array([1e-3, 0.2, 1.0, 4.5, 37.0, 300.0, 2500.0])
    Y, L = np.meshgrid(ys, lams, indexing="ij")
    got = lik.logpmf(Y, L)
    want = np.vectorize(_numerical_logp)(Y, L, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=2e-6)


def test_likelihood_derivatives_match_finite_differences():
    lik = PoissonLognormal(0.7)
    y = np.array([0.0, 1, 3, 10, 50, 200, 1500])
    lam = np.array([0.05, 2.0, 3.3, 8.0, 60.0, 150.0, 1700.0])
    _, d1, d2 = lik.derivatives(y, lam)
    h = 1e-4 * lam
    fd1 = (np.vectorize(_numerical_logp)(y, lam + h, 0.7) - np.vectorize(_numerical_logp)(y, lam - h, 0.7)) / (2 * h)
    np.testing.assert_allclose(d1, fd1, rtol=1e-5, atol=1e-8)
    _, d1p, _ = lik.derivatives(y, lam + h)
    _, d1m, _ = lik.derivatives(y, lam - h)
    np.testing.assert_allclose(d2, (d1p - d1m) / (2 * h), rtol=1e-4, atol=1e-9)


def test_likelihood_is_a_distribution_with_the_lognormal_mean():
    lik = PoissonLognormal(0.5)
    y = np.arange(0, 600, dtype=float)
    p = np.exp(lik.logpmf(y, np.full_like(y, 20.0)))
    assert p.sum() == pytest.approx(1.0, abs=1e-8)
    # E[y] = lam E[e^eps] = lam exp(sigma^2 / 2)
    assert (p * y).sum() == pytest.approx(20.0 * math.exp(0.125), rel=1e-6)


# ------------------------------------------------------------------------------------------------ solvers
def test_nnqp_matches_scipy_nnls():
    rng = np.random.default_rng(1)
    B, K, G = 200, 9, 30
    A = rng.normal(size=(B, G, K))
    b = rng.normal(size=(B, G))
    z = nnqp(np.einsum("bgk,bgl->bkl", A, A), np.einsum("bgk,bg->bk", A, b))
    want = np.array([nnls(A[i], b[i])[0] for i in range(B)])
    np.testing.assert_allclose(z, want, atol=1e-9)
    assert (want == 0).any(1).mean() > 0.5  # the constraints were active in most problems


def _model_counts(P, W, numi, sigma, rng):
    lam = numi[:, None] * (W @ P.T) * np.exp(rng.normal(0, sigma, (len(W), P.shape[0])))
    return rng.poisson(lam).astype(float)


def test_fit_spot_weights_recovers_known_weights(mop_profiles):
    P, types = mop_profiles
    rng = np.random.default_rng(2)
    B, K = 300, P.shape[1]
    W = np.zeros((B, K))
    for_k = rng.integers(0, K, (B, 2))
    W[np.arange(B), for_k[:, 0]] += 0.7
    W[np.arange(B), for_k[:, 1]] += 0.3
    numi = rng.uniform(1500, 4000, B)
    Y = _model_counts(P, W, numi, 0.4, rng)
    fit = fit_spot_weights(Y, numi, P, 0.4)
    assert fit.converged.all()
    assert np.sqrt(((fit.weights - W) ** 2).mean()) < 0.03
    assert (fit.weights.argmax(1) == W.argmax(1)).mean() > 0.95
    # restricted to a given type set per spot (doublet mode): weights elsewhere are exactly 0, and equal the
    # fit on the sub-matrix of profiles
    allowed = np.zeros((B, K), bool)
    allowed[np.arange(B), for_k[:, 0]] = True
    allowed[np.arange(B), (for_k[:, 0] + 1) % K] = True
    r = fit_spot_weights(Y, numi, P, 0.4, allowed_types_mask=allowed)
    assert (r.weights[~allowed] == 0).all()
    sub = fit_spot_weights(Y[:5], numi[:5], P[:, [for_k[0, 0], (for_k[0, 0] + 1) % K]], 0.4)
    np.testing.assert_allclose(r.weights[0, [for_k[0, 0], (for_k[0, 0] + 1) % K]], sub.weights[0], atol=1e-3)


def test_fit_sigma_recovers_the_noise_level(mop_profiles):
    P, _ = mop_profiles
    rng = np.random.default_rng(4)
    B, K = 250, P.shape[1]
    W = rng.dirichlet(np.full(K, 0.3), B)
    numi = rng.uniform(1000, 3000, B)
    Y = _model_counts(P, W, numi, 0.8, rng)
    sf = fit_sigma(Y, numi, P, np.arange(B))  # starts at RCTD's 1.0
    assert sf.history[0] == 1.0
    assert abs(sf.sigma - 0.8) <= 0.06
    # the score of choose_sigma is minimal at the truth when predictions are exact
    s, scores = choose_sigma(Y, numi[:, None] * (W @ P.T), 0.8)
    assert abs(s - 0.8) <= 0.04 and min(scores, key=scores.get) == s


def test_platform_effect_recovers_injected_gene_scaling(mop_profiles):
    """Counts drawn from the model with a known gene-wise factor: the bulk ratio recovers it up to a global scale."""
    P, types = mop_profiles
    rng = np.random.default_rng(3)
    B, G = 400, P.shape[0]
    genes = pd.Index([f"g{i}" for i in range(G)])
    W = rng.dirichlet(np.full(len(types), 0.5), B)
    numi = rng.uniform(1000, 3000, B)
    f = np.exp(rng.normal(0, 0.5, G))
    Y = rng.poisson(numi[:, None] * (W @ P.T) * f).astype(float)
    ok = (P.max(1) > 2e-4) & (Y.sum(0) >= 20)
    pe = fit_platform_effect(Y, genes, pd.DataFrame(P, index=genes, columns=types), genes[ok], 200.0, slide_umi=numi)
    est, true = np.log(pe.ratio.to_numpy()[ok]), np.log(f[ok])
    est, true = est - est.mean(), true - true.mean()
    assert np.corrcoef(est, true)[0, 1] > 0.95
    assert np.sqrt(((est - true) ** 2).mean()) < 0.15  # injected sd 0.5
    assert pe.estimated_be.name == "estimated_be"
    np.testing.assert_allclose((pe.estimated_be / pe.ratio).dropna(), numi.mean() / 200.0)


def test_platform_effect_on_real_cells(mop_halves, mop_profiles):
    """Spots summing real held-out cells (profile sampling noise and library-size differences between types
    included): the injected effect is still recovered, less tightly."""
    ref, pool = mop_halves
    P, types = mop_profiles
    slide, _, _, f = simulate_slide(pool, KEY, 400, mean_cells=5, platform_sd=0.5, seed=7)
    genes = slide.var_names
    ok = (P.max(1) > 2e-4) & (np.asarray(slide.X.sum(0)).ravel() >= 20)
    pe = fit_platform_effect(slide.X, genes, pd.DataFrame(P, index=ref.var_names, columns=types), genes[ok], 200.0)
    est, true = np.log(pe.ratio.to_numpy()[ok]), np.log(f.to_numpy()[ok])
    est, true = est - est.mean(), true - true.mean()
    assert np.corrcoef(est, true)[0, 1] > 0.8
    assert np.sqrt(((est - true) ** 2).mean()) < 0.35


# ------------------------------------------------------------------------------------------------ graphs
def test_knn_graph_and_colour_classes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (400, 2))
    A = knn_graph(xy, 6)
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
    assert (np.asarray(A.sum(1)).ravel() >= 6).all()
    spot = rng.integers(0, 60, 400)
    colour = colour_spots(A, spot, 60, seed=1)
    coo = A.tocoo()
    a, b = spot[coo.row], spot[coo.col]
    diff = a != b
    assert (colour >= 0).all()
    assert (colour[a[diff]] != colour[b[diff]]).all()  # no two touching spots share a colour


# ------------------------------------------------------------------------------------------------ end to end
def test_simulated_slide_accuracy_and_potts_gain(coherent_run):
    slide, cells, props, f, res = coherent_run
    truth = cells["true_type"]
    acc = (res.cells["cell_type"] == truth).mean()
    base = (res.cells["initial_type"] == truth).mean()
    W = res.weights.reindex(columns=props.columns, fill_value=0.0).loc[props.index]
    rmse = float(np.sqrt(((W - props) ** 2).to_numpy().mean()))
    assert rmse < 0.06
    assert acc > 0.9
    assert acc > base + 0.03  # Potts step beats "every cell = its spot's top type" on coherent tissue
    np.testing.assert_allclose(res.weights.sum(1), 1.0)
    assert res.cells["confidence"].between(0, 1).all()
    # confident labels are more often right than unconfident ones
    right = res.cells["cell_type"] == truth
    conf = res.cells["confidence"]
    assert right[conf > 0.9].mean() >= right[conf <= 0.9].mean()


def test_result_contract(coherent_run):
    slide, cells, props, f, res = coherent_run
    assert list(res.cells.index) == list(cells.index)
    for col in ("x", "y", "spot", "cell_type", "confidence", "initial_type"):
        assert col in res.cells.columns
    assert res.platform_effect.name == "estimated_be"
    assert list(res.platform_effect.index) == list(slide.var_names)
    assert set(res.genes_used) <= set(slide.var_names)
    assert list(res.profiles.columns) == list(res.weights.columns) == list(res.weights_raw.columns)
    np.testing.assert_allclose(res.profiles.sum(0), 1.0, atol=1e-9)  # per-cell normalised means sum to 1
    info = res.info
    assert info["seed"] == 5 and info["potts"]["seed"] == 5
    assert info["n_spots_fitted"] == 160 and info["skipped_spots"] == {}
    assert len(info["potts"]["labels_changed_per_sweep"]) == info["potts"]["sweeps"] <= 8
    assert res.sigma == info["potts"]["sigma_per_sweep"][-1]
    json.dumps(info)  # plain types only (goes into asset metadata)


def test_same_seed_same_labels_and_log1p_reference_equivalent(mop_halves):
    ref, pool = mop_halves
    slide, cells, _, _ = simulate_slide(pool, KEY, 40, mean_cells=3, dominant=1.0, seed=11)
    c = cells[["x", "y", "spot"]]
    p = CellTypingParams(max_sweeps=3)
    a = identify_cell_types(slide, ref, KEY, c, p)
    b = identify_cell_types(slide, ref, KEY, c, p)
    pd.testing.assert_frame_equal(a.cells, b.cells)
    logref = ref.copy()
    logref.X = sp.csr_matrix(logref.X, dtype=np.float64).log1p()
    d = identify_cell_types(slide, logref, KEY, c, p)
    assert d.info["reference"]["log1p_input"] is True
    pd.testing.assert_frame_equal(a.profiles, d.profiles, atol=1e-9)
    pd.testing.assert_frame_equal(a.weights, d.weights, atol=1e-6)


def test_potts_prefers_spatially_consistent_arrangement():
    """Two types, spots of 2 cells, left half type 0 and right half type 1: a border spot with one cell on each
    side must be labelled by side, which only the Potts prior can decide (the likelihood sees the sum)."""
    rng = np.random.default_rng(0)
    G = 40
    P = np.abs(rng.normal(1.0, 0.5, (G, 2)))
    P[: G // 2, 0] *= 4
    P[G // 2 :, 1] *= 4
    P /= P.sum(0)
    xs = np.arange(10) * 10.0
    spots_x = np.repeat(xs, 2)
    cell_x = spots_x + np.tile([-2.0, 2.0], 10)
    cell_xy = np.stack([cell_x, np.zeros(20)], 1)
    true = (cell_x > 45).astype(int)
    cell_spot = np.repeat(np.arange(10), 2)
    comp = np.zeros((10, 2))
    np.add.at(comp, (cell_spot, true), 1)
    numi = np.full(10, 3000.0)
    Y = rng.poisson(numi[:, None] * (comp / 2) @ P.T).astype(float)
    W = comp / 2
    out = potts_labels(Y, numi, W, P, cell_spot, cell_xy, 0.3, nu=10, n_neighbors=2, refit_sigma=False)
    np.testing.assert_array_equal(out.labels, true)
    out0 = potts_labels(Y, numi, W, P, cell_spot, cell_xy, 0.3, nu=0, n_neighbors=2, refit_sigma=False)
    assert (out0.labels[cell_spot == 4] != true[cell_spot == 4]).sum() in (0, 2)  # nu=0: arbitrary order


def test_demo_slide_cell_class_accuracy(demo_small):
    """Real osmFISH cells (demo window, 33 genes, ~100-600 UMI per spot), typed from the true cell positions: both
    the RCTD top type and the Potts labels beat the majority-class rate (benchmarks/bench_celltyping.py has the
    full-slide figures, where the Potts step does not beat the top type on this sparse, low-UMI slide)."""
    slide = ad.read_h5ad(demo_small.slide)
    ref = ad.read_h5ad(demo_small.reference)
    truth = ad.read_h5ad(demo_small.truth_cells).obs
    truth = truth[truth["spot"].astype(str) != ""]
    cells = truth[["x", "y", "spot"]].astype({"spot": str})
    res = identify_cell_types(slide, ref, "cell_class", cells, CellTypingParams(min_cells_per_type=3))
    tt = truth["cell_class"].astype(str)
    majority = tt.value_counts(normalize=True).iloc[0]
    assert (res.cells["initial_type"] == tt).mean() > majority + 0.1
    assert (res.cells["cell_type"] == tt).mean() > majority + 0.05


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny(mop_halves):
    ref, pool = mop_halves
    slide, cells, _, _ = simulate_slide(pool, KEY, 30, mean_cells=2, seed=13)
    return slide, ref, cells[["x", "y", "spot"]]


def test_error_missing_cell_type_column(tiny):
    slide, ref, cells = tiny
    with pytest.raises(CellTypingInputError, match=r"reference.obs: no cell-type column 'kind' \(found columns"):
        identify_cell_types(slide, ref, "kind", cells)


def test_error_fewer_than_two_types(tiny):
    slide, ref, cells = tiny
    one = ref[ref.obs[KEY] == "L2/3"].copy()
    with pytest.raises(CellTypingInputError, match=r"expected at least 2 cell types, found 1 \(\['L2/3'\]\)"):
        identify_cell_types(slide, one, KEY, cells)


def test_error_type_with_too_few_cells_is_named(tiny):
    slide, ref, cells = tiny
    with pytest.raises(
        CellTypingInputError,
        match=r"2 cell type\(s\) have fewer than min_cells_per_type=60 cells: 'Vip' \(59\), "
        r"'Macrophage' \(50\)",
    ):
        identify_cell_types(slide, ref, KEY, cells, CellTypingParams(min_cells_per_type=60))


def test_error_few_shared_genes(tiny):
    slide, ref, cells = tiny
    s = slide.copy()
    s.var_names = [f"other{i}" for i in range(s.n_vars - 5)] + list(slide.var_names[-5:])
    with pytest.raises(
        CellTypingInputError,
        match=r"slide and reference share 5 genes \(var_names\); expected at "
        r"least 10",
    ):
        identify_cell_types(s, ref, KEY, cells)


def test_error_non_integer_counts(tiny):
    slide, ref, cells = tiny
    s = slide.copy()
    X = sp.csr_matrix(s.X, dtype=np.float64)
    X.data[3] += 0.37
    s.X = X
    with pytest.raises(
        CellTypingInputError,
        match=r"slide.X: expected raw integer counts, found 1 non-integer "
        r"values \(e.g. \d+\.37\)",
    ):
        identify_cell_types(s, ref, KEY, cells)


def test_error_cells_table(tiny):
    slide, ref, cells = tiny
    with pytest.raises(CellTypingInputError, match=r"cells: missing column\(s\) \['spot'\]"):
        identify_cell_types(slide, ref, KEY, cells[["x", "y"]])
    bad = cells.copy()
    bad.iloc[0, bad.columns.get_loc("spot")] = "nowhere"
    with pytest.raises(
        CellTypingInputError,
        match=r"cells\['spot'\]: 1 cells name spots not in slide.obs_names "
        r"\(e.g. \['nowhere'\]\)",
    ):
        identify_cell_types(slide, ref, KEY, bad)


def test_zero_count_spots_and_outside_cells_are_reported_skips(tiny):
    slide, ref, cells = tiny
    s = slide.copy()
    X = sp.csr_matrix(s.X, dtype=np.float64).tolil()
    X[2, :] = 0
    s.X = X.tocsr()
    c = cells.copy()
    c.iloc[0, c.columns.get_loc("spot")] = ""
    res = identify_cell_types(s, ref, KEY, c, CellTypingParams(max_sweeps=2))
    name = s.obs_names[2]
    assert res.info["skipped_spots"] == {name: "zero counts"}
    assert name not in res.weights.index and len(res.weights) == s.n_obs - 1
    assert (res.cells.loc[c["spot"] == name, "cell_type"] == UNASSIGNED).all()
    assert res.cells.iloc[0]["cell_type"] == UNASSIGNED and np.isnan(res.cells.iloc[0]["confidence"])
    n_skip = int((c["spot"] == name).sum())
    assert res.info["cells_unassigned"] == {"outside every spot": 1, "spot skipped": n_skip}
    assert (res.cells["cell_type"] != UNASSIGNED).sum() == len(c) - 1 - n_skip


def test_figures_are_png(coherent_run):
    slide, cells, props, f, res = coherent_run
    a = cell_types_png(res.cells)
    b = spot_proportions_png(res.weights, pd.DataFrame(slide.obsm["spatial"], index=slide.obs_names))
    for png in (a, b):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="spot_xy: expected shape"):
        spot_proportions_png(res.weights, np.zeros((3, 2)))
