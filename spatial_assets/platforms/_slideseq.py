"""Slide-seq beads: cells from RCTD doublet-mode beads (1 or 2 cells each), and their evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ._imaging import PlatformInputError


def cells_from_beads(
    beads: pd.DataFrame, bead_xy, *, offset: float | None = None, seed: int = 0, bead_z=None
) -> tuple[pd.DataFrame, dict]:
    """Cells of Slide-seq beads from RCTD doublet-mode calls.

    A singlet bead gives one cell ``<bead>_0`` of its first type at the bead; a doublet (certain or uncertain)
    gives ``<bead>_0`` (first type) and ``<bead>_1`` (second type), ``offset`` apart on either side of the bead
    along a random (seeded) direction; rejected beads give no cell.

    Parameters
    ----------
    beads : pandas.DataFrame
        Doublet-mode calls (:func:`spatial_assets.celltyping.classify_beads`), indexed by bead name, columns
        ``spot_class``, ``first_type``, ``second_type`` (+ optional ``confidence_first``, ``confidence_second``,
        ``n_candidates``).
    bead_xy : numpy.ndarray or pandas.DataFrame
        ``(n_beads, 2)`` positions aligned with ``beads``, or a DataFrame with ``x``, ``y`` indexed by bead.
    offset : float, optional
        Distance between a doublet's two cells (unit of ``bead_xy``); None = a quarter of the median
        nearest-bead distance (~2.5 um for 10-um Slide-seq beads), 1 for a single bead.
    seed : int, default 0
        Seed of the doublets' directions (recorded in ``info``).
    bead_z : array-like, optional
        ``(n_beads,)`` heights, copied to a ``z`` column (stacked slices).

    Returns
    -------
    cells : pandas.DataFrame
        Indexed by ``cell_id``, columns ``x``, ``y``, ``spot``, ``cell_type``, ``confidence``, ``spot_class``,
        ``bead_cell`` (0 or 1) [, ``n_candidates``, ``z``].
    info : dict
        ``beads``, ``cells``, ``doublet_beads``, ``rejected_beads``, ``offset``, ``seed``.

    Raises
    ------
    PlatformInputError
        If columns are missing, positions are missing or misaligned, ``spot_class`` holds an unknown class, or
        ``bead_z`` has the wrong length.
    """
    need = [c for c in ("spot_class", "first_type", "second_type") if c not in beads.columns]
    if need:
        raise PlatformInputError(
            f"beads: missing column(s) {need}; expected RCTD doublet-mode calls (found {list(beads.columns)})"
        )
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
        raise PlatformInputError(
            f"beads['spot_class']: unknown class(es) {bad}; expected reject, singlet, "
            "doublet_certain or doublet_uncertain"
        )
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
    cells = pd.DataFrame(
        {
            "x": pos[:, 0],
            "y": pos[:, 1],
            "spot": names[bi],
            "cell_type": np.where(k == 0, first[bi], second[bi]),
            "confidence": np.where(k == 0, conf1[bi], conf2[bi]),
            "spot_class": cls[bi],
            "bead_cell": k.astype(np.int64),
        },
        index=pd.Index(np.char.add(np.char.add(names[bi].astype(str), "_"), k.astype(str)), name="cell_id"),
    )
    if "n_candidates" in beads:
        cells["n_candidates"] = beads["n_candidates"].to_numpy()[bi]
    if bead_z is not None:
        z = np.asarray(bead_z, dtype=float).reshape(-1)
        if len(z) != len(beads):
            raise PlatformInputError(f"bead_z: expected {len(beads)} values, found {len(z)}")
        cells["z"] = z[bi]
    info = {
        "beads": int(len(beads)),
        "cells": int(len(cells)),
        "doublet_beads": int(dbl.sum()),
        "rejected_beads": int((~keep).sum()),
        "offset": float(offset),
        "seed": int(seed),
    }
    return cells, info


def evaluate_beads(beads: pd.DataFrame, truth: pd.DataFrame, type_class: Mapping[str, str] | None = None) -> dict:
    """Doublet-mode calls against the truth of :func:`spatial_assets.datasets.simulate_beads`.

    Beads are matched by index. Singlet / doublet accuracy over non-rejected beads (certain and uncertain doublets
    count as doublets), reject rate, and type recovery: per bead the multiset intersection of true types and
    called types (singlet -> the first type; doublet -> both); ``type_recall`` = matched / true cells,
    ``type_precision`` = matched / called cells; ``singlet_type_accuracy`` = true singlets called singlet with the
    right type / true singlets; ``doublet_evidence_auc``: how well the beads' doublet evidence ranks true doublets
    above singlets.

    Parameters
    ----------
    beads : pandas.DataFrame
        Calls: ``spot_class``, ``first_type``, ``second_type`` (+ optional ``doublet_evidence``).
    truth : pandas.DataFrame
        Truth: ``n_cells`` (1 or 2), ``type1``, ``type2`` (+ ``class1``, ``class2`` for class-level scores).
    type_class : mapping of str to str, optional
        Type -> class; with it, recall / precision also at the class level.

    Returns
    -------
    dict
        ``beads``, ``true_doublet_fraction``, ``reject_rate``, ``class_accuracy``, ``doublet_recall``,
        ``singlet_recall``, ``type_recall``, ``type_precision``, ``singlet_type_accuracy``,
        ``doublet_first_type_accuracy``, ``called`` (counts per class), optionally ``doublet_evidence_auc`` and
        ``class_level_type_recall`` / ``class_level_type_precision``. NaN where a rate has no beads.

    Raises
    ------
    PlatformInputError
        If ``beads`` and ``truth`` share no bead name.
    """
    common = beads.index.intersection(truth.index)
    if len(common) == 0:
        raise PlatformInputError(
            f"beads / truth: no bead names in common (e.g. {list(beads.index[:3])} vs {list(truth.index[:3])})"
        )
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
        "beads": int(len(common)),
        "true_doublet_fraction": float(true_dbl.mean()),
        "reject_rate": float(rej.mean()),
        "class_accuracy": float((called_dbl == true_dbl)[kept].mean()) if kept.any() else float("nan"),
        "doublet_recall": float(called_dbl[true_dbl & kept].mean()) if (true_dbl & kept).any() else float("nan"),
        "singlet_recall": float((~called_dbl)[true_single & kept].mean())
        if (true_single & kept).any()
        else float("nan"),
        "type_recall": float(matched.sum() / max(n_true.sum(), 1)),
        "type_precision": float(matched.sum() / max(n_called.sum(), 1)),
        "singlet_type_accuracy": float(((cls == "singlet") & (f1 == t1))[true_single].mean())
        if true_single.any()
        else float("nan"),
        "doublet_first_type_accuracy": float(((f1 == t1) | (f1 == t2))[true_dbl & kept].mean())
        if (true_dbl & kept).any()
        else float("nan"),
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
        m, nt, nc = recovery(
            np.array([tc.get(x, x) for x in f1]),
            np.array([tc.get(x, x) for x in f2]),
            t["class1"].astype(str).to_numpy(),
            t["class2"].astype(str).to_numpy(),
        )
        out["class_level_type_recall"] = float(m.sum() / max(nt.sum(), 1))
        out["class_level_type_precision"] = float(m.sum() / max(nc.sum(), 1))
    return out
