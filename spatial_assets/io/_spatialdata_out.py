"""One SpatialData zarr per sample: the H&E (multiscale), nuclei labels, spots / cells / sub-spots as circles in
micrometres, and the tables annotating them.

Coordinate systems: ``global`` in micrometres (shapes are stored in um, images and labels carry a pixel -> um
``Scale``) and ``pixels`` in full-resolution image pixels (shapes carry the um -> pixel ``Scale``). Tables:

* ``spot_weights`` (annotates ``spots``): the slide (raw counts in ``X``) with the typed-cells spot proportions in ``obsm['proportions']`` and
  ``obs['typing_status']``;
* ``typed_cells`` (annotates ``cells``): one row per segmented cell (type, confidence, ...), ``X`` empty;
* ``decomposed_cells`` (annotates ``cells``): decomposed expression of the cells that were decomposed;
* ``enhanced_subspots`` (annotates ``subspots``): soScope's enhanced sub-spots.

Each table has ``obs['region']`` (region key) and ``obs['instance_id']`` (instance key) matching its shapes' index.
Written atomically (a temporary sibling renamed into place), like every other store. No dagster import here.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ._readers import InputError
from ._stores import _sanitize_uns, atomic_path

REGION_KEY = "region"
INSTANCE_KEY = "instance_id"


def _transforms(um_per_px: float, stored_in: str):
    from spatialdata.transformations import Identity, Scale

    to_um = Scale([um_per_px, um_per_px], axes=("x", "y"))
    to_px = Scale([1.0 / um_per_px, 1.0 / um_per_px], axes=("x", "y"))
    if stored_in == "pixels":
        return {"global": to_um, "pixels": Identity()}
    return {"global": Identity(), "pixels": to_px}


def _circles(xy_um: np.ndarray, radius_um, index, um_per_px: float):
    import geopandas as gpd
    from shapely import points
    from spatialdata.models import ShapesModel

    r = np.broadcast_to(np.asarray(radius_um, dtype=float), (len(xy_um),)).copy()
    gdf = gpd.GeoDataFrame(
        {"radius": r}, geometry=points(np.asarray(xy_um, dtype=float)), index=pd.Index(np.asarray(index, dtype=str))
    )
    return ShapesModel.parse(gdf, transformations=_transforms(um_per_px, "um"))


def _table(adata: ad.AnnData, region: str):
    from spatialdata.models import TableModel

    t = adata.copy()
    t.uns.pop("spatial", None)  # images live in the SpatialData images element
    t.obs[REGION_KEY] = pd.Categorical([region] * t.n_obs)
    t.obs[INSTANCE_KEY] = t.obs_names.astype(str).to_numpy()
    t.uns.pop("spatialdata_attrs", None)
    _sanitize_uns(t)
    t.uns = _plain(dict(t.uns))
    return TableModel.parse(t, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _plain(v):
    """uns values anndata can write: enums as their values, nested dicts kept."""
    if isinstance(v, Enum):
        return _plain(v.value)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def to_spatialdata(
    slide: ad.AnnData,
    *,
    image=None,
    labels=None,
    cells: pd.DataFrame | None = None,
    decomposed: ad.AnnData | None = None,
    spot_weights: ad.AnnData | None = None,
    subspots: ad.AnnData | None = None,
    um_per_px: float | None = None,
    scale_factors: tuple[int, ...] = (2, 2),
    sample: str = "sample",
):
    """Assemble a sample's inputs and results into one :class:`spatialdata.SpatialData`.

    Parameters
    ----------
    slide : anndata.AnnData
        The sample's spots (``obsm['spatial']`` in full-resolution pixels, Visium scale factors).
    image : array-like, optional
        Full-resolution H&E, (H, W, 3); stored multiscale (``scale_factors``) as ``<sample>_he``.
    labels : array-like, optional
        Nuclei label image (H, W) of the same pixels, stored as ``<sample>_nuclei``.
    cells : pandas.DataFrame, optional
        Typed (or segmented) cells: ``x``, ``y`` in pixels, optional ``area`` (pixels) for the circle radius.
    decomposed : anndata.AnnData, optional
        Decomposed cells (obs names are cell ids of ``cells``).
    spot_weights : anndata.AnnData, optional
        Spots x types proportions over the slide's barcodes (:func:`spot_weights_anndata`).
    subspots : anndata.AnnData, optional
        Enhanced sub-spots (``obsm['spatial']`` in pixels, ``uns['soscope']['spot_diameter_px']`` optional).
    um_per_px : float, optional
        Micrometres per pixel; default from the slide (:func:`spatial_assets.platforms.microns_per_pixel`).
    scale_factors : tuple of int
        Downsampling factors of the image pyramid.
    sample : str
        Prefix of the image / labels element names.

    Returns
    -------
    spatialdata.SpatialData

    Raises
    ------
    InputError
        Cells without ``x`` / ``y``, decomposed cells that are not among ``cells``, or images of different sizes.
    """
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel

    from ..platforms import microns_per_pixel
    from ._readers import scalefactors

    if um_per_px is None:
        um_per_px, _ = microns_per_pixel(slide)
    sf = scalefactors(slide, "slide")
    spot_r_um = sf["spot_diameter_fullres"] / 2 * um_per_px
    images, label_el, shapes, tables = {}, {}, {}, {}
    if image is not None:
        img = np.moveaxis(np.asarray(image), -1, 0)
        images[f"{sample}_he"] = Image2DModel.parse(
            img,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"][: img.shape[0]],
            scale_factors=list(scale_factors) or None,
            transformations=_transforms(um_per_px, "pixels"),
            chunks=(img.shape[0], 1024, 1024),
        )
    if labels is not None:
        lab = np.asarray(labels)
        if image is not None and lab.shape[:2] != np.asarray(image).shape[:2]:
            raise InputError(
                f"nuclei labels have shape {lab.shape[:2]}, the image {np.asarray(image).shape[:2]}; expected the "
                "same pixels"
            )
        label_el[f"{sample}_nuclei"] = Labels2DModel.parse(
            lab.astype(np.int32),
            dims=("y", "x"),
            scale_factors=list(scale_factors) or None,
            transformations=_transforms(um_per_px, "pixels"),
            chunks=(1024, 1024),
        )
    xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    shapes["spots"] = _circles(xy * um_per_px, spot_r_um, slide.obs_names, um_per_px)
    if spot_weights is not None:
        sw = slide.copy()
        sw.obsm["proportions"] = pd.DataFrame(
            np.asarray(spot_weights[slide.obs_names].X), index=slide.obs_names, columns=spot_weights.var_names
        )
        sw.obs["typing_status"] = spot_weights.obs["typing_status"].reindex(slide.obs_names).to_numpy()
        tables["spot_weights"] = _table(sw, "spots")
    else:
        tables["spot_weights"] = _table(slide, "spots")
    if cells is not None:
        missing = [c for c in ("x", "y") if c not in cells]
        if missing:
            raise InputError(f"cells: missing column(s) {missing}; expected x, y in full-resolution pixels")
        cxy = cells[["x", "y"]].to_numpy(float) * um_per_px
        area = cells["area"].to_numpy(float) if "area" in cells else np.full(len(cells), np.pi * 4.0)
        r_um = np.sqrt(np.clip(area, 1.0, None) / np.pi) * um_per_px
        shapes["cells"] = _circles(cxy, r_um, cells.index, um_per_px)
        obs = cells.copy()
        obs.index = obs.index.astype(str)
        for c in obs.columns:
            if obs[c].dtype == object:
                obs[c] = obs[c].astype(str)
        typed = ad.AnnData(obs=obs)
        typed.obsm["spatial"] = cells[["x", "y"]].to_numpy(float)
        tables["typed_cells"] = _table(typed, "cells")
    if decomposed is not None and decomposed.n_obs:
        if cells is None:
            raise InputError("decomposed cells given without their cells table (cells=); they annotate its shapes")
        unknown = decomposed.obs_names.difference(shapes["cells"].index)
        if len(unknown):
            raise InputError(
                f"decomposed cells: {len(unknown)} cell ids are not in the cells table (e.g. {list(unknown[:3])})"
            )
        tables["decomposed_cells"] = _table(decomposed, "cells")
    if subspots is not None and subspots.n_obs:
        info = dict(subspots.uns.get("soscope", {}))
        k = max(int(info.get("subspots_per_spot", 7)), 1)
        r_sub = float(info.get("spot_diameter_px", sf["spot_diameter_fullres"])) / 2 / np.sqrt(k) * um_per_px
        sxy = np.asarray(subspots.obsm["spatial"], dtype=float)[:, :2] * um_per_px
        shapes["subspots"] = _circles(sxy, r_sub, subspots.obs_names, um_per_px)
        tables["enhanced_subspots"] = _table(subspots, "subspots")
    return sd.SpatialData(images=images, labels=label_el, shapes=shapes, tables=tables)


def write_spatialdata(sdata, path: str | os.PathLike) -> Path:
    """Write a SpatialData object to ``path`` (zarr) atomically: a temporary sibling renamed into place.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        :class:`spatialdata.SpatialData`.
    path : str or os.PathLike
        Destination ``.zarr`` folder; an existing store there is replaced only once the new one is complete.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        sdata.write(tmp, overwrite=False)
        (tmp / ".complete").write_text('{"complete": true}')
    return path


