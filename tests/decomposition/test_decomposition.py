"""Decomposition of spots into cells (SpatialScope step 3) with an exact analytic score model.

The synthetic slide draws every cell from the analytic prior itself (log1p expression = mu_type + N(0, s^2)), so
the decomposition's posterior is well defined and the truth of every cell is known.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spatial_assets.decomposition import (
    annealed_langevin,
    baseline_type_mean,
    decompose,
    evaluate_against_truth,
    noise_levels,
    prepare_spots,
    spot_term,
)
from spatial_assets.generative import GaussianScoreModel
from spatial_assets.params import DecompositionParams, ScoreModelParams

torch.set_num_threads(1)


def synthetic(T=5, G=40, S=60, seed=0, sd=0.4, max_cells=5):
    rng = np.random.default_rng(seed)
    mu = np.log1p(rng.gamma(0.8, 30, size=(T, G)))
    genes, types = [f"g{i}" for i in range(G)], [f"t{i}" for i in range(T)]
    ref_t = rng.integers(0, T, 3000)
    ref = np.clip(np.expm1(mu[ref_t] + sd * rng.standard_normal((3000, G))), 0, None)
    model = GaussianScoreModel(genes, types, mu, np.full(T, sd), ref_library_size=ref.sum(1).mean())
    n = rng.integers(1, max_cells + 1, S)
    spot_idx = np.repeat(np.arange(S), n)
    C = len(spot_idx)
    ct = rng.integers(0, T, C)
    truth = np.clip(np.expm1(mu[ct] + sd * rng.standard_normal((C, G))), 0, None)
    counts = np.zeros((S, G))
    np.add.at(counts, spot_idx, truth)
    spots = [f"s{i}" for i in range(S)]
    slide = ad.AnnData(counts.astype(np.float32), obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))
    slide.obsm["spatial"] = rng.uniform(0, 1000, (S, 2))
    k = np.concatenate([np.arange(m) for m in n])
    ids = [f"s{s}_{j}" for s, j in zip(spot_idx, k)]
    cells = pd.DataFrame(
        {
            "spot": np.array(spots)[spot_idx],
            "cell_type": np.array(types)[ct],
            "x": rng.uniform(0, 1000, C),
            "y": rng.uniform(0, 1000, C),
        },
        index=ids,
    )
    truth_ad = ad.AnnData(truth.astype(np.float32), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes))
    return model, slide, cells, truth_ad


@pytest.fixture(scope="module")
def syn():
    return synthetic()


@pytest.fixture(scope="module")
def full_run(syn):
    model, slide, cells, truth = syn
    inp = prepare_spots(slide, cells, model)
    return inp, decompose(inp, model, DecompositionParams(estimator="langevin", seed=3))


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------
def test_beats_type_mean_baseline_and_reconstructs_spots(syn, full_run):
    model, slide, cells, truth = syn
    inp, res = full_run
    dec = evaluate_against_truth(res, truth, multi_cell_only=True)
    base = evaluate_against_truth(res, truth, prediction=baseline_type_mean(inp, model), multi_cell_only=True)
    assert dec["cells"] > 100
    assert dec["gene_r_median"] > base["gene_r_median"] + 0.02, (dec, base)
    assert dec["cell_r_median"] > base["cell_r_median"] + 0.02, (dec, base)
    # the spot sums reconstruct the observed spots; the type means alone do not
    assert res.info["reconstruction_rel_error"] < 0.03
    assert dec["spot_rel_error"] < 0.03 < base["spot_rel_error"]
    assert np.isfinite(res.adata.X).all() and (res.adata.X >= 0).all()
    assert res.info["non_finite_cells"] == [] and res.info["retry_rounds"] == 0
    assert res.info["levels"] == 232 and res.info["langevin_steps"] == 232 * 5 + 1


def test_reconstruction_against_naive_per_spot_sums(syn, full_run):
    model, slide, cells, truth = syn
    inp, res = full_run
    a = res.adata
    X = np.asarray(a.X, dtype=float)
    raw = slide.to_df()
    errs = []
    for spot, grp in a.obs.groupby("spot", observed=True):  # naive reference computation, one spot at a time
        target = raw.loc[spot].to_numpy(float) * grp["spot_scale"].iloc[0]
        assert np.isclose(target.sum(), model.ref_library_size * len(grp), rtol=1e-5)
        got = X[a.obs_names.get_indexer(grp.index)].sum(0)
        errs.append(np.linalg.norm(got - target) / np.linalg.norm(target))
        assert np.isclose(grp["spot_rel_error"].iloc[0], errs[-1], rtol=1e-4, atol=1e-6)
    assert np.median(errs) < 0.03


def test_spot_term_segment_sums_match_naive_loop():
    rng = np.random.default_rng(1)
    M, G, K = 23, 7, 6
    seg = np.sort(rng.integers(0, K, M))
    x = torch.tensor(rng.normal(0, 1, (M, G)), dtype=torch.float32)
    mu = torch.tensor(rng.normal(1, 0.5, (M, G)), dtype=torch.float32)
    target = torch.tensor(rng.uniform(0, 20, (K, G)), dtype=torch.float32)
    mask = torch.tensor(rng.integers(0, 2, G), dtype=torch.float32)
    got = spot_term(x, mu, torch.as_tensor(seg), target, mask).numpy()
    want = np.zeros((M, G))
    e = np.exp((x + mu).numpy().astype(float))
    for s in range(K):
        rows = np.where(seg == s)[0]
        r = np.clip(e[rows].sum(0) - target[s].numpy(), -1, 1) * mask.numpy()
        want[rows] = np.clip(e[rows] * r, -2, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (np.abs(got) < 2).any() and (np.abs(got) == 2).any()  # both clipped and unclipped entries are covered


def test_prior_sampler_matches_gaussian_prior():
    model = GaussianScoreModel(
        ["a", "b", "c"], ["t0", "t1"], np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 4.0]]), np.array([0.3, 0.8])
    )
    t = torch.tensor([0] * 1500 + [1] * 1500)
    x = annealed_langevin(model, t, seed=0) - model.type_means[t]
    sd0, sd1 = x[:1500].std().item(), x[1500:].std().item()
    assert abs(sd0 - 0.3) < 0.05 and abs(sd1 - 0.8) < 0.08, (sd0, sd1)
    assert abs(x.mean().item()) < 0.03


def test_gaussian_model_from_reference_recovers_type_statistics():
    rng = np.random.default_rng(2)
    mu = np.log1p(rng.gamma(2.0, 20, size=(3, 6)))
    t = np.repeat(np.arange(3), 400)
    logx = mu[t] + 0.25 * rng.standard_normal((1200, 6))
    ref = ad.AnnData(
        np.expm1(logx).astype(np.float32),
        obs=pd.DataFrame({"ct": np.array(["a", "b", "c"])[t]}),
        var=pd.DataFrame(index=[f"g{i}" for i in range(6)]),
    )
    m = GaussianScoreModel.from_reference(ref, "ct")
    assert m.cell_types == ["a", "b", "c"] and m.genes == list(ref.var_names)
    np.testing.assert_allclose(m.type_means.numpy(), mu, atol=0.05)
    np.testing.assert_allclose(np.sqrt(m.type_var.numpy()), 0.25, atol=0.04)
    assert m.ref_library_size == pytest.approx(float(np.expm1(logx).sum(1).mean()), rel=1e-4)
    with pytest.raises(ValueError, match=r"reference.obs has no column 'cell_type'"):
        GaussianScoreModel.from_reference(ref, "cell_type")


# ---------------------------------------------------------------------------------------------------------------
# leave genes out
# ---------------------------------------------------------------------------------------------------------------
def test_left_out_genes_get_no_spot_term(syn, full_run):
    model, slide, cells, truth = syn
    held = ["g2", "g5"]
    inp = prepare_spots(slide, cells, model, leave_out_genes=held)
    p = DecompositionParams(estimator="langevin", seed=3)
    res = decompose(inp, model, p)
    j = [model.genes.index(g) for g in held]
    # the held-out columns equal prior-only sampling of the same rows with the same seed
    R, C = p.n_replicates, inp.n_cells
    t = torch.as_tensor(np.tile(inp.cells["type_idx"].to_numpy(), R))
    prior = annealed_langevin(model, t, seed=p.seed, levels=noise_levels(model)).numpy()
    prior_mean = np.clip(np.expm1(prior), 0, None).reshape(R, C, -1).mean(0)
    np.testing.assert_allclose(res.adata.X[:, j], prior_mean[:, j], rtol=1e-5, atol=1e-5)
    # ... while with the spot term (full run, same seed) they differ and reconstruct the spot
    assert not np.allclose(full_run[1].adata.X[:, j], prior_mean[:, j], rtol=0.05)
    assert res.adata.var.loc[held, "left_out"].all() and res.adata.var["left_out"].sum() == 2
    assert sorted(res.info["leave_out_spot_r"]) == held and res.info["leave_out_genes"] == held
    assert res.info["reconstruction_rel_error"] < 0.03  # observed genes still reconstruct
    # the held-out genes are predicted from the prior and the other genes only: positively, not perfectly
    ev = evaluate_against_truth(res, truth, genes=held)
    assert 0.2 < ev["gene_r_log1p_median"] < 0.99
    # the same genes hidden through the parameters give the same result
    res2 = decompose(
        prepare_spots(slide, cells, model),
        model,
        DecompositionParams(estimator="langevin", seed=3, leave_out_genes=held),
    )
    np.testing.assert_array_equal(res.adata.X, res2.adata.X)


# ---------------------------------------------------------------------------------------------------------------
# determinism, chunking, retries
# ---------------------------------------------------------------------------------------------------------------
def test_seeded_and_chunk_independent(syn, full_run):
    model, slide, cells, _ = syn
    inp, res = full_run
    p = DecompositionParams(estimator="langevin", seed=3, level_stride=1, batch_cells=17)
    again = decompose(inp, model, p)
    np.testing.assert_array_equal(again.adata.X, res.adata.X)
    other = decompose(inp, model, DecompositionParams(estimator="langevin", seed=4))
    assert not np.allclose(other.adata.X, res.adata.X)
    assert res.info["seed"] == 3 and other.adata.uns["decomposition"]["seed"] == 4
    spread = res.adata.obs["replicate_spread"].to_numpy()
    assert np.isfinite(spread).all() and (spread > 0).all()


class FlakyModel(GaussianScoreModel):
    """Returns NaN scores for rows of type ``bad_type`` during calls [first, last)."""

    def __init__(self, base: GaussianScoreModel, bad_type: int, first: int, last: float):
        self.__dict__.update(base.__dict__)
        self.bad_type, self.first, self.last, self.calls = bad_type, first, last, 0

    def score(self, x, type_idx, sigma):
        out = super().score(x, type_idx, sigma)
        if self.first <= self.calls < self.last:
            out[type_idx == self.bad_type] = float("nan")
        self.calls += 1
        return out


def test_non_finite_cells_are_rerun_with_their_spots(syn, full_run):
    model, slide, cells, _ = syn
    inp, clean = full_run
    flaky = FlakyModel(model, bad_type=1, first=10, last=11)
    res = decompose(inp, flaky, DecompositionParams(estimator="langevin", seed=3))
    a = res.adata
    has_bad = a.obs.groupby("spot", observed=True)["cell_type"].transform(lambda s: (s == "t1").any()).to_numpy()
    assert has_bad.any() and (~has_bad).any()
    np.testing.assert_array_equal(a.obs["n_retries"].to_numpy(), has_bad.astype(int))
    assert res.info["retry_rounds"] == 1 and res.info["retry_seeds"] == [4] and res.info["non_finite_cells"] == []
    assert np.isfinite(a.X).all()
    # spots never touched by NaN keep exactly the clean run's values
    np.testing.assert_array_equal(a.X[~has_bad], clean.adata.X[~has_bad])
    assert res.info["reconstruction_rel_error"] < 0.03

    broken = FlakyModel(model, bad_type=1, first=0, last=np.inf)
    res = decompose(inp, broken, DecompositionParams(estimator="langevin", seed=3, max_retries=2))
    bad_ids = sorted(a.obs_names[has_bad])
    assert sorted(res.info["non_finite_cells"]) == bad_ids
    assert np.isnan(res.adata[bad_ids].X).all() and np.isfinite(res.adata[~has_bad].X).all()
    assert (res.adata.obs.loc[bad_ids, "n_retries"] == 2).all() and res.info["retry_rounds"] == 2


class PushUpModel(GaussianScoreModel):
    """A score that drives rows of type ``bad_type`` to huge (finite) log values: expm1 overflows float32."""

    def __init__(self, base: GaussianScoreModel, bad_type: int):
        self.__dict__.update(base.__dict__)
        self.bad_type = bad_type

    def score(self, x, type_idx, sigma):
        out = super().score(x, type_idx, sigma)
        out[type_idx == self.bad_type] = 1e4
        return out


def test_overflowing_expression_counts_as_non_finite(syn, full_run):
    model, slide, cells, _ = syn
    inp, clean = full_run
    res = decompose(
        inp, PushUpModel(model, bad_type=2), DecompositionParams(estimator="langevin", seed=3, max_retries=0)
    )
    a = clean.adata
    has_bad = a.obs.groupby("spot", observed=True)["cell_type"].transform(lambda s: (s == "t2").any()).to_numpy()
    is_bad = a.obs["cell_type"].to_numpy() == "t2"
    # the t2 cells overflow; their spot mates may or may not, but every cell reported lies in a t2 spot
    reported = set(res.info["non_finite_cells"])
    assert set(a.obs_names[is_bad]) <= reported <= set(a.obs_names[has_bad])
    assert np.isnan(res.adata[sorted(reported)].X).all() and np.isfinite(res.adata[~has_bad].X).all()
    assert res.info["retry_rounds"] == 0


# ---------------------------------------------------------------------------------------------------------------
# spot ranges, platform effect, evaluation
# ---------------------------------------------------------------------------------------------------------------
def test_spot_ranges_tile_the_slide_and_report_skips(syn):
    model, slide, cells, _ = syn
    cells = cells[cells["spot"] != "s12"]  # a spot without cells
    inp = prepare_spots(slide, cells, model, spot_range=(10, 20))
    assert list(inp.spots.index) == [f"s{i}" for i in range(10, 20) if i != 12]
    assert inp.info["spots_skipped_no_cells"] == ["s12"]
    assert set(inp.cells.index) == set(cells.index[cells["spot"].isin(inp.spots.index)])
    assert (np.diff(inp.cells["spot_idx"].to_numpy()) >= 0).all()
    p = DecompositionParams(estimator="langevin", level_stride=8, n_replicates=1)
    parts = [
        decompose(prepare_spots(slide, cells, model, spot_range=r), model, p).adata
        for r in [(0, 25), (25, 60), (60, 100)]
    ]
    assert [x.n_obs for x in parts][-1] == 0
    assert parts[2].uns["decomposition"]["empty_reason"].startswith("spot range [60, 100) holds no spots")
    assert parts[2].n_vars == len(model.genes)
    whole = decompose(prepare_spots(slide, cells, model), model, p).adata
    assert list(ad.concat(parts[:2]).obs_names) == list(whole.obs_names)
    assert whole.uns["decomposition"]["spots"] == 59 and whole.uns["decomposition"]["level_stride"] == 8
    assert whole.uns["decomposition"]["levels"] == len(range(231, -1, -8))


def test_platform_effect_divides_counts(syn):
    model, slide, cells, _ = syn
    be = pd.Series(1.0, index=model.genes)
    be[["g0", "g1", "g2", "g3"]] = [2.0, np.nan, 0.0, np.inf]
    inp = prepare_spots(slide, cells, model, platform_effect=be.drop("g4"))
    X = slide.X.astype(float)
    np.testing.assert_allclose(inp.counts[:, 0], X[:, 0] / 2, rtol=1e-6)
    np.testing.assert_allclose(inp.counts[:, 1:], X[:, 1:], rtol=1e-6)  # NaN, 0, inf, missing -> 1
    # a uniform platform effect cancels in the spot scaling
    p = DecompositionParams(estimator="langevin", level_stride=16, n_replicates=1)
    a = decompose(prepare_spots(slide, cells, model, platform_effect=pd.Series(3.0, index=model.genes)), model, p)
    b = decompose(prepare_spots(slide, cells, model), model, p)
    np.testing.assert_allclose(a.adata.X, b.adata.X, rtol=1e-4, atol=1e-4)
    assert a.adata.var["platform_effect"].eq(3.0).all()
    with pytest.raises(ValueError, match=r"platform_effect: expected non-negative ratios.*\['g7'\]"):
        prepare_spots(slide, cells, model, platform_effect=pd.Series({"g7": -1.0}))


def test_evaluation_of_the_truth_itself_is_perfect(syn, full_run):
    model, slide, cells, truth = syn
    inp, res = full_run
    t = truth[res.adata.obs_names].X * res.adata.obs["spot_scale"].to_numpy()[:, None]
    ev = evaluate_against_truth(res, truth, prediction=t)
    assert ev["gene_r_median"] == pytest.approx(1.0) and ev["cell_r_median"] == pytest.approx(1.0)
    assert ev["spot_rel_error"] < 1e-6 and ev["cells"] == inp.n_cells
    b = baseline_type_mean(inp, model, per_gene=True)  # per-gene split: exact spot sums by construction
    assert evaluate_against_truth(res, truth, prediction=b)["spot_rel_error"] < 1e-6


def test_result_round_trips_through_storage(tmp_path, full_run):
    from spatial_assets.io import write_anndata

    _, res = full_run
    path = write_anndata(res.adata, tmp_path / "cells.zarr")
    back = ad.read_zarr(path)
    np.testing.assert_array_equal(back.X, res.adata.X)
    assert back.uns["decomposition"]["seed"] == 3
    assert list(back.obs["spot"]) == list(res.adata.obs["spot"])


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_clear_errors(syn):
    model, slide, cells, _ = syn
    bad = cells.copy()
    bad.loc[bad.index[:3], "cell_type"] = "Martian"
    with pytest.raises(ValueError, match=r"cell types absent from the score model: \['Martian'\] \(3 cells\)"):
        prepare_spots(slide, bad, model)
    other = slide.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match=r"no genes shared between slide.var_names \(40 genes"):
        prepare_spots(other, cells, model)
    nan = slide.copy()
    nan.X[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"slide.X: expected finite counts, found 1 NaN/inf"):
        prepare_spots(nan, cells, model)
    neg = slide.copy()
    neg.X[1, 1] = -2
    with pytest.raises(ValueError, match=r"slide.X: expected non-negative counts, found minimum -2"):
        prepare_spots(neg, cells, model)
    with pytest.raises(ValueError, match=r"cells: missing column\(s\) \['cell_type'\]"):
        prepare_spots(slide, cells.drop(columns="cell_type"), model)
    with pytest.raises(ValueError, match=r"spot_range: expected 0 <= start <= stop, found \(5, 2\)"):
        prepare_spots(slide, cells, model, spot_range=(5, 2))
    with pytest.raises(ValueError, match=r"leave_out_genes: \['nope'\] are not among the 40 genes"):
        prepare_spots(slide, cells, model, leave_out_genes=["nope"])
    with pytest.raises(ValueError, match=r"none of the .* cells' spots are slide spots"):
        prepare_spots(slide, cells.assign(spot="elsewhere"), model)
    inp = prepare_spots(slide, cells, model)
    small = GaussianScoreModel(model.genes[:10], model.cell_types, model.type_means[:, :10].numpy(), 0.4)
    with pytest.raises(ValueError, match=r"score model genes \(10\) differ from the inputs' \(40\)"):
        decompose(inp, small, DecompositionParams(estimator="langevin"))
    with pytest.raises(ValueError, match=r"cell-type column is 'cell_type', asked for 'subclass'"):
        prepare_spots(slide, cells, model, cell_type_key="subclass")


def test_with_trained_score_model(syn, tmp_path):
    """End to end with the project's score network (a few training steps) in place of the analytic prior."""
    from spatial_assets.generative import CheckpointMismatch, ScoreModel, train_score_model

    model, slide, cells, truth = syn
    rng = np.random.default_rng(5)
    t = rng.integers(0, len(model.cell_types), 1500)
    mu = model.type_means.numpy()
    counts = np.round(np.clip(np.expm1(mu[t] + 0.4 * rng.standard_normal((1500, len(model.genes)))), 0, None))
    ref = ad.AnnData(
        counts.astype(np.float32),
        obs=pd.DataFrame({"cell_type": np.array(model.cell_types)[t]}),
        var=pd.DataFrame(index=model.genes),
    )
    ref.obs_names = [f"c{i}" for i in range(len(ref))]
    sp_ = ScoreModelParams(hidden=32, n_blocks=1, train_steps=30, batch_size=64, mixed_precision=False)
    net = train_score_model(ref, "cell_type", sp_, tmp_path / "ckpt", log=lambda m: None)
    net = ScoreModel.load(tmp_path / "ckpt")
    inp = prepare_spots(slide, cells, net, spot_range=(0, 30), cell_type_key="cell_type")
    res = decompose(inp, net, DecompositionParams(estimator="langevin", level_stride=4))
    assert np.isfinite(res.adata.X).all() and res.info["non_finite_cells"] == []
    assert res.info["reconstruction_rel_error"] < 0.05
    dec = evaluate_against_truth(res, truth, multi_cell_only=True)
    base = evaluate_against_truth(res, truth, prediction=baseline_type_mean(inp, net), multi_cell_only=True)
    assert dec["cell_r_median"] > base["cell_r_median"], (dec, base)
    with pytest.raises(CheckpointMismatch, match="cell-type column differs"):
        prepare_spots(slide, cells, net, cell_type_key="subclass")


