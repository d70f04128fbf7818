"""Aligned 3D slices: stacking slides in micrometres with z, and splitting results back per slice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ._imaging import PlatformInputError

SLICE_SEP = ":"  # joins slice (sample) and spot / cell names in stacked slices; sample names never contain it


# ------------------------------------------------------------------------------------------------ slices (3D)
def stack_slices(
    slices: Mapping[str, tuple[ad.AnnData, pd.DataFrame]], z_um: Mapping[str, float], um_per_px: Mapping[str, float]
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Join aligned slices into one slide and one cells table in micrometres, with a ``z`` column.

    Spot and cell names become ``<name>:<original>`` (:data:`SLICE_SEP`); genes are those shared by all slides;
    the joint slide's ``obsm['spatial']`` and the cells' ``x``, ``y``, ``z`` are micrometres, so Potts neighbours
    found on (x, y, z) are 3D neighbours. Slices must already be aligned (same x, y frame in micrometres).

    Parameters
    ----------
    slices : mapping of str to (anndata.AnnData, pandas.DataFrame)
        Slice name -> (slide, cells); cells indexed by cell id with ``x``, ``y`` in the slide's pixels and
        ``spot`` (empty for cells outside spots). Names must not contain ``":"``.
    z_um : mapping of str to float
        Height of each slice in micrometres.
    um_per_px : mapping of str to float
        Micrometres per pixel of each slice.

    Returns
    -------
    slide : anndata.AnnData
        Joint spots x shared genes (CSR), ``obs['slice']``, ``obsm['spatial']`` in micrometres,
        ``uns['spatial']`` with ``microns_per_pixel`` 1 and ``uns['slices']`` (names, z_um, um_per_px).
    cells : pandas.DataFrame
        Joint cells table (prefixed ids and spots, ``x``, ``y``, ``z`` in micrometres, ``slice``).

    Raises
    ------
    PlatformInputError
        If there is no slice, a name contains the separator, a slice lacks ``z_um`` or ``um_per_px``, or the
        slides share no gene.
    """
    if not slices:
        raise PlatformInputError("slices: expected at least one slice")
    for name in slices:
        if SLICE_SEP in name:
            raise PlatformInputError(f"slices: slice name '{name}' must not contain '{SLICE_SEP}'")
        for what, m in (("z_um", z_um), ("um_per_px", um_per_px)):
            if name not in m:
                raise PlatformInputError(f"{what}: no value for slice '{name}'")
    genes = None
    for slide, _ in slices.values():
        g = pd.Index(slide.var_names.astype(str))
        genes = g if genes is None else genes[genes.isin(g)]
    if genes is None or len(genes) == 0:
        raise PlatformInputError(f"slices: the slides share no genes ({list(slices)})")
    slides, tables = [], []
    for name, (slide, cells) in slices.items():
        f = float(um_per_px[name])
        obs = pd.DataFrame({"slice": name}, index=pd.Index(name + SLICE_SEP + slide.obs_names.astype(str)))
        s = ad.AnnData(X=sp.csr_matrix(slide[:, list(genes)].X), var=pd.DataFrame(index=genes), obs=obs)
        s.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2] * f
        slides.append(s)
        c = cells.copy()
        c.index = pd.Index(name + SLICE_SEP + cells.index.astype(str), name=cells.index.name)
        blank = c["spot"].isna() | (c["spot"].astype(str).str.len() == 0)
        c["spot"] = np.where(blank, "", name + SLICE_SEP + c["spot"].astype(str))
        c["x"] = c["x"].to_numpy(float) * f
        c["y"] = c["y"].to_numpy(float) * f
        c["z"] = float(z_um[name])
        c["slice"] = name
        tables.append(c)
    joint = ad.concat(slides, merge="same")
    joint.obsm["spatial"] = np.vstack([s.obsm["spatial"] for s in slides])
    joint.uns["spatial"] = {"stacked": {"scalefactors": {"microns_per_pixel": 1.0}}}
    joint.uns["slices"] = {
        "names": list(slices),
        "z_um": {k: float(z_um[k]) for k in slices},
        "um_per_px": {k: float(um_per_px[k]) for k in slices},
    }
    return joint, pd.concat(tables)


def _strip(index: pd.Index, name: str) -> tuple[np.ndarray, pd.Index]:
    s = index.astype(str)
    mine = s.str.startswith(name + SLICE_SEP)
    return np.asarray(mine), pd.Index(s[mine].str.slice(len(name) + len(SLICE_SEP)), name=index.name)


