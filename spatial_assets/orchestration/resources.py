"""Dagster resources: the project config with its store layout, and the compute device of GPU-tagged steps."""

from __future__ import annotations

import hashlib
import warnings
from functools import cached_property

import dagster as dg

from ..params import Parameters
from .config import ProjectConfig, ReferenceConfig, SampleConfig, load_config
from .stores import Stores

GPU_TAG = "spatial_assets/compute"
GPU_POOL = "gpu"
GPU_OP_TAGS = {
    GPU_TAG: "gpu",
    "dagster/concurrency_key": GPU_POOL,
    # for the Dask executor: only workers advertising a GPU resource take these steps
    "dagster-dask/resource_requirements": {"GPU": 1},
}
CPU_OP_TAGS = {GPU_TAG: "cpu"}


class ProjectResource(dg.ConfigurableResource):
    """The deployment's ``dagster_project.yaml``, its samples and references, and where each store lives."""

    config_path: str

    @cached_property
    def config(self) -> ProjectConfig:
        return load_config(self.config_path)

    @cached_property
    def stores(self) -> Stores:
        from ..io._validate import ensure_storage_root

        return Stores(ensure_storage_root(self.config.storage_root))

    def params(self, sample: str | None = None) -> Parameters:
        """The parameters of a sample (global ones with its overrides), or the global ones."""
        return self.config.parameters_for(sample) if sample else self.config.parameters

    def sample(self, name: str) -> SampleConfig:
        return self.config.sample(name)

    def reference(self, name: str) -> ReferenceConfig:
        return self.config.reference(name)

    def reference_of(self, sample: str) -> ReferenceConfig:
        return self.config.reference(self.config.sample(sample).reference)

    def slices_group(self, group: str) -> list[SampleConfig]:
        """The samples of a slices group, in config order."""
        return [s for s in self.config.all_samples() if s.slices == group]


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
        msg = (
            f"no GPU available (configured {self.devices}, torch.cuda.is_available()="
            f"{torch.cuda.is_available()}): running on CPU"
        )
        if context is not None:
            context.log.warning(msg)
        else:
            warnings.warn(msg, stacklevel=2)
        return "cpu", msg
