"""The Dagster code location: ``defs`` (loaded by workspace.yaml / ``dagster dev`` in the repo root).

The deployment is described by ``dagster_project.yaml`` (or the file named by ``$SPATIAL_ASSETS_CONFIG``); it is
validated here, so a bad config fails at load time with a message naming the file and the key.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from .config import ENV_CONFIG, ProjectConfig, load_config
from .orchestration.assets import build_assets
from .orchestration.automation import build_landing_sensor, build_registration_sensor
from .orchestration.checks import build_checks
from .orchestration.dask import dask_asset_job
from .orchestration.partitions import decomposition_partitions, references_partitions, samples_partitions
from .orchestration.resources import GPU_TAG, ComputeResource, ProjectResource

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or REPO_ROOT / "dagster_project.yaml").resolve()


def build_definitions(cfg: ProjectConfig) -> dg.Definitions:
    assets = build_assets(cfg)
    by_name = {a.key.path[-1]: a for a in assets}
    checks = build_checks(by_name)
    reference_job = dg.define_asset_job(
        "reference_job", selection=dg.AssetSelection.assets(by_name["reference_data"], by_name["score_checkpoint"]),
        partitions_def=references_partitions(cfg), description="Validate a reference and train its score model")
    sample_job = dg.define_asset_job(
        "sample_job", selection=dg.AssetSelection.assets(*(by_name[n] for n in (
            "slide_inputs", "segmented_slide", "typed_cells", "enhanced_subspots"))),
        partitions_def=samples_partitions, description="Inputs, segmentation, cell typing and soScope of a sample")
    decomposition_job = dg.define_asset_job(
        "decomposition_job", selection=dg.AssetSelection.assets(by_name["decomposed_cells"]),
        partitions_def=decomposition_partitions, description="Decompose one spot range of one sample")
    combine_job = dg.define_asset_job(
        "combine_job", selection=dg.AssetSelection.assets(by_name["decomposed_cells_by_sample"]),
        partitions_def=samples_partitions, description="Combine a sample's decomposed spot ranges")
    # The same jobs on a Dask cluster (validated_dask_executor): GPU steps only on workers with --resources GPU=1.
    dask_jobs = [dask_asset_job(f"{j.name}_dask", j.selection, j.partitions_def, j.description)
                 for j in (reference_job, sample_job, decomposition_job)]
    executor = dg.multiprocess_executor.configured({
        "max_concurrent": cfg.compute.max_cpu_steps + cfg.compute.max_gpu_steps,
        "tag_concurrency_limits": [{"key": GPU_TAG, "value": "gpu", "limit": cfg.compute.max_gpu_steps}],
    })
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[reference_job, sample_job, decomposition_job, combine_job, *dask_jobs],
        sensors=[build_registration_sensor(cfg, sample_job), build_landing_sensor(cfg, sample_job)],
        resources={"project": ProjectResource(config_path=str(cfg.source)),
                   "compute": ComputeResource(devices=cfg.compute.devices)},
        executor=executor,
    )


defs = build_definitions(load_config(config_path()))
