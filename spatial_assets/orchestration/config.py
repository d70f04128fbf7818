"""The deployment's declarative config: ``dagster_project.yaml``.

Loaded and validated when the definitions load. A bad file raises :class:`ConfigError` whose message names the
file, the key and what was expected. Relative paths resolve against the file's folder. Loading has no side effect
(it never builds data: the demo slide is built by ``make demo`` / :mod:`spatial_assets.orchestration.demo_run`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..constants import Platform
from ..io._validate import check_name
from ..params import Parameters

DEFAULT_CONFIG_NAME = "dagster_project.yaml"
ENV_CONFIG = "SPATIAL_ASSETS_CONFIG"


class ConfigError(ValueError):
    """A problem with dagster_project.yaml; the message names the file, the key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Named(_Strict):
    name: str

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v, "a name")


class ReferenceConfig(_Named):
    path: Path
    cell_type_key: str = "cell_type"
    # optional coarser class column (RCTD doublet mode treats types of one class as compatible)
    class_key: str | None = None


class SampleConfig(_Named):
    spatial: Path
    image: Path | None = None
    # The image is the full-resolution one scaled by this factor: a number, or a scale-factor key of the slide
    # (e.g. tissue_hires_scalef with a Space Ranger folder's spatial/tissue_hires_image.png).
    image_scale: float | str | None = None
    platform: Platform = Platform.VISIUM
    reference: str
    # Visium HD: the bins read (2 / 8 / 16 um) and how far (um) each segmented nucleus is grown (without merging
    # neighbours) to take the bins of its cytoplasm (0: bins under the nucleus only; 4 measured best with ambient
    # RNA, benchmarks/bench_visium_hd.py).
    bin_size: Literal[2, 8, 16] = 2
    expand_um: float = Field(4.0, ge=0)
    # Square grids: sub-spots per spot side (2 -> 4 sub-spots, 3 -> 9).
    grid_subdivision: Literal[2, 3] = 3
    # Several aligned slices: samples sharing a group are slices of one 3D tissue at height z (micrometres).
    slices: str | None = None
    z: float = 0.0
    # Per-sample overrides of the global parameters (same keys as `parameters:`).
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("slices")
    @classmethod
    def _slices_ok(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "a slices group")


class ComputeConfig(_Strict):
    # Devices GPU-tagged steps may use, e.g. ["cuda:0", "cuda:1"]; CPU is always the fallback.
    devices: list[str] = Field(default_factory=lambda: ["cuda"])
    max_gpu_steps: int = Field(1, ge=1)
    max_cpu_steps: int = Field(2, ge=1)
    # "subprocess": score-model training runs in a process of its own through Dagster Pipes
    # (PipesSubprocessClient; orchestration/pipes_worker.py), its log lines streamed to the step's log.
    pipes: Literal["none", "subprocess"] = "none"


class PartitionConfig(_Strict):
    spot_range_size: int = Field(500, ge=1)


class DemoConfig(_Strict):
    """Build the bundled ground-truth demo slide into ``out_dir`` when it is missing (seeded, a few seconds)."""

    out_dir: Path = Path("work/demo")
    seed: int = 0
    crop_um: tuple[float, float, float, float] | None = None


class LandingConfig(_Strict):
    """A folder watched by the landing sensor: each sub-folder is a new sample (see README "Landing folder")."""

    path: Path
    reference: str  # the reference its samples use unless their sample.yaml says otherwise
    platform: Platform = Platform.VISIUM
    marker: str = "_READY"  # a sample folder is taken once this file exists ...
    stable_ticks: int = Field(2, ge=1)  # ... or once its size stayed the same over this many sensor ticks


