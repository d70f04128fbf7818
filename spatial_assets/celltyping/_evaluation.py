"""Cell typing judged against ground truth: per-cell labels, their per-spot composition, the spot proportions and
the calibration of the confidences, each label column side by side (final labels, Potts labels, the spot's top
type). Used by ``benchmarks/bench_typing.py`` and the tests; a stage evaluator for a realistic benchmark suite.
No dagster import.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._morphology import reliability_table

LABEL_COLUMNS = {"final": "cell_type", "potts": "potts_type", "top_type": "initial_type"}
CONFIDENCE_COLUMNS = {"final": "confidence", "potts": "potts_confidence"}


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Macro-averaged F1 over the true classes (a class never predicted scores 0).

    Parameters
    ----------
    truth : numpy.ndarray
        ``(n,)`` true labels (compared as strings).
    pred : numpy.ndarray
        ``(n,)`` predicted labels.

    Returns
    -------
    float
        Mean over the classes present in ``truth`` of their F1; NaN when ``truth`` is empty.
    """
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    classes = np.unique(truth)
    f1 = []
    for c in classes:  # one pass per class (<= a few dozen), vectorised within
        tp = np.sum((pred == c) & (truth == c))
        p, t = np.sum(pred == c), np.sum(truth == c)
        f1.append(0.0 if tp == 0 else 2 * tp / (p + t))
    return float(np.mean(f1)) if f1 else float("nan")


def composition_rmse(spot: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> float:
    """RMSE between the per-spot fractions of the labels and of the true types.

    Parameters
    ----------
    spot : numpy.ndarray
        ``(n,)`` spot of each cell.
    labels : numpy.ndarray
        ``(n,)`` predicted label of each cell.
    truth : numpy.ndarray
        ``(n,)`` true type of each cell.

    Returns
    -------
    float
        Root mean square difference over the spots x (all types seen in either) table of fractions.
    """
    types = np.unique(np.concatenate([np.asarray(labels).astype(str), np.asarray(truth).astype(str)]))
    spots, s = np.unique(np.asarray(spot).astype(str), return_inverse=True)
    K = len(types)
    li = np.searchsorted(types, np.asarray(labels).astype(str))
    ti = np.searchsorted(types, np.asarray(truth).astype(str))
    n = np.bincount(s, minlength=len(spots)).astype(float)[:, None]
    a = np.bincount(s * K + li, minlength=len(spots) * K).reshape(-1, K) / n
    b = np.bincount(s * K + ti, minlength=len(spots) * K).reshape(-1, K) / n
    return float(np.sqrt(((a - b) ** 2).mean()))


def evaluate_typing(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    level: str,
    weights: pd.DataFrame | None = None,
    label_columns: dict | None = None,
    confidence_columns: dict | None = None,
    n_bins: int = 10,
) -> dict:
    """Metrics of a typing result against the truth, for every label column side by side.

    Cells present in both tables are scored; unassigned labels count as wrong. Per label column (final labels,
    Potts labels, the spot's top type: :data:`LABEL_COLUMNS`, those present): accuracy, macro-F1 and the RMSE of
    the per-spot compositions of the scored cells; per confidence column: a reliability table and the expected
    calibration error (:func:`reliability_table`); with ``weights``, the RMSE of the spot proportions against the
    true per-spot composition.

    Parameters
    ----------
    cells : pandas.DataFrame
        The result's cells table (index = cell id; label and confidence columns).
    truth : pandas.DataFrame
        True cells indexed by the same ids, with ``spot`` and the type column ``level``.
    level : str
        Column of ``truth`` with the true types (e.g. ``"cell_type"`` or ``"cell_class"``).
    weights : pandas.DataFrame, optional
        Spots x types proportions.
    label_columns : dict, optional
        ``{name: column}`` of labels to score; default :data:`LABEL_COLUMNS`.
    confidence_columns : dict, optional
        ``{name: column}`` of confidences (``name`` as in ``label_columns``); default
        :data:`CONFIDENCE_COLUMNS`.
    n_bins : int, default 10
        Bins of the reliability tables.

    Returns
    -------
    dict
        ``n_cells``, ``n_cells_truth``, ``n_unassigned``, ``majority_rate`` (the accuracy of always guessing the
        commonest type), ``<name>.accuracy`` / ``.macro_f1`` / ``.composition_rmse`` per label column,
        ``<name>.ece`` / ``.mean_confidence`` / ``.reliability`` (records) per confidence column, and with
        ``weights`` ``proportions_rmse`` and ``n_spots``.

    Raises
    ------
    ValueError
        If ``truth`` lacks ``spot`` or ``level``, or the tables share no cell id.
    """
    label_columns = label_columns or LABEL_COLUMNS
    confidence_columns = confidence_columns or CONFIDENCE_COLUMNS
    if level not in truth.columns or "spot" not in truth.columns:
        raise ValueError(f"truth: expected columns 'spot' and '{level}', found {list(truth.columns)}")
    common = cells.index.intersection(truth.index)
    if len(common) == 0:
        raise ValueError(
            f"cells / truth: no cell ids in common (e.g. {list(cells.index[:3])} vs {list(truth.index[:3])})"
        )
    c, t = cells.loc[common], truth.loc[common]
    tt = t[level].astype(str).to_numpy()
    spot = t["spot"].astype(str).to_numpy()
    out: dict = {
        "n_cells": len(common),
        "n_cells_truth": len(truth),
        "n_unassigned": int((c.get("cell_type", pd.Series("", index=c.index)).astype(str) == "unassigned").sum()),
        "majority_rate": float(pd.Series(tt).value_counts(normalize=True).iloc[0]),
    }
    for name, col in label_columns.items():
        if col not in c.columns:
            continue
        lab = c[col].astype(str).to_numpy()
        out[f"{name}.accuracy"] = float((lab == tt).mean())
        out[f"{name}.macro_f1"] = macro_f1(tt, lab)
        out[f"{name}.composition_rmse"] = composition_rmse(spot, lab, tt)
    for name, col in confidence_columns.items():
        lab_col = label_columns.get(name)
        if col not in c.columns or lab_col not in c.columns:
            continue
        ok = c[lab_col].astype(str).to_numpy() == tt
        tab, ece = reliability_table(c[col].to_numpy(dtype=float), ok, n_bins)
        out[f"{name}.ece"] = ece
        out[f"{name}.mean_confidence"] = float(np.nanmean(c[col].to_numpy(dtype=float)))
        out[f"{name}.reliability"] = tab.round(4).to_dict(orient="records")
    if weights is not None:
        tp = pd.crosstab(pd.Series(spot, name="spot"), pd.Series(tt, name="type"), normalize="index")
        cols = sorted(set(tp.columns) | set(weights.columns))
        sp_ = tp.index.intersection(weights.index)
        A = weights.reindex(index=sp_, columns=cols, fill_value=0.0).to_numpy()
        B = tp.reindex(index=sp_, columns=cols, fill_value=0.0).to_numpy()
        out["proportions_rmse"] = float(np.sqrt(((A - B) ** 2).mean()))
        out["n_spots"] = len(sp_)
    return out
