"""Where the data shipped inside the package lives (found with importlib.resources, so installed wheels work)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``spatial_assets/datasets/data`` (e.g. ``data_path("osmfish-sscortex", "x.h5ad")``).

    Raises FileNotFoundError naming the file when the package was installed without its data.
    """
    p = Path(str(files("spatial_assets.datasets").joinpath("data", *parts)))
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: packaged data file missing (the spatial_assets installation is incomplete: "
            "reinstall the package with its package data)"
        )
    return p
