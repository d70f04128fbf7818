"""Scale-out: dagster-dask's own executor, checking the cluster before it submits, and the Kubernetes step tags.

The steps are submitted by dagster-dask's ``DaskExecutor.execute`` itself, with two thin fixes for distributed
>= 2025 (:class:`_BoundRecords`: dagster's record arguments are bound into the task's function instead of being
walked by distributed as tuples; :func:`_run_step`: one step at a time per worker process, since two Dagster steps
in threads of one process can deadlock on logging's locks, and the dask work inside a step runs in the step, not
as tasks of the cluster).

dagster-dask submits each step with the Dask resources named by its ``dagster-dask/resource_requirements`` tag
(GPU steps: ``{"GPU": 1}``, see ``resources.GPU_OP_TAGS``). Dask then runs the step only on a worker that
advertises that resource (``dask worker --resources GPU=1``); when no worker does, the task waits forever, with no
error. :func:`validated_dask_executor` (same config as ``dagster_dask.dask_executor``) inspects the cluster first and
fails the run at once, naming the step, the missing resource and the workers it found:

* ``cluster: {local: {...}}``: the ``resources`` (and ``n_workers``) of the LocalCluster it is about to start
  (falling back to dask's ``distributed.worker.resources`` setting), before any cluster is started;
* ``cluster: {existing: {address: ...}}``: the resources of every worker connected to that scheduler now;
* other cluster managers (SLURM, PBS, Kubernetes...): their workers start later, so nothing can be read up front;
  the run logs a warning and goes on (give those workers ``--resources GPU=1``).

:func:`k8s_step_tags` gives the ``dagster-k8s/config`` tags of a step run by ``dagster_k8s.k8s_job_executor``
(a ``nvidia.com/gpu`` limit for GPU steps). See docs/DEPLOY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import dagster as dg
import distributed
from dagster_dask import dask_executor
from dagster_dask.executor import DASK_RESOURCE_REQUIREMENTS_KEY, DaskExecutor

from ._dagster_internals import ExecutionPlan, PlanOrchestrationContext, query_on_dask_worker
from .resources import GPU_TAG

GPU_RESOURCE = "GPU"
ENV_SCHEDULER = "DASK_SCHEDULER_ADDRESS"
K8S_CONFIG_TAG = "dagster-k8s/config"
K8S_GPU_RESOURCE = "nvidia.com/gpu"


# cluster managers by dagster-dask cluster type (module, class), as dagster_dask.dask_executor starts them
CLUSTER_MANAGERS = {
    "local": ("distributed", "LocalCluster"),
    "ssh": ("distributed", "SSHCluster"),
    "yarn": ("dask_yarn", "YarnCluster"),
    "pbs": ("dask_jobqueue", "PBSCluster"),
    "moab": ("dask_jobqueue", "MoabCluster"),
    "sge": ("dask_jobqueue", "SGECluster"),
    "lsf": ("dask_jobqueue", "LSFCluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "oar": ("dask_jobqueue", "OARCluster"),
    "kube": ("dask_kubernetes", "KubeCluster"),
}


class DaskClusterError(dg.DagsterInvariantViolationError):
    """The Dask cluster cannot run the plan: a step needs a resource no worker advertises, or there is no worker."""


# -------------------------------------------------------------------------------------------------------------
# what the steps need, what the workers offer
# -------------------------------------------------------------------------------------------------------------
def step_resource_requirements(tags_by_step: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """``{step key: {resource: amount}}`` from each step's ``dagster-dask/resource_requirements`` tag (a JSON
    object of positive numbers); steps without the tag are left out."""
    out: dict[str, dict[str, float]] = {}
    for step, tags in tags_by_step.items():
        raw = tags.get(DASK_RESOURCE_REQUIREMENTS_KEY)
        if raw is None:
            continue
        try:
            req = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (TypeError, ValueError) as e:
            raise DaskClusterError(
                f"step '{step}': tag {DASK_RESOURCE_REQUIREMENTS_KEY} must be a JSON object "
                f'like {{"GPU": 1}}; found {raw!r} ({e})'
            ) from None
        if not isinstance(req, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in req.values()
        ):
            raise DaskClusterError(
                f"step '{step}': tag {DASK_RESOURCE_REQUIREMENTS_KEY} must map resource names "
                f"to positive numbers; found {raw!r}"
            )
        if req:
            out[step] = {str(k): float(v) for k, v in req.items()}
    return out


def local_cluster_worker_resources(cluster_config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The resources each worker of ``LocalCluster(**cluster_config)`` will advertise, by worker name.

    Reads ``resources`` (or ``worker_kwargs.resources``, else dask's ``distributed.worker.resources`` setting,
    which is what the workers themselves fall back to) and ``n_workers`` (an explicit 0 means no worker).
    """
    import dask

    res = cluster_config.get("resources")
    if res is None:
        res = (cluster_config.get("worker_kwargs") or {}).get("resources")
    if res is None:
        res = dask.config.get("distributed.worker.resources", None) or {}
    if not isinstance(res, Mapping):
        raise DaskClusterError(
            f'executor config cluster.local.resources must be a mapping like {{"GPU": 1}}; found {res!r}'
        )
    n = cluster_config.get("n_workers")
    n = 1 if n is None else int(n)  # LocalCluster's default is >= 1 worker; all of them get the same resources
    return {f"local-worker-{i}": {str(k): float(v) for k, v in res.items()} for i in range(n)}


