"""SpatialScope's other platforms: Slide-seq beads, MERFISH-like imaging, several aligned slices (3D).

* Image-free platforms: :func:`cells_from_spots` (one cell per spot / bead / imaged cell).
* Slide-seq: :func:`cells_from_beads` turns RCTD doublet-mode calls (:mod:`spatial_assets.doublets`) into 1 or 2
  cells per bead (rejects dropped); :func:`simulate_beads` builds a bead set with ground truth from real cells
  (each bead = 1 real cell, or 2 neighbouring real cells of different types); :func:`evaluate_beads` scores calls.
* Imaging (MERFISH and alike): every cell is its own spot with a small measured panel; model genes absent from the
  slide get no spot term in the decomposition and are imputed. :func:`simulate_imaging_sample` measures real cells
  on a gene subset; :func:`imputation_scores` compares imputed genes with the real counts (and two baselines);
  :func:`integer_counts` rounds non-integer (e.g. volume-normalised) imaging counts for RCTD.
* 3D: :func:`stack_slices` joins the slices of a group into one slide / cells table in micrometres with a ``z``
  column (cell typing then finds its Potts neighbours in 3D), :func:`unstack_result` takes one slice back out,
  :func:`combined_view` is the 3D table of all slices, :func:`cross_slice_fraction` measures 3D neighbourhoods.

All vectorised (KD-trees, bincount, sparse products). Randomness is seeded and recorded. No dagster import.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .metrics import pearson_columns
from .geometry import VISIUM_SPOT_DIAMETER_UM

__all__ = [
    "PlatformInputError", "SLICE_SEP", "cells_from_spots", "cells_from_beads", "microns_per_pixel", "integer_counts",
    "simulate_beads", "evaluate_beads", "simulate_imaging_sample", "imputation_scores", "stack_slices",
    "unstack_result", "combined_view", "cross_slice_fraction",
]

SLICE_SEP = ":"  # joins slice (sample) and spot / cell names in stacked slices; sample names never contain it


class PlatformInputError(ValueError):
    """Bad input to a platform helper; the message names the input / field and what was expected vs found."""


# ------------------------------------------------------------------------------------------------ image-free cells
def cells_from_spots(slide: ad.AnnData, platform: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One cell per spot at the spot's position (cell id ``<spot>_0``): the cells table of image-free platforms.

    Slide-seq doublets are split into two cells later, by cell typing's doublet mode.
    """
    xy = np.asarray(slide.obsm["spatial"], dtype=float)[:, :2]
    names = slide.obs_names.astype(str)
    cells = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "area": np.nan, "label": np.arange(1, len(names) + 1),
                          "spot": names, "spot_distance": 0.0}, index=pd.Index(names + "_0", name="cell_id"))
    umi = np.asarray(slide.X.sum(1)).ravel()
    spots = pd.DataFrame({"n_cells": 1, "n_cells_raw": 1, "total_umi": umi, "qc_pass": umi > 0},
                         index=pd.Index(names, name="spot"))
    summary = {"cells_kept": len(cells), "cells_outside_spots": 0, "spots_filtered": int((umi <= 0).sum()),
               "platform": platform}
    return cells, spots, summary


