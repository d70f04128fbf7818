"""End to end: the whole asset graph materialized through Dagster on a small window of the demo slide, with
lineage, partitions and checks read back from the instance, accuracy against the demo's ground truth, and a failed
spot range that leaves the finished ones intact."""

import logging
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.spatial import cKDTree

from spatial_assets import io as storage

pytestmark = pytest.mark.slow  # > 30 s on 2 cores: `make test-fast` skips it

REPO = Path(__file__).resolve().parents[2]


def _rows_r(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)


def _matched_truth(pipeline, demo_small):
    """The true cells inside spots, the decomposed cells, the typed cells' obs, and for each decomposed cell the
    index of its nearest true cell and whether it lies within 4 px of it."""
    root = pipeline["root"]
    truth = ad.read_h5ad(demo_small.truth_cells)
    t_in = truth[truth.obs["spot"].astype(str).to_numpy() != ""]
    dec = ad.read_zarr(root / "decomposed_cells_by_sample/crop.zarr")
    typed = ad.read_zarr(root / "typed_cells/crop/cells.zarr").obs
    d, i = cKDTree(t_in.obs[["x", "y"]].to_numpy()).query(dec.obs[["x", "y"]].to_numpy())
    return t_in, dec, typed, i, d < 4.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_small):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = {
        "storage_root": str(tmp / "store"),
        "partitions": {"spot_range_size": 15},
        "references": [{"name": "ref", "path": str(demo_small.reference), "cell_type_key": "cell_class"}],
        "samples": [
            {"name": "crop", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
        ],
        "parameters": {
            "segmentation": {"model": "bundled:stardist_nuclei", "channel": "hematoxylin", "min_umi": 20},
            "cell_typing": {"min_cells_per_type": 2, "sigma_fit_min_umi": 50},
            "score_model": {
                "sigma_begin": 50,
                "sigma_end": 0.002,
                "sampling_step": 3e-7,
                "n_sigmas": 60,
                "train_steps": 400,
                "save_every": 200,
                "hidden": 64,
                "n_blocks": 1,
            },
            "decomposition": {"n_replicates": 2},
            "soscope": {"image_features": "none", "vgae_epochs": 150, "epochs": 400},
        },
    }
    cfg_path = tmp / "dagster_project.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    home = tmp / "dagster_home"
    home.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(home))
    import contextlib
    import io
    import warnings

    from spatial_assets.orchestration.demo_run import ensure_instance_config, materialize_graph

    ensure_instance_config(home)  # as `make demo` does

    console, lines = io.StringIO(), []
    # what `make demo` would print: Dagster's console logger and print() (sys.stderr / sys.stdout), the warnings
    # that get through, and materialize_graph's own lines
    with (
        contextlib.redirect_stdout(console),
        contextlib.redirect_stderr(console),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        timings = materialize_graph(cfg_path, log=lines.append)
    yield {
        "cfg": cfg_path,
        "root": tmp / "store",
        "timings": timings,
        "instance": dg.DagsterInstance.get(),
        "console": console.getvalue().splitlines(),
        "lines": lines,
        "warnings": [str(w.message) for w in caught],
    }
    mp.undo()


def test_every_store_is_complete_and_plain_readable(pipeline):
    root = pipeline["root"]
    for p in [
        "reference_data/ref.zarr",
        "slide_inputs/crop.zarr",
        "segmented_slide/crop/cells.zarr",
        "typed_cells/crop/cells.zarr",
        "typed_cells/crop/weights.zarr",
        "decomposed_cells_by_sample/crop.zarr",
        "enhanced_subspots/crop.zarr",
    ]:
        assert storage.is_complete(root / p), p
        ad.read_zarr(root / p)  # plain anndata
    import spatialdata as sd

    assert storage.is_complete(root / "spatialdata/crop.zarr")
    s = sd.read_zarr(root / "spatialdata/crop.zarr")
    assert set(s.shapes) == {"spots", "cells", "subspots"} and set(s.images) == {"crop_he"}
    assert set(s.tables) == {"spot_weights", "typed_cells", "decomposed_cells", "enhanced_subspots"}
    import zarr

    labels = zarr.open_group(str(root / "segmented_slide/crop/labels.zarr"), mode="r")["labels"]
    assert labels.chunks == (1024, 1024)
    assert (root / "score_checkpoint/ref/model.safetensors").exists()


def test_lineage_partitions_and_checks_recorded(pipeline):
    inst = pipeline["instance"]
    for name in [
        "reference_data",
        "slide_inputs",
        "segmented_slide",
        "typed_cells",
        "score_checkpoint",
        "decomposed_cells",
        "decomposed_cells_by_sample",
        "enhanced_subspots",
        "sample_spatialdata",
    ]:
        ev = inst.get_latest_materialization_event(dg.AssetKey(name))
        assert ev is not None, name
        md = ev.asset_materialization.metadata
        if name != "score_checkpoint":
            assert "path" in md and "size_bytes" in md, name
    mat = inst.get_materialized_partitions(dg.AssetKey("decomposed_cells"))
    from spatial_assets.orchestration.partitions import decomposition_partitions

    ranges = sorted(decomposition_partitions.get_partition_key_from_str(k).keys_by_dimension["spot_range"] for k in mat)
    assert ranges == ["0000", "0001", "0002"]  # 36 spots / 15 per range
    for check, asset in [
        ("checkpoint_sample_quality", "score_checkpoint"),
        ("cells_per_spot_in_range", "segmented_slide"),
        ("few_spots_over_cell_cap", "segmented_slide"),
        ("proportions_sum_to_one", "typed_cells"),
        ("spot_reconstruction", "decomposed_cells"),
        ("subspots_sum_to_spot", "enhanced_subspots"),
    ]:
        hist = inst.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(asset), check), limit=10
        )
        assert hist and all(h.evaluation is not None and h.evaluation.passed for h in hist), (asset, check)
    seg = inst.get_latest_materialization_event(dg.AssetKey("segmented_slide")).asset_materialization.metadata
    assert seg["method"].value == "stardist" and "qc_figure" in seg


