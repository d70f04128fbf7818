"""soScope: sub-spot geometry, graphs, sparse regulariser, accuracy on a synthetic slide, errors, determinism."""

from __future__ import annotations

import resource

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spatial_assets import geometry
from spatial_assets import soscope as ss
from spatial_assets.metrics import pearson_columns as pearson_per_gene
from spatial_assets.params import SoScopeParams
from spatial_assets.soscope import baseline_idw, baseline_split, check_values, enhance
from spatial_assets.soscope._model import SmallCNN, edge_dot, image_regulariser

FAST = dict(hidden=16, z_dim=8, vgae_epochs=20, epochs=20, image_features="none")


def hex_slide(n_rows=8, n_cols=8, pitch=100.0, diameter=55.0, genes=4, seed=0, counts=None):
    xy, rc = geometry.hex_lattice(0, (n_cols - 1) * pitch, 0, (n_rows - 1) * pitch * np.sqrt(3) / 2, pitch)
    keep = (rc[:, 0] < n_rows) & (rc[:, 1] // 2 < n_cols)  # exactly n_rows x n_cols spots
    xy, rc = xy[keep] + 200.0, rc[keep]
    rng = np.random.default_rng(seed)
    x = rng.poisson(20, size=(len(xy), genes)).astype(np.float32) if counts is None else counts
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]}, index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]),
    )
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": diameter}}}
    return a


def square_slide(n=6, pitch=30.0, genes=3, seed=0):
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    xy = np.stack([gx.ravel(), gy.ravel()], 1) * pitch + 100.0
    x = np.random.default_rng(seed).poisson(5, size=(len(xy), genes)).astype(np.float32)
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"q{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"f{j}" for j in range(genes)]),
    )
    a.obsm["spatial"] = xy
    return a


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a small, oversubscribed machine more threads make these tiny models far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------- geometry


def test_visium_subspots_match_geometry_offsets_and_parents():
    s = hex_slide(4, 5)
    g = ss.build_subspots(s, "visium")
    assert g.n_sub == 7 and len(g.positions) == 7 * s.n_obs
    off = geometry.subspot_offsets("visium", 55.0)
    np.testing.assert_allclose(g.offsets, off)
    np.testing.assert_array_equal(g.parent, np.repeat(np.arange(s.n_obs), 7))
    np.testing.assert_array_equal(g.k, np.tile(np.arange(7), s.n_obs))
    # sub-spot k of spot i = centre_i + offset_k; ring at 2/3 of the spot radius
    np.testing.assert_allclose(g.positions[7 * 3 + 4], s.obsm["spatial"][3] + off[4])
    np.testing.assert_allclose(np.linalg.norm(g.positions[1:7] - g.positions[0], axis=1), 55.0 / 3)


@pytest.mark.parametrize("sub,k", [(2, 4), (3, 9)])
def test_square_subspots_tile_the_spot(sub, k):
    s = square_slide(4, pitch=30.0)
    g = ss.build_subspots(s, "square_grid", grid_subdivision=sub)
    assert g.n_sub == k and len(g.positions) == k * s.n_obs
    spot0 = g.positions[:k]
    # the sub-spots tile the 30 x 30 square: spacing 30/sub, centred on the spot
    np.testing.assert_allclose(spot0.mean(0), s.obsm["spatial"][0])
    np.testing.assert_allclose(np.ptp(spot0[:, 0]), 30.0 - 30.0 / sub)
    assert g.subspot_diameter_px == pytest.approx(30.0 / sub)


def test_graph_degrees_on_hex_and_square_lattices():
    s = hex_slide(9, 9)
    g = ss.build_subspots(s, "visium")
    deg = np.bincount(g.spot_edges.ravel(), minlength=s.n_obs)
    r, c = s.obs["array_row"].to_numpy(), s.obs["array_col"].to_numpy()
    interior = (r > 0) & (r < r.max()) & (c > 1) & (c < c.max() - 1)
    assert interior.sum() > 20 and (deg[interior] == 6).all() and deg.max() == 6
    q = ss.build_subspots(square_slide(7), "square_grid")
    qdeg = np.bincount(q.spot_edges.ravel(), minlength=49).reshape(7, 7)
    assert (qdeg[1:-1, 1:-1] == 4).all() and qdeg[0, 0] == 2 and qdeg.max() == 4
    # other platforms: k nearest neighbours
    e = ss.spot_graph(np.random.default_rng(0).uniform(0, 100, (50, 2)), "slideseq", n_neighbors=5)
    assert (np.bincount(e.ravel(), minlength=50) >= 5).all()