class ScheduleConfig(_Strict):
    """``schedules:``: cron strings by name (each becomes one schedule per named job, see orchestration/schedules.py)
    and the age after which the outputs' freshness checks warn."""

    cron: dict[str, str] = Field(default_factory=dict)
    timezone: str = "UTC"
    freshness_hours: float = Field(48.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, v: Any) -> Any:
        # `schedules: {nightly: "0 2 * * *"}` is short for `schedules: {cron: {nightly: "0 2 * * *"}}`
        if isinstance(v, dict) and not set(v) & {"cron", "timezone", "freshness_hours"}:
            return {"cron": v}
        return v

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, v: dict[str, str]) -> dict[str, str]:
        from dagster._utils.schedules import is_valid_cron_string

        for name, cron in v.items():
            check_name(name, "a schedule name")
            if not isinstance(cron, str) or not is_valid_cron_string(cron):
                raise ValueError(
                    f"schedule '{name}': {cron!r} is not a cron string (five fields, e.g. '0 2 * * *' for 02:00 daily)"
                )
        return v

    @field_validator("timezone")
    @classmethod
    def _tz_ok(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return v


class ProjectConfig(_Strict):
    storage_root: Path = Path("work/storage")
    schedules: ScheduleConfig = Field(default_factory=ScheduleConfig)
    demo: DemoConfig | None = None
    landing: LandingConfig | None = None
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    partitions: PartitionConfig = Field(default_factory=PartitionConfig)
    references: list[ReferenceConfig] = Field(default_factory=list)
    samples: list[SampleConfig] = Field(default_factory=list)
    parameters: Parameters = Field(default_factory=Parameters)
    # Set by the loader: the file this config came from.
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> ProjectConfig:
        refs = [r.name for r in self.references]
        dup = sorted({r for r in refs if refs.count(r) > 1})
        if dup:
            raise ValueError(f"references: duplicate name(s) {dup}")
        names = [s.name for s in self.samples]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"samples: duplicate name(s) {dup}")
        for i, s in enumerate(self.samples):
            if not s.platform.image_free and s.image is None:  # what each platform needs, checked before any run
                raise ValueError(
                    f"samples[{i}] ({s.name}).image: platform '{s.platform.value}' needs an H&E image (nuclei "
                    "segmentation) and none is given; set image: to the full-resolution TIFF, or to Space Ranger's "
                    "spatial/tissue_hires_image.png with image_scale: tissue_hires_scalef"
                )
            if s.reference not in refs:
                raise ValueError(
                    f"samples[{i}] ({s.name}).reference: '{s.reference}' is not a reference name; "
                    f"expected one of {refs}"
                )
        return self

    # -- helpers ---------------------------------------------------------------------------------------
    def all_samples(self) -> list[SampleConfig]:
        """The config's samples plus the complete ones found in the landing folder."""
        landed = discover_landed_samples(self) if self.landing is not None else []
        names = {s.name for s in self.samples}
        return list(self.samples) + [s for s in landed if s.name not in names]

    def sample(self, name: str) -> SampleConfig:
        for s in self.samples:
            if s.name == name:
                return s
        if self.landing is not None:
            for s in discover_landed_samples(self):
                if s.name == name:
                    return s
        raise KeyError(f"no sample named '{name}' in {self.source or DEFAULT_CONFIG_NAME}")

    def reference(self, name: str) -> ReferenceConfig:
        for r in self.references:
            if r.name == name:
                return r
        raise KeyError(f"no reference named '{name}' in {self.source or DEFAULT_CONFIG_NAME}")

    def parameters_for(self, sample: str) -> Parameters:
        """Global parameters with the sample's overrides applied (validated like the global ones)."""
        s = self.sample(sample)
        if not s.parameters:
            return self.parameters
        merged = _deep_merge(self.parameters.model_dump(), s.parameters)
        return Parameters.model_validate(merged)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid project config"]
    for e in err.errors():
        key = _loc(tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-"))))
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key (check the spelling; see README for the allowed keys)"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and kind not in ("value_error",) and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"  key '{key}': {msg}")
    return "\n".join(lines)


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(str(p))))
    return p if p.is_absolute() else (base / p).resolve()


