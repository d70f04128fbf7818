"""Gene-ID mismatch between slide and reference is detected and named (Ensembl vs symbols, species' case, a var
column that would match), on the demo's real mouse gene symbols; and on the real Space Ranger folder (Ensembl)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatial_assets as sa
from tests.helpers import DATA


@pytest.fixture(scope="module")
def slide(demo_small):
    """The demo slide (real osmFISH mouse symbols) with Ensembl-like IDs in var['gene_ids'], as Space Ranger has."""
    s = sa.io.read_spatial(demo_small.slide)
    s.var["gene_ids"] = [f"ENSMUSG{i:011d}" for i in range(s.n_vars)]
    return s


def _ref(genes) -> pd.Index:
    return pd.Index(list(genes))


def test_matching_symbols_pass(slide):
    info = sa.io.check_gene_ids(slide, _ref(slide.var_names[:20]))
    assert info == {"shared": 20, "slide_ids": "symbol (mouse-like case)", "reference_ids": "symbol (mouse-like case)"}


def test_ensembl_reference_against_symbols_is_named_with_the_matching_column(slide):
    ref = _ref(slide.var["gene_ids"])
    assert sa.io.id_kind(ref) == "ensembl"
    with pytest.raises(sa.io.InputError) as e:
        sa.io.check_gene_ids(slide, ref, slide_source="slide.h5ad", reference_source="ref.h5ad")
    msg = str(e.value)
    assert msg.startswith("slide.h5ad and ref.h5ad share 0 genes (var_names); expected at least 10.")
    assert "the slide's var_names are symbol (mouse-like case), the reference's are ensembl" in msg
    assert f"slide var['gene_ids'] shares {slide.n_vars} genes with the reference: use it as var_names" in msg


def test_other_species_case_is_named(slide):
    ref = _ref(slide.var_names.str.upper())  # a human reference's symbols
    with pytest.raises(
        sa.io.InputError, match=r"genes match ignoring case \(e.g. slide '\w+' vs reference '[A-Z0-9]+'\)"
    ):
        sa.io.check_gene_ids(slide, ref)
    # not masked by a few coincidental matches (all-caps symbols shared by both, e.g. numbers-only names)
    few = ad.AnnData(np.zeros((2, 3)), var=pd.DataFrame(index=["A1", "B2", "C3"]))
    with pytest.raises(sa.io.InputError, match="share 0 genes"):
        sa.io.check_gene_ids(few, _ref(["X1", "Y2"]), min_shared=1)


def test_reference_gene_names_without_reading_counts(demo_small):
    names = sa.io.reference_gene_names(demo_small.reference)
    assert list(names) == list(ad.read_h5ad(demo_small.reference).var_names)


def test_real_space_ranger_ids_are_ensembl():
    sr = sa.io.read_spatial(DATA / "squidpy-visium-mousebrain")
    assert sa.io.id_kind(sr.var_names) == "ensembl"