def test_subspot_graph_links_within_and_across_adjacent_spots_only():
    s = hex_slide(5, 5)
    g = ss.build_subspots(s, "visium")
    e = ss.subspot_graph(g)
    same = g.parent[e[:, 0]] == g.parent[e[:, 1]]
    assert same.sum() == 21 * s.n_obs  # all 7-choose-2 pairs inside every spot
    cross = e[~same]
    # cross-spot edges only between lattice-adjacent spots, between the facing ring sub-spots
    adj = {tuple(p) for p in g.spot_edges.tolist()}
    pairs = np.sort(np.stack([g.parent[cross[:, 0]], g.parent[cross[:, 1]]], 1), 1)
    assert all(tuple(p) in adj for p in pairs.tolist())
    assert len(cross) == len(g.spot_edges)  # one facing pair per adjacent spot pair
    d = np.linalg.norm(g.positions[cross[:, 0]] - g.positions[cross[:, 1]], axis=1)
    np.testing.assert_allclose(d, 100 - 2 * 55 / 3)


def test_kernel_weights_min_one_median_one_over_scale():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    w = ss.kernel_weights(d, scale=10.0)
    assert w[0] == pytest.approx(1.0) and w[2] == pytest.approx(0.1)
    assert np.all(np.diff(w) < 0)
    np.testing.assert_allclose(ss.kernel_weights(np.full(4, 2.5)), 1.0)


def test_nuclei_features_count_and_area_per_subspot():
    s = hex_slide(3, 3)
    g = ss.build_subspots(s, "visium")
    # one nucleus on sub-spot 2 of spot 4 (area 30), two on the centre of spot 0, one outside every spot
    pts = np.vstack([g.positions[4 * 7 + 2] + 1.0, g.positions[0], g.positions[0] - 2.0, [5000, 5000]])
    nuc = pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "area": [30.0, 10.0, 12.0, 99.0]})
    f = ss.nuclei_features(nuc, g)
    assert f[:, 0].sum() == 3 and f[4 * 7 + 2].tolist() == [1, 30] and f[0].tolist() == [2, 22]


# ---------------------------------------------------------------------------------------------------- regulariser


def test_edge_dot_matches_dense_autograd():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    src, dst = torch.randint(0, 30, (40,), generator=g), torch.randint(0, 30, (40,), generator=g)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    (edge_dot(r, src, dst, chunk=7) * w).sum().backward()
    got = r.grad.clone()
    r.grad = None
    ((r[src] * r[dst]).sum(1) * w).sum().backward()
    torch.testing.assert_close(got, r.grad)


