"""A real deployment: ``dagster-webserver`` + ``dagster-daemon run`` as subprocesses over a temporary DAGSTER_HOME
and project config (the small demo crop, fast parameters). Partitions are registered, the reference, sample and
decomposition jobs launched and followed through the GraphQL API only (runs queued, dequeued by the daemon);
lineage, partitions and asset-check results are read back through GraphQL; everything is stopped at the end.

The served deployment is shared with test_ui.py (started once per pytest session, stopped at its end).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # > 30 s on 2 cores: `make test-fast` skips it

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ui_screenshots", REPO_ROOT / "scripts" / "ui_screenshots.py")
ui = sys.modules.setdefault("ui_screenshots", importlib.util.module_from_spec(_spec))
if not hasattr(ui, "graphql"):
    _spec.loader.exec_module(ui)

SAMPLE, REF = "s1", "ref"
SPOT_RANGE_SIZE = 20
FAST_PARAMS = {
    "segmentation": {"method": "watershed", "min_umi": 20},
    "cell_typing": {"min_cells_per_type": 2, "sigma_fit_min_umi": 50},
    # passes checkpoint_sample_quality (sampled with every 4th noise level): the full 232-level schedule matters,
    # not the training length (on this crop, n_sigmas 60: mean corr 0.66 < 0.8 at any length; 232: 0.98)
    "score_model": {
        "train_steps": 400,
        "save_every": 200,
        "sigma_begin": 50,
        "sigma_end": 0.002,
        "sampling_step": 3.0e-7,
        "hidden": 64,
        "n_blocks": 1,
    },
    "decomposition": {"n_replicates": 1, "level_stride": 4},
    # passes subspots_sum_to_spot (model sub-spot means reconstruct the spot: relative L1 < 0.75; ~0.4 here)
    "soscope": {"epochs": 200, "vgae_epochs": 50, "image_features": "none"},
}
DAGSTER_YAML = """telemetry:
  enabled: false
run_queue:
  max_concurrent_runs: 2
"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}

ADD_PARTITION = """mutation($repo: RepositorySelector!, $def: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $def, partitionKey: $key) {
    __typename ... on AddDynamicPartitionSuccess { partitionsDefName partitionKey }
    ... on PythonError { message } ... on UnauthorizedError { message } } }"""
LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId status } }
  ... on PythonError { message stack } ... on RunConfigValidationInvalid { errors { message } }
  ... on InvalidSubsetError { message } ... on PipelineNotFoundError { message } } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { runId status jobName
  tags { key value } } } }"""
RUN_FAILURE_LOG = """query($id: ID!) { logsForRun(runId: $id) { __typename ... on EventConnection { events {
  __typename ... on ExecutionStepFailureEvent { stepKey error { message } } ... on RunFailureEvent { message } } } } }"""


def _project(tmp: Path, demo) -> Path:
    doc = {
        "storage_root": str(tmp / "store"),
        "partitions": {"spot_range_size": SPOT_RANGE_SIZE},
        "compute": {"devices": ["cpu"], "max_cpu_steps": 1, "max_gpu_steps": 1},
        "references": [{"name": REF, "path": str(demo.reference), "cell_type_key": "cell_class"}],
        "samples": [{"name": SAMPLE, "spatial": str(demo.slide), "image": str(demo.image), "reference": REF}],
        "parameters": FAST_PARAMS,
        # served and RUNNING under the daemon, but never due during a test (1 January, 02:00)
        "schedules": {"nightly": "0 2 1 1 *"},
    }
    p = tmp / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _launch(url: str, repo: dict, job: str, partition: str, dims: dict | None = None) -> str:
    tags = [{"key": "dagster/partition", "value": partition}, {"key": "spatial_assets/launched_by", "value": "test"}]
    tags += [{"key": f"dagster/partition/{k}", "value": v} for k, v in (dims or {}).items()]
    params = {"selector": {**repo, "jobName": job}, "runConfigData": {}, "executionMetadata": {"tags": tags}}
    out = ui.graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
    assert out["__typename"] == "LaunchRunSuccess", out
    return out["run"]["runId"]


def _wait_runs(server, run_ids: list[str], timeout_s: float) -> dict[str, str]:
    t_end = time.time() + timeout_s
    status = {}
    while time.time() < t_end:
        for rid in run_ids:
            if status.get(rid) not in TERMINAL:
                status[rid] = ui.graphql(server.url, RUN_STATUS, {"id": rid})["runOrError"]["status"]
        if all(s in TERMINAL for s in status.values()):
            return status
        for name, p in server.procs.items():
            assert p.poll() is None, f"{name} exited ({p.returncode})\n{server.log_tail()}"
        time.sleep(2.0)
    raise TimeoutError(f"runs not finished after {timeout_s:g} s: {status}\n{server.log_tail()}")


def _failures(url: str, rid: str) -> list[str]:
    events = ui.graphql(url, RUN_FAILURE_LOG, {"id": rid})["logsForRun"].get("events", [])
    return [
        f"{e.get('stepKey', '')}: {(e.get('error') or {}).get('message') or e.get('message', '')}"
        for e in events
        if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
    ]


def _materialize_all(server, repo: dict, n_ranges: int) -> dict:
    """Register the partitions and run reference -> sample -> decomposition jobs, through GraphQL only."""
    url = server.url
    added = []
    for pdef, key in [
        ("references", REF),
        ("samples", SAMPLE),
        *[("spot_ranges", f"{i:04d}") for i in range(n_ranges)],
    ]:
        out = ui.graphql(url, ADD_PARTITION, {"repo": repo, "def": pdef, "key": key})["addDynamicPartition"]
        assert out["__typename"] == "AddDynamicPartitionSuccess", out
        added.append((out["partitionsDefName"], out["partitionKey"]))
    runs: dict[str, str] = {}
    status: dict[str, str] = {}
    timings = {}
    stages = [
        [("reference_job", REF, None)],
        [("sample_job", SAMPLE, None)],
        [
            ("decomposition_job", f"{SAMPLE}|{i:04d}", {"sample": SAMPLE, "spot_range": f"{i:04d}"})
            for i in range(n_ranges)
        ],
    ]
    for stage in stages:
        t0 = time.time()
        ids = {f"{job}:{part}": _launch(url, repo, job, part, dims) for job, part, dims in stage}
        runs.update(ids)
        status.update(_wait_runs(server, list(ids.values()), timeout_s=900))  # generous: CI machines are loaded
        timings[stage[0][0]] = round(time.time() - t0, 1)
        bad = {k: _failures(url, rid) for k, rid in ids.items() if status[rid] != "SUCCESS"}
        if bad:
            return {"added": added, "runs": runs, "status": status, "timings": timings, "failed": bad}
    return {"added": added, "runs": runs, "status": status, "timings": timings, "failed": {}}


_KEY = "spatial_assets_served"


def served_deployment(request, tmp_path_factory, demo) -> dict:
    """Start webserver + daemon once per pytest session, materialize the graph through GraphQL, and register the
    shutdown at session end (shared by test_webserver.py and test_ui.py)."""
    cache = request.config.__dict__.setdefault("_spatial_assets_cache", {})
    if _KEY in cache:
        return cache[_KEY]
    import anndata as ad

    from spatial_assets.orchestration.partitions import n_ranges

    tmp = tmp_path_factory.mktemp("deployment")
    cfg = _project(tmp, demo)
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    t0 = time.time()
    server = ui.start_dagster(home, env={"SPATIAL_ASSETS_CONFIG": str(cfg), "OMP_NUM_THREADS": "1"}, log_dir=tmp)
    state = {"server": server, "tmp": tmp, "config": cfg, "stopped": None, "failed": {}}
    cache[_KEY] = state

    def _stop():
        if state["stopped"] is None:
            state["stopped"] = server.stop(timeout_s=30)

    request.config.add_cleanup(_stop)
    try:
        repo = ui.wait_ready(server, timeout_s=600)
        state["startup_s"] = round(time.time() - t0, 1)
        state["repo"] = repo
        n = n_ranges(ad.read_h5ad(demo.slide, backed="r").n_obs, SPOT_RANGE_SIZE)
        state["n_ranges"] = n
        state.update(_materialize_all(server, repo, n))
    except BaseException as e:  # keep the error for every test that uses the deployment
        state["error"] = f"{type(e).__name__}: {e}"
    state["total_s"] = round(time.time() - t0, 1)
    return state


def stop_if_last_user(request, state: dict) -> None:
    """Module teardown: if no later test of this session uses the deployment, stop webserver + daemon and fail
    (as a teardown error) when a process had to be killed or any process of theirs is left."""
    users = [it for it in request.session.items if "deployment" in getattr(it, "fixturenames", ())]
    if not users or Path(users[-1].path) != Path(request.node.path):
        return  # a later module uses it; the session cleanup stops it anyway
    server = state["server"]
    if state.get("stopped") is not None:
        return
    t0 = time.time()
    killed = server.stop(timeout_s=30)
    state["stopped"] = killed
    left = {name: ui._group_alive(p.pid) for name, p in server.procs.items()}
    assert all(p.returncode is not None for p in server.procs.values())
    assert not any(left.values()), f"processes left after stop: {left}"
    assert not any(killed.values()), f"had to SIGKILL (no clean exit on SIGTERM within 30 s): {killed}"
    assert time.time() - t0 < 35


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory, demo_small):
    state = served_deployment(request, tmp_path_factory, demo_small)
    assert "error" not in state, state["error"]
    assert not state["failed"], f"runs failed: {state['failed']}\n{state['server'].log_tail()}"
    yield state
    stop_if_last_user(request, state)


# -------------------------------------------------------------------------------------------------------------
def test_runs_launched_through_graphql_succeed(deployment):
    st = deployment
    assert ("samples", SAMPLE) in st["added"] and ("spot_ranges", "0000") in st["added"]
    assert len(st["runs"]) == 2 + st["n_ranges"] and st["n_ranges"] >= 2
    assert set(st["status"].values()) == {"SUCCESS"}
    url = st["server"].url
    rid = st["runs"][f"decomposition_job:{SAMPLE}|0001"]
    run = ui.graphql(url, RUN_STATUS, {"id": rid})["runOrError"]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["jobName"] == "decomposition_job" and tags["dagster/partition"] == f"{SAMPLE}|0001"
    # the runs were queued and dequeued by the daemon (the default QueuedRunCoordinator)
    q = """{ instance { runQueuingSupported daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"""
    inst = ui.graphql(url, q)["instance"]
    assert inst["runQueuingSupported"] is True
    health = {d["daemonType"]: d for d in inst["daemonHealth"]["allDaemonStatuses"]}
    assert health["QUEUED_RUN_COORDINATOR"]["healthy"] is True
    # the outputs exist as zarr stores
    store = st["tmp"] / "store"
    assert (store / "typed_cells" / SAMPLE / "cells.zarr").is_dir()
    assert {p.name for p in (store / "decomposed_cells" / SAMPLE).glob("*.zarr")} == {
        f"{i:04d}.zarr" for i in range(st["n_ranges"])
    }


LINEAGE_Q = """{ assetNodes { assetKey { path } dependencyKeys { path } groupName jobNames isPartitioned
  opNames } }"""


def test_lineage_through_graphql(deployment):
    nodes = {n["assetKey"]["path"][-1]: n for n in ui.graphql(deployment["server"].url, LINEAGE_Q)["assetNodes"]}
    assert set(nodes) >= {
        "reference_data",
        "slide_inputs",
        "segmented_slide",
        "typed_cells",
        "score_checkpoint",
        "decomposed_cells",
        "decomposed_cells_by_sample",
        "enhanced_subspots",
    }
    deps = {k: {d["path"][-1] for d in n["dependencyKeys"]} for k, n in nodes.items()}
    assert deps["segmented_slide"] == {"slide_inputs"}
    assert deps["typed_cells"] == {"segmented_slide", "slide_inputs", "reference_data"}
    assert deps["decomposed_cells"] == {"typed_cells", "slide_inputs", "score_checkpoint"}
    assert deps["decomposed_cells_by_sample"] == {"decomposed_cells"}
    assert deps["enhanced_subspots"] == {"slide_inputs", "segmented_slide", "typed_cells", "reference_data"}
    assert deps["reference_data"] == set() and deps["slide_inputs"] == set()
    assert nodes["enhanced_subspots"]["groupName"] == "soscope"
    assert {"sample_job", "sample_job_dask"} <= set(nodes["segmented_slide"]["jobNames"])
    assert all(n["isPartitioned"] for n in nodes.values())
    assert {"reference_job", "reference_job_dask"} <= set(nodes["score_checkpoint"]["jobNames"])


PARTITIONS_Q = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename ... on AssetNode {
  partitionStats { numMaterialized numPartitions numFailed }
  assetPartitionStatuses { __typename ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
  assetMaterializations { partition runId } } } }"""


def _node(url: str, name: str) -> dict:
    n = ui.graphql(url, PARTITIONS_Q, {"key": {"path": [name]}})["assetNodeOrError"]
    assert n["__typename"] == "AssetNode", n
    return n


def test_partitions_through_graphql(deployment):
    url, st = deployment["server"].url, deployment
    ref = _node(url, "score_checkpoint")
    assert ref["assetPartitionStatuses"]["materializedPartitions"] == [REF]
    assert ref["partitionStats"] == {
        "numMaterialized": 1,
        "numPartitions": 1,
        "numFailed": 0,
    }
    for name in ("slide_inputs", "segmented_slide", "typed_cells", "enhanced_subspots"):
        n = _node(url, name)
        assert n["assetPartitionStatuses"]["materializedPartitions"] == [SAMPLE], name
        assert {m["runId"] for m in n["assetMaterializations"]} == {st["runs"][f"sample_job:{SAMPLE}"]}, name
    dec = _node(url, "decomposed_cells")
    keys = sorted(m["partition"] for m in dec["assetMaterializations"])
    assert keys == [f"{SAMPLE}|{i:04d}" for i in range(st["n_ranges"])]
    assert dec["partitionStats"]["numMaterialized"] == st["n_ranges"]
    assert dec["partitionStats"]["numPartitions"] == st["n_ranges"]  # 1 sample x n spot ranges
    # decomposed_cells_by_sample was not launched: known but unmaterialized
    by = _node(url, "decomposed_cells_by_sample")
    assert by["assetPartitionStatuses"]["materializedPartitions"] == [] and by["partitionStats"]["numPartitions"] == 1


CHECKS_Q = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  assetChecksOrError { __typename ... on AssetChecks { checks { name blocking } } } } } }"""
CHECK_EXEC_Q = """query($key: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $check, limit: 20) { runId status partition
    evaluation { success partition metadataEntries { label ... on FloatMetadataEntry { floatValue }
                                                     ... on IntMetadataEntry { intValue } } } } }"""


def test_asset_checks_through_graphql(deployment):
    url, st = deployment["server"].url, deployment
    expected = {
        "segmented_slide": "cells_per_spot_in_range",
        "typed_cells": "proportions_sum_to_one",
        "enhanced_subspots": "subspots_sum_to_spot",
        "decomposed_cells": "spot_reconstruction",
        "score_checkpoint": "checkpoint_sample_quality",
    }
    for asset, check in expected.items():
        checks = ui.graphql(url, CHECKS_Q, {"key": {"path": [asset]}})["assetNodeOrError"]["assetChecksOrError"]
        assert (check, True) in {(c["name"], c["blocking"]) for c in checks["checks"]}, asset
        ex = ui.graphql(url, CHECK_EXEC_Q, {"key": {"path": [asset]}, "check": check})["assetCheckExecutions"]
        # one execution per materializing run (the checks are not partitioned themselves: the run's partition)
        want = (
            [st["runs"][f"decomposition_job:{SAMPLE}|{i:04d}"] for i in range(st["n_ranges"])]
            if asset == "decomposed_cells"
            else [st["runs"][f"reference_job:{REF}"]]
            if asset == "score_checkpoint"
            else [st["runs"][f"sample_job:{SAMPLE}"]]
        )
        assert sorted(e["runId"] for e in ex) == sorted(want), asset
        assert all(e["status"] == "SUCCEEDED" and e["evaluation"]["success"] for e in ex), (asset, ex)
        md = {m["label"]: m for e in ex for m in e["evaluation"]["metadataEntries"]}
        if asset == "typed_cells":
            assert md["max_abs_deviation"]["floatValue"] < 1e-4
        if asset == "decomposed_cells":
            assert 0 <= md["spot_reconstruction_error"]["floatValue"] < 0.5


SCHEDULES_Q = """query($repo: RepositorySelector!) { schedulesOrError(repositorySelector: $repo) { __typename
  ... on Schedules { results { name cronSchedule pipelineName scheduleState { status }
  futureTicks(limit: 1) { results { timestamp } } } } } }"""


def test_schedules_are_served_and_running_under_the_daemon(deployment):
    res = ui.graphql(deployment["server"].url, SCHEDULES_Q, {"repo": deployment["repo"]})["schedulesOrError"]
    got = {r["name"]: r for r in res["results"]}
    jobs = ("reference_job", "sample_job", "decomposition_job", "combine_job")
    assert set(got) == {f"nightly_{j}" for j in jobs}
    for j in jobs:
        r = got[f"nightly_{j}"]
        assert r["cronSchedule"] == "0 2 1 1 *" and r["pipelineName"] == j
        assert r["scheduleState"]["status"] == "RUNNING"
        (tick,) = r["futureTicks"]["results"]
        when = time.gmtime(float(tick["timestamp"]))
        assert (when.tm_mon, when.tm_mday, when.tm_hour, when.tm_min) == (1, 1, 2, 0)
