"""The per-sample SpatialData asset, materialized through Dagster on stores built from the small demo with the
same writers the upstream assets use: elements, tables and region keys, squidpy on the cells table, a non-blank
spatialdata-plot render, sub-spots optional, and the figure / metadata of the materialization."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import yaml

import spatial_assets as sa
from spatial_assets import io as sio
from spatial_assets.orchestration.config import load_config
from spatial_assets.orchestration.partitions import register_partitions
from spatial_assets.orchestration.resources import ProjectResource
from spatial_assets.orchestration.spatialdata import sample_spatialdata
from spatial_assets.orchestration.stores import Stores
from spatial_assets.params import CellTypingParams, SegmentationParams, SoScopeParams
from tests.io.conftest import assert_not_blank, rendered_png

SEG = SegmentationParams(method="stardist", model="bundled:stardist_nuclei", min_umi=20)
pytestmark = pytest.mark.slow  # ~80 s on 2 cores (segmentation, typing and decomposition of the small demo)

TYPING = CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50, small_types="drop")


@pytest.fixture(scope="module")
def project(demo_small, tmp_path_factory):
    """A config over the small demo and its upstream stores (no sub-spots yet)."""
    tmp = tmp_path_factory.mktemp("sdata_asset")
    doc = {
        "storage_root": str(tmp / "store"),
        "references": [{"name": "ref", "path": str(demo_small.reference), "cell_type_key": "cell_type"}],
        "samples": [
            {"name": "demo", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
        ],
    }
    cfg_path = tmp / "dagster_project.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    inputs = sa.io.load_slide(demo_small.slide, "visium", demo_small.image, name="demo")
    reference = sa.io.load_reference(demo_small.reference, "cell_type")
    seg = sa.seg.segment_sample(inputs.slide, inputs.image, "visium", SEG)
    typed = sa.tl.cell_types(inputs.slide, reference, "cell_type", seg, TYPING)
    cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")
    st = Stores(tmp / "store")
    sio.write_anndata(inputs.slide, st.slide("demo"))
    sio.write_arrays({"image": np.asarray(inputs.image)}, st.slide_image("demo"))
    sio.write_arrays({"labels": np.asarray(seg.labels)}, st.segmented("demo").labels)
    sio.write_dataframe(typed.cells, st.typed("demo").cells)
    sio.write_anndata(typed.spots, st.typed("demo").spots)
    sio.write_anndata(cells, st.decomposed("demo"))
    instance = dg.DagsterInstance.ephemeral()
    register_partitions(instance, load_config(cfg_path))
    return {"cfg": cfg_path, "stores": st, "inputs": inputs, "typed": typed, "cells": cells, "instance": instance}


def _materialize(project):
    res = dg.materialize(
        [sample_spatialdata],
        partition_key="demo",
        instance=project["instance"],
        resources={"project": ProjectResource(config_path=str(project["cfg"]))},
    )
    assert res.success
    ev = res.asset_materializations_for_node("sample_spatialdata")[0]
    return {k: getattr(v, "value", v) for k, v in ev.metadata.items()}


@pytest.fixture(scope="module")
def without_subspots(project):
    md = _materialize(project)
    return md, project["stores"].spatialdata("demo")


def test_store_elements_tables_and_region_keys(project, without_subspots):
    import spatialdata as sd

    md, path = without_subspots
    assert path == project["stores"].root / "spatialdata" / "demo.zarr" and sio.is_complete(path)
    s = sd.read_zarr(path)
    assert set(s.images) == {"demo_he"} and set(s.labels) == {"demo_nuclei"}
    assert set(s.shapes) == {"spots", "cells"}  # no soScope run yet: no sub-spots
    assert set(s.tables) == {"spot_weights", "typed_cells", "decomposed_cells"}
    for name, region in [("spot_weights", "spots"), ("typed_cells", "cells"), ("decomposed_cells", "cells")]:
        attrs = s.tables[name].uns["spatialdata_attrs"]
        assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (region, "region", "instance_id")
        assert set(s.tables[name].obs["instance_id"]) <= set(s.shapes[region].index)
    typed, cells = project["typed"], project["cells"]
    assert s.tables["typed_cells"].n_obs == len(typed.cells) == len(s.shapes["cells"])
    assert list(s.tables["typed_cells"].obs["cell_type"]) == list(typed.cells["cell_type"].astype(str))
    assert s.tables["decomposed_cells"].n_obs == cells.n_obs
    np.testing.assert_allclose(np.asarray(s.tables["decomposed_cells"].X), np.asarray(cells.X), rtol=1e-6)
    assert len(s.shapes["spots"]) == project["inputs"].slide.n_obs
    assert {"global", "pixels"} <= set(s.coordinate_systems)
    # the materialization's metadata: figure first, what is in the store, what was left out
    assert "spatialdata_render" in md and md["spatialdata_render"].startswith("![")
    assert md["tables"] == "spot_weights, typed_cells, decomposed_cells"
    assert md["elements"] == "demo_he, demo_nuclei, spots, cells"
    assert md["coordinate_systems"] == "global, pixels"
    assert md["left_out"] == "subspots"


def test_squidpy_reads_the_cells_table_and_render_is_not_blank(without_subspots):
    import spatialdata as sd
    import squidpy as sq

    s = sd.read_zarr(without_subspots[1])
    t = s.tables["typed_cells"].copy()
    sq.gr.spatial_neighbors(t, coord_type="generic", n_neighs=6)
    assert t.obsp["spatial_connectivities"].shape == (t.n_obs, t.n_obs)
    assert (np.asarray(t.obsp["spatial_connectivities"].sum(1)).ravel() == 6).all()
    assert_not_blank(rendered_png(lambda: sio.render_spatialdata(s)))


def test_subspots_join_when_soscope_has_run(project, without_subspots):
    import spatialdata as sd

    inputs = project["inputs"]
    sub = sa.tl.enhance(inputs.slide, SoScopeParams(epochs=10, vgae_epochs=10, image_features="none"))
    sio.write_anndata(sub, project["stores"].subspots("demo"))
    md = _materialize(project)
    s = sd.read_zarr(project["stores"].spatialdata("demo"))
    assert set(s.shapes) == {"spots", "cells", "subspots"}
    t = s.tables["enhanced_subspots"]
    assert t.uns["spatialdata_attrs"]["region"] == "subspots" and t.n_obs == sub.n_obs == len(s.shapes["subspots"])
    assert md["left_out"] == "none"