def cells_from_beads(beads: pd.DataFrame, bead_xy, *, offset: float | None = None, seed: int = 0,
                     bead_z=None) -> tuple[pd.DataFrame, dict]:
    """Cells of Slide-seq beads from RCTD doublet-mode calls: a singlet bead -> one cell ``<bead>_0`` of its first
    type at the bead; a doublet (certain or uncertain) -> ``<bead>_0`` (first type) and ``<bead>_1`` (second type),
    ``offset`` apart on either side of the bead along a random (seeded) direction; rejected beads give no cell.

    ``beads``: index bead names, columns spot_class, first_type, second_type (+ optional confidence_first /
    confidence_second, n_candidates); ``bead_xy`` (n_beads, 2) aligned with ``beads`` (or a DataFrame with x, y
    indexed by bead); ``bead_z`` optional (n_beads,) heights copied to a ``z`` column. ``offset`` None = a quarter
    of the median nearest-bead distance (~2.5 um for 10-um Slide-seq beads). Returns (cells, info).
    """
    need = [c for c in ("spot_class", "first_type", "second_type") if c not in beads.columns]
    if need:
        raise PlatformInputError(f"beads: missing column(s) {need}; expected RCTD doublet-mode calls "
                                 f"(found {list(beads.columns)})")
    if isinstance(bead_xy, pd.DataFrame):
        missing = beads.index[~beads.index.isin(bead_xy.index)]
        if len(missing):
            raise PlatformInputError(f"bead_xy: no position for {len(missing)} bead(s), e.g. {list(missing[:3])}")
        xy = bead_xy.loc[beads.index, ["x", "y"]].to_numpy(dtype=float)
    else:
        xy = np.asarray(bead_xy, dtype=float)
    if xy.shape != (len(beads), 2):
        raise PlatformInputError(f"bead_xy: expected shape ({len(beads)}, 2) aligned with beads, found {xy.shape}")
    cls = beads["spot_class"].astype(str).to_numpy()
    bad = sorted(set(cls) - {"reject", "singlet", "doublet_certain", "doublet_uncertain"})
    if bad:
        raise PlatformInputError(f"beads['spot_class']: unknown class(es) {bad}; expected reject, singlet, "
                                 "doublet_certain or doublet_uncertain")
    if offset is None:
        if len(xy) > 1:
            d = cKDTree(xy).query(xy, k=2)[0][:, 1]
            offset = 0.25 * float(np.median(d[np.isfinite(d)]))
        else:
            offset = 1.0
    rng = np.random.default_rng(seed)
    keep = cls != "reject"
    dbl = np.isin(cls, ("doublet_certain", "doublet_uncertain"))
    n_cells = np.where(dbl, 2, np.where(keep, 1, 0))
    bi = np.repeat(np.arange(len(beads)), n_cells)
    k = np.arange(len(bi)) - np.repeat(np.cumsum(n_cells) - n_cells, n_cells)
    theta = rng.uniform(0, 2 * np.pi, len(beads))
    u = np.stack([np.cos(theta), np.sin(theta)], 1)
    sign = np.where(dbl[bi], np.where(k == 0, -0.5, 0.5), 0.0)
    pos = xy[bi] + sign[:, None] * offset * u[bi]
    names = beads.index.astype(str).to_numpy()
    first = beads["first_type"].astype(str).to_numpy()
    second = beads["second_type"].astype(str).to_numpy()
    conf1 = beads["confidence_first"].to_numpy(float) if "confidence_first" in beads else np.full(len(beads), np.nan)
    conf2 = beads["confidence_second"].to_numpy(float) if "confidence_second" in beads else np.full(len(beads), np.nan)
    cells = pd.DataFrame({
        "x": pos[:, 0], "y": pos[:, 1], "spot": names[bi],
        "cell_type": np.where(k == 0, first[bi], second[bi]),
        "confidence": np.where(k == 0, conf1[bi], conf2[bi]),
        "spot_class": cls[bi], "bead_cell": k.astype(np.int64),
    }, index=pd.Index(np.char.add(np.char.add(names[bi].astype(str), "_"), k.astype(str)), name="cell_id"))
    if "n_candidates" in beads:
        cells["n_candidates"] = beads["n_candidates"].to_numpy()[bi]
    if bead_z is not None:
        z = np.asarray(bead_z, dtype=float).reshape(-1)
        if len(z) != len(beads):
            raise PlatformInputError(f"bead_z: expected {len(beads)} values, found {len(z)}")
        cells["z"] = z[bi]
    info = {"beads": int(len(beads)), "cells": int(len(cells)), "doublet_beads": int(dbl.sum()),
            "rejected_beads": int((~keep).sum()), "offset": float(offset), "seed": int(seed)}
    return cells, info


