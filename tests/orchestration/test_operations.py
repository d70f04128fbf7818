"""Day-to-day operation: schedules that request what is missing or stale, retries for transient faults only, and
checks whose descriptions name the failing items."""

import contextlib
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spatial_assets.io._readers import InputError
from spatial_assets.orchestration.config import ConfigError, load_config
from spatial_assets.orchestration.definitions import build_definitions
from spatial_assets.orchestration.metadata import name_items
from spatial_assets.orchestration.partitions import register_partitions, sample_range_keys
from spatial_assets.orchestration.retries import run_with_transient_retries, transient_kind, user_error_message
from spatial_assets.orchestration.schedules import CODE_VERSION_TAG
from spatial_assets.orchestration.spatialscope import cells_per_spot_result, proportions_result

TICK = datetime(2026, 1, 2, 2, 0, tzinfo=UTC)


def _project(tmp_path: Path, demo_small, **extra) -> Path:
    doc = {
        "storage_root": str(tmp_path / "store"),
        "partitions": {"spot_range_size": 10},
        "schedules": {"nightly": "0 2 * * *"},
        "references": [{"name": "ref", "path": str(demo_small.reference), "cell_type_key": "cell_type"}],
        "samples": [
            {"name": "s1", "spatial": str(demo_small.slide), "image": str(demo_small.image), "reference": "ref"}
        ],
        **extra,
    }
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
def test_schedule_config_is_validated_at_load(tmp_path, demo_small):
    cfg = load_config(_project(tmp_path, demo_small))
    assert cfg.schedules.cron == {"nightly": "0 2 * * *"} and cfg.schedules.freshness_hours == 48
    with pytest.raises(ConfigError, match=r"key 'schedules.cron': .*'nightly': '0 25 \* \* \*' is not a cron string"):
        load_config(_project(tmp_path, demo_small, schedules={"nightly": "0 25 * * *"}))
    with pytest.raises(ConfigError, match="key 'schedules.timezone': .*'Mars/Olympus' is not an IANA time zone"):
        load_config(_project(tmp_path, demo_small, schedules={"cron": {"n": "0 2 * * *"}, "timezone": "Mars/Olympus"}))
    with pytest.raises(ConfigError, match="key 'schedules.freshness_hours'"):
        load_config(_project(tmp_path, demo_small, schedules={"freshness_hours": 0}))


def _materialize_event(inst, defs, asset: str, partition: str, code_version: str | None = None) -> None:
    """Record a materialization of one partition, as a finished run of the asset would (with its code version)."""
    version = code_version or defs.resolve_asset_graph().get(dg.AssetKey(asset)).code_version
    inst.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=asset, partition=partition, tags={CODE_VERSION_TAG: version})
    )


def _tick(defs, inst, name: str):
    sched = defs.resolve_schedule_def(name)
    ctx = dg.build_schedule_context(
        instance=inst,
        scheduled_execution_time=TICK,
        resources={"project": defs.resources["project"]},
        repository_def=defs.get_repository_def(),
    )
    data = sched.evaluate_tick(ctx)
    return data.run_requests or [], data.skip_message


def test_schedules_request_missing_then_stale_partitions(tmp_path, demo_small):
    cfg = load_config(_project(tmp_path, demo_small))
    defs = build_definitions(cfg)
    names = {s.name for s in defs.schedules}
    assert names == {f"nightly_{j}" for j in ("reference_job", "sample_job", "decomposition_job", "combine_job")}
    assert all(defs.resolve_schedule_def(n).cron_schedule == "0 2 * * *" for n in names)
    (tmp_path / "dagster_home").mkdir()
    inst = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home"))
    try:
        _schedule_story(cfg, defs, names, inst)
    finally:
        inst.dispose()


