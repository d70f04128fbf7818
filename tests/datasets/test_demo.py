"""Invariants of the ground-truth demo slide built from real osmFISH cells."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tifffile

from spatial_assets import geometry
from spatial_assets.datasets import OSMFISH_UM_PER_PX, build_demo


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def test_spot_sums_equal_cell_sums(demo_full):
    slide = ad.read_h5ad(demo_full.slide)
    cells = ad.read_h5ad(demo_full.truth_cells)
    spot = cells.obs["spot"].astype(str).to_numpy()
    inside = spot != ""
    by_spot = cells[inside].to_df().groupby(spot[inside]).sum()
    got = slide.to_df().loc[by_spot.index]
    np.testing.assert_array_equal(got.to_numpy(), by_spot.to_numpy())
    # every slide spot has at least one cell, and n_cells_true agrees with the truth table
    counts = pd.Series(spot[inside]).value_counts()
    assert set(counts.index) == set(slide.obs_names)
    np.testing.assert_array_equal(slide.obs["n_cells_true"].to_numpy(), counts.loc[slide.obs_names].to_numpy())


def test_every_cell_in_at_most_one_spot_and_inside_its_circle(demo_full):
    slide = ad.read_h5ad(demo_full.slide)
    cells = ad.read_h5ad(demo_full.truth_cells).obs
    r = slide.uns["spatial"]["demo"]["scalefactors"]["spot_diameter_fullres"] / 2
    xy = cells[["x", "y"]].to_numpy()
    sxy = np.asarray(slide.obsm["spatial"])
    d = np.sqrt(((xy[:, None, :] - sxy[None, :, :]) ** 2).sum(-1))  # small: 2,420 x 252
    n_containing = (d <= r).sum(1)
    assert n_containing.max() <= 1
    inside = cells["spot"].to_numpy() != ""
    np.testing.assert_array_equal(inside, n_containing == 1)
    idx = pd_index = {s: i for i, s in enumerate(slide.obs_names)}
    own = np.array([pd_index[s] for s in cells["spot"][inside]])
    assert (d[np.flatnonzero(inside), own] <= r).all()
    del idx


def test_subspot_sums_equal_spot_and_nearest_centre(demo_full):
    slide = ad.read_h5ad(demo_full.slide)
    sub = ad.read_h5ad(demo_full.truth_subspots)
    assert sub.n_obs == 7 * slide.n_obs
    summed = _dense(sub.X).reshape(slide.n_obs, 7, -1).sum(1)
    assert list(sub.obs["spot"].to_numpy()[::7]) == list(slide.obs_names)
    np.testing.assert_array_equal(summed, _dense(slide.X))
    cells = ad.read_h5ad(demo_full.truth_cells).obs
    inside = cells[cells["spot"] != ""]
    sub_xy = sub.obs[["x", "y"]].to_numpy().reshape(slide.n_obs, 7, 2)
    pos = {s: i for i, s in enumerate(slide.obs_names)}
    si = np.array([pos[s] for s in inside["spot"]])
    dd = ((inside[["x", "y"]].to_numpy()[:, None, :] - sub_xy[si]) ** 2).sum(-1)
    np.testing.assert_array_equal(dd.argmin(1), inside["subspot"].to_numpy())


def test_reference_and_tissue_are_disjoint_halves(demo_full):
    ref = ad.read_h5ad(demo_full.reference)
    cells = ad.read_h5ad(demo_full.truth_cells)
    assert not set(ref.obs_names) & set(cells.obs_names)
    assert abs(ref.n_obs - cells.n_obs) <= 1
    assert ref.n_obs + cells.n_obs == 4839 - 476  # all valid osmFISH cells, source duplicates dropped
    assert {"cell_type", "cell_class"} <= set(ref.obs.columns)
    X = _dense(ref.X)
    assert (X == np.round(X)).all() and X.min() >= 0


def test_nuclei_image_matches_cells(demo_full):
    info = json.loads(demo_full.info.read_text())
    labels = tifffile.imread(demo_full.nuclei_labels)
    img = tifffile.imread(demo_full.image)
    assert img.shape == tuple(info["image_shape"]) and img.dtype == np.uint8
    assert labels.shape == img.shape[:2]
    cells = ad.read_h5ad(demo_full.truth_cells).obs
    xy = np.round(cells[["x", "y"]].to_numpy()).astype(int)
    # the pixel at (almost) every cell centre belongs to that cell's nucleus (overlaps may hide a few)
    hit = labels[xy[:, 1], xy[:, 0]] == cells["label"].to_numpy()
    assert hit.mean() > 0.97
    # nuclei are darker than background
    assert img[labels > 0].mean() < img[labels == 0].mean() - 40


def test_scale_is_documented_and_consistent(demo_full):
    slide = ad.read_h5ad(demo_full.slide)
    sf = slide.uns["spatial"]["demo"]["scalefactors"]
    assert np.isclose(sf["spot_diameter_fullres"] * sf["microns_per_pixel"], geometry.VISIUM_SPOT_DIAMETER_UM)
    assert OSMFISH_UM_PER_PX == 0.065
    # neighbouring spots are 100 um apart on the hexagonal lattice
    xy = np.asarray(slide.obsm["spatial"]) * sf["microns_per_pixel"]
    e = geometry.grid_neighbors(xy, 6, max_distance=101)
    d = np.linalg.norm(xy[e[:, 0]] - xy[e[:, 1]], axis=1)
    np.testing.assert_allclose(d, 100.0, atol=1e-6)


def test_seeded_and_reproducible(tmp_path, demo_small):
    from tests.conftest import DEMO_CROP_UM

    again = build_demo(tmp_path / "again", seed=0, crop_um=DEMO_CROP_UM)
    a, b = ad.read_h5ad(demo_small.slide), ad.read_h5ad(again.slide)
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    np.testing.assert_array_equal(tifffile.imread(demo_small.image), tifffile.imread(again.image))
    other = build_demo(tmp_path / "other", seed=1, crop_um=DEMO_CROP_UM)
    assert set(ad.read_h5ad(other.reference).obs_names) != set(ad.read_h5ad(demo_small.reference).obs_names)