# ------------------------------------------------------------------------------------------------ units and counts
def microns_per_pixel(slide: ad.AnnData, platform: str = "visium") -> tuple[float, str]:
    """Micrometres per coordinate unit of ``obsm['spatial']``, and how it was found.

    ``uns['spatial'][lib]['scalefactors']['microns_per_pixel']`` when present; else for Visium 55 um /
    ``spot_diameter_fullres``; else 1 (image-free platforms whose coordinates are usually micrometres).
    """
    lib = next(iter(slide.uns.get("spatial", {}) or {}), None)
    sf = (slide.uns["spatial"][lib].get("scalefactors", {}) if lib is not None else {}) or {}
    if "microns_per_pixel" in sf and float(sf["microns_per_pixel"]) > 0:
        return float(sf["microns_per_pixel"]), "scalefactors['microns_per_pixel']"
    if platform == "visium" and float(sf.get("spot_diameter_fullres", 0) or 0) > 0:
        return VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"]), "55 um / spot_diameter_fullres"
    return 1.0, "assumed: coordinates in micrometres"


def integer_counts(slide: ad.AnnData) -> tuple[ad.AnnData, dict]:
    """The slide with X rounded to integers (imaging panels are often volume-normalised); info says how many
    values changed and the largest change. A copy only when something changes."""
    X = slide.X
    vals = X.data if sp.issparse(X) else np.asarray(X)
    r = np.round(vals)
    changed = int(np.count_nonzero(r != vals))
    info = {"values_rounded": changed, "max_rounding": float(np.abs(r - vals).max()) if vals.size else 0.0}
    if changed == 0:
        return slide, info
    out = slide.copy()
    if sp.issparse(out.X):
        out.X = out.X.copy()
        out.X.data = np.round(out.X.data).astype(out.X.dtype)
        out.X.eliminate_zeros()
    else:
        out.X = np.round(np.asarray(out.X)).astype(np.float32)
    return out, info


# ------------------------------------------------------------------------------------------------ Slide-seq simulation
def _xy_um(cells: ad.AnnData, um_per_px: float | None) -> np.ndarray:
    if {"x_um", "y_um"} <= set(cells.obs.columns):
        return cells.obs[["x_um", "y_um"]].to_numpy(dtype=float)
    if {"x", "y"} <= set(cells.obs.columns):
        return cells.obs[["x", "y"]].to_numpy(dtype=float) * float(um_per_px or 1.0)
    raise PlatformInputError("cells.obs: expected columns x_um, y_um (or x, y) with cell positions")