def spatialdata_from_stores(
    slide: str | os.PathLike,
    *,
    image: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    cells: str | os.PathLike | None = None,
    spot_weights: str | os.PathLike | None = None,
    decomposed: str | os.PathLike | None = None,
    subspots: str | os.PathLike | None = None,
    sample: str = "sample",
    scale_factors: tuple[int, ...] = (2, 2),
):
    """Gather a sample's stores (as the assets write them) into one :class:`spatialdata.SpatialData`.

    Every store but ``slide`` is optional: one that is not given, or not complete (never materialized, e.g.
    soScope not run for the sample), is left out and named in the returned ``missing``.

    Parameters
    ----------
    slide : str or os.PathLike
        The slide-inputs AnnData store (spots).
    image : str or os.PathLike, optional
        The slide-image arrays store (array ``image``, (H, W, 3)).
    labels : str or os.PathLike, optional
        The segmented slide's nuclei labels store (array ``labels``).
    cells : str or os.PathLike, optional
        The typed cells' cells table (``x``, ``y`` in pixels, ``cell_type``, ...).
    spot_weights : str or os.PathLike, optional
        The typed cells' spots x types AnnData (``obs['typing_status']``).
    decomposed : str or os.PathLike, optional
        The sample's decomposed cells (all spot ranges combined).
    subspots : str or os.PathLike, optional
        soScope's enhanced sub-spots.
    sample : str
        Prefix of the image / labels element names.
    scale_factors : tuple of int
        Downsampling factors of the image and labels pyramids.

    Returns
    -------
    (spatialdata.SpatialData, list[str])
        The SpatialData object and the names of the optional stores left out (not given or not complete).

    Raises
    ------
    InputError
        ``slide`` is not a complete store, or the stores disagree (see :func:`to_spatialdata`).
    """
    from ._stores import is_complete, read_anndata, read_arrays, read_dataframe

    if not is_complete(slide):
        raise InputError(f"{slide}: the slide-inputs store is missing or incomplete; materialize slide_inputs first")
    given = {
        "image": image,
        "labels": labels,
        "cells": cells,
        "spot_weights": spot_weights,
        "decomposed": decomposed,
        "subspots": subspots,
    }
    present = {k: p for k, p in given.items() if p is not None and is_complete(p)}
    missing = [k for k in given if k not in present]
    readers = {
        "image": lambda p: read_arrays(p, ["image"])["image"],
        "labels": lambda p: read_arrays(p, ["labels"])["labels"],
        "cells": read_dataframe,
        "spot_weights": read_anndata,
        "decomposed": read_anndata,
        "subspots": read_anndata,
    }
    parts = {k: readers[k](p) for k, p in present.items()}
    if "decomposed" in parts and "cells" not in parts:
        missing.append("decomposed")  # decomposed cells annotate the cells shapes: nothing to attach them to
        parts.pop("decomposed")
    sdata = to_spatialdata(read_anndata(slide), sample=sample, scale_factors=scale_factors, **parts)
    return sdata, missing