def test_accuracy_against_ground_truth(pipeline, demo_small):
    t_in, dec, typed, i, ok = _matched_truth(pipeline, demo_small)
    # segmentation found (nearly) every true cell of the spots, at its position
    assert ok.sum() >= 0.85 * t_in.n_obs
    genes = list(dec.var_names)
    T = pd.DataFrame(t_in.X.toarray(), columns=t_in.var_names)[genes].to_numpy()[i[ok]]
    D = np.asarray(dec.X[ok].toarray() if hasattr(dec.X, "toarray") else dec.X[ok])
    per_cell = np.median(_rows_r(np.log1p(D), np.log1p(T)))
    # the baseline: each cell gets the reference mean profile of its (typed) cell type
    ref = ad.read_h5ad(demo_small.reference)
    ref_norm = pd.DataFrame(ref.X.toarray() / np.maximum(ref.X.sum(1).A1, 1)[:, None] * 1e3, columns=ref.var_names)
    type_means = ref_norm.groupby(ref.obs["cell_class"].astype(str).to_numpy()).mean()[genes]
    typed_types = typed.loc[dec.obs_names[ok], "cell_type"].astype(str).to_numpy()
    base = np.median(_rows_r(np.log1p(type_means.loc[typed_types].to_numpy()), np.log1p(T)))
    assert per_cell > 0.6 and per_cell > base, (per_cell, base)
    pred = typed.loc[dec.obs_names[ok], "cell_type"].astype(str).to_numpy()  # typed with cell_class
    acc = (pred == t_in.obs["cell_class"].astype(str).to_numpy()[i[ok]]).mean()
    majority = t_in.obs["cell_class"].value_counts(normalize=True).iloc[0]
    assert acc > majority + 0.1, (acc, majority)
    sub = ad.read_zarr(pipeline["root"] / "enhanced_subspots/crop.zarr")
    assert sub.n_obs == 7 * ad.read_h5ad(demo_small.slide).n_obs


def test_quiet_console_one_line_per_stage_full_log_in_instance(pipeline):
    """Without --verbose: one line per stage, no step log on the console, no zarr warnings; the instance still
    holds every event of every run (the steps' INFO progress lines and DEBUG events included)."""
    import re

    n_stages = len(pipeline["timings"])
    stage = re.compile(r"^\[spatial_assets\] .+ (ok|checks failed|FAILED) \(\d+\.\d s, run [0-9a-f]{8} of \w+\)$")
    assert sum(bool(stage.match(line)) for line in pipeline["lines"]) == n_stages, pipeline["lines"]
    extra = [line for line in pipeline["lines"] if not stage.match(line)]
    assert all("registered partitions" in line or "WARNING" in line for line in extra), extra
    console = pipeline["console"]
    assert not [line for line in console if " - INFO - " in line or " - DEBUG - " in line], console[:20]
    assert len(console) <= 2 * n_stages, "\n".join(console)  # the steps' warnings only (e.g. the CPU fallback)
    noisy = ("Consolidated metadata", "zarr v3 autosharding", "Automatic shard shape inference")
    assert not [w for w in pipeline["warnings"] if any(n in w for n in noisy)]
    inst = pipeline["instance"]
    runs = inst.get_runs(dg.RunsFilter(tags={"spatial_assets/launched_by": "make demo"}))
    assert len(runs) == n_stages
    logs = [r for run in runs for r in inst.all_logs(run.run_id)]
    assert sum(r.level == logging.DEBUG and r.is_dagster_event for r in logs) > 10 * n_stages  # step events
    info = [r.user_message for r in logs if r.level == logging.INFO and not r.is_dagster_event]
    assert any(re.search(r": \d+/\d+ \(\d+%\)", m) for m in info), info[:20]  # Progress lines of the steps
    assert len(logs) > 20 * len(console)


