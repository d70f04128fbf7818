"""Readers for spatial inputs and large H&E images, with validation errors that name the file and the field.

* spatial data: ``.h5ad``, AnnData ``.zarr`` stores, and Space Ranger output folders (scanpy's ``read_visium``);
* images: TIFF (read lazily through tifffile's zarr interface: a 10,000 x 10,000 slide is never loaded twice),
  JPEG / PNG (read once with Pillow).

No dagster import here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp


class InputError(ValueError):
    """Bad input data; the message names the file, the field and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# spatial data
# ---------------------------------------------------------------------------------------------------------------
def read_spatial(
    path: str | os.PathLike, *, require_spatial: bool = True, table: str = "table", bin_size: int = 2
) -> ad.AnnData:
    """Read a slide (spots x genes) from .h5ad, AnnData .zarr, SpatialData zarr, a Space Ranger or a Visium HD folder.

    Parameters
    ----------
    path : str or os.PathLike
        An ``.h5ad`` / ``.h5`` file, an AnnData ``.zarr`` store, a SpatialData zarr (a folder with ``tables/``), a
        Space Ranger output folder (with ``spatial/``), a Visium HD folder (with ``binned_outputs/``) or a Xenium
        output folder (with ``experiment.xenium``).
    require_spatial : bool
        Also check ``obsm['spatial']`` (:func:`validate_spatial`).
    table : str
        The table to read when ``path`` is a SpatialData zarr.
    bin_size : int
        The bins (2 / 8 / 16 um) to read when ``path`` is a Visium HD folder (with ``binned_outputs/``).

    Returns
    -------
    anndata.AnnData
        The slide.

    Raises
    ------
    InputError
        The path is missing, of the wrong kind (a folder named ``.h5ad``, a file named ``.zarr``) or of an
        unsupported format, cannot be read, has duplicated gene or spot names, or (``require_spatial``) invalid
        ``obsm['spatial']``; the message names the path.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: spatial data not found")
    if path.is_dir() and path.suffix in (".h5ad", ".h5"):
        raise InputError(f"{path}: is a folder; expected an AnnData .h5ad file")
    if path.is_file() and path.suffix == ".zarr":
        raise InputError(f"{path}: is a file; expected an AnnData .zarr store (a folder)")
    try:
        if path.is_dir() and (path / "binned_outputs").is_dir():  # Visium HD: bins through spatialdata-io
            from ._spatialdata_in import read_visium_hd_bins

            adata = read_visium_hd_bins(path, bin_size=bin_size)
        elif path.is_dir() and (path / "experiment.xenium").exists():  # Xenium: cells through spatialdata-io
            from ._spatialdata_in import read_xenium

            adata = read_xenium(path)
        elif (
            path.is_dir()
            and (path / "spatial").is_dir()
            and not (path / "zarr.json").exists()
            and not (path / ".zgroup").exists()
        ):
            adata = _read_spaceranger(path)
        elif path.is_dir() and (path / "tables").is_dir():  # a SpatialData zarr: its table named `table`
            from ._spatialdata_in import read_spatialdata_zarr

            adata = read_spatialdata_zarr(path, table)
        elif path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
            adata = ad.read_zarr(path)
        elif path.suffix in (".h5ad", ".h5"):
            adata = ad.read_h5ad(path)
        else:
            raise InputError(
                f"{path}: unsupported spatial data format; expected .h5ad, an AnnData .zarr store "
                "or a Space Ranger output folder (with spatial/ and filtered_feature_bc_matrix.h5)"
            )
    except InputError:
        raise
    except Exception as e:  # corrupt file, wrong format
        raise InputError(
            f"{path}: could not be read as spatial data (truncated or wrong format?) ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    from ._validate import check_unique_names

    # checked before anything could rename them (anndata's var_names_make_unique turns a second 'Gad2' into
    # 'Gad2-1', which is then silently "imputed")
    check_unique_names(adata.var_names, str(path), "var_names (genes)")
    check_unique_names(adata.obs_names, str(path), "obs_names (spot barcodes)")
    if require_spatial:
        validate_spatial(adata, str(path))
    return adata


def _read_spaceranger(folder: Path) -> ad.AnnData:
    import scanpy as sc

    h5 = [p for p in ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5") if (folder / p).exists()]
    if not h5:
        raise InputError(f"{folder}: Space Ranger folder without filtered_feature_bc_matrix.h5")
    pos = folder / "spatial" / "tissue_positions_list.csv"
    pos_new = folder / "spatial" / "tissue_positions.csv"
    if not pos.exists() and not pos_new.exists():
        raise InputError(f"{folder}: Space Ranger folder without spatial/tissue_positions(_list).csv")
    if not (folder / "spatial" / "scalefactors_json.json").exists():
        raise InputError(f"{folder}: Space Ranger folder without spatial/scalefactors_json.json (scale factors)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.read_visium(folder, count_file=h5[0], load_images=True)
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=float)
    return adata


def library_id(adata: ad.AnnData, source: str = "slide") -> str:
    """The first library id of ``uns['spatial']``.

    Parameters
    ----------
    adata : anndata.AnnData
        The slide.
    source : str
        The file, for the message.

    Returns
    -------
    str
        The first key of ``uns['spatial']``.

    Raises
    ------
    InputError
        ``uns['spatial']`` is missing, not a dict or empty.
    """
    sp_uns = adata.uns.get("spatial")
    if not isinstance(sp_uns, dict) or not sp_uns:
        raise InputError(
            f"{source}: uns['spatial'] is missing; expected uns['spatial'][library_id]['scalefactors'] "
            "(Visium / scanpy convention) with spot_diameter_fullres"
        )
    return next(iter(sp_uns))


def scalefactors(adata: ad.AnnData, source: str = "slide", library: str | None = None) -> dict[str, Any]:
    """The Visium scale factors of ``library`` (default: the first); ``spot_diameter_fullres`` must be positive.

    Parameters
    ----------
    adata : anndata.AnnData
        The slide.
    source : str
        The file, for the message.
    library : str, optional
        The library id in ``uns['spatial']`` (default: the first, :func:`library_id`).

    Returns
    -------
    dict
        ``uns['spatial'][library]['scalefactors']``, scalar values as floats.

    Raises
    ------
    InputError
        ``uns['spatial']`` or the library is missing, the scale factors lack ``spot_diameter_fullres``, or it is
        not a positive finite number.
    """
    lib = library or library_id(adata, source)
    entry = adata.uns.get("spatial", {}).get(lib)
    if not isinstance(entry, dict):
        raise InputError(
            f"{source}: uns['spatial']['{lib}'] is missing; libraries present: {list(adata.uns.get('spatial', {}))}"
        )
    sf = entry.get("scalefactors")
    if not isinstance(sf, dict) or "spot_diameter_fullres" not in sf:
        raise InputError(
            f"{source}: uns['spatial']['{lib}']['scalefactors']['spot_diameter_fullres'] is missing; "
            "expected Visium scale factors (spot diameter in full-resolution pixels)"
        )
    d = float(sf["spot_diameter_fullres"])
    if not np.isfinite(d) or d <= 0:
        raise InputError(
            f"{source}: uns['spatial']['{lib}']['scalefactors']['spot_diameter_fullres'] = {d}; "
            "expected a positive number of pixels"
        )
    return {k: (float(v) if np.isscalar(v) else v) for k, v in sf.items()}


def validate_spatial(adata: ad.AnnData, source: str = "slide") -> None:
    """``obsm['spatial']`` present, finite and of shape (n_spots, 2).

    Parameters
    ----------
    adata : anndata.AnnData
        The slide.
    source : str
        The file, for the message.

    Raises
    ------
    InputError
        ``obsm['spatial']`` is missing, of another shape (fewer than 2 columns, or not one row per spot), or holds
        non-finite coordinates.
    """
    if "spatial" not in adata.obsm:
        raise InputError(
            f"{source}: obsm['spatial'] is missing; expected spot coordinates (x, y) in full-resolution image pixels"
        )
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs:
        raise InputError(f"{source}: obsm['spatial'] has shape {xy.shape}; expected ({adata.n_obs}, 2)")
    if not np.isfinite(xy[:, :2].astype(float)).all():
        raise InputError(f"{source}: obsm['spatial'] has non-finite coordinates")


def validate_counts(adata: ad.AnnData, source: str, *, require_integer: bool = True, layer: str | None = None) -> None:
    """Counts must be finite, non-negative and (if required) integers; the message says what was found.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots or cells x genes.
    source : str
        The file, for the message.
    require_integer : bool
        Also require integer values.
    layer : str, optional
        A layer instead of ``X``.

    Raises
    ------
    InputError
        NaN or infinite values, negative values, or (``require_integer``) non-integer values.
    """
    X = adata.layers[layer] if layer else adata.X
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    field = f"layers['{layer}']" if layer else "X"
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{source}: {field} has {n} NaN or infinite values; expected finite counts")
    mn = float(data.min())
    if mn < 0:
        raise InputError(f"{source}: {field} has negative values (min {mn:g}); expected non-negative counts")
    if require_integer:
        frac = np.abs(data - np.round(data))
        if frac.max() > 1e-6:
            i = int(frac.argmax())
            raise InputError(
                f"{source}: {field} has non-integer values (e.g. {float(data[i]):g}, max {float(data.max()):g}); "
                "expected raw integer counts (log-normalised data cannot be used here)"
            )


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """(H, W[, C]) of an image file, without reading its pixels.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.tif`` / ``.tiff``, ``.jpg`` / ``.jpeg`` or ``.png`` file.

    Returns
    -------
    tuple of int
        The shape: a TIFF's first series shape; for Pillow images ``(H, W)`` for one band, else ``(H, W, C)``.

    Raises
    ------
    InputError
        The file is missing, of an unsupported format, or unreadable.
    """
    path = Path(path)
    _check_image_path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                return tuple(tf.series[0].shape)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            w, h = im.size
            c = len(im.getbands())
            return (h, w) if c == 1 else (h, w, c)
    except Exception as e:
        raise InputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _check_image_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: image not found")
    if path.suffix.lower() not in (".tif", ".tiff", ".jpg", ".jpeg", ".png"):
        raise InputError(f"{path}: unsupported image format '{path.suffix}'; expected .tif/.tiff, .jpg or .png")


def read_image(path: str | os.PathLike, *, lazy: bool = True, require_rgb: bool = True):
    """Read an H&E image as (H, W, 3) uint8.

    TIFFs are opened lazily (a ``zarr.Array`` backed by the file: tiles are read on demand), so a whole-slide image
    is not held in memory by the reader; JPEG / PNG are decoded once into a numpy array. With ``lazy=False`` a
    numpy array is always returned.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.tif`` / ``.tiff`` (level 0 of a pyramid), ``.jpg`` / ``.jpeg`` or ``.png`` file.
    lazy : bool
        Return TIFFs as a lazy ``zarr.Array`` (``False``: read into a numpy array).
    require_rgb : bool
        Require an RGB(A) image; an alpha channel is dropped.

    Returns
    -------
    numpy.ndarray or zarr.Array
        The image, (H, W, 3) when ``require_rgb``.

    Raises
    ------
    InputError
        The file is missing, of an unsupported format, unreadable, or (``require_rgb``) not an RGB image.
    """
    path = Path(path)
    _check_image_path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True)
            arr = zarr.open(store, mode="r")
            if isinstance(arr, zarr.Group):  # pyramidal: level 0 is full resolution
                arr = arr[sorted(arr.array_keys())[0]]
            img = arr if lazy else np.asarray(arr[...])
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as im:
                if require_rgb and im.mode not in ("RGB", "RGBA"):
                    raise InputError(f"{path}: image mode is {im.mode}; expected an RGB H&E image")
                img = np.asarray(im.convert("RGB") if im.mode == "RGBA" else im)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if require_rgb:
        shape = tuple(img.shape)
        if len(shape) != 3 or shape[2] not in (3, 4):
            raise InputError(f"{path}: image has shape {shape}; expected an RGB image of shape (H, W, 3)")
        if shape[2] == 4:
            img = np.asarray(img[..., :3])
    return img


def check_image_covers_spots(
    image_hw: tuple[int, int], adata: ad.AnnData, source: str = "slide", image_source: str = "image"
) -> None:
    """Every spot centre (plus its radius) must lie within the image; the error gives both extents.

    Parameters
    ----------
    image_hw : tuple of int
        The image's (height, width) in pixels.
    adata : anndata.AnnData
        The slide, ``obsm['spatial']`` (x, y) in the image's pixels; the radius is half ``spot_diameter_fullres``
        (0 without scale factors).
    source : str
        The slide's file, for the message.
    image_source : str
        The image's file, for the message.

    Raises
    ------
    InputError
        The spots' extent (with radius) leaves the image.
    """
    xy = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    if len(xy) == 0:
        return
    try:
        r = scalefactors(adata, source)["spot_diameter_fullres"] / 2
    except InputError:
        r = 0.0
    H, W = int(image_hw[0]), int(image_hw[1])
    lo, hi = xy.min(0) - r, xy.max(0) + r
    if lo[0] < 0 or lo[1] < 0 or hi[0] > W or hi[1] > H:
        n_out = int(((xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= W) | (xy[:, 1] >= H)).sum())
        raise InputError(
            f"{image_source} (width {W} x height {H} px) does not cover the spots of {source}: spot extent "
            f"x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} px (incl. spot radius {r:.0f}); "
            f"{n_out} spot centres lie outside. Are obsm['spatial'] coordinates in full-resolution pixels of this image? "
            "For a downscaled image (e.g. Space Ranger's spatial/tissue_hires_image.png) give its scale: "
            "image_scale: tissue_hires_scalef"
        )


def count_spots(path: str | os.PathLike) -> int:
    """Number of spots of a slide without reading its count matrix (obs index only).

    Parameters
    ----------
    path : str or os.PathLike
        An ``.h5ad`` file, an AnnData ``.zarr`` store or a Space Ranger folder (barcodes of
        ``filtered_feature_bc_matrix.h5``).

    Returns
    -------
    int
        The number of spots.

    Raises
    ------
    InputError
        The file is missing or cannot be read (the message names it).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: spatial data not found")
    try:
        return _count_spots(path)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"{path}: could not read obs (spot barcodes) of the spatial data (truncated or wrong format?) "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _count_spots(path: Path) -> int:
    if path.is_dir() and (path / "experiment.xenium").exists():
        import h5py

        with h5py.File(path / "cell_feature_matrix.h5", "r") as f:
            return len(f["matrix"]["barcodes"])
    if path.is_dir() and (path / "spatial").is_dir() and not (path / "zarr.json").exists():
        import h5py

        h5 = path / "filtered_feature_bc_matrix.h5"
        with h5py.File(h5, "r") as f:
            n_h5 = len(f["matrix"]["barcodes"])
        return n_h5
    if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        import zarr

        g = zarr.open_group(str(path), mode="r")
        return ad.io.read_elem(g["obs"]).shape[0]
    import h5py

    with h5py.File(path, "r") as f:
        return ad.io.read_elem(f["obs"]).shape[0]


def require_columns(df, what: str, columns: tuple[str, ...], hint: str, error: type[Exception] = InputError) -> None:
    """``df`` must be a DataFrame with ``columns``; the error names ``what``, the missing columns and ``hint``.

    Parameters
    ----------
    df : pandas.DataFrame
        The table to check.
    what : str
        What the table is, for the message.
    columns : tuple of str
        The required columns.
    hint : str
        What was expected, for the message.
    error : type of Exception
        The exception class raised.

    Raises
    ------
    InputError
        (or ``error``) ``df`` is not a DataFrame or lacks some of ``columns``.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise error(f"{what}: expected a pandas DataFrame with columns {', '.join(columns)}, found {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise error(f"{what}: missing column(s) {missing}; expected {hint} (found {list(df.columns)})")
