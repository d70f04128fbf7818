"""Visium HD and Xenium output folders on disk, in the exact layout spatialdata-io 0.7.1's readers expect (written
by tests/platforms/hd_synthetic.py from synthetic data, h5 files in 10x's matrix layout), read back through the
project's readers, ``load_slide`` and the config path; the files the readers cannot do without are named."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

import spatial_assets as sa
from spatial_assets.datasets import simulate_imaging_sample
from tests.platforms.hd_synthetic import simulate_hd_bins, write_visium_hd_folder, write_xenium_folder


@pytest.fixture(scope="module")
def hd_folder(tmp_path_factory, demo_small):
    folder = tmp_path_factory.mktemp("hd") / "outs"
    out = {}
    for size in (8, 16):  # two bin sizes in one outs/ folder, as Space Ranger writes them
        bins, _ = simulate_hd_bins(demo_small, bin_um=float(size), ambient=0.01, seed=size)
        write_visium_hd_folder(folder, bins, hires_png=np.full((300, 280, 3), 200, np.uint8))
        out[size] = bins
    return folder, out


@pytest.mark.parametrize("size", [8, 16])
def test_visium_hd_folder_round_trips_through_spatialdata_io(hd_folder, size):
    folder, bins = hd_folder
    b = sa.io.read_visium_hd_bins(folder, bin_size=size)
    want = bins[size]
    assert list(b.obs_names) == list(want.obs_names) and list(b.var_names) == list(want.var_names)
    np.testing.assert_array_equal(sp.csr_matrix(b.X).toarray(), sp.csr_matrix(want.X).toarray())
    np.testing.assert_allclose(b.obsm["spatial"], want.obsm["spatial"])
    lib = next(iter(b.uns["spatial"]))
    sf = b.uns["spatial"][lib]["scalefactors"]
    assert sf["bin_size_um"] == size and sf["microns_per_pixel"] == pytest.approx(0.8)
    assert sf["spot_diameter_fullres"] == pytest.approx(size / 0.8)  # the bin's side in full-resolution pixels
    assert b.uns["spatial"][lib]["images"]["hires"].shape[:2] == (300, 280)
    assert sf["tissue_hires_scalef"] == pytest.approx(0.5)
    # the same through load_slide (read_spatial dispatches on binned_outputs/), counts checked as raw integers
    loaded = sa.io.load_slide(folder, "visium_hd", bin_size=size)
    assert loaded.slide.n_obs == want.n_obs and loaded.info["platform"] == "visium_hd"
    assert sa.platforms.microns_per_pixel(loaded.slide, "visium_hd")[0] == pytest.approx(0.8)


def test_visium_hd_missing_files_are_named(tmp_path, demo_small):
    bins, _ = simulate_hd_bins(demo_small, bin_um=16.0, ambient=0.01, seed=0)
    folder = write_visium_hd_folder(tmp_path / "outs", bins)
    with pytest.raises(sa.io.InputError, match="missing binned_outputs/square_008um/filtered_feature_bc_matrix.h5"):
        sa.io.read_visium_hd_bins(folder, bin_size=8)
    (folder / "binned_outputs/square_016um/spatial/tissue_positions.parquet").unlink()
    with pytest.raises(
        sa.io.InputError, match=r"missing binned_outputs/square_016um/spatial/tissue_positions\.parquet"
    ):
        sa.io.load_slide(folder, "visium_hd", bin_size=16)
    (folder / "feature_slice.h5").unlink()
    assert sa.io.visium_hd_missing_files(folder, 16) == [
        "feature_slice.h5",
        "binned_outputs/square_016um/spatial/tissue_positions.parquet",
    ]


@pytest.fixture(scope="module")
def xenium_cells(demo_small):
    truth = ad.read_h5ad(demo_small.truth_cells)
    cells, held = simulate_imaging_sample(truth, n_measured=20, seed=0)
    return cells, held


def test_xenium_folder_round_trips_and_goes_through_the_config(tmp_path, xenium_cells, demo_small):
    from spatial_assets.orchestration.config import load_config

    cells, _ = xenium_cells
    folder = write_xenium_folder(tmp_path / "xenium", cells)
    x = sa.io.read_xenium(folder)
    assert x.n_obs == cells.n_obs and list(x.var_names) == list(cells.var_names)
    np.testing.assert_array_equal(sp.csr_matrix(x.X).toarray(), np.rint(sp.csr_matrix(cells.X).toarray()))
    np.testing.assert_allclose(x.obsm["spatial"], np.asarray(cells.obsm["spatial"])[:, :2])  # micrometres
    loaded = sa.io.load_slide(folder, "xenium")
    assert loaded.slide.n_obs == int((np.asarray(cells.X.sum(1)).ravel() > 0).sum())
    assert sa.io.count_spots(folder) == cells.n_obs
    doc = {
        "references": [{"name": "r", "path": str(demo_small.reference)}],
        "samples": [{"name": "x", "spatial": str(folder), "platform": "xenium", "reference": "r"}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.samples[0].spatial == folder.resolve()


def test_xenium_missing_files_are_named(tmp_path, xenium_cells):
    cells, _ = xenium_cells
    folder = write_xenium_folder(tmp_path / "xenium", cells)
    (folder / "cells.zarr.zip").unlink()
    with pytest.raises(sa.io.InputError, match=r"missing cells\.zarr\.zip"):
        sa.io.read_xenium(folder)
    with pytest.raises(sa.io.InputError, match=r"missing cells\.zarr\.zip"):
        sa.io.load_slide(folder, "xenium")
