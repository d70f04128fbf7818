"""Small reference types: one policy (error | drop | merge) applied by prepare_reference_types, shared by typing."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.celltyping import (
    SmallTypesError,
    SmallTypesWarning,
    identify_cell_types,
    prepare_reference_types,
)
from spatial_assets.datasets import data_path, simulate_slide
from spatial_assets.params import CellTypingParams

MOP = data_path("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")


@pytest.fixture(scope="module")
def mop():
    a = ad.read_h5ad(MOP)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    a.obs["cell_class"] = a.obs["cell_class"].astype(str)
    return a


@pytest.fixture(scope="module")
def half(mop):
    """The reference half of the MOp cells (as the realistic slides use): 16 of its 44 subtypes below 25 cells."""
    rng = np.random.default_rng(0)
    return mop[rng.random(mop.n_obs) < 0.5].copy()


def _small(ref, n=25):
    vc = ref.obs["cell_type"].value_counts()
    return vc[vc < n]


def test_error_names_every_small_type_and_its_cells(half):
    small = _small(half)
    assert len(small) >= 10
    with pytest.raises(SmallTypesError) as e:
        prepare_reference_types(half, "cell_type", CellTypingParams())
    msg = str(e.value)
    assert f"{len(small)} cell type(s) have fewer than min_cells_per_type=25 cells" in msg
    for name, cnt in small.items():
        assert f"'{name}' ({cnt})" in msg
    assert "small_types" in msg  # says how to go on


def test_drop_removes_exactly_the_small_types_with_a_warning(half):
    small = _small(half)
    before = half.obs["cell_type"].copy()
    with pytest.warns(SmallTypesWarning, match=r"dropped with their (\d+) cells") as w:
        out, rep = prepare_reference_types(half, "cell_type", CellTypingParams(small_types="drop"))
    assert str(int(small.sum())) in str(w[0].message)
    pd.testing.assert_series_equal(half.obs["cell_type"], before)  # input untouched
    assert out.n_obs == half.n_obs - int(small.sum()) == half.n_obs - rep["n_cells_dropped"]
    assert set(out.obs["cell_type"].astype(str)) == set(half.obs["cell_type"]) - set(small.index)
    assert rep["dropped"] == {k: int(v) for k, v in small.items()}
    assert min(rep["final_types"].values()) >= 25
    assert (out.obs["cell_type_original"].astype(str) == out.obs["cell_type"].astype(str)).all()


def test_merge_into_class_and_drop_what_stays_small(half):
    small = _small(half)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, rep = prepare_reference_types(half, "cell_type", CellTypingParams(small_types="merge"), "cell_class")
    assert any("merged into their class" in str(x.message) for x in w)
    # every small type maps to the class most of its cells have
    for name in small.index:
        cls = half.obs.loc[half.obs["cell_type"] == name, "cell_class"].value_counts().index[0]
        assert rep["merged"][name] == cls
    # no cell lost except the groups still too small after merging, which are reported
    assert out.n_obs == half.n_obs - sum(rep["dropped"].values())
    assert all(v >= 25 for v in rep["final_types"].values())
    orig = out.obs["cell_type_original"].astype(str)
    new = out.obs["cell_type"].astype(str)
    moved = orig != new
    assert set(orig[moved]) <= set(small.index)
    assert (new[moved].to_numpy() == orig[moved].map(rep["merged"]).to_numpy()).all()
    # the final types: untouched large subtypes plus the classes that received cells
    large = set(half.obs["cell_type"]) - set(small.index)
    assert large <= set(rep["final_types"])


def test_merge_needs_a_class_column(half):
    with pytest.raises(SmallTypesError, match=r"small_types='merge' needs a class column \(class_key = None"):
        prepare_reference_types(half, "cell_type", CellTypingParams(small_types="merge"))


def test_nothing_small_returns_the_reference_itself(half):
    out, rep = prepare_reference_types(half, "cell_class", CellTypingParams())
    assert out is half and rep["small_types"] == {} and len(rep["final_types"]) == 12


def test_typing_uses_the_final_type_list(half, mop):
    """identify_cell_types applies the configured policy: with 'drop' it runs on the 44-subtype reference and
    its weights hold exactly the surviving types; with the default 'error' it stops before fitting anything."""
    pool = mop[~mop.obs_names.isin(half.obs_names)].copy()
    slide, cells, _, _ = simulate_slide(pool, "cell_type", 40, mean_cells=3, seed=2)
    c = cells[["x", "y", "spot"]]
    with pytest.raises(SmallTypesError, match="fewer than min_cells_per_type=25"):
        identify_cell_types(slide, half, "cell_type", c, CellTypingParams(max_sweeps=1))
    with pytest.warns(SmallTypesWarning):
        res = identify_cell_types(slide, half, "cell_type", c, CellTypingParams(max_sweeps=1, small_types="drop"))
    small = _small(half)
    assert set(res.weights.columns) == set(half.obs["cell_type"]) - set(small.index)
    assert res.info["reference_types"]["dropped"] == {k: int(v) for k, v in small.items()}


def test_zero_count_cells_do_not_count(half):
    ref = half[half.obs["cell_class"].isin(["Vip", "Sst"])].copy()
    X = sp.csr_matrix(ref.X, dtype=np.float64).tolil()
    vip = np.flatnonzero(ref.obs["cell_class"].to_numpy() == "Vip")
    X[vip[: len(vip) - 3], :] = 0  # 3 Vip cells keep counts
    ref.X = X.tocsr()
    with pytest.raises(SmallTypesError, match=r"'Vip' \(3\)"):
        prepare_reference_types(ref, "cell_class", min_cells_per_type=10)
