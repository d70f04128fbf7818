"""Sensors: register the config's samples (and landed ones) as partitions and request their runs."""

import json

import dagster as dg

from .config import discover_landed_samples, folder_size, landed_sample_files
from .jobs import sample_job
from .partitions import SAMPLES, new_partitions, partition_requests
from .resources import ProjectResource


@dg.sensor(
    name="register_config_samples",
    minimum_interval_seconds=60,
    job=sample_job,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds every sample of dagster_project.yaml as a sample partition (with its reference, slices "
    "group and spot ranges), and requests runs of the new samples' assets.",
)
def register_config_samples(context: dg.SensorEvaluationContext, project: ProjectResource):
    cfg = project.config
    new = new_partitions(context.instance, cfg)
    if not any(new.values()):
        return dg.SkipReason("all samples of the config are registered")
    requests = [dg.RunRequest(run_key=f"sample-{n}", partition_key=n) for n in new[SAMPLES]]
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests(new))


@dg.sensor(
    name="landing_folder_sensor",
    minimum_interval_seconds=30,
    job=sample_job,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers new samples dropped into the landing folder and requests their runs.",
)
def landing_folder_sensor(context: dg.SensorEvaluationContext, project: ProjectResource):
    """Watch ``landing.path``: a new sub-folder becomes a sample partition (plus its spot ranges) and a run of its
    assets is requested. A half-copied folder is not taken: it needs the marker file, or a size that stayed the
    same over ``landing.stable_ticks`` sensor ticks (then the sensor writes the marker itself)."""
    cfg = project.config
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
    have = set(context.instance.get_dynamic_partitions(SAMPLES))
    fresh = [s for s in landed if s.name not in have]
    context.update_cursor(json.dumps(state))
    if not fresh:
        return dg.SkipReason("no new complete sample in the landing folder")
    new = new_partitions(context.instance, cfg, fresh)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"landed-{n}", partition_key=n) for n in new[SAMPLES]],
        dynamic_partitions_requests=partition_requests(new),
    )


SENSORS = [register_config_samples, landing_folder_sensor]
