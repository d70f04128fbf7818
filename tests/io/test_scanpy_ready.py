"""Scanpy-ready outputs: obsm/uns['spatial'] so that sc.pl.spatial and sq.pl.spatial_scatter render with no glue,
a raw-scale counts layer that adds back up to the spots, and spot weights over every input barcode."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import spatial_assets as sa
from spatial_assets.params import SoScopeParams
from tests.io.conftest import assert_not_blank, rendered_png


def test_decomposed_cells_render_in_scanpy_and_squidpy(api_run):
    import scanpy as sc
    import squidpy as sq

    inputs, _, _, cells = api_run
    lib = next(iter(cells.uns["spatial"]))
    assert lib == "demo"
    np.testing.assert_allclose(cells.obsm["spatial"], cells.obs[["x", "y"]].to_numpy())
    sf = cells.uns["spatial"][lib]["scalefactors"]
    assert sf["spot_diameter_fullres"] == inputs.slide.uns["spatial"]["demo"]["scalefactors"]["spot_diameter_fullres"]
    assert_not_blank(rendered_png(lambda: sc.pl.spatial(cells, color="cell_type", spot_size=20, show=False)))
    assert_not_blank(rendered_png(lambda: sq.pl.spatial_scatter(cells, color="cell_type", shape=None, size=20)))


def test_counts_layer_adds_back_up_to_the_raw_spots(api_run):
    inputs, _, typed, cells = api_run
    assert "reference's normalised scale" in cells.uns["X_description"]
    C = pd.DataFrame(cells.layers["counts"], columns=cells.var_names).groupby(cells.obs["spot"].to_numpy()).sum()
    raw = inputs.slide[C.index].to_df()[C.columns].to_numpy()
    rel = np.abs(C.to_numpy() - raw).sum() / raw.sum()
    # X itself is in the reference's scale: its spot sums are far from the raw counts, the counts layer is close
    X = pd.DataFrame(np.asarray(cells.X), columns=cells.var_names).groupby(cells.obs["spot"].to_numpy()).sum()
    rel_x = np.abs(X.to_numpy() - raw).sum() / raw.sum()
    assert rel < 0.1 < rel_x


def test_spot_weights_cover_every_input_barcode_with_reasons(api_run):
    inputs, seg, typed, _ = api_run
    w = typed.spots
    assert list(w.obs_names) == list(inputs.slide.obs_names)
    assert list(w.var_names) == list(typed.weights.columns)
    typed_mask = (w.obs["typing_status"] == "typed").to_numpy()
    assert typed_mask.sum() == len(typed.weights)
    np.testing.assert_allclose(np.asarray(w.X)[typed_mask].sum(1), 1.0, atol=1e-4)
    assert np.isnan(np.asarray(w.X)[~typed_mask]).all()
    # a spot failing segmentation QC is marked with its reason
    spots = seg.spots.copy()
    bad = spots.index[0]
    spots.loc[bad, ["qc_pass", "qc_reason"]] = [False, "fewer than min_umi counts"]
    skip = inputs.slide.obs_names[1]
    weights = typed.weights.drop(index=[bad, skip], errors="ignore")
    w2 = sa.io.spot_weights_anndata(weights, inputs.slide, spots=spots, skipped={skip: "no cells"})
    assert w2.obs.loc[bad, "typing_status"] == "segmentation QC: fewer than min_umi counts"
    assert w2.obs.loc[skip, "typing_status"] == "skipped: no cells"
    with pytest.raises(
        sa.io.InputError, match=r"typed cells weights: 1 spots are not in the slide \(e.g. \['nope'\]\)"
    ):
        sa.io.spot_weights_anndata(pd.concat([weights, weights.iloc[:1].rename(index=lambda _: "nope")]), inputs.slide)


def test_uns_spatial_is_built_from_the_image_when_the_slide_has_none(api_run):
    import scanpy as sc

    inputs, _, _, cells = api_run
    slide = inputs.slide.copy()
    sf = dict(slide.uns["spatial"]["demo"]["scalefactors"])
    slide.uns["spatial"] = {"demo": {"scalefactors": {"spot_diameter_fullres": sf["spot_diameter_fullres"]}}}
    out = cells.copy()
    del out.obsm["spatial"]
    sa.io.make_scanpy_ready(out, slide, np.asarray(inputs.image), store="decomposed_cells")
    entry = out.uns["spatial"]["demo"]
    H, W = inputs.image.shape[:2]
    assert max(entry["images"]["hires"].shape[:2]) <= 2000 and max(entry["images"]["lowres"].shape[:2]) <= 600
    assert entry["images"]["lowres"].shape[0] == pytest.approx(H * entry["scalefactors"]["tissue_lowres_scalef"], abs=1)
    assert_not_blank(
        rendered_png(lambda: sc.pl.spatial(out, color="cell_type", img_key="lowres", spot_size=20, show=False))
    )
    bare = slide.copy()
    bare.uns["spatial"] = {"demo": {}}
    with pytest.raises(
        sa.io.InputError, match=r"uns\['spatial'\]\['demo'\]\['scalefactors'\]\['spot_diameter_fullres'\] is missing"
    ):
        sa.io.make_scanpy_ready(cells.copy(), bare, store="decomposed_cells")


@pytest.mark.slow
def test_enhanced_subspots_render_and_counts_conserve_spots(api_run):
    import scanpy as sc

    inputs, seg, _, _ = api_run
    sub = sa.tl.enhance(inputs.slide, SoScopeParams(epochs=10, vgae_epochs=10, image_features="none"), nuclei=seg.cells)
    assert "demo" in sub.uns["spatial"]
    sums = pd.DataFrame(sub.layers["counts"], columns=sub.var_names).groupby(sub.obs["spot"].to_numpy()).sum()
    raw = inputs.slide[sums.index].to_df()[sums.columns].to_numpy()
    np.testing.assert_allclose(sums.to_numpy(), raw, rtol=1e-3, atol=1e-3)
    assert_not_blank(rendered_png(lambda: sc.pl.spatial(sub, color=sub.var_names[0], spot_size=15, show=False)))
