"""Sensors and schedules: register the config's samples as partitions and request their runs."""

from __future__ import annotations

import dagster as dg

from ..config import ProjectConfig
from .partitions import new_partitions, partition_requests


def build_registration_sensor(cfg: ProjectConfig, sample_job) -> dg.SensorDefinition:
    @dg.sensor(name="register_config_samples", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Adds every sample of dagster_project.yaml as a sample partition (and its spot ranges), "
                           "and requests runs of the new samples' assets.")
    def register_config_samples(context: dg.SensorEvaluationContext):
        new, new_r = new_partitions(context.instance, list(cfg.samples), cfg.partitions.spot_range_size)
        if not new and not new_r:
            return dg.SkipReason("all samples of the config are registered")
        requests = [dg.RunRequest(run_key=f"sample-{n}", job_name=sample_job.name, partition_key=n) for n in new]
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests(new, new_r))

    return register_config_samples


def build_landing_sensor(cfg: ProjectConfig, sample_job) -> dg.SensorDefinition:
    """Watch ``landing.path``: a new sub-folder becomes a sample partition (plus its spot ranges) and a run of its
    assets is requested. A half-copied folder is not taken: it needs the marker file, or a size that stayed the
    same over ``landing.stable_ticks`` sensor ticks (then the sensor writes the marker itself)."""
    import json

    from ..config import discover_landed_samples, folder_size, landed_sample_files

    @dg.sensor(name="landing_folder_sensor", minimum_interval_seconds=30, job=sample_job,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Registers new samples dropped into the landing folder and requests their runs.")
    def landing_folder_sensor(context: dg.SensorEvaluationContext):
        land = cfg.landing
        if land is None or not land.path.is_dir():
            return dg.SkipReason(f"no landing folder ({land.path if land else 'landing: not configured'})")
        state = json.loads(context.cursor) if context.cursor else {}
        for folder in sorted(p for p in land.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (folder / land.marker).exists():
                continue
            spatial, _ = landed_sample_files(folder)
            if spatial is None:
                continue
            size = folder_size(folder)
            prev = state.get(folder.name, [None, 0])
            stable = prev[1] + 1 if prev[0] == size else 0
            state[folder.name] = [size, stable]
            if stable >= land.stable_ticks:
                (folder / land.marker).write_text("ready: size stable over sensor ticks\n")
        landed = discover_landed_samples(cfg)
        have = set(context.instance.get_dynamic_partitions("samples"))
        new = [s for s in landed if s.name not in have]
        context.update_cursor(json.dumps(state))
        if not new:
            return dg.SkipReason("no new complete sample in the landing folder")
        names, new_r = new_partitions(context.instance, new, cfg.partitions.spot_range_size)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"landed-{n}", partition_key=n) for n in names],
            dynamic_partitions_requests=partition_requests(names, new_r))

    return landing_folder_sensor
