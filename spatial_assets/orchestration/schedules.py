"""Schedules: on each cron tick of ``schedules:`` in ``dagster_project.yaml``, request the runs (through the named
jobs) of every partition that is missing or stale and whose inputs are ready, across samples, references and spot
ranges; plus freshness checks on the headline outputs.

A partition of an asset is

* **missing** when the instance holds no materialization of it;
* **stale** when its latest materialization ran an older code version than the asset's current one, or when one of
  its upstream partitions (the sample's typed cells, the reference's checkpoint, ...) was materialized after it.

A job is requested for a partition only when every upstream partition *outside* the job is materialized; the
stages that are not ready yet are requested by a later tick (or sooner by the eager automation conditions of the
downstream assets, once Dagster's automation sensor is on). Each request names its job and partition, carries a
``run_key`` (tick time, job, partition) so a tick never launches the same run twice, and lists why it was made
(``spatial_assets/reason`` tag).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg
from dagster._core.events import DagsterEventType

from .config import ProjectConfig
from .jobs import combine_job, decomposition_job, reference_job, sample_job
from .partitions import decomposition_partitions, sample_range_keys
from .resources import ProjectResource

CODE_VERSION_TAG = "dagster/code_version"
#: job -> (its assets in dependency order, how a partition key of the job is enumerated)
SCHEDULED_JOBS = (reference_job, sample_job, decomposition_job, combine_job)
#: assets whose freshness is checked (the outputs users read)
FRESH_OUTPUTS = ("decomposed_cells_by_sample", "enhanced_subspots", "typed_cells", "score_checkpoint")


@dataclass(frozen=True)
class Outdated:
    """One partition of one asset that a schedule tick would (re)materialize, and why."""

    asset: str
    partition: str
    reason: str  # "missing" | "code version a -> b" | "upstream X[k] is newer"


def job_partition_keys(job_name: str, cfg: ProjectConfig) -> list[str]:
    """The partition keys of a named job that the config's samples and references need."""
    if job_name == reference_job.name:
        return [r.name for r in cfg.references]
    if job_name == decomposition_job.name:
        return [str(k) for s in cfg.all_samples() for k in sample_range_keys(cfg, s.name)]
    return [s.name for s in cfg.all_samples()]


def _upstream_keys(cfg: ProjectConfig, child_key: str, child_multi: bool, parent_pdef_name: str) -> list[str]:
    """The partitions of a parent asset that a child partition reads, following the project's partition mappings
    (multi -> its sample; sample -> its reference for reference-partitioned parents)."""
    sample = (
        decomposition_partitions.get_partition_key_from_str(child_key).keys_by_dimension["sample"]
        if child_multi
        else child_key
    )
    if parent_pdef_name == "references":
        try:
            return [cfg.sample(sample).reference]
        except KeyError:
            return [child_key]  # a reference-partitioned child: the same reference
    if parent_pdef_name == "samples":
        return [sample]
    if parent_pdef_name == "multi":  # combine_job: every spot range of the sample
        return [str(k) for k in sample_range_keys(cfg, sample)]
    return [child_key]


def _pdef_name(pdef) -> str:
    if isinstance(pdef, dg.MultiPartitionsDefinition):
        return "multi"
    return getattr(pdef, "name", None) or "none"


