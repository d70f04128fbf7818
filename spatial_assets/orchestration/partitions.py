"""Partitions: samples (dynamic: added from the config and by the landing-folder sensor), references (one
checkpoint each), and spot ranges (dynamic keys ``0000``, ``0001``... of ``spot_range_size`` spots each)."""

from __future__ import annotations

import math

import dagster as dg

from ..config import ProjectConfig, SampleConfig
from ..readers import count_spots

samples_partitions = dg.DynamicPartitionsDefinition(name="samples")
spot_range_partitions = dg.DynamicPartitionsDefinition(name="spot_ranges")
decomposition_partitions = dg.MultiPartitionsDefinition({"sample": samples_partitions,
                                                         "spot_range": spot_range_partitions})


def references_partitions(cfg: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([r.name for r in cfg.references] or ["none"])


def range_key(i: int) -> str:
    return f"{i:04d}"


def range_bounds(key: str, size: int) -> tuple[int, int]:
    i = int(key)
    return i * size, (i + 1) * size


def n_ranges(n_spots: int, size: int) -> int:
    return max(1, math.ceil(n_spots / size))


def new_partitions(instance: dg.DagsterInstance, samples: list[SampleConfig], size: int
                   ) -> tuple[list[str], list[str]]:
    """The sample names and spot-range keys that ``samples`` need and ``instance`` does not have yet."""
    have = set(instance.get_dynamic_partitions("samples"))
    have_r = set(instance.get_dynamic_partitions("spot_ranges"))
    need = max((n_ranges(count_spots(s.spatial), size) for s in samples), default=0)
    return ([s.name for s in samples if s.name not in have],
            [range_key(i) for i in range(need) if range_key(i) not in have_r])


def partition_requests(new_samples: list[str], new_ranges: list[str]) -> list[dg.AddDynamicPartitionsRequest]:
    """Sensor requests adding the given sample and spot-range partitions."""
    out = []
    if new_samples:
        out.append(dg.AddDynamicPartitionsRequest("samples", new_samples))
    if new_ranges:
        out.append(dg.AddDynamicPartitionsRequest("spot_ranges", new_ranges))
    return out


def register_samples(instance: dg.DagsterInstance, cfg: ProjectConfig, samples: list[str] | None = None) -> dict:
    """Add the config's samples (or the named ones) and the spot-range keys they need. Idempotent."""
    chosen = [cfg.sample(n) for n in samples] if samples else list(cfg.samples)
    new, new_r = new_partitions(instance, chosen, cfg.partitions.spot_range_size)
    if new:
        instance.add_dynamic_partitions("samples", new)
    if new_r:
        instance.add_dynamic_partitions("spot_ranges", new_r)
    return {"new_samples": new, "new_spot_ranges": new_r}


def sample_range_keys(cfg: ProjectConfig, sample: str) -> list[dg.MultiPartitionKey]:
    """The (sample, spot range) partition keys that cover a sample's spots."""
    n = n_ranges(count_spots(cfg.sample(sample).spatial), cfg.partitions.spot_range_size)
    return [dg.MultiPartitionKey({"sample": sample, "spot_range": range_key(i)}) for i in range(n)]