def scheduler_worker_resources(address: str, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """The resources of every worker connected to the Dask scheduler at ``address`` now, by worker address."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout_s, set_as_default=False) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]  # the default lists only 5 workers
    except (OSError, TimeoutError) as e:
        raise DaskClusterError(
            f"executor config cluster.existing.address: cannot reach a Dask scheduler at "
            f"{address!r} within {timeout_s:g} s ({type(e).__name__}: {e})"
        ) from None
    return {addr: {str(k): float(v) for k, v in (w.get("resources") or {}).items()} for addr, w in workers.items()}


def check_workers(
    requirements: Mapping[str, Mapping[str, float]], workers: Mapping[str, Mapping[str, float]], where: str
) -> None:
    """Raise :class:`DaskClusterError` unless some worker satisfies every step's requirements on its own (and,
    for any plan at all, unless there is a worker). ``where`` names the cluster in the message."""
    if not workers:
        raise DaskClusterError(
            f"the Dask cluster ({where}) has no worker: no step could run. Start workers "
            f"(GPU workers with `dask worker <scheduler> --resources {GPU_RESOURCE}=1`)."
        )
    missing = []
    for step, req in requirements.items():
        if not any(all(w.get(r, 0.0) >= amt for r, amt in req.items()) for w in workers.values()):
            need = ", ".join(f"{r}={amt:g}" for r, amt in req.items())
            missing.append(f"step '{step}' needs resources {{{need}}}")
    if missing:
        found = "; ".join(f"{name}: {dict(res) or '{}'}" for name, res in sorted(workers.items()))
        names = sorted({r for req in requirements.values() for r in req})
        hint = " ".join(f"{r}=1" for r in names)
        raise DaskClusterError(
            f"no Dask worker advertises the resources these steps need, so they would wait forever: "
            f"{'; '.join(missing)}. Workers found ({where}): {found}. Start workers with "
            f'`dask worker <scheduler> --resources "{hint}"` or give the local cluster `resources: '
            f"{{{', '.join(f'{r}: 1' for r in names)}}}`."
        )


def cluster_worker_resources(
    cluster_type: str, cluster_config: Mapping[str, Any]
) -> tuple[dict[str, dict[str, float]] | None, str]:
    """``(workers' resources, description)`` of a dagster-dask cluster config; ``None`` when they cannot be known
    before the run (cluster managers whose workers start later)."""
    if cluster_type == "local":
        if "address" in cluster_config:  # LocalCluster(address=...) attaches to that scheduler
            return scheduler_worker_resources(cluster_config["address"]), f"scheduler {cluster_config['address']}"
        return local_cluster_worker_resources(cluster_config), "local cluster config"
    if cluster_type == "existing":
        address = cluster_config["address"]
        return scheduler_worker_resources(address), f"scheduler {address}"
    return None, cluster_type


_STEP_SCHEDULER = "threads"  # dask's scheduler for the dask work inside a step (see _run_step)
# one Dagster step at a time per process (see _run_step)
_STEP_LOCK = threading.Lock()


@contextlib.contextmanager
def _run_step():
    """The conditions each step runs in on a Dask worker: alone in its process, with dask's local scheduler.

    - **Alone**: every step creates a Dagster log manager, which calls ``logging.config.dictConfig`` and so closes
      every logging handler of the process while holding logging's module lock. A second step in another thread
      of the same process, inside a handler's ``emit`` (its handler lock held) and logging there (sqlalchemy's
      debug check takes the module lock), deadlocks with it: both threads wait forever (seen in
      tests/orchestration/test_dask.py under CPU load, with both workers' threads in one process). Workers with
      several threads therefore run their steps one by one; give workers ``--nthreads 1`` and more processes.
    - **Local dask**: inside a Dask task, dask sends any dask computation to the cluster itself (the worker's
      client); the segmentation's stores stack dask arrays, so the step submitted an inner graph, seceded from
      its worker thread, shipped the image over TCP and waited to rejoin. Here that work runs in the step
      (``dask.config`` scheduler ``threads``, restored after the step).
    """
    import dask

    with _STEP_LOCK, dask.config.set(scheduler=_STEP_SCHEDULER):
        yield


class _BoundRecords:
    """``query_on_dask_worker`` with every argument but the upstream futures bound into the task's function.

    dagster-dask 0.29 submits ``query_on_dask_worker(dependencies, recon_job, dagster_run, run_config, step_keys,
    instance_ref, known_state)``; distributed >= 2025 walks positional task arguments that are tuples to find
    futures in them, and dagster's records (tuple subclasses that forbid iteration) make it fail with "Iteration
    is not allowed on @record". Bound here, they travel pickled with the function and distributed only walks the
    list of upstream futures. The step runs alone in its process with dask's local scheduler (:func:`_run_step`).
    """

    def __init__(self, func, args: tuple):
        self.func, self.args = func, args

    def __call__(self, dependencies):
        with _run_step():
            return self.func(dependencies, *self.args)


class _RecordSafeClient(distributed.Client):
    """``distributed.Client`` whose ``submit`` binds dagster-dask's record arguments (see :class:`_BoundRecords`);
    every other call is the client's own."""

    def submit(self, func, *args, **kwargs):
        if func is query_on_dask_worker and args:
            return super().submit(_BoundRecords(func, tuple(args[1:])), args[0], **kwargs)
        return super().submit(func, *args, **kwargs)


@contextlib.contextmanager
def _record_safe_dask_client(close_clusters: bool, on_connect=None):
    """dagster-dask's ``execute`` looks ``dask.distributed.Client`` and ``as_completed`` up when it runs: point
    them at :class:`_RecordSafeClient` and at ``as_completed`` on that client's loop (dagster-dask passes no loop,
    so distributed would take the loop of the process's latest default client, which need not be the run's) for
    that run only (each Dagster run executes in its own process with the default run launcher). dagster-dask
    never closes the cluster manager it starts (``LocalCluster``, ``SLURMCluster``...):
    with ``close_clusters`` the clusters of the clients made meanwhile are closed at the end. ``on_connect(client)``
    runs once each client is connected (before any submit)."""
    import dask.distributed

    made: list[distributed.Client] = []

    class _Tracked(_RecordSafeClient):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
            if on_connect is not None:
                on_connect(self)

    def as_completed(futures, **kwargs):  # on the run's client loop, not the process's default client's
        return original_as_completed(futures, loop=made[-1].loop, **kwargs)

    original, original_as_completed = dask.distributed.Client, dask.distributed.as_completed
    dask.distributed.Client, dask.distributed.as_completed = _Tracked, as_completed
    try:
        yield
    finally:
        dask.distributed.Client, dask.distributed.as_completed = original, original_as_completed
        for c in made:
            c.close()  # already closed by dagster-dask unless on_connect raised
            if close_clusters and c.cluster is not None:
                c.cluster.close()


class ValidatedDaskExecutor(DaskExecutor):
    """dagster-dask's executor that first checks the cluster can run every step of the plan, then runs
    dagster-dask's own ``execute`` with two fixes: the record arguments of its tasks are bound into the task's
    function (:class:`_BoundRecords`), which distributed >= 2025 needs, and each step runs alone in its worker
    process with its own dask work kept in the step (:func:`_run_step`); the cluster manager it starts is closed
    after the run."""

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan):
        if not plan_context.instance.is_persistent:
            raise DaskClusterError("Dask execution needs a persistent Dagster instance (set DAGSTER_HOME)")
        if self.cluster_type not in CLUSTER_MANAGERS and self.cluster_type != "existing":
            raise DaskClusterError(
                f"executor config cluster: unknown type '{self.cluster_type}'; expected "
                f"'existing' or one of {sorted(CLUSTER_MANAGERS)}"
            )
        steps = [s for level in execution_plan.get_steps_to_execute_by_level() for s in level]
        reqs = step_resource_requirements({s.key: s.tags or {} for s in steps})
        workers, where = cluster_worker_resources(self.cluster_type, self.cluster_configuration)
        if workers is None:
            if reqs:
                plan_context.log.warning(
                    f"Dask cluster type '{where}': its workers start with the run, so the resources "
                    f"{sorted({r for q in reqs.values() for r in q})} needed by steps {sorted(reqs)} cannot be "
                    f"checked up front; if no worker advertises them, these steps wait forever."
                )
        else:
            check_workers(reqs, workers, where)
            plan_context.log.info(
                f"Dask cluster check passed ({where}): {len(workers)} worker(s); "
                f"resource-tagged steps: {sorted(reqs) or 'none'}"
            )
        owned = self.cluster_type != "existing"

        def check_started(client) -> None:  # job-queue / cloud managers: their workers, if any are up already
            if owned and self.cluster_type != "local" and reqs:
                now = {
                    a: {str(k): float(v) for k, v in (w.get("resources") or {}).items()}
                    for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                }
                if now:  # else an adaptive cluster may still add workers
                    check_workers(reqs, now, f"{self.cluster_type} cluster")

        with _record_safe_dask_client(close_clusters=owned, on_connect=check_started):
            yield from super().execute(plan_context, execution_plan)


