"""Inputs through spatialdata-io (the scverse readers): Space Ranger (Visium), Visium HD, Xenium, and any
SpatialData zarr with a named table, turned into the scanpy-layout slide the pipeline reads (``X`` counts,
``obsm['spatial']`` in full-resolution pixels, ``uns['spatial'][library_id]`` with images and scale factors).

No dagster import here.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ._readers import InputError

VISIUM_SPOT_UM = 55.0


def _affine(element, cs: str) -> np.ndarray | None:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, get_all=True)
    if cs not in t:
        return None
    return np.asarray(t[cs].to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)


def _centres_and_diameters(shapes) -> tuple[np.ndarray, np.ndarray]:
    geom = shapes.geometry
    if "radius" in shapes:
        return np.c_[geom.x.to_numpy(), geom.y.to_numpy()], 2 * shapes["radius"].to_numpy(float)
    c = geom.centroid
    return np.c_[c.x.to_numpy(), c.y.to_numpy()], 2 * np.sqrt(geom.area.to_numpy(float) / np.pi)


def spatialdata_to_anndata(sdata, table: str = "table", *, source: str = "SpatialData") -> ad.AnnData:
    """The scanpy-layout slide of a SpatialData table annotating shapes (spots, bins or cells).

    ``obsm['spatial']`` are the shapes' centres in their own coordinates (for spatialdata-io's readers: the
    full-resolution image pixels); ``spot_diameter_fullres`` is the median shape diameter; images transformed into
    those coordinates by a pure scale become ``uns['spatial'][lib]['images']`` (largest ``hires``, smallest
    ``lowres``) with their ``tissue_*_scalef``.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        :class:`spatialdata.SpatialData`.
    table : str
        Name of the table to read (``sdata.tables[table]``).
    source : str
        What to name in errors (e.g. the zarr path).

    Returns
    -------
    AnnData
        Spots (or cells) x genes.

    Raises
    ------
    InputError
        The table is missing, does not annotate one shapes element, or instances are missing from the shapes.
    """
    if table not in sdata.tables:
        raise InputError(f"{source}: no table '{table}'; tables present: {list(sdata.tables)}")
    t = sdata.tables[table]
    attrs = dict(t.uns.get("spatialdata_attrs", {}))
    region = attrs.get("region")
    region = region[0] if isinstance(region, (list, tuple)) and len(region) == 1 else region
    if not isinstance(region, str) or region not in sdata.shapes:
        raise InputError(
            f"{source}: table '{table}' annotates {region!r}; expected one shapes element (shapes present: "
            f"{list(sdata.shapes)})"
        )
    shapes = sdata.shapes[region]
    ikey = attrs.get("instance_key")
    inst = t.obs[ikey].to_numpy() if ikey in t.obs else t.obs_names.to_numpy()
    missing = pd.Index(inst).difference(shapes.index)
    if len(missing):
        raise InputError(
            f"{source}: {len(missing)} instances of table '{table}' (obs['{ikey}']) are not in shapes '{region}' "
            f"(e.g. {list(missing[:3])})"
        )
    xy, diam = _centres_and_diameters(shapes.loc[inst])
    # target coordinates: 'pixels' (this package's stores) or the shapes' own (identity) coordinate system
    from spatialdata.transformations import get_transformation

    systems = list(get_transformation(shapes, get_all=True))
    cs = (
        "pixels"
        if "pixels" in systems
        else next((k for k in systems if np.allclose(_affine(shapes, k), np.eye(3))), None)
    )
    if cs is not None:
        m = _affine(shapes, cs)
        xy = xy @ m[:2, :2].T + m[:2, 2]
        diam = diam * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    adata = ad.AnnData(X=t.X, obs=t.obs.copy(), var=t.var.copy())
    adata.obs_names = t.obs_names.astype(str)
    adata.obsm["spatial"] = xy.astype(float)
    sf: dict[str, float] = {"spot_diameter_fullres": float(np.median(diam)) if len(diam) else 1.0}
    images: dict[str, np.ndarray] = {}
    if cs is not None:
        found = []
        for name, img in sdata.images.items():
            m = _affine(img, cs)
            if m is None or not np.allclose(m[0, 1], 0) or not np.allclose(m[:2, 2], 0):
                continue
            arr = img["scale0"]["image"] if hasattr(img, "children") and "scale0" in img.children else img
            found.append((float(1.0 / m[0, 0]), name, arr))
        found.sort(key=lambda f: -f[0])
        for key, (scale, _, arr) in zip(("hires", "lowres"), [found[0], found[-1]] if found else []):
            k = max(1, int(np.ceil(max(arr.sizes["y"], arr.sizes["x"]) / (2000 if key == "hires" else 600))))
            scale /= k  # strided read: never the whole full-resolution image
            a = np.asarray(arr.isel(y=slice(None, None, k), x=slice(None, None, k)).transpose("y", "x", "c").values)
            a = a[..., :3]
            images[key] = (
                a if a.dtype == np.uint8 else np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).astype(np.uint8)
            )
            sf[f"tissue_{key}_scalef"] = scale
    lib = region if cs in (None, "pixels", "global") else cs
    adata.uns["spatial"] = {lib: {"images": images, "scalefactors": sf, "metadata": {"source": str(source)}}}
    return adata


def read_spatialdata_zarr(path: str | os.PathLike, table: str = "table") -> ad.AnnData:
    """A SpatialData zarr's table as a scanpy-layout slide (:func:`spatialdata_to_anndata`).

    Parameters
    ----------
    path : str or os.PathLike
        The SpatialData zarr.
    table : str
        The table to read.

    Returns
    -------
    anndata.AnnData
        The slide.

    Raises
    ------
    InputError
        Not readable as SpatialData, or the table is missing / not annotating shapes.
    """
    import spatialdata as sd

    path = Path(path)
    try:
        sdata = sd.read_zarr(path)
    except Exception as e:
        raise InputError(f"{path}: could not be read as a SpatialData zarr ({type(e).__name__}: {e})") from None
    return spatialdata_to_anndata(sdata, table, source=str(path))


def read_visium(folder: str | os.PathLike, dataset_id: str | None = None, **kwargs) -> ad.AnnData:
    """A Space Ranger (Visium) ``outs/`` folder through ``spatialdata_io.visium``, as a scanpy-layout slide.

    Works with or without the full-resolution TIFF (``fullres_image_file=`` is passed through): spot centres are
    in full-resolution pixels either way, and the hires / lowres images come with their scale factors.

    Parameters
    ----------
    folder : str or os.PathLike
        The ``outs/`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/``).
    dataset_id : str, optional
        Library id (default: the folder's name).
    **kwargs
        Passed to :func:`spatialdata_io.visium`.

    Returns
    -------
    AnnData

    Raises
    ------
    InputError
        The folder cannot be read by spatialdata-io.
    """
    import spatialdata_io

    folder = Path(folder)
    dataset_id = dataset_id or folder.name
    try:
        sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, **kwargs)
    except Exception as e:
        raise InputError(
            f"{folder}: not readable as a Space Ranger folder by spatialdata-io ({type(e).__name__}: {e})"
        ) from None
    adata = spatialdata_to_anndata(sdata, "table", source=str(folder))
    sf = next(iter(adata.uns["spatial"].values()))["scalefactors"]
    sf.setdefault("microns_per_pixel", VISIUM_SPOT_UM / sf["spot_diameter_fullres"])
    adata.var_names_make_unique()
    return adata


XENIUM_FILES = ("experiment.xenium", "cells.zarr.zip", "cells.parquet", "cell_feature_matrix.h5")


def xenium_missing_files(folder: str | os.PathLike) -> list[str]:
    """The files spatialdata-io 0.7.1's ``xenium`` reader needs for the cells table that a folder lacks.

    ``experiment.xenium`` (``pixel_size``, the analysis version), ``cells.zarr.zip`` (always opened: cell ids
    and ``cell_summary`` from XOA 1.3 on), ``cells.parquet`` (``cell_id``, ``x_centroid``, ``y_centroid``,
    ``cell_area``, ...) and ``cell_feature_matrix.h5`` (10x matrix layout). Boundaries, transcripts and morphology
    images are not needed by :func:`read_xenium`.

    Parameters
    ----------
    folder : str or os.PathLike
        The Xenium output folder.

    Returns
    -------
    list of str
        The missing files (empty when none is missing).
    """
    folder = Path(folder)
    return [f for f in XENIUM_FILES if not (folder / f).exists()]


def read_xenium(folder: str | os.PathLike, **kwargs) -> ad.AnnData:
    """A Xenium output folder through ``spatialdata_io.xenium``: cells (already segmented) x panel genes, cell
    centres in micrometres as ``obsm['spatial']`` (platform ``xenium``: each cell is its own spot; genes outside
    the panel are imputed by the decomposition).

    Only the cells table is read by default (no boundaries, labels, transcripts or images; pass e.g.
    ``transcripts=True`` to change that); the files it needs are checked first (:func:`xenium_missing_files`).

    Parameters
    ----------
    folder : str or os.PathLike
        The Xenium output folder.
    **kwargs
        Passed to :func:`spatialdata_io.xenium` (``cells_as_circles`` is always ``True``).

    Returns
    -------
    anndata.AnnData
        Cells x panel genes.

    Raises
    ------
    InputError
        A file the reader needs is missing (named), or the folder cannot be read by spatialdata-io.
    """
    import spatialdata_io

    folder = Path(folder)
    missing = xenium_missing_files(folder)
    if missing:
        raise InputError(
            f"{folder}: not a complete Xenium output folder; missing {', '.join(missing)} (spatialdata-io's xenium "
            "reader needs them for the cells table)"
        )
    for k in (
        "cells_boundaries",
        "nucleus_boundaries",
        "cells_labels",
        "nucleus_labels",
        "transcripts",
        "morphology_mip",
        "morphology_focus",
        "aligned_images",
    ):
        kwargs.setdefault(k, False)
    try:
        sdata = spatialdata_io.xenium(folder, cells_as_circles=True, **kwargs)
    except Exception as e:
        raise InputError(
            f"{folder}: not readable as a Xenium folder by spatialdata-io ({type(e).__name__}: {e})"
        ) from None
    adata = spatialdata_to_anndata(sdata, "table", source=str(folder))
    adata.var_names_make_unique()
    return adata


def visium_hd_missing_files(folder: str | os.PathLike, bin_size: int = 2) -> list[str]:
    """The files spatialdata-io 0.7.1's ``visium_hd`` reader needs that a Visium HD folder lacks (relative paths).

    It needs ``feature_slice.h5`` (or ``<dataset_id>_feature_slice.h5``: the HD layout's file format is read from
    its ``metadata_json`` attribute) and, for the bins, ``binned_outputs/square_<bin>um/`` with
    ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``.
    Images (``microscope_image/``, ``spatial/tissue_hires_image.png``) are optional.

    Parameters
    ----------
    folder : str or os.PathLike
        The Visium HD output folder (``outs/``).
    bin_size : int
        The bin size in micrometres.

    Returns
    -------
    list of str
        The missing files, relative to ``folder`` (empty when it is complete).
    """
    folder = Path(folder)
    missing = []
    if not (folder / "feature_slice.h5").exists() and not list(folder.glob("*_feature_slice.h5")):
        missing.append("feature_slice.h5")
    b = f"binned_outputs/square_{int(bin_size):03d}um"
    for f in ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.parquet", "spatial/scalefactors_json.json"):
        if not (folder / b / f).exists():
            missing.append(f"{b}/{f}")
    return missing


def read_visium_hd_bins(folder: str | os.PathLike, bin_size: int = 2, **kwargs) -> ad.AnnData:
    """Visium HD bins (``bin_size`` 2 / 8 / 16 um) through ``spatialdata_io.visium_hd``, as a slide of bins with
    centres in full-resolution pixels; turn them into cells with
    :func:`spatial_assets.platforms.bins_to_cells` and the nuclei of the H&E.

    The files it needs are checked first (:func:`visium_hd_missing_files`), so a missing one is named.
    ``uns['spatial'][lib]['scalefactors']`` holds ``spot_diameter_fullres`` (the bin's side in pixels),
    ``microns_per_pixel`` and ``bin_size_um`` from the bins' ``scalefactors_json.json``.

    Parameters
    ----------
    folder : str or os.PathLike
        The Visium HD output folder.
    bin_size : int
        The bin size in micrometres (its table's name ends with ``<bin_size:03d>um``).
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd`.

    Returns
    -------
    anndata.AnnData
        Bins x genes.

    Raises
    ------
    InputError
        A file the reader needs is missing (named), the folder cannot be read, or it has no table for
        ``bin_size``.
    """
    import json
    import warnings

    import spatialdata_io

    folder = Path(folder)
    missing = visium_hd_missing_files(folder, bin_size)
    if missing:
        raise InputError(
            f"{folder}: not a complete Visium HD folder for {bin_size}-um bins; missing {', '.join(missing)} "
            "(spatialdata-io's visium_hd reader needs them; images are optional)"
        )
    kwargs["dataset_id"] = kwargs.get("dataset_id") or folder.name  # never '': the library id of uns['spatial']
    kwargs.setdefault("bins_as_squares", False)  # circles: centre + diameter = the bin's side
    kwargs.setdefault("load_segmentations_only", False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No (full resolution image|image path) found")
            sdata = spatialdata_io.visium_hd(folder, bin_size=bin_size, **kwargs)
    except Exception as e:
        raise InputError(
            f"{folder}: not readable as a Visium HD folder by spatialdata-io ({type(e).__name__}: {e})"
        ) from None
    name = next((k for k in sdata.tables if k.endswith(f"{bin_size:03d}um")), None)
    if name is None:
        raise InputError(f"{folder}: no table of {bin_size}-um bins; tables present: {list(sdata.tables)}")
    adata = spatialdata_to_anndata(sdata, name, source=str(folder))
    sf_file = folder / f"binned_outputs/square_{int(bin_size):03d}um/spatial/scalefactors_json.json"
    sf_bins = json.loads(sf_file.read_text())
    sf = next(iter(adata.uns["spatial"].values()))["scalefactors"]
    for k in ("spot_diameter_fullres", "microns_per_pixel", "bin_size_um"):
        if k in sf_bins:
            sf[k] = float(sf_bins[k])
    adata.var_names_make_unique()
    return adata