def _schedule_story(cfg, defs, names, inst):
    register_partitions(inst, cfg)
    ranges = [str(k) for k in sample_range_keys(cfg, "s1")]
    assert len(ranges) >= 3

    # nothing materialized: only the reference job can start; the sample waits for its reference
    reqs, _ = _tick(defs, inst, "nightly_reference_job")
    assert [(r.partition_key, sorted(k.to_user_string() for k in r.asset_selection)) for r in reqs] == [
        ("ref", ["reference_data", "score_checkpoint"])
    ]
    assert reqs[0].tags["spatial_assets/reason"] == "reference_data: missing; score_checkpoint: missing"
    assert reqs[0].run_key == "20260102T0200:reference_job:ref"
    reqs, skip = _tick(defs, inst, "nightly_sample_job")
    assert reqs == [] and "s1 waits for reference_data[ref]" in skip

    _materialize_event(inst, defs, "reference_data", "ref")
    _materialize_event(inst, defs, "score_checkpoint", "ref")
    reqs, skip = _tick(defs, inst, "nightly_reference_job")
    assert reqs == [] and "up to date" in skip
    reqs, _ = _tick(defs, inst, "nightly_sample_job")
    assert [r.partition_key for r in reqs] == ["s1"]
    assert {k.to_user_string() for k in reqs[0].asset_selection} == {
        "slide_inputs",
        "segmented_slide",
        "typed_cells",
        "enhanced_subspots",
    }
    reqs, skip = _tick(defs, inst, "nightly_decomposition_job")
    assert reqs == [] and "typed_cells[s1]" in skip

    for a in ("slide_inputs", "segmented_slide", "typed_cells", "enhanced_subspots"):
        _materialize_event(inst, defs, a, "s1")
    reqs, _ = _tick(defs, inst, "nightly_decomposition_job")
    assert sorted(r.partition_key for r in reqs) == sorted(ranges)  # every spot range of the sample
    for k in ranges[:-1]:
        _materialize_event(inst, defs, "decomposed_cells", k)
    reqs, _ = _tick(defs, inst, "nightly_decomposition_job")
    assert [r.partition_key for r in reqs] == [ranges[-1]]
    reqs, skip = _tick(defs, inst, "nightly_combine_job")
    assert reqs == [] and f"decomposed_cells[{ranges[-1]}]" in skip  # waits for the last range
    _materialize_event(inst, defs, "decomposed_cells", ranges[-1])
    reqs, _ = _tick(defs, inst, "nightly_combine_job")
    assert [r.partition_key for r in reqs] == ["s1"]
    assert {k.to_user_string() for k in reqs[0].asset_selection} == {"decomposed_cells_by_sample", "sample_spatialdata"}
    _materialize_event(inst, defs, "decomposed_cells_by_sample", "s1")
    reqs, _ = _tick(defs, inst, "nightly_combine_job")  # the SpatialData store is still missing
    assert [[k.to_user_string() for k in r.asset_selection] for r in reqs] == [["sample_spatialdata"]]
    _materialize_event(inst, defs, "sample_spatialdata", "s1")
    for n in names:
        assert _tick(defs, inst, n)[0] == [], n  # all up to date

    # stale: an older code version, and an upstream partition materialized after its child
    _materialize_event(inst, defs, "segmented_slide", "s1", code_version="old")
    reqs, _ = _tick(defs, inst, "nightly_sample_job")
    reason = reqs[0].tags["spatial_assets/reason"]
    assert reason.startswith("segmented_slide: code version old -> ")
    assert "typed_cells: upstream segmented_slide[s1] is newer" in reason
    assert "enhanced_subspots: upstream segmented_slide[s1] is newer" in reason
    _materialize_event(inst, defs, "reference_data", "ref")
    reqs, _ = _tick(defs, inst, "nightly_reference_job")
    assert reqs[0].tags["spatial_assets/reason"] == "score_checkpoint: upstream reference_data[ref] is newer"


def test_freshness_checks_on_outputs(tmp_path, demo_small):
    defs = build_definitions(load_config(_project(tmp_path, demo_small)))
    fresh = {
        k.asset_key.to_user_string() for c in defs.asset_checks for k in c.check_keys if k.name == "freshness_check"
    }
    assert fresh == {"decomposed_cells_by_sample", "enhanced_subspots", "typed_cells", "score_checkpoint"}
    assert defs.get_sensor_def("freshness_checks_sensor") is not None


# ---------------------------------------------------------------------------------------------------------------
# retries for transient faults only
# ---------------------------------------------------------------------------------------------------------------
def _retrying_asset(fail_with, attempts: list):
    @dg.asset
    def flaky(context: dg.AssetExecutionContext):
        def step(scale: float):
            attempts.append(scale)
            if fail_with is not None and (len(attempts) == 1 or not isinstance(fail_with, torch.OutOfMemoryError)):
                raise fail_with
            return scale

        return run_with_transient_retries(context, step, wait_s=0)

    return flaky


