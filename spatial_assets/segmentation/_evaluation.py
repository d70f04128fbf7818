"""Segmentation accuracy against a ground-truth label image."""

from __future__ import annotations

import numpy as np

from ..io._readers import InputError


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------
def match_f1(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.5) -> dict:
    """Instance matching at an IoU threshold (stardist.matching): f1, precision, recall, tp, fp, fn, counts.

    Parameters
    ----------
    pred_labels : numpy.ndarray
        Predicted label image (0 = background).
    true_labels : numpy.ndarray
        Ground-truth label image of the same shape.
    iou : float
        Matching threshold.

    Returns
    -------
    dict
        ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn``, ``n_true``, ``n_pred`` and ``iou``.

    Raises
    ------
    InputError
        If the two label images differ in shape.
    """
    from stardist.matching import matching

    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise InputError(
            f"match_f1: predicted labels shape {pred_labels.shape} differs from the ground truth's {true_labels.shape}"
        )
    m = matching(true_labels.astype(np.int32), pred_labels.astype(np.int32), thresh=iou)
    return {
        "f1": float(m.f1),
        "precision": float(m.precision),
        "recall": float(m.recall),
        "tp": int(m.tp),
        "fp": int(m.fp),
        "fn": int(m.fn),
        "n_true": int(m.n_true),
        "n_pred": int(m.n_pred),
        "iou": iou,
    }


def matched_true_labels(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """The true labels matched one-to-one by a predicted nucleus at IoU >= ``iou`` (stardist.matching).

    Parameters
    ----------
    pred_labels, true_labels
        Label images of one shape (0 = background).
    iou
        Matching threshold.

    Returns
    -------
    numpy.ndarray
        Sorted int64 array of matched true labels (e.g. to compute the recall of a subset of nuclei).

    Raises
    ------
    InputError
        The two label images differ in shape.
    """
    from stardist.matching import matching

    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise InputError(
            f"matched_true_labels: predicted labels shape {pred_labels.shape} differs from the ground truth's "
            f"{true_labels.shape}"
        )
    m = matching(true_labels.astype(np.int32), pred_labels.astype(np.int32), thresh=iou, report_matches=True)
    pairs = np.asarray(m.matched_pairs[: m.tp], dtype=np.int64).reshape(-1, 2)
    return np.sort(pairs[:, 0])
