"""Code versions of the assets, computed from the source of the science each asset calls.

An asset's version is a hash of the source files of the modules / subpackages it uses (and of its own wiring
module), so editing a stage's science marks that asset, and what depends on it, stale in Dagster, while unrelated
assets keep their version.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the spatial_assets package folder

# shared by every asset: parameters and constants
_SHARED = ("params.py", "constants.py")
#: The package paths (relative to ``spatial_assets/``) whose source each asset's result depends on.
SCIENCE: dict[str, tuple[str, ...]] = {
    "reference_data": ("io", "celltyping/_reference_types.py", "orchestration/inputs.py"),
    "slide_inputs": ("io", "orchestration/inputs.py"),
    "segmented_slide": ("segmentation", "platforms/_imaging.py", "geometry.py", "io", "orchestration/spatialscope.py"),
    "typed_cells": ("celltyping", "platforms", "geometry.py", "orchestration/spatialscope.py"),
    "score_checkpoint": ("generative", "orchestration/spatialscope.py"),
    "decomposed_cells": ("decomposition", "generative", "metrics.py", "orchestration/spatialscope.py"),
    "decomposed_cells_by_sample": ("decomposition/_sample.py", "orchestration/spatialscope.py"),
    "enhanced_subspots": ("soscope", "geometry.py", "metrics.py", "orchestration/soscope.py"),
    "combined_slices": ("platforms/_slices.py", "orchestration/slices.py"),
}


def _files(root: Path, rel: str) -> list[Path]:
    p = root / rel
    if p.is_dir():
        return sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"code version: {p} does not exist (update SCIENCE in {__file__})")


def source_hash(paths: tuple[str, ...] | list[str], root: str | Path | None = None, salt: str = "") -> str:
    """A short hash of the source files at ``paths`` (relative to the package folder ``root``), and ``salt``."""
    root = Path(root) if root is not None else PACKAGE_ROOT
    h = hashlib.sha256(salt.encode())
    for rel in sorted(set(paths) | set(_SHARED)):
        for f in _files(root, rel):
            h.update(str(f.relative_to(root)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


@cache
def code_version(asset: str) -> str:
    """The code version of an asset of this package (computed once per process)."""
    return source_hash(SCIENCE[asset], salt=asset)