@pytest.fixture(autouse=True)
def _instance_closed():
    """Ephemeral instances entered for the test and exited after it: Dagster's execute_in_process leaves the
    instance's defs-state storage as the process's current one (a ContextVar), so an instance dropped inline
    makes a later materialize fail with "Attempted to resolve undefined DagsterInstance weakref" once the
    garbage collector has taken it (seen when this file runs after test_faults.py)."""
    with contextlib.ExitStack() as stack:
        _OPEN.append(stack)
        try:
            yield
        finally:
            _OPEN.pop()


_OPEN: list[contextlib.ExitStack] = []


def _instance() -> dg.DagsterInstance:
    """An ephemeral instance kept entered until the end of the test (see :func:`_instance_closed`)."""
    return _OPEN[-1].enter_context(dg.DagsterInstance.ephemeral())


def test_cuda_oom_is_retried_with_a_smaller_batch():
    attempts: list = []
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    res = dg.materialize([_retrying_asset(oom, attempts)], raise_on_error=False, instance=_instance())
    assert res.success
    assert attempts == [1.0, 0.5]  # the retry ran with half the batch
    assert res.output_for_node("flaky") == 0.5
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in res.all_events)


def test_lost_worker_is_retried_until_the_limit():
    attempts: list = []
    res = dg.materialize(
        [_retrying_asset(ConnectionResetError("worker lost"), attempts)],
        raise_on_error=False,
        instance=_instance(),
    )
    assert not res.success and len(attempts) == 3  # first attempt + 2 retries
    assert transient_kind(ConnectionResetError()) == "lost_worker"


@pytest.mark.parametrize(
    "err",
    [
        InputError("slide.h5ad: obsm['spatial'] missing; expected spot coordinates"),
        FileNotFoundError("he.tif: image not found"),
        ValueError("bad parameter"),
    ],
)
def test_input_errors_fail_at_once_with_their_message(err):
    attempts: list = []
    res = dg.materialize([_retrying_asset(err, attempts)], raise_on_error=False, instance=_instance())
    assert not res.success and len(attempts) == 1
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in res.all_events)
    failure = next(e for e in res.all_events if e.is_step_failure)
    assert user_error_message(failure.event_specific_data.error).endswith(f"{type(err).__name__}: {err}")


def test_gpu_assets_have_no_blanket_retry_policy(tmp_path, demo_small):
    defs = build_definitions(load_config(_project(tmp_path, demo_small)))
    for name in ("segmented_slide", "score_checkpoint", "decomposed_cells", "enhanced_subspots"):
        assert defs.get_assets_def(name).op.retry_policy is None, name


# ---------------------------------------------------------------------------------------------------------------
# checks that say why
# ---------------------------------------------------------------------------------------------------------------
def test_name_items():
    assert name_items([]) == "none"
    assert name_items(["a", "b"], [1.23456, 2]) == "'a' (1.235), 'b' (2)"
    assert name_items(list("abcdefghij"), limit=3) == "'a', 'b', 'c' ... and 7 more"


def test_failed_checks_name_the_failing_items():
    spots = pd.DataFrame({"n_cells": [1, 5, 0, 9, 2]}, index=["AAA-1", "BBB-1", "CCC-1", "DDD-1", "EEE-1"])
    r = cells_per_spot_result(spots, cap=3)
    assert not r.passed
    assert r.description == "2 spot(s) hold more than max_cells_per_spot=3 cells: 'DDD-1' (9), 'BBB-1' (5)"
    r = cells_per_spot_result(spots, cap=9)
    assert r.passed and r.description == "all 5 spots hold 0..9 cells"
    r = cells_per_spot_result(spots.assign(n_cells=0), cap=3)
    assert not r.passed and r.description == "no spot of the 5 holds a cell (nothing segmented inside the spots)"

    w = pd.DataFrame({"A": [0.5, 0.7, 1.0], "B": [0.5, 0.2, 0.0]}, index=["AAA-1", "BBB-1", "CCC-1"])
    cells = pd.DataFrame({"cell_type": ["A", "Z"]}, index=["c1", "c2"])
    r = proportions_result(w, cells)
    assert not r.passed
    assert r.description == (
        "1 spot(s) whose proportions do not sum to 1 (|sum - 1| >= 1e-4): 'BBB-1' (0.9); "
        "cells typed with types absent from the spot weights: 'Z'"
    )
    np.testing.assert_allclose(r.metadata["max_abs_deviation"].value, 0.1, atol=1e-9)
    assert proportions_result(w.iloc[[0, 2]], cells.iloc[:1]).passed