def test_regulariser_is_sparse_at_a_size_where_dense_is_impossible():
    # 400,000 sub-spots: a dense (NK)^2 float32 matrix would need 640 GB.
    nk, gdim = 400_000, 4
    r = torch.randn(nk, gdim, requires_grad=True)
    src = torch.arange(nk - 1)
    edges = torch.stack([src, src + 1], 1)
    w = torch.full((nk - 1,), 0.5)
    neg = torch.randint(0, nk, (2, nk - 1), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = image_regulariser(r, edges, w, neg[0], neg[1], 5.0)
    loss.backward()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert torch.isfinite(loss) and r.grad.shape == (nk, gdim)
    assert grown_mb < 500


# ---------------------------------------------------------------------------------------------------- model


def smooth_slide(seed=0, genes=8, rows=10, cols=10, scale=35.0):
    """Hex slide whose sub-spot rates vary smoothly in space (spots: Poisson counts summed over their sub-spots);
    features = a noisy view of the field. Returns (slide, geometry, true sub-spot rates, features)."""
    s = hex_slide(rows, cols, genes=genes, counts=np.zeros((rows * cols, genes), np.float32))
    g = ss.build_subspots(s, "visium")
    rng = np.random.default_rng(seed)
    p = g.positions / scale
    field = np.stack([np.sin(p[:, 0] + 0.7 * j) + np.cos(p[:, 1] * 0.8 - 0.5 * j) for j in range(3)], 1)
    load = rng.normal(0, 1, (3, genes))
    rate = np.exp(1.5 + 0.6 * field @ load / np.sqrt(3))
    truth = rng.poisson(rate).astype(np.float32)
    s.X = truth.reshape(s.n_obs, 7, genes).sum(1)
    feats = field + rng.normal(0, 0.1, field.shape)
    return s, g, rate, feats


def test_model_beats_spot_split_on_smooth_synthetic_truth_and_sums_to_spots():
    s, g, truth, feats = smooth_slide()
    p = SoScopeParams(hidden=32, z_dim=16, vgae_epochs=150, epochs=250, likelihood="poisson", seed=0)
    res = enhance(s, p, "visium", features=feats)
    # truth = the smooth sub-spot rates: the likelihood mean (denoised) is the layer to compare
    r_model = np.nanmedian(pearson_per_gene(res.adata.layers["model_mean"], truth))
    r_conserved = np.nanmedian(pearson_per_gene(res.adata.X, truth))
    r_split = np.nanmedian(pearson_per_gene(baseline_split(s.X, 7), truth))
    r_idw = np.nanmedian(pearson_per_gene(baseline_idw(s.X, g), truth))
    assert r_model > r_split + 0.1 and r_model > r_idw, (r_model, r_split, r_idw)
    assert r_conserved > r_split + 0.03 and r_conserved > r_idw, (r_conserved, r_split, r_idw)
    # X (default: conserved) sums exactly to the observed spot; no nuclei: the prior is spot / K
    np.testing.assert_array_equal(res.adata.X, res.adata.layers["conserved"])
    np.testing.assert_allclose(res.adata.X.reshape(s.n_obs, 7, -1).sum(1), s.X, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(res.adata.layers["prior_split"], baseline_split(s.X, 7), rtol=1e-5)
    assert res.info["x_layer"] == "conserved" and res.info["prior"] == "even split (spot / K)"
    sums = res.adata.layers["model_mean"].reshape(s.n_obs, 7, -1).sum(1)
    assert np.median(pearson_per_gene(sums, s.X)) > 0.9
    assert np.abs(sums - s.X).sum() / s.X.sum() == pytest.approx(res.info["spot_reconstruction_rel_l1"], rel=1e-4)
    assert res.info["spot_reconstruction_rel_l1"] < 0.25
    assert res.info["features"]["image"] == "precomputed features" and res.info["image_features_used"]


def test_output_layout_determinism_and_h5ad_round_trip(tmp_path):
    s = hex_slide(4, 4)
    p = SoScopeParams(**FAST, seed=3)
    a = enhance(s, p, "visium")
    b = enhance(s, p, "visium")
    np.testing.assert_array_equal(a.adata.X, b.adata.X)
    torch.set_num_threads(2)
    np.testing.assert_array_equal(enhance(s, p, "visium", n_threads=1).adata.X, a.adata.X)
    assert torch.get_num_threads() == 2
    c = enhance(s, SoScopeParams(**{**FAST, "seed": 4}), "visium")
    assert not np.allclose(a.adata.X, c.adata.X)
    o = a.adata
    assert o.shape == (16 * 7, 4) and (o.X >= 0).all()
    assert o.obs["spot"].tolist()[:8] == ["s0"] * 7 + ["s1"] and o.obs["subspot"].tolist()[:8] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        0,
    ]
    np.testing.assert_allclose(
        o.obsm["spatial"][[0, 8]],
        [s.obsm["spatial"][0], s.obsm["spatial"][1] + geometry.subspot_offsets("visium", 55.0)[1]],
    )
    assert a.info["seed"] == 3 and not a.info["image_features_used"]
    assert a.info["features"]["image"].startswith("none (positional encoding")
    from spatial_assets import pl as _pl
    from tests.helpers import png_of

    enhanced_maps = png_of(_pl.enhanced_maps)
    loss_curves = png_of(_pl.loss_curves)
    assert enhanced_maps(s, o, ["g0", "g1"])[:4] == b"\x89PNG" and loss_curves(a.info)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="genes: none of the requested features"):
        enhanced_maps(s, o, ["nope"])
    o.write_h5ad(tmp_path / "x.h5ad")
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    np.testing.assert_array_equal(back.X, o.X)
    assert back.uns["soscope"]["seed"] == 3