def unstack_result(result, name: str, um_per_px: float):
    """One slice of a cell-typing result on stacked slices (:func:`stack_slices`).

    Keeps the slice's cells (original ids and spots, ``x``, ``y`` back in its pixels, the height as ``z_um``),
    weights, raw weights and bead calls; platform effect, profiles and sigma are shared by all slices and kept.

    Parameters
    ----------
    result : spatial_assets.celltyping.CellTypingResult
        Result of typing the stacked slide.
    name : str
        The slice to take out.
    um_per_px : float
        Micrometres per pixel of that slice.

    Returns
    -------
    spatial_assets.celltyping.CellTypingResult
        A copy restricted to the slice, with ``info['slices']`` (this slice, cells of all slices, cells of this
        slice).
    """
    cells = result.cells
    mine, idx = _strip(cells.index, name)
    c = cells.loc[mine].copy()
    c.index = idx
    c["spot"] = c["spot"].astype(str).str.slice(len(name) + len(SLICE_SEP)).where(c["spot"].astype(str) != "", "")
    c["x"] = c["x"].to_numpy(float) / um_per_px
    c["y"] = c["y"].to_numpy(float) / um_per_px
    if "z" in c:
        c = c.rename(columns={"z": "z_um"})
    c = c.drop(columns=[k for k in ("slice",) if k in c])

    def rows(df):
        if df is None:
            return None
        m, i = _strip(df.index, name)
        out = df.loc[m].copy()
        out.index = i
        return out

    info = dict(result.info)
    info["slices"] = {"this_slice": name, "cells_all_slices": int(len(cells)), "cells_this_slice": int(mine.sum())}
    kw = {"cells": c, "weights": rows(result.weights), "weights_raw": rows(result.weights_raw), "info": info}
    if getattr(result, "beads", None) is not None:
        kw["beads"] = rows(result.beads)
    return replace(result, **kw)


def combined_view(
    slices: Mapping[str, pd.DataFrame], z_um: Mapping[str, float], um_per_px: Mapping[str, float]
) -> pd.DataFrame:
    """The 3D table of typed cells of all slices.

    Parameters
    ----------
    slices : mapping of str to pandas.DataFrame
        Slice name -> its typed cells table (``x``, ``y`` in the slice's pixels, ``cell_type``, ...).
    z_um : mapping of str to float
        Height of each slice in micrometres.
    um_per_px : mapping of str to float
        Micrometres per pixel of each slice.

    Returns
    -------
    pandas.DataFrame
        Indexed ``<slice>:<cell id>``, columns ``slice``, ``cell_id``, ``x_um``, ``y_um``, ``z_um``, then every
        column of the per-slice tables (``x``, ``y`` stay in each slice's pixels).

    Raises
    ------
    PlatformInputError
        If ``slices`` is empty.
    """
    tables = []
    for name, cells in slices.items():
        f = float(um_per_px[name])
        c = cells.drop(columns=[k for k in ("slice", "cell_id", "x_um", "y_um", "z_um", "z") if k in cells.columns])
        c.insert(0, "z_um", float(z_um[name]))
        c.insert(0, "y_um", c["y"].to_numpy(float) * f)
        c.insert(0, "x_um", c["x"].to_numpy(float) * f)
        c.insert(0, "cell_id", c.index.astype(str))
        c.insert(0, "slice", name)
        c.index = pd.Index(name + SLICE_SEP + cells.index.astype(str), name="cell")
        tables.append(c)
    if not tables:
        raise PlatformInputError("slices: expected at least one slice")
    return pd.concat(tables)


def cross_slice_fraction(coords: np.ndarray, slice_labels, k: int = 10) -> float:
    """Fraction of k-nearest-neighbour pairs that join two different slices.

    Parameters
    ----------
    coords : numpy.ndarray
        ``(n, d)`` cell coordinates, any dimension (e.g. x, y, z in micrometres); KD-tree neighbours.
    slice_labels : array-like
        ``(n,)`` slice of each cell.
    k : int, default 10
        Neighbours per cell (capped at ``n - 1``).

    Returns
    -------
    float
        Fraction of the ``n x k`` (cell, neighbour) pairs whose slices differ; 0 for fewer than two cells.
    """
    coords = np.asarray(coords, dtype=float)
    lab = pd.factorize(pd.Index(np.asarray(slice_labels).astype(str)))[0]
    n = len(coords)
    if n < 2:
        return 0.0
    kk = min(k + 1, n)
    _, idx = cKDTree(coords).query(coords, k=kk)
    nb = idx[:, 1:]
    return float((lab[nb] != lab[:, None]).mean())