def test_coarse_level_stride_is_warned():
    from spatial_assets.orchestration.preflight import accuracy_warnings
    from spatial_assets.params import Parameters

    assert accuracy_warnings(Parameters()) == []
    mixture = Parameters.model_validate({"decomposition": {"level_stride": 4, "estimator": "mixture"}})
    assert accuracy_warnings(mixture) == []  # the mixture estimator does not anneal over noise levels
    p = Parameters.model_validate(
        {"decomposition": {"level_stride": 4, "estimator": "langevin"}, "score_model": {"n_sigmas": 232}}
    )
    (w,) = accuracy_warnings(p, "samples.demo.parameters")
    assert w.startswith("samples.demo.parameters.decomposition.level_stride=4: the decomposition anneals over only 58")
    assert "not usable" in w
    p = Parameters.model_validate({"decomposition": {"level_stride": 2, "estimator": "langevin"}})
    assert "not usable" not in accuracy_warnings(p)[0]  # 116 of 232 levels: warned, not flagged unusable


def test_console_summary_prints_failed_checks_with_their_reason():
    from spatial_assets.orchestration.demo_run import failed_check_lines
    from spatial_assets.orchestration.metadata import check_result

    @dg.asset
    def spots_table():
        return 1

    @dg.asset_check(asset=spots_table, blocking=True)
    def too_many_cells():
        return check_result(False, "fine", ["1 spot(s) hold more than max_cells_per_spot=3 cells: 'DDD-1' (9)"])

    inst = _instance()
    res = dg.materialize([spots_table, too_many_cells], instance=inst, raise_on_error=False)
    assert failed_check_lines(inst, res.run_id) == [
        "spots_table too_many_cells: 1 spot(s) hold more than max_cells_per_spot=3 cells: 'DDD-1' (9)"
    ]


def test_decomposed_maps_figure_shows_expressed_markers():
    import anndata as ad
    from PIL import Image

    from spatial_assets import pl
    from tests.helpers import png

    rng = np.random.default_rng(0)
    n_spots, n_cells = 30, 120
    genes = ["Hi1", "Hi2", "Low1", "Low2", "Mid"]
    lam = np.array([50.0, 40.0, 0.01, 0.02, 5.0])
    slide = ad.AnnData(
        rng.poisson(lam, (n_spots, 5)).astype(float), obsm={"spatial": rng.uniform(0, 500, (n_spots, 2))}
    )
    slide.var_names = genes
    slide.obs_names = [f"s{i}" for i in range(n_spots)]
    X = rng.poisson(lam / 4 * rng.uniform(0.2, 2, (n_cells, 1)), (n_cells, 5)).astype(float)
    cells = ad.AnnData(X)
    cells.var_names = genes
    cells.obs = pd.DataFrame(
        {
            "x": rng.uniform(0, 500, n_cells),
            "y": rng.uniform(0, 500, n_cells),
            "spot": rng.choice(slide.obs_names, n_cells),
            "replicate_spread": rng.uniform(0, 1, n_cells),
            "spot_rel_error": rng.uniform(0, 0.5, n_cells),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    picked = pl.pick_markers(cells, 2)
    assert not set(picked) & {"Low1", "Low2"}  # never a near-zero gene
    img = np.asarray(Image.open(__import__("io").BytesIO(png(pl.decomposed_maps(slide, cells, n_genes=2)))))
    assert img.shape[0] > 1.2 * img.shape[1]  # 3 rows (2 genes + uncertainty) of 2 panels: taller than wide
    assert img[..., :3].std() > 20  # not blank
    with pytest.raises(ValueError, match="none of the requested genes is in both the slide and the decomposed cells"):
        pl.decomposed_maps(slide, cells, genes=["Nope"])