class _Latest:
    """Latest materialization storage ids and code versions per (asset, partition), fetched once per asset."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self._ids: dict[str, dict[str, int]] = {}
        self._versions: dict[tuple[str, str], str | None] = {}

    def ids(self, asset: str) -> dict[str, int]:
        if asset not in self._ids:
            self._ids[asset] = dict(
                self.instance.get_latest_storage_id_by_partition(
                    dg.AssetKey(asset), DagsterEventType.ASSET_MATERIALIZATION
                )
            )
        return self._ids[asset]

    def version(self, asset: str, partition: str) -> str | None:
        key = (asset, partition)
        if key not in self._versions:
            recs = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
            ).records
            mat = recs[0].asset_materialization if recs else None
            self._versions[key] = (mat.tags or {}).get(CODE_VERSION_TAG) if mat is not None else None
        return self._versions[key]


def asset_applies(cfg: ProjectConfig, asset: str, partition_key: str) -> bool:
    """Whether ``asset`` is built for this partition at all: ``enhanced_subspots`` only for samples whose platform
    has sub-spots (not Visium HD, whose bins are finer than cells); every other asset everywhere.

    Parameters
    ----------
    cfg
        The validated project config.
    asset
        An asset's name.
    partition_key
        One of the asset's partition keys (a sample's name for ``enhanced_subspots``).

    Returns
    -------
    bool
        False where the schedules and ``make demo`` must never request the asset.
    """
    return asset != "enhanced_subspots" or cfg.sample(partition_key).platform.subspots


def outdated_partitions(
    instance: dg.DagsterInstance, repo: dg.RepositoryDefinition, cfg: ProjectConfig, job_name: str
) -> tuple[dict[str, list[Outdated]], dict[str, list[str]]]:
    """What a tick would request for one named job.

    Parameters
    ----------
    instance
        The Dagster instance whose materializations are read.
    repo
        The project's repository (``Definitions.get_repository_def()``, a schedule's ``context.repository_def``):
        the assets' code versions and dependencies, the named jobs.
    cfg
        The validated project config (which samples, references and spot ranges exist).
    job_name
        One of the names of :data:`SCHEDULED_JOBS`.

    Returns
    -------
    (outdated, blocked)
        ``outdated``: partition key -> the missing or stale assets of the job there, whose inputs are ready;
        ``blocked``: partition key -> the upstream partitions (``asset[key]``) not materialized yet.
    """
    graph = repo.asset_graph
    selected = repo.get_job(job_name).asset_layer.executable_asset_keys
    assets = [k.to_user_string() for k in graph.toposorted_asset_keys if k in selected]
    latest = _Latest(instance)
    outdated: dict[str, list[Outdated]] = {}
    blocked: dict[str, list[str]] = {}
    for pk in job_partition_keys(job_name, cfg):
        for name in assets:
            if not asset_applies(cfg, name, pk):
                continue  # e.g. no sub-spots on this platform (Visium HD): never requested
            node = graph.get(dg.AssetKey(name))
            multi = isinstance(node.partitions_def, dg.MultiPartitionsDefinition)
            mine = latest.ids(name).get(pk)
            reason = None
            if mine is None:
                reason = "missing"
            else:
                have, want = latest.version(name, pk), node.code_version
                if want and have != want:
                    reason = f"code version {have} -> {want}"
            for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
                pname = parent.to_user_string()
                pnode = graph.get(parent)
                for ppk in _upstream_keys(cfg, pk, multi, _pdef_name(pnode.partitions_def)):
                    pid = latest.ids(pname).get(ppk)
                    if pid is None:
                        if pname not in assets:  # an input the job itself does not build
                            blocked.setdefault(pk, []).append(f"{pname}[{ppk}]")
                    elif mine is not None and pid > mine and reason is None:
                        reason = f"upstream {pname}[{ppk}] is newer"
            if reason is not None:
                outdated.setdefault(pk, []).append(Outdated(name, pk, reason))
    return {k: v for k, v in outdated.items() if k not in blocked}, blocked


def _run_requests(
    context: dg.ScheduleEvaluationContext, project: ProjectResource, job_name: str, schedule_name: str
) -> Iterable[dg.RunRequest] | dg.SkipReason:
    cfg = project.config
    outdated, blocked = outdated_partitions(context.instance, context.repository_def, cfg, job_name)
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M") if context.scheduled_execution_time else "now"
    reqs = []
    for pk, items in outdated.items():
        why = "; ".join(f"{o.asset}: {o.reason}" for o in items)
        context.log.info(f"{job_name}[{pk}]: {why}")
        reqs.append(
            dg.RunRequest(
                run_key=f"{tick}:{job_name}:{pk}",
                partition_key=pk,
                asset_selection=[dg.AssetKey(o.asset) for o in items],
                tags={"spatial_assets/launched_by": f"schedule {schedule_name}", "spatial_assets/reason": why[:1000]},
            )
        )
    if reqs:
        return reqs
    waiting = "; ".join(f"{pk} waits for {', '.join(v)}" for pk, v in blocked.items())
    return dg.SkipReason(f"{job_name}: every partition is up to date" + (f" ({waiting})" if waiting else ""))


def build_schedules(schedules: dict[str, str], timezone: str = "UTC") -> list[dg.ScheduleDefinition]:
    """One schedule per named job and per ``schedules:`` entry (``{name: cron}``), named ``<name>_<job>``.

    Parameters
    ----------
    schedules
        Cron strings by schedule name, as validated by the config loader.
    timezone
        The cron strings' time zone.

    Returns
    -------
    list of dagster.ScheduleDefinition
        Running by default (``DefaultScheduleStatus.RUNNING``): the daemon ticks them as soon as it starts.
    """
    out = []
    for sname, cron in schedules.items():
        for job in SCHEDULED_JOBS:
            out.append(_schedule(sname, cron, job, timezone))
    return out


def _schedule(sname: str, cron: str, job, timezone: str) -> dg.ScheduleDefinition:
    def _fn(context: dg.ScheduleEvaluationContext, project: ProjectResource):
        return _run_requests(context, project, job.name, f"{sname}_{job.name}")

    return dg.schedule(
        name=f"{sname}_{job.name}",
        cron_schedule=cron,
        execution_timezone=timezone,
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"'{sname}' ({cron}): runs {job.name} on every partition that is missing or stale (older "
        "code version, or an upstream partition newer) and whose inputs are ready",
    )(_fn)


def build_freshness_checks(max_age_hours: float) -> tuple[list, dg.SensorDefinition]:
    """Freshness checks (warning severity) on the outputs users read: failed when no partition of the asset was
    materialized within the last ``max_age_hours``; with the sensor that evaluates them."""
    # Dagster 1.13 marks these as superseded by FreshnessPolicy, whose evaluation OSS Dagster does not run as an
    # asset check; they still are the checks the daemon evaluates and the UI shows, so keep them, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.SupersessionWarning)
        checks = dg.build_last_update_freshness_checks(
            assets=list(FRESH_OUTPUTS), lower_bound_delta=timedelta(hours=max_age_hours)
        )
        sensor = dg.build_sensor_for_freshness_checks(
            freshness_checks=checks, name="freshness_checks_sensor", default_status=dg.DefaultSensorStatus.STOPPED
        )
    return list(checks), sensor
