"""Realistic benchmark slides: real mouse MOp scRNA-seq cells placed at real osmFISH cortex cell positions.

Sources (both shipped with the package, see their SOURCE.txt): the osmFISH somatosensory-cortex table
(Codeluppi et al. 2018; real positions and cell clusters) and the BICCN MOp 10x reference (11,444 cells x 500
genes, raw UMI counts, 44 subtypes in 12 classes).

How a slide is built (all steps seeded; the same arguments give identical files):

1. The valid, de-duplicated osmFISH cells keep their real positions, shrunk about the tissue by one factor so that
   Visium's 55-um spots hold ``cells_per_spot`` cells on average (real cortex sections hold ~1-15 per spot).
2. The MOp cells are split per subtype into two disjoint halves: the **reference** and the **tissue pool**.
3. Every osmFISH cell gets a MOp class from its cluster (:data:`OSMFISH_TO_MOP_CLASS`, by layer and lineage), then a
   subtype of that class drawn from a preference of its osmFISH cluster (a seeded Dirichlet around the pool's
   subtype frequencies), so subtypes are spatially coherent like the clusters; then a pool cell of that subtype
   (without replacement until the pool runs out).
4. Platform effect: each gene keeps a fraction of its molecules (binomial thinning, a per-gene capture rate,
   log-normal around ``capture_mean``); the thinned counts are the cells' true counts, spots are their sums.
5. Spots and sub-spots on Visium's lattice and the H&E-like image as for the demo (:func:`demo.layout_slide`).
   Nuclei: with ``morphology="by_type"`` each class has its own nucleus size, shape and darkness
   (:data:`NUCLEUS_MORPHOLOGY`: large pale round neurons, small dark round oligodendrocytes, elongated
   endothelial cells, ...); with ``"uniform"`` the same per-cell values are shuffled across cells, so nuclei look
   the same on average but carry no information about the type.

Files as for the demo (:class:`demo.DemoPaths`), plus ``truth_cells.obs`` columns ``cell_type`` (subtype),
``cell_class``, ``mop_cell`` (source barcode), ``osmfish_cluster``, ``nucleus_ratio``, ``nucleus_strength``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import geometry
from ..io._stores import atomic_path
from ._demo import OSMFISH_FILE, OSMFISH_UM_PER_PX, DemoPaths, _load_source, layout_slide, write_images
from ._paths import data_path

MOP_FILE = ("dot-mop-scrna", "mop_scrna_ref_500genes.h5ad")  # shipped in datasets/data
GENERATOR_VERSION = 1

# osmFISH cluster -> MOp class (motor cortex has no L4: the L4 / L3-4 pyramidal cells take the nearest IT class)
OSMFISH_TO_MOP_CLASS = {
    "Pyramidal L2-3": "L2/3",
    "Pyramidal L2-3 L5": "L2/3",
    "Pyramidal Kcnip2": "L2/3",
    "Pyramidal L3-4": "L2/3",
    "Hippocampus": "L2/3",
    "pyramidal L4": "L5",
    "Pyramidal L5": "L5",
    "Pyramidal L6": "L6",
    "Pyramidal Cpne5": "L6",
    "Inhibitory Vip": "Vip",
    "Inhibitory Pthlh": "Lamp5",
    "Inhibitory Cnr1": "Lamp5",
    "Inhibitory Kcnip2": "Pvalb",
    "Inhibitory IC": "Pvalb",
    "Inhibitory Crhbp": "Sst",
    "Inhibitory CP": "Sst",
    "Astrocyte Gfap": "Astro",
    "Astrocyte Mfge8": "Astro",
    "Ependymal": "Astro",
    "C. Plexus": "Astro",
    "Oligodendrocyte Mature": "Oligo",
    "Oligodendrocyte MF": "Oligo",
    "Oligodendrocyte NF": "Oligo",
    "Oligodendrocyte COP": "Oligo",
    "Oligodendrocyte Precursor cells": "OPC",
    "Endothelial": "Endo",
    "Endothelial 1": "Endo",
    "Pericytes": "Endo",
    "Vascular Smooth Muscle": "Endo",
    "Microglia": "Macrophage",
    "Perivascular Macrophages": "Macrophage",
}

# Nucleus per MOp class: (radius um mean, radius sd, minor/major ratio low, high, hematoxylin strength mean)
NUCLEUS_MORPHOLOGY = {
    "L2/3": (5.2, 0.45, 0.80, 1.00, 0.70),
    "L5": (5.6, 0.50, 0.80, 1.00, 0.68),
    "L6": (5.0, 0.45, 0.78, 1.00, 0.72),
    "Pvalb": (4.4, 0.40, 0.75, 0.95, 0.88),
    "Sst": (4.3, 0.40, 0.75, 0.95, 0.90),
    "Vip": (4.0, 0.35, 0.70, 0.92, 0.92),
    "Lamp5": (4.1, 0.35, 0.72, 0.95, 0.90),
    "Astro": (3.8, 0.35, 0.65, 0.90, 0.98),
    "Oligo": (3.0, 0.25, 0.85, 1.00, 1.35),
    "OPC": (3.4, 0.30, 0.70, 0.90, 1.12),
    "Endo": (3.9, 0.35, 0.32, 0.50, 1.25),
    "Macrophage": (3.2, 0.30, 0.45, 0.70, 1.30),
}


def _mean_cells_per_spot(xy_um: np.ndarray) -> float:
    """Mean number of cells in the occupied 55-um spots of a Visium lattice laid over ``xy_um``."""
    pitch, diam = geometry.VISIUM_SPOT_PITCH_UM, geometry.VISIUM_SPOT_DIAMETER_UM
    lo, hi = xy_um.min(0), xy_um.max(0)
    lat, _ = geometry.hex_lattice(lo[0] - pitch / 2, hi[0] + pitch / 2, lo[1] - pitch / 2, hi[1] + pitch / 2, pitch)
    spot, _ = geometry.assign_to_spots(xy_um, lat, diam / 2)
    n = np.bincount(spot[spot >= 0])
    return float(n[n > 0].mean())


def _split_reference(mop: ad.AnnData, rng: np.random.Generator, type_key: str) -> np.ndarray:
    """Boolean mask of reference cells: half of every subtype (the larger half), the rest is the tissue pool."""
    is_ref = np.zeros(mop.n_obs, bool)
    codes, _ = pd.factorize(mop.obs[type_key].astype(str), sort=True)
    order = rng.permutation(mop.n_obs)
    ranked = order[np.argsort(codes[order], kind="stable")]  # random order within each subtype
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank_in_type = np.arange(mop.n_obs) - np.repeat(starts, sizes)
    is_ref[ranked[rank_in_type < (sizes[codes[ranked]] + 1) // 2]] = True
    return is_ref


def _draw_pool_cells(subtype: np.ndarray, pool_type: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each tissue cell, a row of the pool with its subtype; without replacement until a subtype runs out."""
    out = np.empty(len(subtype), np.int64)
    for t in np.unique(subtype):  # one pass per subtype (<= 44), vectorised within
        need = np.flatnonzero(subtype == t)
        have = np.flatnonzero(pool_type == t)
        reps = -(-len(need) // len(have))
        rows = np.concatenate([rng.permutation(have) for _ in range(reps)])[: len(need)]
        out[need] = rows
    return out


def _thin(counts: sp.csr_matrix, capture: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Binomial thinning of integer counts, gene g keeping each molecule with probability ``capture[g]``."""
    c = counts.tocsr().astype(np.int64)
    data = rng.binomial(c.data, capture[c.indices]).astype(np.float32)
    out = sp.csr_matrix((data, c.indices, c.indptr), shape=c.shape)
    out.eliminate_zeros()
    return out


def nucleus_morphology(
    cell_class: np.ndarray, rng: np.random.Generator, mode: str = "by_type"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell nucleus radius, shape and darkness drawn from its class (:data:`NUCLEUS_MORPHOLOGY`).

    Radius ~ N(mean, sd) clipped to 2.2..7.5 um, minor / major ratio uniform in the class's range, hematoxylin
    strength = the class's mean x exp(N(0, 0.08^2)) clipped to 0.4..1.8. ``mode="uniform"`` draws the same values,
    then shuffles them across cells: the marginal distribution is unchanged but the nucleus says nothing about the
    type.

    Parameters
    ----------
    cell_class : numpy.ndarray
        ``(n,)`` MOp class of each cell (keys of :data:`NUCLEUS_MORPHOLOGY`).
    rng : numpy.random.Generator
        Source of the draws.
    mode : {"by_type", "uniform"}, default "by_type"
        Whether the nucleus follows the class.

    Returns
    -------
    radius_um : numpy.ndarray
        ``(n,)`` equivalent nucleus radius in micrometres.
    ratio : numpy.ndarray
        ``(n,)`` minor / major axis ratio.
    strength : numpy.ndarray
        ``(n,)`` hematoxylin strength.

    Raises
    ------
    ValueError
        If ``mode`` is unknown or a class has no morphology.
    """
    if mode not in ("by_type", "uniform"):
        raise ValueError(f"morphology: expected 'by_type' or 'uniform', got {mode!r}")
    unknown = sorted(set(cell_class) - set(NUCLEUS_MORPHOLOGY))
    if unknown:
        raise ValueError(f"nucleus_morphology: no morphology for classes {unknown}")
    p = np.array([NUCLEUS_MORPHOLOGY[c] for c in cell_class], dtype=float)
    n = len(cell_class)
    radius = np.clip(p[:, 0] + p[:, 1] * rng.standard_normal(n), 2.2, 7.5)
    ratio = p[:, 2] + (p[:, 3] - p[:, 2]) * rng.uniform(0, 1, n)
    strength = np.clip(p[:, 4] * np.exp(0.08 * rng.standard_normal(n)), 0.4, 1.8)
    if mode == "uniform":
        perm = rng.permutation(n)
        radius, ratio, strength = radius[perm], ratio[perm], strength[perm]
    return radius, ratio, strength


def build_realistic_slide(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    cells_per_spot: float = 6.5,
    morphology: str = "by_type",
    um_per_px: float = 0.8,
    capture_mean: float = 0.6,
    capture_sd: float = 0.35,
    crop_um: tuple[float, float, float, float] | None = None,
    subtype_concentration: float = 2.0,
    osmfish_source: str | os.PathLike | None = None,
    mop_source: str | os.PathLike | None = None,
) -> DemoPaths:
    """Build a realistic Visium-like slide with ground truth into ``out_dir``, atomically.

    Real BICCN MOp scRNA-seq cells (500 genes, 44 subtypes in 12 classes) are placed at the real osmFISH cortex cell
    positions (shrunk so that 55-um spots hold ``cells_per_spot`` cells on average): each position gets a MOp class
    from its osmFISH cluster (:data:`OSMFISH_TO_MOP_CLASS`), a subtype from a seeded Dirichlet preference of the
    cluster, and a cell of that subtype from the tissue pool (the MOp cells not in the reference). Counts are
    binomially thinned with a per-gene capture rate (the platform effect); spots, sub-spots and the H&E-like image
    follow the demo. The reference is disjoint from the tissue cells. Same arguments -> identical files.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to create (replaced atomically if it exists).
    seed : int, default 0
        Seed of every random step (recorded).
    cells_per_spot : float, default 6.5
        Target mean number of cells per occupied spot (> 0).
    morphology : {"by_type", "uniform"}, default "by_type"
        Nuclei follow the class (:data:`NUCLEUS_MORPHOLOGY`), or carry the same values shuffled across cells.
    um_per_px : float, default 0.8
        Micrometres per full-resolution pixel of the image.
    capture_mean : float, default 0.6
        Mean per-gene capture rate, in (0, 1].
    capture_sd : float, default 0.35
        Log-normal spread of the capture rates across genes (rates clipped to 0.02..1).
    crop_um : tuple of float, optional
        ``(x0, y0, x1, y1)``: keep the cells inside this window (micrometres of the shrunk tissue, which starts at a
        60-um margin) for small test slides.
    subtype_concentration : float, default 2.0
        Concentration of the Dirichlet around the pool's subtype frequencies (lower = clusters prefer fewer
        subtypes).
    osmfish_source : str or os.PathLike, optional
        The osmFISH h5ad; default the packaged copy.
    mop_source : str or os.PathLike, optional
        The MOp reference h5ad; default the packaged copy.

    Returns
    -------
    DemoPaths
        The paths of the files written (as for :func:`build_demo`; ``truth_cells.obs`` also has ``cell_class``,
        ``mop_cell``, ``osmfish_cell``, ``osmfish_cluster``, ``nucleus_ratio``, ``nucleus_strength``).

    Raises
    ------
    ValueError
        If ``cells_per_spot`` or ``capture_mean`` is out of range, a source lacks a column or maps no class, the
        crop keeps fewer than 20 cells, or ``morphology`` is unknown.
    FileNotFoundError
        If a source file is missing.

    Examples
    --------
    >>> import tempfile
    >>> import anndata as ad
    >>> from spatial_assets.datasets import build_realistic_slide
    >>> paths = build_realistic_slide(tempfile.mkdtemp() + "/slide", seed=3, crop_um=(0.0, 600.0, 700.0, 1300.0))
    >>> ad.read_h5ad(paths.reference).obs["cell_type"].nunique()
    44
    """
    if cells_per_spot <= 0:
        raise ValueError(f"cells_per_spot: expected > 0, got {cells_per_spot}")
    if not 0 < capture_mean <= 1:
        raise ValueError(f"capture_mean: expected a fraction in (0, 1], got {capture_mean}")
    rng = np.random.default_rng(seed)
    osmfish_source = Path(osmfish_source) if osmfish_source is not None else data_path(*OSMFISH_FILE)
    mop_source = Path(mop_source) if mop_source is not None else data_path(*MOP_FILE)
    osm = _load_source(osmfish_source)
    if not Path(mop_source).exists():
        raise FileNotFoundError(
            f"{mop_source}: MOp reference not found (expected the h5ad shipped in spatial_assets/datasets/data/dot-mop-scrna)"
        )
    mop = ad.read_h5ad(mop_source)
    for col in ("cell_type", "cell_class"):
        if col not in mop.obs:
            raise ValueError(f"{mop_source}: obs column '{col}' missing")
    cluster = osm.obs["ClusterName"].astype(str).to_numpy()
    unmapped = sorted(set(cluster) - set(OSMFISH_TO_MOP_CLASS))
    if unmapped:
        raise ValueError(f"{osmfish_source}: osmFISH clusters without a MOp class: {unmapped}")

    # 1. positions: shrink the real tissue to the wanted density (cells per spot scale as 1 / shrink^2)
    xy = np.asarray(osm.obsm["spatial"], dtype=float) * OSMFISH_UM_PER_PX
    xy -= xy.min(0)
    shrink = float(np.sqrt(_mean_cells_per_spot(xy) / cells_per_spot))
    margin = 60.0
    xy = xy * shrink + margin
    keep = np.ones(len(xy), bool)
    if crop_um is not None:
        x0, y0, x1, y1 = crop_um
        keep = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
        if keep.sum() < 20:
            raise ValueError(f"crop_um={crop_um}: only {int(keep.sum())} cells inside; choose a larger window")
        xy = xy[keep] - np.array([x0, y0]) + margin
    cluster = cluster[keep]
    osm_ids = osm.obs_names[keep].astype(str)

    # 2. reference / tissue pool
    is_ref = _split_reference(mop, rng, "cell_type")
    sub_all = mop.obs["cell_type"].astype(str).to_numpy()
    cls_all = mop.obs["cell_class"].astype(str).to_numpy()
    pool = np.flatnonzero(~is_ref)
    pool_type = sub_all[pool]

    # 3. class -> subtype (cluster-specific preference) -> pool cell
    cell_class = np.array([OSMFISH_TO_MOP_CLASS[c] for c in cluster])
    subtype = np.empty(len(cluster), dtype=object)
    for c in np.unique(cluster):  # one pass per osmFISH cluster (31)
        k = OSMFISH_TO_MOP_CLASS[c]
        subs, freq = np.unique(pool_type[cls_all[pool] == k], return_counts=True)
        pref = rng.dirichlet(subtype_concentration * len(subs) * freq / freq.sum())
        rows = np.flatnonzero(cluster == c)
        subtype[rows] = subs[rng.choice(len(subs), size=len(rows), p=pref)]
    subtype = subtype.astype(str)
    chosen = pool[_draw_pool_cells(subtype, pool_type, rng)]

    # 4. platform effect by gene-wise capture
    genes = pd.Index(mop.var_names.astype(str))
    capture = np.clip(
        capture_mean * np.exp(capture_sd * rng.standard_normal(len(genes)) - capture_sd**2 / 2), 0.02, 1.0
    )
    counts = _thin(sp.csr_matrix(mop.X)[chosen], capture, rng)

    # 5. nuclei, spots, image
    radius_um, ratio, strength = nucleus_morphology(cell_class, rng, morphology)
    cell_ids = pd.Index([f"cell{i:05d}" for i in range(len(chosen))], name="cell_id")
    extra = pd.DataFrame(
        {
            "cell_type": pd.Categorical(subtype),
            "cell_class": pd.Categorical(cell_class),
            "mop_cell": mop.obs_names[chosen].astype(str),
            "osmfish_cell": osm_ids,
            "osmfish_cluster": cluster,
            "nucleus_ratio": ratio,
            "nucleus_strength": strength,
        },
        index=cell_ids,
    )
    slide, truth_cells, truth_sub, image, labels, info = layout_slide(
        xy,
        counts,
        genes,
        extra,
        radius_um,
        rng,
        um_per_px=um_per_px,
        margin=margin,
        seed=seed,
        source_note="spatial_assets realistic slide (MOp cells at osmFISH positions)",
        ratio=ratio,
        strength=strength,
    )
    truth_cells.var["capture_rate"] = capture
    ref = ad.AnnData(
        X=sp.csr_matrix(mop.X)[np.flatnonzero(is_ref)].astype(np.float32),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(sub_all[is_ref]), "cell_class": pd.Categorical(cls_all[is_ref])},
            index=pd.Index(mop.obs_names[is_ref].astype(str), name="cell_id"),
        ),
        var=pd.DataFrame(index=genes),
    )
    ref.uns["realistic"] = {"seed": seed, "role": "reference"}
    info = {
        "generator": "realistic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "cells_per_spot_target": cells_per_spot,
        "morphology": morphology,
        "um_per_px": um_per_px,
        "capture_mean": capture_mean,
        "capture_sd": capture_sd,
        "shrink": shrink,
        "crop_um": list(crop_um) if crop_um else None,
        "subtype_concentration": subtype_concentration,
        "n_reference_cells": int(is_ref.sum()),
        "n_pool_cells": int(len(pool)),
        "n_pool_cells_reused": int(len(chosen) - len(np.unique(chosen))),
        **info,
    }
    paths = DemoPaths.at(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        p = DemoPaths.at(tmp)
        slide.write_h5ad(p.slide)
        ref.write_h5ad(p.reference)
        truth_cells.write_h5ad(p.truth_cells)
        truth_sub.write_h5ad(p.truth_subspots)
        write_images(p, image, labels, um_per_px)
        p.info.write_text(json.dumps(info, indent=2))
    return paths
