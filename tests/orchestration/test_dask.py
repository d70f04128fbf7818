"""Scale-out: the validated Dask executor on a real local Dask cluster (127.0.0.1 / in-process only), its fail-fast
cluster check, and the Kubernetes step tags / per-step config checked against dagster-k8s's documented schema."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.definitions.reconstruct import build_reconstructable_job

from spatial_assets.orchestration.config import load_config
from spatial_assets.orchestration.definitions import build_definitions
from spatial_assets.orchestration.executors import (
    K8S_CONFIG_TAG,
    K8S_GPU_RESOURCE,
    DaskClusterError,
    check_workers,
    dask_run_config,
    k8s_executor_config,
    k8s_step_tags,
    local_cluster_worker_resources,
    scheduler_worker_resources,
    step_resource_requirements,
)
from spatial_assets.orchestration.partitions import register_partitions
from spatial_assets.orchestration.resources import GPU_OP_TAGS, GPU_TAG
from tests.helpers import REPO

defs = build_definitions(load_config(REPO / "dagster_project.yaml", check_files=False))
GPU_ASSETS = ("segmented_slide", "score_checkpoint", "decomposed_cells", "enhanced_subspots")
DASK_KEY = "dagster-dask/resource_requirements"

# dagster-k8s's schema of the `dagster-k8s/config` tag and of k8s_job_executor's per_step_k8s_config
# (dagster_k8s.job.USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, dagster-k8s 0.29; dagster-k8s itself is not installed here)
K8S_TAG_SCHEMA = dg.Shape(
    {
        "container_config": dg.Permissive(),
        "pod_template_spec_metadata": dg.Permissive(),
        "pod_spec_config": dg.Permissive(),
        "job_config": dg.Permissive(),
        "job_metadata": dg.Permissive(),
        "job_spec_config": dg.Permissive(),
        "merge_behavior": dg.Field(
            dg.Enum("K8sConfigMergeBehavior", [dg.EnumValue("SHALLOW"), dg.EnumValue("DEEP")]), is_required=False
        ),
    }
)
K8S_EXECUTOR_STEP_SCHEMA = dg.Shape(
    {
        "step_k8s_config": dg.Field(K8S_TAG_SCHEMA, is_required=False),
        "per_step_k8s_config": dg.Field(dg.Map(str, K8S_TAG_SCHEMA, key_label_name="step_name"), is_required=False),
    }
)
# fields of the Kubernetes objects these configs become (V1Container, V1ResourceRequirements, V1PodSpec, V1Toleration)
V1_CONTAINER_USED = {"resources"}
V1_RESOURCES = {"limits", "requests", "claims"}
V1_PODSPEC_USED = {"tolerations", "node_selector"}
V1_TOLERATION = {"key", "operator", "value", "effect", "toleration_seconds"}


# -------------------------------------------------------------------------------------------------------------
# requirements vs workers (no cluster)
# -------------------------------------------------------------------------------------------------------------
def test_step_requirements_from_real_plan():
    job = defs.resolve_job_def("sample_job_dask")
    from dagster._core.execution.api import create_execution_plan

    steps = {s.key: s.tags for s in create_execution_plan(job).steps}
    req = step_resource_requirements(steps)
    assert req == {"segmented_slide": {"GPU": 1.0}, "enhanced_subspots": {"GPU": 1.0}}
    assert "slide_inputs" in steps and "typed_cells" in steps  # CPU steps: no requirement


def test_bad_requirement_tag_is_named():
    with pytest.raises(
        DaskClusterError,
        match=r"step 'x': tag dagster-dask/resource_requirements must map "
        r"resource names to positive numbers; found '\{\"GPU\": 0\}'",
    ):
        step_resource_requirements({"x": {DASK_KEY: '{"GPU": 0}'}})
    with pytest.raises(DaskClusterError, match="step 'y': tag dagster-dask/resource_requirements must be a JSON"):
        step_resource_requirements({"y": {DASK_KEY: "GPU=1"}})


def test_check_workers_messages():
    req = {"segmented_slide": {"GPU": 1.0}}
    check_workers(req, {"w0": {"GPU": 1.0}}, "test")  # satisfied: no error
    with pytest.raises(DaskClusterError) as e:
        check_workers(req, {"tcp://127.0.0.1:1": {}, "tcp://127.0.0.1:2": {"GPU": 0.5}}, "scheduler s")
    msg = str(e.value)
    assert "step 'segmented_slide' needs resources {GPU=1}" in msg
    assert "Workers found (scheduler s): tcp://127.0.0.1:1: {}; tcp://127.0.0.1:2: {'GPU': 0.5}" in msg
    assert '--resources "GPU=1"' in msg
    # all of a step's resources must sit on one worker
    with pytest.raises(DaskClusterError, match=r"step 'a' needs resources \{GPU=1, MEM=2\}"):
        check_workers({"a": {"GPU": 1.0, "MEM": 2.0}}, {"w0": {"GPU": 1.0}, "w1": {"MEM": 4.0}}, "x")
    with pytest.raises(DaskClusterError, match=r"the Dask cluster \(x\) has no worker"):
        check_workers({}, {}, "x")


def test_local_cluster_config_resources():
    assert local_cluster_worker_resources({"n_workers": 2, "resources": {"GPU": 1}}) == {
        "local-worker-0": {"GPU": 1.0},
        "local-worker-1": {"GPU": 1.0},
    }
    assert local_cluster_worker_resources({"worker_kwargs": {"resources": {"GPU": 2}}}) == {
        "local-worker-0": {"GPU": 2.0}
    }
    assert local_cluster_worker_resources({"n_workers": 0, "resources": {"GPU": 1}}) == {}
    import dask

    with dask.config.set({"distributed.worker.resources": {"GPU": 1}}):  # what workers fall back to
        assert local_cluster_worker_resources({}) == {"local-worker-0": {"GPU": 1.0}}
    with pytest.raises(DaskClusterError, match="cluster.local.resources must be a mapping"):
        local_cluster_worker_resources({"resources": "GPU=1"})


def test_unreachable_scheduler_is_named():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.time()
    with pytest.raises(
        DaskClusterError,
        match=rf"cluster.existing.address: cannot reach a Dask scheduler at "
        rf"'tcp://127.0.0.1:{port}' within 2 s",
    ):
        scheduler_worker_resources(f"tcp://127.0.0.1:{port}", timeout_s=2)
    assert time.time() - t0 < 15


# -------------------------------------------------------------------------------------------------------------
# Kubernetes step tags / per-step config
# -------------------------------------------------------------------------------------------------------------
def _check_k8s_config(cfg: dict, gpu: bool) -> None:
    res = validate_config(K8S_TAG_SCHEMA, cfg)
    assert res.success, res.errors
    assert set(cfg["container_config"]) <= V1_CONTAINER_USED
    r = cfg["container_config"]["resources"]
    assert set(r) <= V1_RESOURCES and r["requests"]["memory"] == r["limits"]["memory"]
    if gpu:
        assert r["limits"][K8S_GPU_RESOURCE] == 1
        assert K8S_GPU_RESOURCE not in r["requests"]  # extended resources: a request must equal the limit if set
        assert set(cfg["pod_spec_config"]) <= V1_PODSPEC_USED
        for t in cfg["pod_spec_config"]["tolerations"]:
            assert set(t) <= V1_TOLERATION and t["key"] == K8S_GPU_RESOURCE
    else:
        assert K8S_GPU_RESOURCE not in r["limits"] and "pod_spec_config" not in cfg


def _one_op_job(op) -> dg.JobDefinition:
    @dg.job(name=f"job_{op.name}")
    def one():
        op()

    return one


def test_k8s_step_tags_merged_with_gpu_op_tags():
    for name in GPU_ASSETS:
        tags = {**defs.get_assets_def(name).op.tags, **k8s_step_tags(True)}
        # dagster stores op tags as strings (dicts as JSON): build a real op with the merged tags and read the
        # step's tags the way dagster-k8s's step handler does (json.loads of the tag, then its schema)
        op = dg.op(name=f"{name}_k8s", tags=tags)(lambda: None)
        from dagster._core.execution.api import create_execution_plan

        (step,) = create_execution_plan(_one_op_job(op)).steps
        assert all(isinstance(v, str) for v in step.tags.values())
        cfg = json.loads(step.tags[K8S_CONFIG_TAG])
        _check_k8s_config(cfg, gpu=True)
        assert json.loads(step.tags[DASK_KEY]) == {"GPU": 1} and step.tags[GPU_TAG] == "gpu"
    _check_k8s_config(json.loads(json.dumps(k8s_step_tags(False)[K8S_CONFIG_TAG])), gpu=False)
    sel = k8s_step_tags(True, gpus=2, gpu_node_selector={"nvidia.com/gpu.present": "true"})[K8S_CONFIG_TAG]
    assert sel["container_config"]["resources"]["limits"][K8S_GPU_RESOURCE] == 2
    assert sel["pod_spec_config"]["node_selector"] == {"nvidia.com/gpu.present": "true"}
    with pytest.raises(ValueError, match="k8s_step_tags: gpus must be a positive int; found 0"):
        k8s_step_tags(True, gpus=0)
    assert GPU_OP_TAGS[GPU_TAG] == "gpu"


def test_k8s_executor_config_targets_gpu_steps():
    for job_name, gpu_steps in (
        ("sample_job", {"segmented_slide", "enhanced_subspots"}),
        ("reference_job", {"score_checkpoint"}),
        ("decomposition_job", {"decomposed_cells"}),
    ):
        run_config = k8s_executor_config(defs.resolve_job_def(job_name))
        ex = run_config["execution"]["config"]
        res = validate_config(K8S_EXECUTOR_STEP_SCHEMA, ex)
        assert res.success, res.errors
        assert set(ex["per_step_k8s_config"]) == gpu_steps, job_name
        for cfg in ex["per_step_k8s_config"].values():
            _check_k8s_config(cfg, gpu=True)
        _check_k8s_config(ex["step_k8s_config"], gpu=False)


# -------------------------------------------------------------------------------------------------------------
# real runs on a local Dask cluster
# -------------------------------------------------------------------------------------------------------------
def _project(tmp_path: Path, demo) -> Path:
    doc = {
        "storage_root": str(tmp_path / "store"),
        "partitions": {"spot_range_size": 20},
        "references": [{"name": "ref", "path": str(demo.reference), "cell_type_key": "cell_type"}],
        "samples": [{"name": "s1", "spatial": str(demo.slide), "image": str(demo.image), "reference": "ref"}],
        "parameters": {"segmentation": {"method": "watershed", "min_umi": 20}},
    }
    p = tmp_path / "dagster_project.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir(exist_ok=True)
    return tmp_path / "home"


def _recon(cfg_path: Path):
    return build_reconstructable_job(
        "spatial_assets.orchestration.definitions",
        "build_dask_job_from_config",
        reconstructable_args=(str(cfg_path), "sample_job_dask"),
    )


SELECTION = [dg.AssetKey("slide_inputs"), dg.AssetKey("segmented_slide")]


@pytest.fixture
def mixed_cluster():
    """A real Dask scheduler on 127.0.0.1 with one CPU-only worker and one worker advertising GPU=1, each in its
    own process (like `dask worker`): Dagster steps in threads of one process can deadlock on logging's locks."""
    from distributed import Nanny, Scheduler, SpecCluster

    spec = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "resources": {"GPU": 1}}},
    }
    cluster = SpecCluster(
        scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}},
        workers=spec,
        asynchronous=False,
    )
    try:
        yield cluster
    finally:
        cluster.close()


