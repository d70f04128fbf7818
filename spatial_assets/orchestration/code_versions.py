"""Code versions of the assets, computed from the source of the science each asset calls.

An asset's version is a hash of the source files of the modules / subpackages it uses (and of its own wiring
module), so editing a stage's science marks that asset, and what depends on it, stale in Dagster, while unrelated
assets keep their version. Each file is hashed through its syntax tree with docstrings removed, so comments,
docstrings and formatting do not make results stale; only code does.
"""

from __future__ import annotations

import ast
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
    "score_checkpoint": ("generative", "orchestration/spatialscope.py", "orchestration/pipes_worker.py"),
    "decomposed_cells": ("decomposition", "generative", "metrics.py", "orchestration/spatialscope.py"),
    "decomposed_cells_by_sample": ("decomposition/_sample.py", "orchestration/spatialscope.py"),
    "enhanced_subspots": ("soscope", "geometry.py", "metrics.py", "orchestration/soscope.py"),
    "combined_slices": ("platforms/_slices.py", "orchestration/slices.py"),
    "sample_spatialdata": ("io/_spatialdata_out.py", "io/_stores.py", "orchestration/spatialdata.py"),
}


def _files(root: Path, rel: str) -> list[Path]:
    p = root / rel
    if p.is_dir():
        return sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"code version: {p} does not exist (update SCIENCE in {__file__})")


def _code_of(path: Path) -> bytes:
    """The code of a Python file without comments, docstrings or formatting (its syntax tree, dumped)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False).encode()


def source_hash(paths: tuple[str, ...] | list[str], root: str | Path | None = None, salt: str = "") -> str:
    """A short hash of the code of the source files at ``paths`` (relative to the package folder ``root``) and ``salt``.

    Parameters
    ----------
    paths
        Files or folders, relative to ``root``; folders contribute every ``.py`` file under them.
    root
        The package folder; default: this installed package.
    salt
        Mixed into the hash (the asset name, so two assets on the same sources differ).

    Returns
    -------
    str
        16 hexadecimal digits.
    """
    root = Path(root) if root is not None else PACKAGE_ROOT
    h = hashlib.sha256(salt.encode())
    for rel in sorted(set(paths) | set(_SHARED)):
        for f in _files(root, rel):
            h.update(str(f.relative_to(root)).encode())
            h.update(b"\0")
            h.update(_code_of(f))
            h.update(b"\0")
    return h.hexdigest()[:16]


@cache
def code_version(asset: str) -> str:
    """The code version of an asset of this package (computed once per process)."""
    return source_hash(SCIENCE[asset], salt=asset)
