"""The Dagster code location: ``defs``, loaded lazily by ``workspace.yaml`` / ``dagster dev``.

The deployment is described by ``dagster_project.yaml`` in the working directory (or the file named by
``$SPATIAL_ASSETS_CONFIG``); it is read and validated when the definitions load, so a bad config fails there with
a message naming the file and the key. Importing this module has no side effect: nothing is read or built until
Dagster (or a test) calls :func:`defs`.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from .config import DEFAULT_CONFIG_NAME, ENV_CONFIG, ProjectConfig, load_config
from .executors import dask_asset_job
from .inputs import reference_data, slide_inputs
from .jobs import JOBS, decomposition_job, reference_job, sample_job
from .resources import GPU_TAG, ComputeResource, ProjectResource
from .schedules import build_freshness_checks, build_schedules
from .sensors import SENSORS
from .slices import combined_slices
from .soscope import enhanced_subspots, subspots_sum_to_spot
from .spatialdata import sample_spatialdata
from .spatialscope import (
    cells_per_spot_in_range,
    checkpoint_sample_quality,
    decomposed_cells,
    decomposed_cells_by_sample,
    few_spots_over_cell_cap,
    proportions_sum_to_one,
    score_checkpoint,
    segmented_slide,
    spot_reconstruction,
    typed_cells,
)

ASSETS = [
    reference_data,
    slide_inputs,
    segmented_slide,
    typed_cells,
    score_checkpoint,
    decomposed_cells,
    decomposed_cells_by_sample,
    enhanced_subspots,
    combined_slices,
    sample_spatialdata,
]
CHECKS = [
    checkpoint_sample_quality,
    cells_per_spot_in_range,
    few_spots_over_cell_cap,
    proportions_sum_to_one,
    spot_reconstruction,
    subspots_sum_to_spot,
]
# The same jobs on a Dask cluster (validated_dask_executor): GPU steps only on workers with --resources GPU=1.
DASK_JOBS = [
    dask_asset_job(f"{j.name}_dask", j.selection, j.partitions_def, j.description)
    for j in (reference_job, sample_job, decomposition_job)
]


def config_path() -> Path:
    """``$SPATIAL_ASSETS_CONFIG``, else ``dagster_project.yaml`` in the working directory."""
    return Path(os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_NAME).resolve()


def build_definitions(cfg: ProjectConfig) -> dg.Definitions:
    """The Definitions of a validated project config: the module-level assets, checks, jobs and sensors, the
    config's schedules and freshness checks, with the config's resources and executor limits."""
    executor = dg.multiprocess_executor.configured(
        {
            "max_concurrent": cfg.compute.max_cpu_steps + cfg.compute.max_gpu_steps,
            "tag_concurrency_limits": [{"key": GPU_TAG, "value": "gpu", "limit": cfg.compute.max_gpu_steps}],
        }
    )
    freshness_checks, freshness_sensor = build_freshness_checks(cfg.schedules.freshness_hours)
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[*CHECKS, *freshness_checks],
        jobs=[*JOBS, *DASK_JOBS],
        schedules=build_schedules(cfg.schedules.cron, cfg.schedules.timezone),
        sensors=[*SENSORS, freshness_sensor],
        executor=executor,
        resources={
            "project": ProjectResource(config_path=str(cfg.source)),
            "compute": ComputeResource(devices=cfg.compute.devices),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Load ``dagster_project.yaml`` (see :func:`config_path`) and build the definitions."""
    return build_definitions(load_config(config_path()))


def build_dask_job_from_config(config_path: str, job_name: str) -> dg.JobDefinition:
    """A resolved job of the definitions built from ``config_path`` (a reconstructable target for Dask workers:
    ``build_reconstructable_job(__name__, 'build_dask_job_from_config', (config_path, job_name))``)."""
    return build_definitions(load_config(config_path)).resolve_job_def(job_name)