def _executed_keys(cluster) -> dict[str, set[str]]:
    """Per worker name, the keys it ran itself (moved to "executing"), not results it fetched for a downstream
    task."""
    from distributed import Client

    def executed(dask_worker):
        return sorted({str(rec[0]) for rec in dask_worker.state.log if len(rec) > 2 and rec[2] == "executing"})

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        by_address = client.run(executed)
    return {name: set(by_address[w.worker_address]) for name, w in cluster.workers.items()}


@pytest.mark.slow
def test_dask_run_gpu_step_on_gpu_worker(tmp_path, demo_small, mixed_cluster):
    cfg_path = _project(tmp_path, demo_small)
    from spatial_assets.orchestration.config import load_config

    with dg.instance_for_test(temp_dir=str(_home(tmp_path))) as instance:
        register_partitions(instance, load_config(cfg_path))
        addr = mixed_cluster.scheduler_address
        assert addr.startswith("tcp://127.0.0.1:")
        t0 = time.time()
        res = dg.execute_job(
            _recon(cfg_path),
            instance,
            run_config=dask_run_config({"existing": {"address": addr}}),
            tags={"dagster/partition": "s1"},
            asset_selection=SELECTION,
        )
        assert res.success, [e.message for e in res.all_events if e.is_failure]
        mats = {e.asset_key.to_user_string(): e for e in res.get_asset_materialization_events()}
        assert set(mats) == {"slide_inputs", "segmented_slide"}
        assert all(e.partition == "s1" for e in mats.values())
        md = mats["segmented_slide"].materialization.metadata
        assert md["method"].value == "watershed" and md["cells"].value > 10
        assert (tmp_path / "store" / "segmented_slide" / "s1" / "cells.zarr").exists()
        # the GPU-tagged step ran on the GPU worker, not on the CPU-only one
        keys = _executed_keys(mixed_cluster)
        assert "sample_job_dask.segmented_slide" in keys["gpu"]
        assert "sample_job_dask.segmented_slide" not in keys["cpu"]
        ran = keys["gpu"] | keys["cpu"]
        assert "sample_job_dask.slide_inputs" in ran
        # the steps' own dask work (the segmentation stores' array stacking) ran inside the steps, not as tasks of
        # the cluster, where it waited for a free worker thread while its step held one (a one-thread GPU worker,
        # or all threads busy with steps, waited forever)
        assert all(str(k).startswith("sample_job_dask.") for k in ran), sorted(map(str, ran))
        logs = [r.user_message or "" for r in instance.all_logs(res.run_id)]
        assert any("Dask cluster check passed (scheduler tcp://127.0.0.1:" in m for m in logs)
        assert time.time() - t0 < 300  # a guard against waiting forever (worker processes start cold), not a speed test