def load_config(path: str | os.PathLike | None = None, *, check_files: bool = True) -> ProjectConfig:
    """Read, validate and resolve a dagster_project.yaml.

    ``path`` defaults to ``$SPATIAL_ASSETS_CONFIG`` or ``dagster_project.yaml`` in the current folder.
    """
    if path is None:
        path = os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_NAME
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: project config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(
            f"{path}: the project config file is empty; expected a mapping with at least 'references' and "
            "'samples' (see README, dagster_project.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None
    base = path.parent
    cfg.source = path
    cfg.storage_root = _resolve(base, cfg.storage_root)
    if cfg.landing is not None:
        cfg.landing.path = _resolve(base, cfg.landing.path)
        if cfg.landing.reference not in [r.name for r in cfg.references]:
            raise ConfigError(
                f"{path}: invalid project config\n  key 'landing.reference': "
                f"'{cfg.landing.reference}' is not a reference name; expected one of "
                f"{[r.name for r in cfg.references]}"
            )
    for r in cfg.references:
        r.path = _resolve(base, r.path)
    for s in cfg.samples:
        s.spatial = _resolve(base, s.spatial)
        s.image = _resolve(base, s.image)
        try:
            Parameters.model_validate(_deep_merge(cfg.parameters.model_dump(), s.parameters))
        except ValidationError as e:
            raise ConfigError(_format_errors(path, e).replace("key '", f"key 'samples.{s.name}.parameters.")) from None
    model_path = cfg.parameters.segmentation.model
    if model_path and ("/" in model_path or model_path.startswith(".")) and not model_path.startswith("bundled:"):
        cfg.parameters.segmentation.model = str(_resolve(base, Path(model_path)))
    if cfg.demo is not None:
        cfg.demo.out_dir = _resolve(base, cfg.demo.out_dir)
    if check_files:
        problems = []
        for i, r in enumerate(cfg.references):
            if not r.path.exists():
                problems.append(f"  key 'references[{i}].path': file not found: {r.path}")
        for i, s in enumerate(cfg.samples):
            if not s.spatial.exists():
                problems.append(f"  key 'samples[{i}].spatial': file not found: {s.spatial}")
            if s.image is not None and not s.image.exists():
                problems.append(f"  key 'samples[{i}].image': file not found: {s.image}")
            if s.platform == Platform.VISIUM_HD and s.spatial.is_dir() and s.spatial.suffix != ".zarr":
                from ..io import visium_hd_missing_files

                missing = visium_hd_missing_files(s.spatial, s.bin_size)
                if missing:
                    problems.append(
                        f"  key 'samples[{i}].spatial': {s.spatial} is not a complete Visium HD folder for "
                        f"{s.bin_size}-um bins (samples[{i}].bin_size): missing {', '.join(missing)}"
                    )
        if problems:
            raise ConfigError("\n".join([f"{path}: invalid project config", *problems]))
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# landing folder
# ---------------------------------------------------------------------------------------------------------------
SPATIAL_NAMES = ("slide.h5ad", "slide.zarr")
IMAGE_NAMES = ("image.tif", "image.tiff", "image.jpg", "image.jpeg", "image.png")


def landed_sample_files(folder: Path) -> tuple[Path | None, Path | None]:
    """(spatial data, image) of a landing sub-folder: slide.h5ad / slide.zarr / a Space Ranger, Visium HD
    (``binned_outputs/``) or Xenium (``experiment.xenium``) layout, image.*"""
    spatial = next((folder / n for n in SPATIAL_NAMES if (folder / n).exists()), None)
    if spatial is None and (folder / "spatial").is_dir() and (folder / "filtered_feature_bc_matrix.h5").exists():
        spatial = folder
    if spatial is None and ((folder / "binned_outputs").is_dir() or (folder / "experiment.xenium").exists()):
        spatial = folder
    image = next((folder / n for n in IMAGE_NAMES if (folder / n).exists()), None)
    return spatial, image


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def discover_landed_samples(cfg: ProjectConfig, *, ready_only: bool = True) -> list[SampleConfig]:
    """Samples in the landing folder whose marker file exists (``ready_only``) and whose data is present.

    A sub-folder ``<landing>/<name>/`` holds ``slide.h5ad`` (or ``slide.zarr`` or a Space Ranger output), an optional
    ``image.tif|jpg|png``, and an optional ``sample.yaml`` with ``platform`` / ``reference`` / ``parameters``.
    """
    land = cfg.landing
    if land is None or not land.path.is_dir():
        return []
    out = []
    for folder in sorted(p for p in land.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if ready_only and not (folder / land.marker).exists():
            continue
        spatial, image = landed_sample_files(folder)
        if spatial is None:
            continue
        extra = {}
        if (folder / "sample.yaml").exists():
            extra = yaml.safe_load((folder / "sample.yaml").read_text()) or {}
        try:
            s = SampleConfig.model_validate(
                {
                    "name": folder.name,
                    "spatial": str(spatial),
                    "image": str(image) if image else None,
                    "platform": extra.pop("platform", land.platform),
                    "reference": extra.pop("reference", land.reference),
                    **extra,
                }
            )
        except ValidationError as e:
            raise ConfigError(_format_errors(folder / "sample.yaml", e)) from None
        out.append(s)
    return out