def simulate_beads(cells: ad.AnnData, *, type_key: str = "cell_type", doublet_fraction: float = 0.35,
                   max_pair_distance_um: float = 30.0, n_beads: int | None = None,
                   second_fraction: tuple[float, float] = (1.0, 1.0), bead_diameter_um: float = 10.0,
                   um_per_px: float | None = None, class_key: str | None = "cell_class",
                   random_positions: bool = False, pair_by: str = "type",
                   seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    """A Slide-seq-like bead set whose beads are real cells: a singlet bead holds one cell, a doublet bead two
    neighbouring cells of different types (the second one's counts binomially thinned by a factor drawn from
    ``second_fraction``; (1, 1) = the plain sum).

    ``cells``: real cells x genes (raw counts), ``obs`` with positions (x_um, y_um, or x, y in px times
    ``um_per_px``) and ``type_key``. About ``doublet_fraction`` of the beads are doublets: anchor cells pair with
    their nearest cell of another type within ``max_pair_distance_um`` (each cell used once; conflicts resolved in
    random order, so the realised fraction is a bit lower and reported). ``n_beads``: keep a random subset. Beads
    sit at the cell (singlet) or the pair's midpoint, coordinates in micrometres (microns_per_pixel 1).
    ``pair_by="class"``: doublet partners must differ in class (``class_key``), not only in type.
    ``random_positions``: for cells without positions (dissociated scRNA-seq), scatter them uniformly at random at
    the density of a tissue section (one cell per 15 x 15 um), so doublet partners are random cells of another type.

    Returns (slide AnnData beads x genes with obsm['spatial'] and Visium-style scale factors, truth DataFrame
    indexed by bead: n_cells, type1, type2 ('' for singlets), class1, class2, cell1, cell2, second_fraction).
    """
    if type_key not in cells.obs:
        raise PlatformInputError(f"cells.obs: no cell-type column '{type_key}' (found {list(cells.obs.columns)})")
    if not 0 <= doublet_fraction < 1:
        raise PlatformInputError(f"doublet_fraction: expected 0 <= f < 1, found {doublet_fraction}")
    lo, hi = second_fraction
    if not 0 < lo <= hi <= 1:
        raise PlatformInputError(f"second_fraction: expected 0 < lo <= hi <= 1, found {second_fraction}")
    rng = np.random.default_rng(seed)
    if random_positions:
        side = 15.0 * np.sqrt(cells.n_obs)
        xy = rng.uniform(0, side, (cells.n_obs, 2))
    else:
        xy = _xy_um(cells, um_per_px)
    n = len(xy)
    types = cells.obs[type_key].astype(str).to_numpy()
    classes = cells.obs[class_key].astype(str).to_numpy() if class_key and class_key in cells.obs else types
    names = cells.obs_names.astype(str).to_numpy()
    # anchors and their partners (nearest cell of another type), conflicts resolved in random order
    n_anchor = int(round(n * doublet_fraction / (1 + doublet_fraction)))
    anchors = rng.permutation(n)[:n_anchor]
    is_anchor = np.zeros(n, bool)
    is_anchor[anchors] = True
    kq = min(24, n)
    dist, nb = cKDTree(xy).query(xy[anchors], k=kq)
    if pair_by not in ("type", "class"):
        raise PlatformInputError(f"pair_by: expected 'type' or 'class', found '{pair_by}'")
    key = classes if pair_by == "class" else types
    nbc = np.minimum(nb, n - 1)
    ok = (key[nbc] != key[anchors, None]) & (dist <= max_pair_distance_um) & ~is_anchor[nbc] & (nb < n)
    has = ok.any(1)
    partner = np.where(has, nb[np.arange(len(anchors)), ok.argmax(1)], -1)
    a_ok, p_ok = anchors[has], partner[has]
    _, first_use = np.unique(p_ok, return_index=True)  # anchors come in random order: first claim wins
    a_ok, p_ok = a_ok[np.sort(first_use)], p_ok[np.sort(first_use)]
    used = np.zeros(n, bool)
    used[a_ok] = True
    used[p_ok] = True
    singles = np.flatnonzero(~used)
    X = sp.csr_matrix(cells.X, dtype=np.float64)
    frac = rng.uniform(lo, hi, len(a_ok)) if hi > lo else np.full(len(a_ok), lo)
    second = X[p_ok]
    if hi < 1 or lo < 1:
        second = second.tocoo()
        second = sp.csr_matrix((rng.binomial(second.data.astype(np.int64), frac[second.row]).astype(np.float64),
                                (second.row, second.col)), shape=second.shape)
    Xd = X[a_ok] + second
    Xs = X[singles]
    counts = sp.vstack([Xs, Xd]).tocsr()
    counts.eliminate_zeros()
    nb_ = len(singles) + len(a_ok)
    bead_xy = np.vstack([xy[singles], 0.5 * (xy[a_ok] + xy[p_ok])])
    truth = pd.DataFrame({
        "n_cells": np.r_[np.ones(len(singles), int), np.full(len(a_ok), 2)],
        "type1": np.r_[types[singles], types[a_ok]], "type2": np.r_[np.full(len(singles), ""), types[p_ok]],
        "class1": np.r_[classes[singles], classes[a_ok]], "class2": np.r_[np.full(len(singles), ""), classes[p_ok]],
        "cell1": np.r_[names[singles], names[a_ok]], "cell2": np.r_[np.full(len(singles), ""), names[p_ok]],
        "second_fraction": np.r_[np.full(len(singles), np.nan), frac],
    })
    order = rng.permutation(nb_)
    if n_beads is not None:
        order = order[: int(n_beads)]
    keep_rows = order[np.asarray(counts[order].sum(1)).ravel() > 0]
    bead_names = np.array([f"bead{i:05d}" for i in range(len(keep_rows))])
    truth = truth.iloc[keep_rows].set_index(pd.Index(bead_names, name="bead"))
    slide = ad.AnnData(X=counts[keep_rows].astype(np.float32), obs=pd.DataFrame(index=pd.Index(bead_names)),
                       var=pd.DataFrame(index=cells.var_names.astype(str)))
    slide.obsm["spatial"] = bead_xy[keep_rows]
    slide.uns["spatial"] = {"beads": {"scalefactors": {"spot_diameter_fullres": float(bead_diameter_um),
                                                       "microns_per_pixel": 1.0}}}
    slide.uns["simulation"] = {"kind": "slide-seq beads from real cells", "seed": int(seed),
                               "doublet_fraction_target": float(doublet_fraction),
                               "doublet_fraction": float((truth["n_cells"] == 2).mean()) if len(truth) else 0.0,
                               "max_pair_distance_um": float(max_pair_distance_um),
                               "second_fraction": [float(lo), float(hi)], "source_cells": int(n),
                               "random_positions": bool(random_positions), "pair_by": pair_by}
    return slide, truth


def evaluate_beads(beads: pd.DataFrame, truth: pd.DataFrame, type_class: Mapping[str, str] | None = None) -> dict:
    """Doublet-mode calls against the truth of :func:`simulate_beads` (beads matched by index).

    Singlet/doublet accuracy over non-rejected beads (certain and uncertain doublets count as doublets), reject
    rate, and type recovery: per bead the multiset intersection of true types and called types (singlet -> the
    first type; doublet -> both); ``type_recall`` = matched / true cells, ``type_precision`` = matched / called
    cells; ``singlet_type_accuracy`` = true singlets called singlet with the right type / true singlets;
    ``doublet_evidence_auc``: how well the beads' doublet evidence ranks true doublets above singlets. With
    ``type_class`` (type -> class), recall / precision also at the class level (truth columns class1, class2).
    """
    common = beads.index.intersection(truth.index)
    if len(common) == 0:
        raise PlatformInputError(f"beads / truth: no bead names in common (e.g. {list(beads.index[:3])} vs "
                                 f"{list(truth.index[:3])})")
    b, t = beads.loc[common], truth.loc[common]
    cls = b["spot_class"].astype(str).to_numpy()
    rej = cls == "reject"
    called_dbl = np.isin(cls, ("doublet_certain", "doublet_uncertain"))
    true_dbl = t["n_cells"].to_numpy() == 2
    kept = ~rej
    f1, f2 = b["first_type"].astype(str).to_numpy(), b["second_type"].astype(str).to_numpy()
    t1, t2 = t["type1"].astype(str).to_numpy(), t["type2"].astype(str).to_numpy()

    def recovery(p1, p2, q1, q2):
        p2 = np.where(called_dbl, p2, "\x00p")
        q2 = np.where(true_dbl, q2, "\x00q")
        m1 = (p1 == q1) | (p1 == q2)
        # second called type matches the remaining true type (multiset intersection of two pairs)
        rest = np.where(p1 == q1, q2, np.where(p1 == q2, q1, "\x00r"))
        m2 = np.where(m1, p2 == rest, (p2 == q1) | (p2 == q2))
        matched = (m1.astype(int) + m2.astype(int))[kept]
        n_true = np.where(true_dbl, 2, 1)[kept]
        n_called = np.where(called_dbl, 2, 1)[kept]
        return matched, n_true, n_called

    matched, n_true, n_called = recovery(f1, f2, t1, t2)
    true_single = ~true_dbl
    out = {
        "beads": int(len(common)), "true_doublet_fraction": float(true_dbl.mean()),
        "reject_rate": float(rej.mean()),
        "class_accuracy": float((called_dbl == true_dbl)[kept].mean()) if kept.any() else float("nan"),
        "doublet_recall": float(called_dbl[true_dbl & kept].mean()) if (true_dbl & kept).any() else float("nan"),
        "singlet_recall": float((~called_dbl)[true_single & kept].mean()) if (true_single & kept).any()
        else float("nan"),
        "type_recall": float(matched.sum() / max(n_true.sum(), 1)),
        "type_precision": float(matched.sum() / max(n_called.sum(), 1)),
        "singlet_type_accuracy": float(((cls == "singlet") & (f1 == t1))[true_single].mean())
        if true_single.any() else float("nan"),
        "doublet_first_type_accuracy": float(((f1 == t1) | (f1 == t2))[true_dbl & kept].mean())
        if (true_dbl & kept).any() else float("nan"),
        "called": {c: int((cls == c).sum()) for c in ("singlet", "doublet_certain", "doublet_uncertain", "reject")},
    }
    if "doublet_evidence" in b.columns and 0 < true_dbl.sum() < len(true_dbl):
        # AUC of the doublet evidence (log-likelihood gain of a second type) for true doublets vs singlets
        from scipy.stats import rankdata

        r = rankdata(b["doublet_evidence"].to_numpy(float))
        n1, n0 = int(true_dbl.sum()), int((~true_dbl).sum())
        out["doublet_evidence_auc"] = float((r[true_dbl].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    if type_class is not None and {"class1", "class2"} <= set(t.columns):
        tc = {str(k): str(v) for k, v in dict(type_class).items()}
        m, nt, nc = recovery(np.array([tc.get(x, x) for x in f1]), np.array([tc.get(x, x) for x in f2]),
                             t["class1"].astype(str).to_numpy(), t["class2"].astype(str).to_numpy())
        out["class_level_type_recall"] = float(m.sum() / max(nt.sum(), 1))
        out["class_level_type_precision"] = float(m.sum() / max(nc.sum(), 1))
    return out


# ------------------------------------------------------------------------------------------------ imaging (MERFISH)
def simulate_imaging_sample(cells: ad.AnnData, *, n_measured: int | None = None,
                            measured_genes: Sequence[str] | None = None, um_per_px: float = 1.0,
                            cell_diameter_um: float = 10.0, seed: int = 0) -> tuple[ad.AnnData, list[str]]:
    """An imaging-based sample from real cells: every cell is a spot measured on a gene subset.

    ``cells``: cells x genes raw counts with ``obs`` x, y (px, times ``um_per_px`` = micrometres); either
    ``measured_genes`` or ``n_measured`` (a seeded random panel). Returns (slide: cells x measured genes, obs names =
    cell ids, obsm['spatial'] = (x, y) px, scale factors with microns_per_pixel; the held-out genes).
    """
    genes = pd.Index(cells.var_names.astype(str))
    if measured_genes is None:
        if n_measured is None or not 1 <= int(n_measured) < len(genes):
            raise PlatformInputError(f"n_measured: expected 1 <= n < {len(genes)} (genes of cells), found {n_measured}")
        rng = np.random.default_rng(seed)
        measured = list(genes[np.sort(rng.permutation(len(genes))[: int(n_measured)])])
    else:
        measured = [str(g) for g in measured_genes]
        missing = [g for g in measured if g not in genes]
        if missing:
            raise PlatformInputError(f"measured_genes: {missing[:5]} are not genes of cells ({len(missing)} missing)")
    held = [g for g in genes if g not in set(measured)]
    if not {"x", "y"} <= set(cells.obs.columns):
        raise PlatformInputError(f"cells.obs: expected columns x, y (px), found {list(cells.obs.columns)}")
    X = sp.csr_matrix(cells[:, measured].X, dtype=np.float32)
    slide = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(cells.obs_names.astype(str))),
                       var=pd.DataFrame(index=pd.Index(measured)))
    slide.obsm["spatial"] = cells.obs[["x", "y"]].to_numpy(dtype=float)
    slide.uns["spatial"] = {"imaging": {"scalefactors": {"spot_diameter_fullres": cell_diameter_um / um_per_px,
                                                         "microns_per_pixel": float(um_per_px)}}}
    slide.uns["simulation"] = {"kind": "imaging sample from real cells", "seed": int(seed),
                               "measured_genes": measured, "held_out_genes": held}
    return slide, held


def imputation_scores(decomposed: ad.AnnData, truth: ad.AnnData, genes: Sequence[str], *,
                      reference: ad.AnnData | None = None, reference_type_key: str = "cell_type") -> dict:
    """Imputed genes against real counts, per gene (Pearson r across cells), on the raw count scale.

    ``decomposed``: the decomposition's cells (obs spot_scale, cell_type; var platform_effect, in_slide; X in the
    reference scale), brought back to counts by ``X x platform_effect / spot_scale``; ``truth``: real counts of the
    same cells (obs names = the decomposition's cell ids or their spot names, as for one-cell spots). Baselines
    (with ``reference``): each cell = its library (its total over the measured genes) times the reference's
    pooled mean profile ('mean' baseline, library size only) or its called type's mean profile ('type_mean'),
    each normalised over the measured genes. Returns per-gene r (linear and log1p), their medians, and
    ``r_pooled_log1p`` (over all cell x gene entries: also scores each gene's level).
    """
    genes = [str(g) for g in genes]
    miss = [g for g in genes if g not in decomposed.var_names or g not in truth.var_names]
    if miss:
        raise PlatformInputError(f"genes: {miss[:5]} are not in both the decomposition and the truth")
    ids = decomposed.obs_names.astype(str)
    pos = truth.obs_names.get_indexer(ids)
    if (pos < 0).any() and "spot" in decomposed.obs:
        alt = truth.obs_names.get_indexer(decomposed.obs["spot"].astype(str))
        pos = np.where(pos < 0, alt, pos)
    ok = pos >= 0
    if not ok.any():
        raise PlatformInputError(f"truth: no cells in common with the decomposition (e.g. {list(ids[:3])} vs "
                                 f"{list(truth.obs_names[:3])})")
    gi = decomposed.var_names.get_indexer(genes)
    pred = np.asarray(decomposed.X[ok][:, gi] if not sp.issparse(decomposed.X) else decomposed.X[ok][:, gi].toarray(),
                      dtype=np.float64)
    be = decomposed.var["platform_effect"].to_numpy(float)[gi] if "platform_effect" in decomposed.var else 1.0
    scale = decomposed.obs["spot_scale"].to_numpy(float)[ok] if "spot_scale" in decomposed.obs else np.ones(ok.sum())
    pred = pred * be / scale[:, None]
    tX = truth.X[pos[ok]]
    T = np.asarray(tX.toarray() if sp.issparse(tX) else tX, dtype=np.float64)[:, truth.var_names.get_indexer(genes)]
    fin = np.isfinite(pred).all(1)
    pred, T = pred[fin], T[fin]
    out = {"cells": int(len(T)), "genes": genes}
    r = pearson_columns(pred, T)
    rl = pearson_columns(np.log1p(np.maximum(pred, 0)), np.log1p(T))
    pooled = pearson_columns(np.log1p(np.maximum(pred, 0)).reshape(-1, 1), np.log1p(T).reshape(-1, 1))[0]
    out.update(r=dict(zip(genes, map(float, r))), r_log1p=dict(zip(genes, map(float, rl))),
               r_median=float(np.nanmedian(r)), r_log1p_median=float(np.nanmedian(rl)),
               r_pooled_log1p=float(pooled))
    if reference is not None:
        if reference_type_key not in reference.obs:
            raise PlatformInputError(f"reference.obs: no column '{reference_type_key}'")
        measured = [g for g in decomposed.var_names[decomposed.var["in_slide"].to_numpy(bool)]
                    if g in truth.var_names and g in reference.var_names and g not in set(genes)] \
            if "in_slide" in decomposed.var else []
        if not measured:
            raise PlatformInputError("decomposed.var['in_slide']: no measured genes to scale the baselines by")
        R = sp.csr_matrix(reference.X, dtype=np.float64)
        lib = np.asarray(R.sum(1)).ravel()
        Rn = sp.diags(1.0 / np.where(lib > 0, lib, 1)) @ R
        rtypes = reference.obs[reference_type_key].astype(str).to_numpy()
        tn, codes = np.unique(rtypes, return_inverse=True)
        M = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(tn), len(codes)))
        prof = np.asarray((M @ Rn).todense()) / np.bincount(codes)[:, None]  # types x genes
        pooled = np.asarray(Rn.mean(0)).ravel()
        rg = reference.var_names.get_indexer(genes)
        rm = reference.var_names.get_indexer(measured)
        Tm = truth.X[pos[ok]][:, truth.var_names.get_indexer(measured)]
        obs_lib = np.asarray(Tm.sum(1)).ravel()[fin]
        base_mean = obs_lib[:, None] * pooled[rg][None, :] / max(pooled[rm].sum(), 1e-30)
        called = decomposed.obs["cell_type"].astype(str).to_numpy()[ok][fin]
        ti = pd.Index(tn).get_indexer(called)
        P = np.where(ti[:, None] >= 0, prof[np.maximum(ti, 0)], pooled[None, :])
        base_type = obs_lib[:, None] * P[:, rg] / np.maximum(P[:, rm].sum(1, keepdims=True), 1e-30)
        for name, b in (("mean", base_mean), ("type_mean", base_type)):
            rb = pearson_columns(b, T)
            rbl = pearson_columns(np.log1p(b), np.log1p(T))
            out[f"baseline_{name}_r"] = dict(zip(genes, map(float, rb)))
            out[f"baseline_{name}_r_median"] = float(np.nanmedian(rb))
            out[f"baseline_{name}_r_log1p_median"] = float(np.nanmedian(rbl))
    return out