def test_joint_gaussian_and_isolated_spot():
    s = hex_slide(4, 4, genes=4)
    s.var["feature_type"] = ["Gene Expression", "Gene Expression", "Antibody Capture", "Antibody Capture"]
    res = enhance(s, SoScopeParams(**FAST, likelihood="joint"), "visium")
    assert res.info["feature_likelihoods"] == {"nb": 2, "poisson": 2, "gaussian": 0}
    # Gaussian: continuous, negative values allowed; one spot far away is isolated but handled
    s2 = hex_slide(4, 4, genes=3)
    s2.X = np.random.default_rng(0).normal(0, 1, (16, 3)).astype(np.float32)
    xy = s2.obsm["spatial"].copy()
    xy[0] = [5000.0, 5000.0]
    s2.obsm["spatial"] = xy
    r2 = enhance(s2, SoScopeParams(**FAST, likelihood="gaussian"), "visium")
    assert r2.info["isolated_spots"] == 1 and r2.info["isolated_spot_names"] == ["s0"]
    assert (r2.adata.X < 0).any() and np.isfinite(r2.adata.X).all()


def test_cnn_weights_path_and_squidpy_features(tmp_path):
    s = hex_slide(2, 2, pitch=60.0, diameter=40.0)
    g = ss.build_subspots(s, "visium")
    img = np.full((400, 400, 3), 230, np.uint8)
    cy, cx = g.positions[9].astype(int)[::-1]
    img[cy - 4 : cy + 5, cx - 4 : cx + 5] = (60, 40, 120)  # a dark nucleus on sub-spot 2 of spot 1
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    torch.save(SmallCNN().state_dict(), path)
    f = ss.cnn_features(img, g, str(path))
    assert f.shape == (28, 64) and np.isfinite(f).all()
    d = np.linalg.norm(f - f[0], axis=1)
    assert d.argmax() == 9  # the sub-spot with the nucleus stands out
    torch.save({"bad": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="cnn_weights: .* is not a state dict of SmallCNN"):
        ss.cnn_features(img, g, str(tmp_path / "bad.pt"))
    q = ss.squidpy_features(img, g, features=("summary", "histogram"))
    assert q.shape[0] == 28 and np.isfinite(q).all()
    mean_cols = [0, 1, 2]  # any colour statistic must separate the nucleus patch
    assert np.linalg.norm(q - q[0], axis=1).argmax() == 9, mean_cols


def test_baselines_sum_to_spot():
    s = hex_slide(4, 4)
    g = ss.build_subspots(s, "visium")
    for est in (baseline_split(s.X, 7), baseline_idw(s.X, g)):
        np.testing.assert_allclose(est.reshape(16, 7, -1).sum(1), s.X, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------- errors


def test_error_messages():
    s = hex_slide(3, 3)
    with pytest.raises(
        ValueError,
        match=r"n_subspots: platform 'visium' splits each spot into 7 sub-spots, "
        r"found 9",
    ):
        enhance(s, SoScopeParams(**FAST, n_subspots=9), "visium")
    with pytest.raises(ValueError, match=r"n_subspots: platform 'square_grid' .* 4 \(2x2\) or 9 \(3x3\).* found 7"):
        ss.build_subspots(square_slide(3), "square_grid", n_subspots=7)
    with pytest.raises(
        ValueError,
        match="platform: expected one of visium, square_grid, slideseq, merfish, xenium, visium_hd, found 'hexagon'",
    ):
        ss.build_subspots(s, "hexagon")
    bad = s.copy()
    bad.X = bad.X - 30
    with pytest.raises(
        ValueError,
        match=r"slide.X: likelihood 'nb' needs non-negative integer counts .* found "
        r"\d+ negative values \(min -\d+",
    ):
        enhance(bad, SoScopeParams(**FAST), "visium")
    frac = s.copy()
    frac.X = frac.X + 0.5
    with pytest.raises(ValueError, match=r"likelihood 'poisson' .* found \d+ non-integer values \(e.g. \d+\.5\)"):
        enhance(frac, SoScopeParams(**FAST, likelihood="poisson"), "visium")
    nan = s.copy()
    nan.X[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"slide.X: 1 NaN/inf values in 1 spots"):
        enhance(nan, SoScopeParams(**FAST, likelihood="gaussian"), "visium")
    feats = np.zeros((s.n_obs * 7, 3))
    feats[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"features: 1 NaN/inf values \(first at row 5, column 2\)"):
        enhance(s, SoScopeParams(**FAST), "visium", features=feats)
    with pytest.raises(
        ValueError,
        match=r"features: expected \(63, F\) = one row per sub-spot \(9 spots x 7\), "
        r"found shape \(9, 3\)",
    ):
        enhance(s, SoScopeParams(**FAST), "visium", features=np.zeros((9, 3)))
    with pytest.raises(ValueError, match=r"slide.var\['feature_type'\]: missing; likelihood 'joint'"):
        enhance(s, SoScopeParams(**FAST, likelihood="joint"), "visium")
    j = s.copy()
    j.var["feature_type"] = ["RNA", "RNA", "lipid", "ADT"]
    with pytest.raises(ValueError, match=r"unknown modality value\(s\) \['lipid'\]"):
        enhance(j, SoScopeParams(**FAST, likelihood="joint"), "visium")
    with pytest.raises(ValueError, match=r"nuclei: missing column\(s\) \['area'\]"):
        enhance(s, SoScopeParams(**FAST), "visium", nuclei=pd.DataFrame({"x": [1.0], "y": [2.0]}))
    with pytest.raises(ValueError, match=r"nuclei: 1 rows with NaN/inf in x, y or area"):
        enhance(
            s,
            SoScopeParams(**FAST),
            "visium",
            nuclei=pd.DataFrame({"x": [1.0, np.nan], "y": [2.0, 3.0], "area": [5.0, 5.0]}),
        )
    nopos = s.copy()
    del nopos.obsm["spatial"]
    with pytest.raises(ValueError, match=r"slide.obsm\['spatial'\]: missing"):
        enhance(nopos, SoScopeParams(**FAST), "visium")
    one = s[:1].copy()
    with pytest.raises(ValueError, match=r"slide: expected >= 2 spots"):
        enhance(one, SoScopeParams(**FAST), "visium")
    with pytest.raises(ValueError, match=r"spot graph: no edges between the 3 spots"):
        ss.check_spot_graph(np.zeros((0, 2), np.int64), 3, "visium", 100.0)
    with pytest.raises(ValueError, match=r"image: expected \(H, W\) or \(H, W, 3\) RGB array, found shape \(4, 4, 2\)"):
        ss.extract_patches(np.zeros((4, 4, 2)), np.zeros((1, 2)), 3)


def test_check_values_accepts_integer_counts():
    check_values(np.array([[0.0, 3.0], [2.0, 1.0]]), np.array([0, 1]), "nb")


def test_joint_model_on_real_spatial_cite_seq_subset():
    from pathlib import Path

    from spatial_assets.datasets import read_soscope_humanskin

    a = read_soscope_humanskin(Path(__file__).resolve().parents[2] / "data" / "soscope-humanskin")
    assert a.shape == (1618, 15) and (a.var["feature_type"] == "protein").sum() == 10
    sub = a[a.obs["row"] < 16].copy()
    res = enhance(sub, SoScopeParams(**{**FAST, "likelihood": "joint"}), "square_grid", grid_subdivision=3)
    assert res.adata.n_obs == 9 * sub.n_obs and res.info["subspots_per_spot"] == 9
    assert res.info["feature_likelihoods"] == {"nb": 5, "poisson": 10, "gaussian": 0}
    assert (res.adata.X >= 0).all()
    # sub-spots of a spot tile its square: mean position = spot centre
    np.testing.assert_allclose(res.adata.obsm["spatial"].reshape(sub.n_obs, 9, 2).mean(1), sub.obsm["spatial"])


def test_conserve_spot_sums_exact_and_keeps_the_split():
    from spatial_assets.soscope import conserve_spot_sums

    rng = np.random.default_rng(0)
    n, k, g = 5, 7, 4
    m = rng.gamma(2.0, 1.0, (n * k, g)).astype(np.float32)
    m[:k, 0] = 0.0  # the model predicts nothing for gene 0 of spot 0
    x = rng.poisson(20, (n, g)).astype(np.float64)
    counts = np.array([True, True, True, False])
    out = conserve_spot_sums(m, x, k, counts).reshape(n, k, g)
    np.testing.assert_allclose(out.sum(1), x, rtol=1e-5)
    mm = m.reshape(n, k, g)
    # count features keep the model's within-spot shares; an all-zero spot is split evenly
    np.testing.assert_allclose(
        out[1:, :, 1] / out[1:, :, 1].sum(1, keepdims=True),
        mm[1:, :, 1] / mm[1:, :, 1].sum(1, keepdims=True),
        rtol=1e-5,
    )
    np.testing.assert_allclose(out[0, :, 0], x[0, 0] / k, rtol=1e-6)
    # continuous features: the residual is spread evenly (differences between sub-spots unchanged)
    np.testing.assert_allclose(np.diff(out[:, :, 3], axis=1), np.diff(mm[:, :, 3], axis=1), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- realistic


@pytest.mark.slow
def test_beats_nuclei_split_and_spot_split_on_a_small_realistic_slide(tmp_path):
    """45 spots of a realistic slide (seed 3, not a benchmark seed). Measured (2 model seeds, 100+100 epochs):
    per-gene r 0.683 / 0.684 against the nuclei split's 0.669 and spot / 7's 0.383; per-sub-spot r 0.794 / 0.790
    against 0.790 and 0.790. Margins: half the measured gain per gene, no loss per sub-spot beyond 0.005."""
    from benchmarks.bench_realistic_subspots import _log_r, count_split, nuclei_table
    from spatial_assets.datasets import build_realistic_slide

    paths = build_realistic_slide(tmp_path / "slide", seed=3, crop_um=(200, 200, 1400, 1100))
    import tifffile

    s = ad.read_h5ad(paths.slide)
    truth = ad.read_h5ad(paths.truth_subspots).X.toarray()
    image, nuclei = tifffile.imread(paths.image), nuclei_table(paths.nuclei_labels)
    x = s.X.toarray()
    g = ss.build_subspots(s, "visium")
    nuc_gene, nuc_sub = _log_r(count_split(x, ss.nuclei_features(nuclei, g)[:, 0]), truth)
    flat_gene, flat_sub = _log_r(baseline_split(x, 7), truth)
    p = SoScopeParams(vgae_epochs=100, epochs=100, seed=0, squidpy_features=["summary", "histogram"])
    res = enhance(s, p, "visium", image=image, nuclei=nuclei, log_every=0)
    gene_r, sub_r = _log_r(res.adata.X, truth)
    assert gene_r > nuc_gene + 0.007 and gene_r > flat_gene + 0.2, (gene_r, nuc_gene, flat_gene)
    assert sub_r > nuc_sub - 0.005 and sub_r > flat_sub - 0.005, (sub_r, nuc_sub, flat_sub)
    # the start point is the nuclei split, and X keeps every molecule of its spot
    np.testing.assert_allclose(res.adata.X.reshape(s.n_obs, 7, -1).sum(1), x, rtol=1e-4, atol=1e-3)
    assert res.info["prior"] == "nuclei split" and res.info["features"]["image_components"] == 8