def test_dask_no_gpu_worker_fails_fast(tmp_path, demo_small):
    """(b) a GPU step and no GPU worker: the run fails at once with the step, resource and workers named."""
    from distributed import LocalCluster

    cfg_path = _project(tmp_path, demo_small)
    from spatial_assets.orchestration.config import load_config

    with (
        dg.instance_for_test(temp_dir=str(_home(tmp_path))) as instance,
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp", dashboard_address=None
        ) as cpu_only,
    ):
        register_partitions(instance, load_config(cfg_path))
        for cluster in (
            {"existing": {"address": cpu_only.scheduler_address}},
            {"local": {"n_workers": 1, "processes": False, "threads_per_worker": 1}},
        ):
            t0 = time.time()
            with pytest.raises(DaskClusterError) as e:
                dg.execute_job(
                    _recon(cfg_path),
                    instance,
                    run_config=dask_run_config(cluster),
                    tags={"dagster/partition": "s1"},
                    asset_selection=SELECTION,
                    raise_on_error=True,
                )
            took = time.time() - t0
            assert took < 30, took
            msg = str(e.value)
            assert "step 'segmented_slide' needs resources {GPU=1}" in msg and "wait forever" in msg
            where = f"scheduler {cpu_only.scheduler_address}" if "existing" in cluster else "local cluster config"
            assert f"Workers found ({where}):" in msg
            run = instance.get_runs(limit=1)[0]
            assert run.status == dg.DagsterRunStatus.FAILURE
        assert not (tmp_path / "store" / "segmented_slide").exists()  # nothing ran