def test_figures_are_png(syn, full_run):
    from spatial_assets import pl as _pl
    from tests.helpers import png_of

    plot_decomposition_summary = png_of(_pl.decomposition_summary)
    plot_truth_comparison = png_of(_pl.truth_comparison)

    model, slide, cells, truth = syn
    inp, res = full_run
    png = plot_decomposition_summary(res)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    t = truth[res.adata.obs_names].X * res.adata.obs["spot_scale"].to_numpy()[:, None]
    png = plot_truth_comparison(res, t, baseline_type_mean(inp, model), genes=["g0", "g1"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    empty = decompose(
        prepare_spots(slide, cells, model, spot_range=(100, 120)), model, DecompositionParams(estimator="langevin")
    )
    assert plot_decomposition_summary(empty)[:4] == b"\x89PNG"


def test_spots_with_unassigned_cells_are_skipped_and_reported(syn):
    """Cells that cell typing left 'unassigned' (a skipped spot) must not crash the range nor give their counts to
    the spot's other cells: the whole spot is skipped and named."""
    model, slide, cells, _ = syn
    cells = cells.copy()
    spot5 = cells.index[cells["spot"] == "s5"]
    cells.loc[spot5[:1], "cell_type"] = "unassigned"
    inp = prepare_spots(slide, cells, model, spot_range=(0, 10))
    assert inp.info["spots_skipped_unassigned_cells"] == ["s5"]
    assert "s5" not in set(inp.spots.index) and "s5" in inp.info["spots_skipped_no_cells"]
    assert not set(spot5) & set(inp.cells.index)
    assert list(inp.spots.index) == [f"s{i}" for i in range(10) if i != 5]