def test_demo_accuracy_table_has_same_input_baselines(pipeline, demo_small):
    """The demo's accuracy table: each figure beside its same-input baseline, the figures recomputed here."""
    import re

    from spatial_assets.orchestration.config import load_config
    from spatial_assets.orchestration.demo_run import demo_accuracy

    row = demo_accuracy(load_config(pipeline["cfg"]), truth_dir=Path(demo_small.truth_cells).parent)["crop"]
    nums = {k: [float(x) for x in re.findall(r"-?\d+\.\d+", v)] for k, v in row.items()}
    assert set(row) == {"nuclei", "cell types", "decomposed cells", "sub-spots"}, row
    # cell types: the typed labels, each spot's top type given to all its cells, the majority type
    t_in, dec, typed, i, ok = _matched_truth(pipeline, demo_small)
    true_type = t_in.obs["cell_class"].astype(str).to_numpy()[i[ok]]
    acc = (typed.loc[dec.obs_names[ok], "cell_type"].astype(str).to_numpy() == true_type).mean()
    top = (typed.loc[dec.obs_names[ok], "initial_type"].astype(str).to_numpy() == true_type).mean()
    majority = pd.Series(true_type).value_counts(normalize=True).iloc[0]
    assert nums["cell types"] == pytest.approx([acc, top, majority], abs=0.006), row["cell types"]
    assert "each spot's top type" in row["cell types"]
    # decomposed cells (median per-cell r of log1p, recomputed here) beside the proportional split of each spot
    # by its cells' types (which figure is higher is the science's business, not this table's)
    assert "proportional split by cell types" in row["decomposed cells"]
    genes = list(dec.var_names)
    T = np.log1p(pd.DataFrame(t_in.X.toarray(), columns=t_in.var_names)[genes].to_numpy()[i[ok]])
    D = np.log1p(np.asarray(dec.X[ok].toarray() if hasattr(dec.X, "toarray") else dec.X[ok]))
    r_dec, r_split = nums["decomposed cells"][:2]
    varied = (T.std(1) > 0) & (D.std(1) > 0)  # r is undefined for a constant profile
    assert r_dec == pytest.approx(np.median(_rows_r(D[varied], T[varied])), abs=0.006), row["decomposed cells"]
    assert -1 <= r_split <= 1
    # sub-spots beside the nuclei split soScope starts from
    assert "nuclei split" in row["sub-spots"], row["sub-spots"]
    r_sub, r_prior = nums["sub-spots"]
    assert -1 <= r_prior <= 1 and -1 <= r_sub <= 1


def test_runs_use_named_jobs_and_up_to_date_stages_are_skipped(pipeline):
    """(Before test_failed_range_keeps_finished_ranges, which re-materializes a range and so makes the combined
    sample stale.)"""
    inst = pipeline["instance"]
    demo_runs = inst.get_runs(dg.RunsFilter(tags={"spatial_assets/launched_by": "make demo"}))
    jobs = {r.job_name for r in demo_runs}
    assert jobs >= {"reference_job", "sample_job", "decomposition_job", "combine_job"}
    assert not any(j.startswith("__") for j in jobs), jobs  # never the anonymous __ephemeral_asset_job__
    from spatial_assets.orchestration.demo_run import materialize_graph

    n_runs = len(inst.get_runs())
    lines: list[str] = []
    stages: list[dict] = []
    timings = materialize_graph(pipeline["cfg"], log=lines.append, stages_out=stages)
    assert set(timings.values()) == {0.0} and len(inst.get_runs()) == n_runs  # nothing re-ran
    assert all(s["status"] == "up to date" for s in stages) and len(stages) == len(pipeline["timings"])
    assert all("up to date (skipped; --force re-runs it)" in line for line in lines)


def test_failed_range_keeps_finished_ranges(pipeline, monkeypatch):
    """A range that crashes mid-run leaves no store; finished ranges are untouched; re-running it alone works."""
    from spatial_assets import decomposition
    from spatial_assets.orchestration.config import load_config
    from spatial_assets.orchestration.definitions import build_definitions

    root = pipeline["root"]
    cfg = load_config(pipeline["cfg"])
    d = build_definitions(cfg)
    inst = pipeline["instance"]
    done = root / "decomposed_cells/crop/0000.zarr"
    before = ad.read_zarr(done).X.copy()
    target = root / "decomposed_cells/crop/0001.zarr"
    import shutil

    shutil.rmtree(target)
    real = decomposition.decompose_range

    def crash(*a, **k):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(decomposition, "decompose_range", crash)
    key = dg.MultiPartitionKey({"sample": "crop", "spot_range": "0001"})
    res = dg.materialize(
        [*d.assets, *d.asset_checks],
        selection=["decomposed_cells"],
        partition_key=key,
        resources=dict(d.resources),
        instance=inst,
        raise_on_error=False,
    )
    assert not res.success
    assert not target.exists() and not list(target.parent.glob(".0001.zarr.tmp-*"))
    np.testing.assert_array_equal(np.asarray(ad.read_zarr(done).X), np.asarray(before))
    monkeypatch.setattr(decomposition, "decompose_range", real)
    res = dg.materialize(
        [*d.assets, *d.asset_checks],
        selection=["decomposed_cells"],
        partition_key=key,
        resources=dict(d.resources),
        instance=inst,
        raise_on_error=False,
    )
    assert res.success and storage.is_complete(target)