def describe_spatialdata(sdata) -> dict:
    """Elements, tables (shape, region) and coordinate systems of a SpatialData object, for reports.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        :class:`spatialdata.SpatialData`.

    Returns
    -------
    dict
        ``images``, ``labels``, ``shapes`` (name -> count), ``tables`` (name -> ``{"shape", "region"}``) and
        ``coordinate_systems``.
    """
    tables = {}
    for name, t in sdata.tables.items():
        attrs = t.uns.get("spatialdata_attrs", {})
        tables[name] = {"shape": [int(t.n_obs), int(t.n_vars)], "region": attrs.get("region")}
    return {
        "images": sorted(sdata.images),
        "labels": sorted(sdata.labels),
        "shapes": {k: len(v) for k, v in sdata.shapes.items()},
        "tables": tables,
        "coordinate_systems": sorted(sdata.coordinate_systems),
    }


def render_spatialdata(sdata, image: str | None = None, table: str = "typed_cells", color: str = "cell_type"):
    """A spatialdata-plot render of the H&E with the cells coloured by type, as a Matplotlib figure.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        :class:`spatialdata.SpatialData` (as :func:`to_spatialdata` builds it).
    image : str, optional
        The image element; default: the first one (none: cells only).
    table : str
        The table annotating ``cells`` whose column ``color`` colours them; without it, the spots are drawn.
    color : str
        Column of ``table`` to colour by.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    fig, ax = plt.subplots(figsize=(6, 5))
    plot = sdata  # each render_* returns a new SpatialData carrying the render plan
    if image is None and len(sdata.images):
        image = sorted(sdata.images)[0]
    if image is not None:
        plot = plot.pl.render_images(image)
    if table in sdata.tables and "cells" in sdata.shapes and color in sdata.tables[table].obs:
        plot = plot.pl.render_shapes("cells", color=color, table_name=table)
    else:
        plot = plot.pl.render_shapes("spots", fill_alpha=0.3)
    plot.pl.show(coordinate_systems="global", ax=ax)
    return fig
