"""Partitions, all dynamic so that assets are defined once at module level, whatever the config holds:
samples, references (one checkpoint each), slices groups (aligned 3D slices), and spot ranges (keys ``0000``,
``0001``, ... of ``partitions.spot_range_size`` spots each). They are registered from the config by ``make demo``,
the ``register_config_samples`` sensor and :func:`register_partitions`; the landing sensor adds landed samples."""

from __future__ import annotations

import math

import dagster as dg

from ..constants import Platform
from ..io import count_spots
from .config import ProjectConfig, SampleConfig

SAMPLES, REFERENCES, SLICES_GROUPS, SPOT_RANGES = "samples", "references", "slices_groups", "spot_ranges"
samples_partitions = dg.DynamicPartitionsDefinition(name=SAMPLES)
references_partitions = dg.DynamicPartitionsDefinition(name=REFERENCES)
slices_groups_partitions = dg.DynamicPartitionsDefinition(name=SLICES_GROUPS)
spot_range_partitions = dg.DynamicPartitionsDefinition(name=SPOT_RANGES)
decomposition_partitions = dg.MultiPartitionsDefinition(
    {"sample": samples_partitions, "spot_range": spot_range_partitions}
)


def range_key(i: int) -> str:
    return f"{i:04d}"


def range_bounds(key: str, size: int) -> tuple[int, int]:
    i = int(key)
    return i * size, (i + 1) * size


def n_ranges(n_spots: int, size: int) -> int:
    return max(1, math.ceil(n_spots / size))


def _n_spots(cfg: ProjectConfig, s: SampleConfig) -> int:
    """Spots of a sample as decomposition sees them; Visium HD: its segmented cells (1 range until segmented,
    segmented_slide then adds the keys its cells need)."""
    if s.platform == Platform.VISIUM_HD:
        from ..io import is_complete, read_dataframe
        from .stores import Stores

        cells = Stores(cfg.storage_root).segmented(s.name).cells
        return len(read_dataframe(cells)) if is_complete(cells) else 1
    return count_spots(s.spatial)


def needed_keys(cfg: ProjectConfig, samples: list[SampleConfig] | None = None) -> dict[str, list[str]]:
    """The partition keys the config's samples (or the given ones) need, per dynamic partitions definition."""
    chosen = list(cfg.samples) if samples is None else samples
    size = cfg.partitions.spot_range_size
    most = max((n_ranges(_n_spots(cfg, s), size) for s in chosen), default=0)
    refs = sorted({s.reference for s in chosen} | ({r.name for r in cfg.references} if samples is None else set()))
    return {
        SAMPLES: [s.name for s in chosen],
        REFERENCES: refs,
        SLICES_GROUPS: sorted({s.slices for s in chosen if s.slices}),
        SPOT_RANGES: [range_key(i) for i in range(most)],
    }


def new_partitions(
    instance: dg.DagsterInstance, cfg: ProjectConfig, samples: list[SampleConfig] | None = None
) -> dict[str, list[str]]:
    """The keys that ``samples`` (default: the config's) need and ``instance`` does not have yet."""
    out = {}
    for name, keys in needed_keys(cfg, samples).items():
        have = set(instance.get_dynamic_partitions(name))
        out[name] = [k for k in keys if k not in have]
    return out


def partition_requests(new: dict[str, list[str]]) -> list[dg.AddDynamicPartitionsRequest]:
    """Sensor requests adding the given keys."""
    return [dg.AddDynamicPartitionsRequest(name, keys) for name, keys in new.items() if keys]


def register_partitions(instance: dg.DagsterInstance, cfg: ProjectConfig, samples: list[str] | None = None) -> dict:
    """Add the config's samples (or the named ones), their references, slices groups and spot-range keys.
    Idempotent; returns the keys added."""
    chosen = [cfg.sample(n) for n in samples] if samples else None
    new = new_partitions(instance, cfg, chosen)
    for name, keys in new.items():
        if keys:
            instance.add_dynamic_partitions(name, keys)
    return new


def sample_range_keys(cfg: ProjectConfig, sample: str) -> list[dg.MultiPartitionKey]:
    """The (sample, spot range) partition keys that cover a sample's spots."""
    n = n_ranges(_n_spots(cfg, cfg.sample(sample)), cfg.partitions.spot_range_size)
    return [dg.MultiPartitionKey({"sample": sample, "spot_range": range_key(i)}) for i in range(n)]
