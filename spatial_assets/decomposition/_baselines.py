"""The simple splits a decomposition must beat: type means scaled to the spot, and the per-gene proportional split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._decompose import _segment_matrix
from ._inputs import DecompositionInput, _targets


# ----------------------------------------------------------------------------------------------------------------
# Baseline and evaluation
# ----------------------------------------------------------------------------------------------------------------
def baseline_type_mean(
    inputs: DecompositionInput,
    model,
    *,
    per_gene: bool = False,
    leave_out_genes: Sequence[str] = (),
    profiles: np.ndarray | None = None,
) -> np.ndarray:
    """Each cell = its type's mean profile expm1(mu), scaled so that the spot's cells sum to the spot; (C, G).

    ``per_gene=False``: one factor per spot (the spot's observed total). ``per_gene=True``: each observed gene of
    the spot is split among its cells in proportion to their type means (hidden genes keep the per-spot factor).
    ``profiles`` (n_types x genes, expression scale): type profiles to use instead of ``expm1(model.type_means)``
    (e.g. the arithmetic mean of the reference's normalised expression, :func:`reference_type_profiles`).

    Parameters
    ----------
    inputs : DecompositionInput
        The prepared spots and cells (from :func:`prepare_spots`).
    model : MixturePrior-like model
        The fitted prior model; its ``type_means`` (log1p scale) give the type profiles unless ``profiles`` is set.
    per_gene : bool
        Split each observed gene of a spot among its cells in proportion to their type means, instead of one
        factor per spot.
    leave_out_genes : sequence of str
        Genes treated as hidden in addition to ``inputs.leave_out``.
    profiles : numpy.ndarray or None
        Type profiles (n_types x genes, expression scale) to use instead of ``expm1(model.type_means)``.

    Returns
    -------
    numpy.ndarray
        Estimated expression of each cell, cells x genes (float64).

    Raises
    ------
    ValueError
        If ``profiles`` does not have the shape of ``model.type_means``.
    """
    hidden = np.isin(inputs.genes, list(inputs.leave_out) + list(leave_out_genes))
    target, _, observed = _targets(inputs, model, hidden)
    if profiles is None:
        prof = torch.expm1(model.type_means.detach().float().cpu()).clamp_min(0).numpy().astype(np.float64)
    else:
        prof = np.asarray(profiles, dtype=np.float64)
        if prof.shape != tuple(model.type_means.shape):
            raise ValueError(f"profiles: expected shape {tuple(model.type_means.shape)}, got {prof.shape}")
    spot_idx = inputs.cells["spot_idx"].to_numpy(np.int64)
    cell = prof[inputs.cells["type_idx"].to_numpy(np.int64)]
    Mseg = _segment_matrix(spot_idx, inputs.n_spots)
    ssum = Mseg @ cell  # (S, G)
    tot = ssum[:, observed].sum(1)
    factor = target[:, observed].sum(1) / np.where(tot > 0, tot, 1)
    out = cell * factor[spot_idx, None]
    if per_gene:
        with np.errstate(invalid="ignore", divide="ignore"):
            share = cell / np.where(ssum > 0, ssum, 1)[spot_idx]
        n = inputs.spots["n_cells"].to_numpy(float)
        share = np.where(ssum[spot_idx] > 0, share, 1.0 / n[spot_idx, None])
        out[:, observed] = (share * target[spot_idx])[:, observed]
    return out


def reference_type_profiles(prior) -> np.ndarray:
    """Arithmetic mean expression of each type (n_types x genes) from a :class:`MixturePrior`'s weighted clusters.

    Parameters
    ----------
    prior : MixturePrior
        The prior whose cluster profiles, type indices and log weights are averaged per type.

    Returns
    -------
    numpy.ndarray
        Weighted mean profile of each type, n_types x genes (float64).
    """
    T = len(prior.cell_types)
    w = np.exp(prior.log_weights)[:, None] * prior.profiles.astype(np.float64)
    out = np.zeros((T, prior.profiles.shape[1]))
    np.add.at(out, prior.type_idx, w)
    return out
