"""Xenium (cells already segmented): platform ``xenium`` runs as an imaging panel (each cell its own spot,
non-integer counts rounded for typing, genes outside the panel imputed) and needs no image at config load."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import spatial_assets as sa
from spatial_assets.constants import Platform
from spatial_assets.datasets import simulate_imaging_sample
from spatial_assets.params import CellTypingParams, DecompositionParams, SegmentationParams


@pytest.fixture(scope="module")
def panel(demo_small):
    truth = ad.read_h5ad(demo_small.truth_cells)
    ref = ad.read_h5ad(demo_small.reference)
    slide, held = simulate_imaging_sample(truth, n_measured=22, seed=0)
    slide.X = slide.X.astype(np.float32) * np.float32(1.3)  # volume-normalised: non-integer counts
    return slide, held, ref


def test_platform_properties():
    assert Platform("xenium").image_free and Platform("xenium").imaging
    assert not Platform("visium").imaging and not Platform("slideseq").imaging


@pytest.mark.slow
def test_xenium_types_and_imputes_exactly_as_an_imaging_panel(panel):
    slide, held, ref = panel
    typing = CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=10, small_types="drop")
    out = {}
    for platform in ("merfish", "xenium"):
        seg = sa.seg.segment_sample(slide, None, platform, SegmentationParams(min_umi=0))
        typed = sa.tl.cell_types(slide, ref, "cell_type", seg, typing, platform=platform)
        cells = sa.tl.decompose(
            slide, typed, ref, "cell_type", DecompositionParams(n_replicates=1, seed=3), platform=platform
        )
        out[platform] = (typed, cells)
    (t_m, c_m), (t_x, c_x) = out["merfish"], out["xenium"]
    assert (t_x.cells["cell_type"] == t_m.cells["cell_type"]).all()
    np.testing.assert_array_equal(np.asarray(c_x.X), np.asarray(c_m.X))
    assert c_x.uns["decomposition"]["genes_imputed"] == len(held)  # genes outside the panel are imputed
    assert set(held) <= set(c_x.var_names[~c_x.var["in_slide"].to_numpy(bool)])


def test_xenium_needs_no_image_at_config_load(tmp_path):
    import yaml

    from spatial_assets.orchestration.config import load_config

    (tmp_path / "cells.h5ad").write_bytes(b"x")
    (tmp_path / "ref.h5ad").write_bytes(b"x")
    doc = {
        "references": [{"name": "r", "path": "ref.h5ad"}],
        "samples": [{"name": "x", "spatial": "cells.h5ad", "platform": "xenium", "reference": "r"}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    assert load_config(tmp_path / "p.yaml").samples[0].platform == Platform.XENIUM
