"""Where the data shipped inside the package lives (found with importlib.resources, so installed wheels work)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``spatial_assets/datasets/data``.

    Found with :mod:`importlib.resources`, so installed (non-editable) packages work too.

    Parameters
    ----------
    *parts : str
        Path components below the data folder, e.g. ``data_path("osmfish-sscortex", "x.h5ad")``.

    Returns
    -------
    pathlib.Path
        The file's path.

    Raises
    ------
    FileNotFoundError
        Naming the file, when the package was installed without its data.
    """
    p = Path(str(files("spatial_assets.datasets").joinpath("data", *parts)))
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: packaged data file missing (the spatial_assets installation is incomplete: "
            "reinstall the package with its package data)"
        )
    return p
