"""Visium HD: bins under segmented nuclei summed into cells, on a synthetic HD slide with known cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import spatial_assets as sa


def _synthetic_hd(seed: int, n_cells: int = 12, size: int = 240, pitch: int = 4, genes: int = 30):
    """Disc nuclei in a label image; bins every ``pitch`` px; a bin inside cell k draws Poisson(profile_k), a
    background bin draws Poisson(background) (ambient RNA)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    centres = rng.uniform(25, size - 25, size=(n_cells, 2))
    for k, (cx, cy) in enumerate(centres, start=1):
        labels[((xx - cx) ** 2 + (yy - cy) ** 2 <= 9**2) & (labels == 0)] = k
    profiles = rng.gamma(0.5, 2.0, size=(n_cells, genes))
    background = np.full(genes, 1.0)
    by, bx = np.mgrid[pitch // 2 : size : pitch, pitch // 2 : size : pitch]
    bxy = np.c_[bx.ravel(), by.ravel()].astype(float)
    owner = labels[by.ravel(), bx.ravel()]
    lam = np.where(owner[:, None] > 0, profiles[np.maximum(owner - 1, 0)], background[None, :])
    X = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    bins = ad.AnnData(X=X)
    bins.obs_names = [f"b{i}" for i in range(bins.n_obs)]
    bins.obsm["spatial"] = bxy
    return bins, labels, profiles, centres


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a**2).sum(1) * (b**2).sum(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bins_to_cells_recovers_cells_better_than_nearest_nucleus(seed):
    bins, labels, profiles, centres = _synthetic_hd(seed)
    cells = sa.platforms.bins_to_cells(bins, labels)
    k = cells.obs["label"].to_numpy() - 1
    # exact: each cell is the sum of the bins whose centre lies on its label (naive per-cell check)
    xy = np.rint(bins.obsm["spatial"]).astype(int)
    on = labels[xy[:, 1], xy[:, 0]]
    for j, lab in enumerate(cells.obs["label"]):
        np.testing.assert_allclose(cells.X[j].toarray().ravel(), bins.X[on == lab].toarray().sum(0))
    assert cells.uns["bins_to_cells"]["fraction_bins_assigned"] == pytest.approx((on > 0).mean())
    # accuracy against the true profiles vs the simplest baseline on the same inputs: every bin to its nearest
    # nucleus centre (Voronoi), which mixes in the ambient background
    r_ours = _corr_rows(cells.X.toarray(), profiles[k])
    nearest = cKDTree(centres).query(bins.obsm["spatial"])[1]
    vor = np.vstack([bins.X[nearest == i].toarray().sum(0) for i in range(len(centres))])
    r_vor = _corr_rows(vor[k], profiles[k])
    assert np.median(r_ours) > np.median(r_vor) + 0.05
    from scipy.ndimage import center_of_mass

    com = np.array(center_of_mass(np.ones_like(labels), labels, cells.obs["label"].to_numpy()))[:, ::-1]
    np.testing.assert_allclose(cells.obsm["spatial"], com, atol=2.5)  # within a bin pitch of each nucleus centre


def test_expanded_nuclei_take_more_bins_and_errors_are_named():
    bins, labels, _, _ = _synthetic_hd(0)
    a = sa.platforms.bins_to_cells(bins, labels)
    b = sa.platforms.bins_to_cells(bins, labels, expand_px=4)
    assert (b.obs["n_bins"].to_numpy() >= a.obs["n_bins"].to_numpy()).all()
    assert b.uns["bins_to_cells"]["fraction_bins_assigned"] > a.uns["bins_to_cells"]["fraction_bins_assigned"]
    far = bins.copy()
    far.obsm["spatial"] = far.obsm["spatial"] + 10_000
    with pytest.raises(sa.io.InputError, match="no bin centre lies inside the label image"):
        sa.platforms.bins_to_cells(far, labels)
    del far.obsm["spatial"]
    with pytest.raises(sa.io.InputError, match=r"obsm\['spatial'\] is missing"):
        sa.platforms.bins_to_cells(far, labels)


def test_segment_bins_is_segmentation_then_bins_to_cells(demo_small):
    """One step of the ``segmented_slide`` asset on Visium HD: the grown nuclei's bins, each cell its own spot."""
    from spatial_assets.params import SegmentationParams
    from tests.platforms.hd_synthetic import simulate_hd_bins

    bins, truth = simulate_hd_bins(demo_small, bin_um=2.0, ambient=0.01, seed=3)
    bins.uns["spatial"] = {"hd": {"scalefactors": {"microns_per_pixel": 0.8, "spot_diameter_fullres": 2.5}}}
    params = SegmentationParams(method="watershed", min_umi=0)
    res, cells = sa.platforms.segment_bins(bins, sa.io.read_image(demo_small.image), params, expand_um=4.0)
    want = sa.platforms.bins_to_cells(bins, np.asarray(res.labels), expand_px=5)  # 4 um / 0.8 um per px
    assert list(cells.obs_names) == list(want.obs_names)
    np.testing.assert_array_equal(cells.X.toarray(), want.X.toarray())
    assert (res.cells["spot"].to_numpy() == cells.obs_names.to_numpy()).all()
    assert (res.spots["n_cells"] == 1).all() and res.info["bins_to_cells"]["expand_px"] == 5
    assert res.info["expand_um"] == 4.0 and res.summary["fraction_bins_assigned"] > 0
    assert 0.5 * truth.n_obs < cells.n_obs < 2 * truth.n_obs  # about one cell per true nucleus
    with pytest.raises(sa.io.InputError, match="needs an H&E image"):
        sa.platforms.segment_bins(bins, None, params)
    del bins.uns["spatial"]
    with pytest.raises(sa.io.InputError, match=r"\['microns_per_pixel'\] is missing"):
        sa.platforms.segment_bins(bins, demo_small.image, params, expand_um=4.0)