def default_cluster_config() -> dict:
    """The cluster a Dask job uses when its run config names none: the scheduler at ``$DASK_SCHEDULER_ADDRESS``
    if set, else one local worker process (on 127.0.0.1) that advertises one GPU and runs the steps one by one."""
    if os.environ.get(ENV_SCHEDULER):
        return {"existing": {"address": {"env": ENV_SCHEDULER}}}
    return {
        "local": {
            "n_workers": 1,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
            "resources": {GPU_RESOURCE: 1},
        }
    }


_CLUSTER_TYPE = dask_executor.config_schema.as_field().config_type.fields["cluster"].config_type


@dg.executor(
    name="validated_dask",
    config_schema={
        "cluster": dg.Field(
            _CLUSTER_TYPE,
            is_required=False,
            default_value=default_cluster_config(),
            description="as dagster_dask.dask_executor's `cluster`",
        )
    },
    requirements=dg.multiple_process_executor_requirements(),
)
def validated_dask_executor(init_context: dg.InitExecutorContext) -> ValidatedDaskExecutor:
    """dagster-dask's executor (same config) that fails fast when a resource-tagged step (GPU steps:
    ``{"GPU": 1}``) could not be taken by any worker of the cluster, instead of waiting forever."""
    ((cluster_type, cluster_config),) = init_context.executor_config["cluster"].items()
    return ValidatedDaskExecutor(cluster_type, cluster_config)


