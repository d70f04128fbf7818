"""Invariants of the realistic benchmark slides (real MOp cells at real osmFISH positions)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatial_assets.datasets import NUCLEUS_MORPHOLOGY, build_realistic_slide, data_path

CROP = (0.0, 600.0, 700.0, 1300.0)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("realistic")
    return {m: build_realistic_slide(d / m, seed=3, morphology=m, crop_um=CROP) for m in ("by_type", "uniform")}


def test_spots_are_sums_of_disjoint_tissue_cells(slides):
    p = slides["by_type"]
    slide, cells, ref = ad.read_h5ad(p.slide), ad.read_h5ad(p.truth_cells), ad.read_h5ad(p.reference)
    spot = cells.obs["spot"].astype(str).to_numpy()
    inside = spot != ""
    sums = cells[inside].to_df().groupby(spot[inside]).sum()
    np.testing.assert_array_equal(slide.to_df().loc[sums.index].to_numpy(), sums.to_numpy())
    # the reference never holds a tissue cell's source barcode, and every class of the tissue is in it
    assert not set(cells.obs["mop_cell"]) & set(ref.obs_names)
    assert set(cells.obs["cell_class"]) <= set(ref.obs["cell_class"])
    assert set(cells.obs["cell_type"]) <= set(ref.obs["cell_type"])
    assert 3.0 < slide.obs["n_cells_true"].mean() < 9.0


def test_capture_thins_counts_below_the_source(slides):
    cells = ad.read_h5ad(slides["by_type"].truth_cells)
    mop = ad.read_h5ad(data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad"))
    src = mop[cells.obs["mop_cell"].to_numpy()].X
    assert (cells.X <= src).toarray().all()
    ratio = np.asarray(cells.X.sum(0)).ravel() / np.maximum(np.asarray(src.sum(0)).ravel(), 1)
    cap = cells.var["capture_rate"].to_numpy()
    ok = np.asarray(src.sum(0)).ravel() > 500
    assert np.corrcoef(ratio[ok], cap[ok])[0, 1] > 0.9


def test_morphology_informative_only_by_type(slides):
    def explained(p):  # share of the nucleus-radius variance explained by the class (eta squared)
        obs = ad.read_h5ad(p.truth_cells).obs
        r = obs["nucleus_radius_px"]
        fitted = obs.groupby("cell_class", observed=True)["nucleus_radius_px"].transform("mean")
        return float(1 - ((r - fitted) ** 2).sum() / ((r - r.mean()) ** 2).sum())

    assert explained(slides["by_type"]) > 0.5
    assert explained(slides["uniform"]) < 0.15
    assert len(NUCLEUS_MORPHOLOGY) == 12


def test_seeded(tmp_path):
    a = build_realistic_slide(tmp_path / "a", seed=5, crop_um=CROP)
    b = build_realistic_slide(tmp_path / "b", seed=5, crop_um=CROP)
    c = build_realistic_slide(tmp_path / "c", seed=6, crop_um=CROP)
    xa, xb, xc = (ad.read_h5ad(p.slide).X for p in (a, b, c))
    assert (xa != xb).nnz == 0
    assert xa.shape != xc.shape or (xa != xc).nnz > 0
    pd.testing.assert_frame_equal(ad.read_h5ad(a.truth_cells).obs, ad.read_h5ad(b.truth_cells).obs)