# ------------------------------------------------------------------------------------------------ slices (3D)
def stack_slices(slices: Mapping[str, tuple[ad.AnnData, pd.DataFrame]], z_um: Mapping[str, float],
                 um_per_px: Mapping[str, float]) -> tuple[ad.AnnData, pd.DataFrame]:
    """Join aligned slices into one slide and one cells table in micrometres, with a ``z`` column.

    ``slices``: name -> (slide, cells) (cells indexed by cell id with x, y in the slide's pixels and spot);
    ``z_um`` and ``um_per_px`` per name. Spot and cell names become ``<name>:<original>``; genes are those shared
    by all slides; the joint slide's obsm['spatial'] and the cells' x, y, z are micrometres, so Potts neighbours
    found on (x, y, z) are 3D neighbours. Slices must already be aligned (same x, y frame in micrometres).
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
    for name, (slide, _) in slices.items():
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
    joint.uns["slices"] = {"names": list(slices), "z_um": {k: float(z_um[k]) for k in slices},
                           "um_per_px": {k: float(um_per_px[k]) for k in slices}}
    return joint, pd.concat(tables)


def _strip(index: pd.Index, name: str) -> tuple[np.ndarray, pd.Index]:
    s = index.astype(str)
    mine = s.str.startswith(name + SLICE_SEP)
    return np.asarray(mine), pd.Index(s[mine].str.slice(len(name) + len(SLICE_SEP)), name=index.name)


def unstack_result(result, name: str, um_per_px: float):
    """One slice of a cell-typing result on stacked slices (:func:`stack_slices`): the slice's cells (original ids,
    x, y back in its pixels, ``z_um``), weights and bead calls, with the same platform effect, profiles and sigma.
    ``result`` is a :class:`spatial_assets.celltyping.CellTypingResult`."""
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


def combined_view(slices: Mapping[str, pd.DataFrame], z_um: Mapping[str, float],
                  um_per_px: Mapping[str, float]) -> pd.DataFrame:
    """The 3D table of typed cells of all slices: index ``<slice>:<cell id>``, columns slice, cell_id, x_um, y_um,
    z_um, then every column of the per-slice tables (x, y stay in each slice's pixels)."""
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
    """Fraction of the k-nearest-neighbour pairs (KD-tree on ``coords``, any dimension) that join two slices."""
    coords = np.asarray(coords, dtype=float)
    lab = pd.factorize(pd.Index(np.asarray(slice_labels).astype(str)))[0]
    n = len(coords)
    if n < 2:
        return 0.0
    kk = min(k + 1, n)
    _, idx = cKDTree(coords).query(coords, k=kk)
    nb = idx[:, 1:]
    return float((lab[nb] != lab[:, None]).mean())