def dask_run_config(cluster: Mapping[str, Any]) -> dict:
    """Run config selecting a cluster for a Dask job, e.g. ``dask_run_config({"existing": {"address": a}})``."""
    return {"execution": {"config": {"cluster": dict(cluster)}}}


def dask_asset_job(name: str, selection, partitions_def=None, description: str | None = None):
    """An asset job run by :func:`validated_dask_executor`."""
    return dg.define_asset_job(
        name,
        selection=selection,
        partitions_def=partitions_def,
        executor_def=validated_dask_executor,
        description=(description or name) + " (on a Dask cluster; GPU steps on GPU workers)",
    )


# -------------------------------------------------------------------------------------------------------------
# Kubernetes (dagster-k8s k8s_job_executor / K8sRunLauncher): per-step pod config through op tags
# -------------------------------------------------------------------------------------------------------------
def k8s_step_tags(
    gpu: bool, gpus: int = 1, cpu: str = "2", memory: str = "8Gi", gpu_node_selector: Mapping[str, str] | None = None
) -> dict[str, dict]:
    """The ``dagster-k8s/config`` tag of one step's pod (dagster-k8s's schema: ``container_config`` /
    ``pod_spec_config`` ...): CPU and memory requests; GPU steps also get a ``nvidia.com/gpu`` limit (Kubernetes
    requires GPU requests == limits, so only the limit is set), the NVIDIA toleration, and an optional node
    selector. Merge it into the op tags: ``{**GPU_OP_TAGS, **k8s_step_tags(True)}``."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"k8s_step_tags: gpus must be a positive int; found {gpus!r}")
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    cfg: dict[str, Any] = {"container_config": {"resources": resources}}
    if gpu:
        resources["limits"][K8S_GPU_RESOURCE] = gpus
        pod_spec: dict[str, Any] = {
            "tolerations": [{"key": K8S_GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        }
        if gpu_node_selector:
            pod_spec["node_selector"] = dict(gpu_node_selector)
        cfg["pod_spec_config"] = pod_spec
    return {K8S_CONFIG_TAG: cfg}


def k8s_executor_config(
    job: dg.JobDefinition,
    gpus: int = 1,
    cpu: str = "2",
    memory: str = "8Gi",
    gpu_memory: str = "32Gi",
    gpu_node_selector: Mapping[str, str] | None = None,
) -> dict:
    """Run config for ``dagster_k8s.k8s_job_executor`` that gives every GPU-tagged step of ``job`` (op tag
    ``spatial_assets/compute: gpu``) a pod with ``nvidia.com/gpu`` (``per_step_k8s_config``) and every other step
    a CPU pod (``step_k8s_config``); no change to the assets' op tags needed."""
    gpu_steps = sorted(n.name for n in job.graph.node_dict.values() if n.tags.get(GPU_TAG) == "gpu")
    per_step = {s: k8s_step_tags(True, gpus, cpu, gpu_memory, gpu_node_selector)[K8S_CONFIG_TAG] for s in gpu_steps}
    return {
        "execution": {
            "config": {
                "step_k8s_config": k8s_step_tags(False, cpu=cpu, memory=memory)[K8S_CONFIG_TAG],
                "per_step_k8s_config": per_step,
            }
        }
    }
