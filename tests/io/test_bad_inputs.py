"""Bad inputs, each on a small copy of the demo: the error names the file, the field and what was expected.

Every case returns (a callable that must raise, the exception type, the substrings its message must hold: the
file, the field and the expectation)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from spatial_assets import io as sio
from spatial_assets.orchestration.config import ConfigError, load_config


def _dense(a: ad.AnnData) -> np.ndarray:
    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, dtype=float)


def _ref(demo) -> ad.AnnData:
    return ad.read_h5ad(demo.reference)


def _slide(demo) -> ad.AnnData:
    return ad.read_h5ad(demo.slide)


def _write(a: ad.AnnData, tmp: Path, name: str) -> Path:
    p = tmp / name
    a.write_h5ad(p)
    return p


def _truncate(src: Path, dst: Path, frac: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


# --- references -------------------------------------------------------------------------------------------------
def ref_lognorm(tmp, demo):
    a = _ref(demo)
    x = _dense(a)
    a.X = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    p = _write(a, tmp, "ref_log.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "X", "log-normalised", "raw integer"]


def ref_scaled(tmp, demo):
    a = _ref(demo)
    x = _dense(a)
    a.X = x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4
    p = _write(a, tmp, "ref_cp10k.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "X", "scaled to 10000", "raw integer"]


def ref_negative(tmp, demo):
    a = _ref(demo)
    x = _dense(a)
    x[0, 0] = -3
    a.X = x
    p = _write(a, tmp, "ref_neg.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "X", "negative", "raw integer"]


def ref_nan(tmp, demo):
    a = _ref(demo)
    x = _dense(a)
    x[1, 2] = np.nan
    a.X = x
    p = _write(a, tmp, "ref_nan.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "X", "NaN", "raw integer"]


def ref_dup_genes(tmp, demo):
    a = _ref(demo)
    names = list(a.var_names)
    names[1] = names[0]
    a.var_names = names
    p = _write(a, tmp, "ref_dupgenes.h5ad")
    return (
        lambda: sio.load_reference(p, "cell_class"),
        sio.InputError,
        [str(p), "var_names (genes)", f"'{names[0]}' x2", "expected unique"],
    )


def ref_dup_cells(tmp, demo):
    a = _ref(demo)
    names = list(a.obs_names)
    names[3] = names[2]
    a.obs_names = names
    p = _write(a, tmp, "ref_dupcells.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "obs_names (cell ids)", "unique"]


def ref_no_key(tmp, demo):
    p = Path(demo.reference)
    return lambda: sio.load_reference(p, "celltype"), sio.InputError, [str(p), "'celltype'", "cell_type_key", "columns"]


def ref_empty_key(tmp, demo):
    a = _ref(demo)
    a.obs["cell_class"] = np.nan
    p = _write(a, tmp, "ref_emptykey.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "obs['cell_class']", "expected cell"]


def ref_no_cells(tmp, demo):
    a = _ref(demo)[:0].copy()
    p = _write(a, tmp, "ref_nocells.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "0 cells", "at least one"]


def ref_truncated(tmp, demo):
    p = _truncate(Path(demo.reference), tmp / "ref_trunc.h5ad")
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "could not be read", ".h5ad"]


def ref_folder(tmp, demo):
    p = tmp / "ref_folder.h5ad"
    p.mkdir()
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "is a folder", ".h5ad file"]


def ref_missing(tmp, demo):
    p = tmp / "nope.h5ad"
    return lambda: sio.load_reference(p, "cell_class"), sio.InputError, [str(p), "not found", ".h5ad"]


def ref_one_type(tmp, demo):
    a = _ref(demo)
    a.obs["cell_class"] = "Excitatory"
    return (
        lambda: sio.check_cell_types(a, "cell_class", 2, "ref.h5ad"),
        sio.InputError,
        ["ref.h5ad", "obs['cell_class']", "1 type(s)", "expected at least 2"],
    )


def ref_tiny_types(tmp, demo):
    a = _ref(demo)
    return (
        lambda: sio.check_cell_types(a, "cell_class", 100, "ref.h5ad"),
        sio.InputError,
        ["ref.h5ad", "obs['cell_class']", "at least 100 cells", "min_cells_per_type", "expected at least 2"],
    )


# --- slides -----------------------------------------------------------------------------------------------------
def slide_lognorm(tmp, demo):
    a = _slide(demo)
    a.X = np.log1p(_dense(a))
    p = _write(a, tmp, "slide_log.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "X", "log-normalised", "raw integer"]


def slide_dup_barcodes(tmp, demo):
    a = _slide(demo)
    names = list(a.obs_names)
    names[5] = names[4]
    a.obs_names = names
    p = _write(a, tmp, "slide_dupbc.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "obs_names (spot barcodes)", names[4], "unique"]


def slide_dup_genes(tmp, demo):
    a = _slide(demo)
    names = list(a.var_names)
    names[2] = names[0]
    a.var_names = names
    p = _write(a, tmp, "slide_dupgenes.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "var_names (genes)", names[0], "unique"]


def slide_empty(tmp, demo):
    a = _slide(demo)[:0].copy()
    p = _write(a, tmp, "slide_empty.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "0 spots", "at least one"]


def slide_all_zero(tmp, demo):
    a = _slide(demo)
    a.X = np.zeros(a.shape, np.float32)
    p = _write(a, tmp, "slide_zero.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "X", "zero counts", "expected counts"]


def slide_no_spatial(tmp, demo):
    a = _slide(demo)
    del a.obsm["spatial"]
    p = _write(a, tmp, "slide_nospatial.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "obsm['spatial']", "expected spot coordinates"]


def slide_nan_xy(tmp, demo):
    a = _slide(demo)
    a.obsm["spatial"][0, 0] = np.nan
    p = _write(a, tmp, "slide_nanxy.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "obsm['spatial']", "non-finite"]


def slide_no_scalefactors(tmp, demo):
    a = _slide(demo)
    del a.uns["spatial"]
    p = _write(a, tmp, "slide_nosf.h5ad")
    return (
        lambda: sio.load_slide(p, image=demo.image),
        sio.InputError,
        [str(p), "uns['spatial']", "spot_diameter_fullres"],
    )


def slide_truncated(tmp, demo):
    p = _truncate(Path(demo.slide), tmp / "slide_trunc.h5ad")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "could not be read as spatial data", "truncated"]


def slide_truncated_count(tmp, demo):
    p = _truncate(Path(demo.slide), tmp / "slide_trunc2.h5ad")
    return lambda: sio.count_spots(p), sio.InputError, [str(p), "obs (spot barcodes)", "truncated"]


def slide_folder(tmp, demo):
    p = tmp / "slide_dir.h5ad"
    p.mkdir()
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "is a folder", ".h5ad file"]


def slide_bad_format(tmp, demo):
    p = tmp / "slide.csv"
    p.write_text("a,b\n1,2\n")
    return lambda: sio.load_slide(p), sio.InputError, [str(p), "unsupported spatial data format", "expected .h5ad"]


def image_truncated(tmp, demo):
    p = _truncate(Path(demo.image), tmp / "he_trunc.tif", 0.3)
    return lambda: sio.load_slide(demo.slide, image=p), sio.InputError, [str(p), "unreadable image"]


def image_too_small(tmp, demo):
    from PIL import Image

    p = tmp / "tiny.png"
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(p)
    return (
        lambda: sio.load_slide(demo.slide, image=p),
        sio.InputError,
        [str(p), "width 60 x height 50", "obsm['spatial']", "full-resolution pixels"],
    )


def image_gray(tmp, demo):
    from PIL import Image

    p = tmp / "gray.png"
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(p)
    return lambda: sio.load_slide(demo.slide, image=p), sio.InputError, [str(p), "mode is L", "RGB"]


# --- slide vs reference -----------------------------------------------------------------------------------------
def genes_ensembl(tmp, demo):
    s = _slide(demo)
    ens = [f"ENSMUSG{i:011d}" for i in range(s.n_vars)]
    r = _ref(demo)
    return (
        lambda: sio.check_shared_genes(ens, r.var_names, "slide.h5ad", "ref.h5ad", 10),
        sio.InputError,
        ["slide.h5ad var_names", "ref.h5ad var_names", "share 0 genes", "at least 10", "Ensembl", "ENSMUSG"],
    )


def genes_case(tmp, demo):
    s, r = _slide(demo), _ref(demo)
    return (
        lambda: sio.check_shared_genes([g.upper() for g in s.var_names], r.var_names, "slide.h5ad", "ref.h5ad", 10),
        sio.InputError,
        ["slide.h5ad var_names", "share 0 genes", "upper-case", "title-case", "species", "GAD2"],
    )


# --- checkpoint files --------------------------------------------------------------------------------------------
def _fake_ckpt(tmp: Path) -> Path:
    d = tmp / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": "spatial_assets.score_model", "train_step": 1}))
    return d


def ckpt_pickle(tmp, demo):
    from spatial_assets.generative import CheckpointFileError, ScoreModel

    d = _fake_ckpt(tmp)
    (d / "model.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    return (
        lambda: ScoreModel.load(d),
        CheckpointFileError,
        [str(d / "model.safetensors"), "pickle", "expected safetensors"],
    )


def ckpt_truncated(tmp, demo):
    from safetensors.numpy import save_file

    from spatial_assets.generative import CheckpointFileError, ScoreModel

    d = _fake_ckpt(tmp)
    save_file({"w": np.zeros((100, 100), np.float32)}, str(d / "full.safetensors"))
    _truncate(d / "full.safetensors", d / "model.safetensors")
    return lambda: ScoreModel.load(d), CheckpointFileError, [str(d / "model.safetensors"), "safetensors", "truncated"]


def ckpt_bad_json(tmp, demo):
    from spatial_assets.generative import CheckpointFileError, ScoreModel

    d = _fake_ckpt(tmp)
    (d / "config.json").write_text('{"format": "spatial_assets.sc')
    (d / "model.safetensors").write_bytes(b"x")
    return lambda: ScoreModel.load(d), CheckpointFileError, [str(d / "config.json"), "not valid JSON"]


def ckpt_missing_file(tmp, demo):
    from spatial_assets.generative import ScoreModel

    d = _fake_ckpt(tmp)
    return lambda: ScoreModel.load(d), FileNotFoundError, [str(d), "lacks model.safetensors", "config.json"]


def ckpt_file_not_folder(tmp, demo):
    from spatial_assets.generative import ScoreModel

    f = tmp / "model.safetensors"
    f.write_bytes(b"x")
    return lambda: ScoreModel.load(f), FileNotFoundError, [str(f), "is a file", "checkpoint folder"]


# --- config and storage ------------------------------------------------------------------------------------------
def config_empty(tmp, demo):
    p = tmp / "dagster_project.yaml"
    p.write_text("")
    return lambda: load_config(p), ConfigError, [str(p), "is empty", "'references'", "'samples'"]


def config_not_mapping(tmp, demo):
    p = tmp / "dagster_project.yaml"
    p.write_text("- a\n- b\n")
    return lambda: load_config(p), ConfigError, [str(p), "mapping", "list"]


def _cfg(tmp, demo, **over) -> Path:
    cfg = {
        "storage_root": str(tmp / "store"),
        "references": [{"name": "ref", "path": str(demo.reference), "cell_type_key": "cell_class"}],
        "samples": [{"name": "s1", "spatial": str(demo.slide), "image": str(demo.image), "reference": "ref"}],
    }
    for k, v in over.items():
        cfg[k] = v
    p = tmp / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def config_missing_spatial(tmp, demo):
    p = _cfg(
        tmp,
        demo,
        samples=[{"name": "s1", "spatial": str(tmp / "gone.h5ad"), "image": str(demo.image), "reference": "ref"}],
    )
    return lambda: load_config(p), ConfigError, [str(p), "samples[0].spatial", "file not found", "gone.h5ad"]


def config_unknown_reference(tmp, demo):
    p = _cfg(
        tmp,
        demo,
        samples=[{"name": "s1", "spatial": str(demo.slide), "image": str(demo.image), "reference": "other"}],
    )
    return lambda: load_config(p), ConfigError, [str(p), "samples[0]", "'other'", "expected one of ['ref']"]


def storage_root_uncreatable(tmp, demo):
    blocker = tmp / "a_file"
    blocker.write_text("x")
    root = blocker / "store"
    return (
        lambda: sio.ensure_storage_root(root),
        sio.InputError,
        [f"storage_root {root}", "cannot be created", "folder"],
    )


def combine_missing_range(tmp, demo):
    from spatial_assets.decomposition import combine_ranges

    part = ad.AnnData(np.ones((2, 3), np.float32))
    part.obs_names = ["c0", "c1"]
    part.obs["spot"] = ["s0", "s0"]
    return (
        lambda: combine_ranges({"0000": part}, expected_ranges=["0000", "0001"], source="decomposed_cells/x"),
        ValueError,
        ["decomposed_cells/x", "missing ['0001']", "materialize decomposed_cells"],
    )


CASES = [
    ref_lognorm,
    ref_scaled,
    ref_negative,
    ref_nan,
    ref_dup_genes,
    ref_dup_cells,
    ref_no_key,
    ref_empty_key,
    ref_no_cells,
    ref_truncated,
    ref_folder,
    ref_missing,
    ref_one_type,
    ref_tiny_types,
    slide_lognorm,
    slide_dup_barcodes,
    slide_dup_genes,
    slide_empty,
    slide_all_zero,
    slide_no_spatial,
    slide_nan_xy,
    slide_no_scalefactors,
    slide_truncated,
    slide_truncated_count,
    slide_folder,
    slide_bad_format,
    image_truncated,
    image_too_small,
    image_gray,
    genes_ensembl,
    genes_case,
    ckpt_pickle,
    ckpt_truncated,
    ckpt_bad_json,
    ckpt_missing_file,
    ckpt_file_not_folder,
    config_empty,
    config_not_mapping,
    config_missing_spatial,
    config_unknown_reference,
    storage_root_uncreatable,
    combine_missing_range,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_message_names_file_field_expectation(case, tmp_path, demo_small):
    call, exc, parts = case(tmp_path, demo_small)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    missing = [p for p in parts if p not in msg]
    assert not missing, f"message lacks {missing}: {msg}"


def test_zero_count_spots_are_reported_and_skipped(tmp_path, demo_small):
    a = _slide(demo_small)
    x = _dense(a)
    x[[0, 3]] = 0
    a.X = x
    p = _write(a, tmp_path, "slide_somezero.h5ad")
    loaded = sio.load_slide(p)
    assert loaded.slide.n_obs == a.n_obs - 2
    assert loaded.info["zero_count_spots_skipped"] == 2
    assert loaded.info["zero_count_spots_examples"] == f"{a.obs_names[0]}, {a.obs_names[3]}"
    assert a.obs_names[0] not in loaded.slide.obs_names


def test_clean_demo_passes_and_shares_genes(demo_small):
    loaded = sio.load_slide(demo_small.slide, image=demo_small.image)
    ref = sio.load_reference(demo_small.reference, "cell_class")
    n = sio.check_shared_genes(loaded.slide.var_names, ref.var_names, "slide", "ref", 10)
    assert n == len(set(loaded.slide.var_names) & set(ref.var_names)) >= 10
    assert loaded.info["zero_count_spots_skipped"] == 0


def test_spots_mostly_without_nuclei_are_flagged():
    ok_frac, ok = sio.spots_with_nuclei_problem([1, 2, 0, 3], "s1")
    assert ok_frac == 0.75 and ok is None
    frac, msg = sio.spots_with_nuclei_problem([0, 0, 0, 1, 0, 2, 0, 0, 0, 0], "s1")
    assert frac == pytest.approx(0.2)
    assert "sample 's1'" in msg and "20%" in msg and "obsm['spatial']" in msg and "swapped" in msg
    assert "at least 50%" in msg
