"""Inputs through spatialdata-io: the repository's real Space Ranger folder (no full-resolution TIFF), its hires
image with tissue_hires_scalef, and any SpatialData zarr with a named table (round trip of our own store)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import spatial_assets as sa
from tests.helpers import DATA

SPACERANGER = DATA / "squidpy-visium-mousebrain"


def test_visium_through_spatialdata_io_matches_the_scanpy_reader():
    a = sa.io.read_visium(SPACERANGER, dataset_id="mb")
    ref = sa.io.read_spatial(SPACERANGER)  # scanpy's read_visium
    assert a.n_obs == ref.n_obs == 100
    common = ref.obs_names.intersection(a.obs_names)
    assert len(common) == 100
    np.testing.assert_allclose(a[common].obsm["spatial"], ref[common].obsm["spatial"], atol=1.0)
    sf_json = json.loads((SPACERANGER / "spatial" / "scalefactors_json.json").read_text())
    sf = a.uns["spatial"]["mb"]["scalefactors"]
    assert sf["tissue_hires_scalef"] == pytest.approx(sf_json["tissue_hires_scalef"], rel=1e-5)
    assert sf["spot_diameter_fullres"] == pytest.approx(sf_json["spot_diameter_fullres"], rel=1e-5)
    assert a.uns["spatial"]["mb"]["images"]["hires"].shape[:2] == (2000, 2000)
    np.testing.assert_array_equal(a[common].X.toarray(), ref[common].X.toarray())


def test_hires_image_with_its_scale_factor_and_the_small_nuclei_warning():
    hires = SPACERANGER / "spatial" / "tissue_hires_image.png"
    with pytest.raises(sa.io.InputError, match="give its scale: image_scale: tissue_hires_scalef"):
        sa.io.load_slide(SPACERANGER, "visium", hires)
    with pytest.warns(UserWarning, match=r"nuclei are about 2.0 px across \(fewer than 6\)"):
        inputs = sa.io.load_slide(SPACERANGER, "visium", hires, image_scale="tissue_hires_scalef")
    full = sa.io.read_spatial(SPACERANGER)
    f = json.loads((SPACERANGER / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    np.testing.assert_allclose(inputs.slide.obsm["spatial"], np.asarray(full.obsm["spatial"]) * f)
    assert inputs.info["image_hw"] == [2000, 2000]
    with pytest.raises(sa.io.InputError, match=r"image_scale 'tissue_midres_scalef' is not in"):
        sa.io.load_slide(SPACERANGER, "visium", hires, image_scale="tissue_midres_scalef")


def test_any_spatialdata_zarr_with_a_named_table_round_trips(api_run, tmp_path):
    inputs, seg, typed, cells = api_run
    sdata = sa.io.to_spatialdata(inputs.slide, image=np.asarray(inputs.image), spot_weights=typed.spots, sample="demo")
    path = sa.io.write_spatialdata(sdata, tmp_path / "demo.zarr")
    back = sa.io.read_spatial(path, table="spot_weights")
    np.testing.assert_allclose(back.obsm["spatial"], inputs.slide[back.obs_names].obsm["spatial"], rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(back.X.todense() if hasattr(back.X, "todense") else back.X),
        np.asarray(inputs.slide[back.obs_names].X.todense()),
    )
    lib = next(iter(back.uns["spatial"]))
    d = inputs.slide.uns["spatial"]["demo"]["scalefactors"]["spot_diameter_fullres"]
    assert back.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(d, rel=1e-6)
    # the slide read back goes through the pipeline's own validation
    again = sa.io.load_slide(path, "visium", table="spot_weights")
    assert again.slide.n_obs == inputs.slide.n_obs
    with pytest.raises(sa.io.InputError, match=r"no table 'nope'; tables present: \['spot_weights'\]"):
        sa.io.read_spatial(path, table="nope")
