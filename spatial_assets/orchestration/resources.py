"""Dagster resources: the project config + storage layout, and the compute device for GPU-tagged steps."""

from __future__ import annotations

import hashlib
import warnings
from functools import cached_property
from pathlib import Path

import dagster as dg

from ..config import ProjectConfig, load_config
from ..params import Parameters
from ..storage import store_path

GPU_TAG = "spatial_assets/compute"
GPU_POOL = "gpu"
GPU_OP_TAGS = {GPU_TAG: "gpu", "dagster/concurrency_key": GPU_POOL,
               # for the Dask executor: only workers advertising a GPU resource take these steps
               "dagster-dask/resource_requirements": {"GPU": 1}}
CPU_OP_TAGS = {GPU_TAG: "cpu"}


class ProjectResource(dg.ConfigurableResource):
    """The deployment's ``dagster_project.yaml`` and where each asset's stores live."""

    config_path: str

    @cached_property
    def config(self) -> ProjectConfig:
        return load_config(self.config_path)

    def params(self, sample: str | None = None) -> Parameters:
        return self.config.parameters_for(sample) if sample else self.config.parameters

    def store(self, asset: str, sample: str | None = None, partition: str | None = None, suffix: str = ".zarr") -> Path:
        return store_path(self.config.storage_root, asset, sample, partition, suffix=suffix)

    def folder(self, asset: str, sample: str) -> Path:
        """A per-sample folder holding several stores of one asset (written atomically as a whole)."""
        return Path(self.config.storage_root) / asset / sample


class ComputeResource(dg.ConfigurableResource):
    """Picks the device of a GPU-tagged step: a configured GPU (round-robin by step) if present, else the CPU."""

    devices: list[str] = ["cuda"]

    def device(self, context: dg.AssetExecutionContext | None = None) -> tuple[str, str | None]:
        """Return ``(device, warning)``; the warning says why the CPU is used, if it is."""
        import torch

        gpus = [d for d in self.devices if d.startswith("cuda")]
        if gpus and torch.cuda.is_available():
            n = torch.cuda.device_count()
            candidates = []
            for d in gpus:
                if d == "cuda":
                    candidates += [f"cuda:{i}" for i in range(n)]
                elif int(d.split(":")[1]) < n:
                    candidates.append(d)
            if candidates:
                key = f"{context.run_id}:{context.op_execution_context.op.name}" if context is not None else "x"
                i = int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(candidates)
                return candidates[i], None
        msg = (f"no GPU available (configured {self.devices}, torch.cuda.is_available()="
               f"{torch.cuda.is_available()}): running on CPU")
        if context is not None:
            context.log.warning(msg)
        else:
            warnings.warn(msg)
        return "cpu", msg
