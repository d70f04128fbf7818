"""SpatialData out: one zarr per sample with the H&E (multiscale), nuclei labels, spots / cells / sub-spots as
circles in um, tables with region / instance keys, pixel <-> um transformations; atomic; renders with
spatialdata-plot."""

from __future__ import annotations

import numpy as np
import pytest

import spatial_assets as sa
from tests.io.conftest import assert_not_blank, rendered_png


@pytest.fixture(scope="module")
def written(api_run, tmp_path_factory):
    inputs, seg, typed, cells = api_run
    sdata = sa.io.to_spatialdata(
        inputs.slide,
        image=np.asarray(inputs.image),
        labels=np.asarray(seg.labels),
        cells=typed.cells,
        decomposed=cells,
        spot_weights=typed.spots,
        sample="demo",
    )
    path = sa.io.write_spatialdata(sdata, tmp_path_factory.mktemp("sd") / "demo.zarr")
    return path


def test_elements_tables_and_transformations_round_trip(api_run, written):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    inputs, seg, typed, cells = api_run
    assert sa.io.is_complete(written)
    s = sd.read_zarr(written)
    assert set(s.images) == {"demo_he"} and set(s.labels) == {"demo_nuclei"}
    assert len(s.images["demo_he"]) == 3  # multiscale: full, /2, /4
    assert set(s.shapes) == {"spots", "cells"}
    um, _ = sa.platforms.microns_per_pixel(inputs.slide)
    # spots in um in 'global'; back in full-resolution pixels through the 'pixels' transformation
    spots = s.shapes["spots"]
    xy_um = np.c_[spots.geometry.x, spots.geometry.y]
    to_px = get_transformation(spots, to_coordinate_system="pixels").to_affine_matrix(("x", "y"), ("x", "y"))
    xy_px = xy_um @ to_px[:2, :2].T + to_px[:2, 2]
    np.testing.assert_allclose(xy_px, np.asarray(inputs.slide[spots.index].obsm["spatial"])[:, :2], rtol=1e-6)
    sf = inputs.slide.uns["spatial"]["demo"]["scalefactors"]
    np.testing.assert_allclose(spots["radius"], sf["spot_diameter_fullres"] / 2 * um)
    img_to_um = get_transformation(s.images["demo_he"], to_coordinate_system="global").to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    np.testing.assert_allclose(np.diag(img_to_um)[:2], [um, um])
    # tables annotate their shapes by region / instance keys
    for name, region in [("spot_weights", "spots"), ("typed_cells", "cells"), ("decomposed_cells", "cells")]:
        t = s.tables[name]
        attrs = t.uns["spatialdata_attrs"]
        assert attrs["region"] == region and attrs["region_key"] == "region" and attrs["instance_key"] == "instance_id"
        assert set(t.obs["instance_id"]) <= set(s.shapes[region].index)
    assert s.tables["decomposed_cells"].n_obs == cells.n_obs
    np.testing.assert_allclose(s.tables["decomposed_cells"].layers["counts"], cells.layers["counts"], rtol=1e-6)
    prop = s.tables["spot_weights"].obsm["proportions"]
    typed_rows = typed.spots.obs["typing_status"].to_numpy() == "typed"
    np.testing.assert_allclose(np.asarray(prop)[typed_rows].sum(1), 1.0, atol=1e-4)
    # nuclei labels: each cell's label covers its centre (same pixels as the cells table)
    lab = np.asarray(s.labels["demo_nuclei"]["scale0"]["image"])
    c = typed.cells
    at = lab[c["y"].round().astype(int).clip(0, lab.shape[0] - 1), c["x"].round().astype(int).clip(0, lab.shape[1] - 1)]
    assert (at == c["label"].to_numpy()).mean() > 0.8


def test_renders_with_spatialdata_plot(written):
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  (registers .pl)

    s = sd.read_zarr(written)
    px = rendered_png(
        lambda: (
            s.pl.render_images("demo_he")
            .pl.render_shapes("cells", color="cell_type", table_name="typed_cells")
            .pl.show(coordinate_systems="global")
        )
    )
    assert_not_blank(px)


def test_write_is_atomic_and_errors_name_the_problem(api_run, tmp_path):
    inputs, seg, typed, cells = api_run
    path = sa.io.write_spatialdata(sa.io.to_spatialdata(inputs.slide, sample="demo"), tmp_path / "s.zarr")

    class Broken:
        def write(self, *a, **k):
            (a[0] / "partial").mkdir(parents=True)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sa.io.write_spatialdata(Broken(), path)
    assert sa.io.is_complete(path) and not (path / "partial").exists()  # the previous store is intact
    with pytest.raises(sa.io.InputError, match=r"decomposed cells: 1 cell ids are not in the cells table"):
        sa.io.to_spatialdata(
            inputs.slide,
            cells=typed.cells.iloc[1:],
            decomposed=cells[cells.obs_names.isin(typed.cells.index[:1])].copy(),
        )


def test_from_stores_names_a_missing_slide_store(tmp_path):
    missing = tmp_path / "slide_inputs" / "s.zarr"
    with pytest.raises(sa.io.InputError, match=r"s\.zarr: the slide-inputs store is missing or incomplete"):
        sa.io.spatialdata_from_stores(missing, cells=tmp_path / "cells.zarr")
