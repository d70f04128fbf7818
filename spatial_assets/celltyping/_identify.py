"""SpatialScope step 2: RCTD spot deconvolution, then a type per segmented cell."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from ..constants import UNASSIGNED
from ..params import CellTypingParams
from ._morphology import morphology_labels
from ._potts import PottsResult, potts_labels
from ._rctd import (
    CellTypingInputError,
    PlatformEffect,
    as_counts,
    de_genes,
    fit_platform_effect,
    fit_sigma,
    fit_spot_weights,
    maybe_expm1,
    reference_profiles,
)
from ._reference_types import prepare_reference_types


@dataclass
class CellTypingResult:
    """Output of :func:`identify_cell_types`.

    Attributes
    ----------
    cells : pandas.DataFrame
        Indexed by cell id: ``x``, ``y``, ``spot``, ``cell_type``, ``confidence``, ``initial_type`` (the spot's top
        type), ``n_candidates``, ``skip_reason`` ('' for labelled cells, else 'outside every spot' / 'spot skipped:
        <reason>'), ``potts_type`` / ``potts_confidence`` (the Potts labels, equal to ``cell_type`` /
        ``confidence`` unless morphology was used); 'unassigned' / NaN for cells of skipped spots or outside every
        spot. In doublet mode: one or two cells per bead (:func:`spatial_assets.platforms.cells_from_beads`).
    weights : pandas.DataFrame
        Fitted spots x types RCTD weights normalised to proportions (rows sum to 1).
    weights_raw : pandas.DataFrame
        The same, unnormalised.
    platform_effect : pandas.Series
        ``estimated_be`` over all genes shared by slide and reference.
    profiles : pandas.DataFrame
        Reference per-type mean of per-cell-normalised expression, shared genes x types (before the platform
        effect).
    genes_used : list
        The regression genes of the likelihood.
    sigma : float
        Final sigma of the Poisson-lognormal likelihood.
    info : dict
        Counts, skipped spots with reasons, sigma fit, sweeps, seed, timings, ``reference_types`` (the small-types
        report), ``morphology`` (used or why not, the gate, EM).
    beads : pandas.DataFrame or None
        Doublet mode: RCTD's per-bead calls (:func:`classify_beads`); None in full mode.
    """

    cells: pd.DataFrame
    weights: pd.DataFrame
    weights_raw: pd.DataFrame
    platform_effect: pd.Series
    profiles: pd.DataFrame
    genes_used: list
    sigma: float
    info: dict = field(default_factory=dict)
    beads: pd.DataFrame | None = None  # doublet mode: RCTD's per-bead calls (spatial_assets.celltyping.classify_beads)


# ------------------------------------------------------------------------------------------------ entry point
def weights_unusable(W: np.ndarray) -> np.ndarray:
    """Per spot, why its fitted weights cannot be used.

    Parameters
    ----------
    W : numpy.ndarray
        ``(n_spots, K)`` fitted weights.

    Returns
    -------
    numpy.ndarray
        ``(n_spots,)`` object array: '' (usable), 'non-finite weights' or 'all-zero weights'.
    """
    W = np.asarray(W, dtype=np.float64)
    finite = np.isfinite(W).all(1)
    tot = np.where(finite, np.abs(np.where(np.isfinite(W), W, 0)).sum(1), 0.0)
    return np.where(~finite, "non-finite weights", np.where(tot <= 0, "all-zero weights", "")).astype(object)


def _check_cells(cells: pd.DataFrame) -> None:
    from ..io._readers import require_columns

    require_columns(cells, "cells", ("x", "y", "spot"), "x, y, spot", CellTypingInputError)
    if not cells.index.is_unique:
        raise CellTypingInputError("cells: the index (cell ids) must be unique")
    xy = cells[["x", "y"]].to_numpy(dtype=float)
    if not np.isfinite(xy).all():
        raise CellTypingInputError("cells: x and y must be finite numbers")
    if "z" in cells.columns and not np.isfinite(pd.to_numeric(cells["z"], errors="coerce").to_numpy(float)).all():
        raise CellTypingInputError("cells['z']: expected finite heights (same unit as x and y)")


def identify_cell_types(
    slide: ad.AnnData,
    reference: ad.AnnData,
    cell_type_key: str,
    cells: pd.DataFrame,
    params: CellTypingParams | None = None,
    max_cells_per_spot: int = 20,
    *,
    min_shared_genes: int = 10,
    min_obs: float = 3,
    min_sigma_fit_spots: int = 20,
    refit_sigma: bool = True,
    mode: str = "full",
    class_key: str | None = None,
    log=None,
) -> CellTypingResult:
    """Cell types of the segmented cells of a slide from a reference (SpatialScope step 2; RCTD full + Potts).

    See :mod:`spatial_assets.celltyping` for the pipeline: reference profiles and DE genes, platform effect, sigma
    of the Poisson-lognormal likelihood, non-negative weights for every spot (RCTD full mode, Cable et al. 2022),
    then per-cell labels by a Potts model solved by iterated conditional modes, and morphology-aware labels when the
    cells carry nucleus features that tell the spot's types apart. The reference's types are fixed first by
    :func:`prepare_reference_types`; spots that cannot be fitted are skipped with their reason and their cells
    flagged. 3D: when ``cells`` has a ``z`` column (same unit as x and y, e.g. stacked slices in micrometres), the
    Potts neighbours are the nearest cells in (x, y, z).

    Parameters
    ----------
    slide : anndata.AnnData
        Spots x genes, raw counts in ``X``.
    reference : anndata.AnnData
        Cells x genes, counts (log1p accepted) in ``X``, types in ``obs[cell_type_key]``, optional boolean
        ``var['Marker']``.
    cell_type_key : str
        Column of ``reference.obs`` with the cell types.
    cells : pandas.DataFrame
        Indexed by unique cell id, columns ``x``, ``y`` (finite), ``spot`` (slide obs name; '' or NaN = outside
        every spot), optional ``z`` and the nucleus feature columns of ``params.morphology_features``.
    params : spatial_assets.params.CellTypingParams, optional
        Default ``CellTypingParams()``.
    max_cells_per_spot : int, default 20
        Cap on the cells per spot of the Potts model.
    min_shared_genes : int, default 10
        Fewest genes shared by slide and reference accepted.
    min_obs : float, default 3
        RCTD's MIN_OBS: slide counts a gene needs to be used.
    min_sigma_fit_spots : int, default 20
        Below this many spots with UMI > ``params.sigma_fit_min_umi``, sigma is fitted on the highest-UMI spots
        instead (and ``info`` says so).
    refit_sigma : bool, default True
        Refit sigma between Potts sweeps, as SpatialScope.
    mode : {"full", "doublet"}, default "full"
        ``"doublet"`` (Slide-seq beads): RCTD's doublet mode instead of the Potts labels -- each bead is a
        singlet, a certain or uncertain doublet, or rejected (:func:`classify_beads` with
        ``params.doublet_confidence_threshold`` / ``params.doublet_threshold``); ``cells`` then only supplies bead
        heights (``z``), and the output cells are one per singlet and two per doublet, ``params.doublet_offset``
        apart (:func:`spatial_assets.platforms.cells_from_beads`).
    class_key : str, optional
        Column of ``reference.obs`` with coarser classes (doublet mode's type classes; small-types merging).
    log : callable, optional
        Receives progress lines (Potts sweeps done / total, time left) at most every 10 s; None = silent.

    Returns
    -------
    CellTypingResult
        Labels, weights, platform effect, profiles and info (``beads`` in doublet mode).

    Raises
    ------
    CellTypingInputError
        On bad input, naming it: unknown ``mode``; non-AnnData inputs; missing type or class column; a cells
        table without ``x``, ``y``, ``spot``, with duplicate ids, non-finite positions or unknown spots; fewer than
        2 types or ``min_shared_genes`` shared genes; no spot with counts on the informative genes or with usable
        weights. :class:`SmallTypesError` (a subclass) from the small-types policy.
    """
    if mode not in ("full", "doublet"):
        raise CellTypingInputError(f"mode: expected 'full' or 'doublet', found '{mode}'")
    params = params or CellTypingParams()
    timings = {}
    t = time.perf_counter()
    seed = int(params.seed)
    rng = np.random.default_rng(seed)
    info: dict = {
        "seed": seed,
        "params": params.model_dump(),
        "max_cells_per_spot": int(max_cells_per_spot),
        "mode": mode,
    }

    # ---- reference ------------------------------------------------------------------------------
    if not isinstance(reference, ad.AnnData) or not isinstance(slide, ad.AnnData):
        raise CellTypingInputError("slide and reference: expected AnnData objects")
    if cell_type_key not in reference.obs.columns:
        raise CellTypingInputError(
            f"reference.obs: no cell-type column '{cell_type_key}' (found columns {list(reference.obs.columns)})"
        )
    if class_key is not None and class_key not in reference.obs.columns:
        raise CellTypingInputError(
            f"reference.obs: no cell-class column '{class_key}' (class_key; found columns "
            f"{list(reference.obs.columns)})"
        )
    _check_cells(cells)
    # the final type list (small_types policy), shared with the score model and the decomposition
    reference, info["reference_types"] = prepare_reference_types(reference, cell_type_key, params, class_key)
    spot_names = pd.Index(slide.obs_names.astype(str))
    spot_col = cells["spot"]
    blank = spot_col.isna().to_numpy() | (spot_col.astype(str).str.len() == 0).to_numpy()
    sname = spot_col.astype(str).to_numpy()
    pos_slide = spot_names.get_indexer(sname)
    unknown = (~blank) & (pos_slide < 0)
    if unknown.any():
        ex = pd.unique(sname[unknown])[:3]
        raise CellTypingInputError(
            f"cells['spot']: {int(unknown.sum())} cells name spots not in slide.obs_names (e.g. {list(ex)})"
        )
    types_raw = reference.obs[cell_type_key]
    ok_type = types_raw.notna().to_numpy()
    ref_X, ref_log = maybe_expm1(reference.X, "reference.X")
    ref_lib = np.asarray(ref_X.sum(1)).ravel()
    ok = ok_type & (ref_lib > 0)
    info["reference"] = {
        "log1p_input": ref_log,
        "cells_without_type": int((~ok_type).sum()),
        "cells_with_zero_counts": int((ok_type & (ref_lib <= 0)).sum()),
    }
    tnames = types_raw[ok].astype(str).to_numpy()
    vc = pd.Series(tnames).value_counts()
    if len(vc) < 2:
        raise CellTypingInputError(
            f"reference.obs['{cell_type_key}']: expected at least 2 cell types, found {len(vc)} ({list(vc.index)})"
        )
    type_names = sorted(vc.index)
    K = len(type_names)
    codes_all = pd.Categorical(tnames, categories=type_names).codes
    ref_rows = np.flatnonzero(ok)
    # seeded subsample of types above max_cells_per_type
    order = rng.permutation(len(ref_rows))
    rank_in_type = np.empty(len(ref_rows), dtype=np.int64)
    srt = order[np.argsort(codes_all[order], kind="stable")]
    cnts = np.bincount(codes_all, minlength=K)
    rank_in_type[srt] = np.arange(len(srt)) - np.repeat(np.concatenate([[0], np.cumsum(cnts)[:-1]]), cnts)
    keep = rank_in_type < params.max_cells_per_type
    ref_rows, codes = ref_rows[keep], codes_all[keep]
    info["reference"].update(
        {
            "n_cells_used": int(len(ref_rows)),
            "n_types": K,
            "cells_per_type": {k: int(v) for k, v in zip(type_names, np.bincount(codes, minlength=K))},
            "subsampled_types": [type_names[k] for k in np.flatnonzero(cnts > params.max_cells_per_type)],
        }
    )
    ref_sub = ref_X[ref_rows]
    ref_genes = pd.Index(reference.var_names.astype(str))
    prof_all = reference_profiles(ref_sub, codes, type_names)  # all reference genes

    # ---- genes ----------------------------------------------------------------------------------
    slide_genes = pd.Index(slide.var_names.astype(str))
    shared_mask = slide_genes.isin(ref_genes)
    shared = slide_genes[shared_mask]
    if len(shared) < min_shared_genes:
        raise CellTypingInputError(
            f"slide and reference share {len(shared)} genes (var_names); expected at least {min_shared_genes}"
        )
    S_X, slide_log = as_counts(slide.X, "slide.X")
    numi_all = np.asarray(S_X.sum(1)).ravel()
    S_sh = S_X[:, np.flatnonzero(shared_mask)].tocsc()
    profiles = pd.DataFrame(prof_all[ref_genes.get_indexer(shared)], index=shared, columns=type_names)
    marker = None
    if "Marker" in reference.var.columns:
        marker = reference.var["Marker"].reindex(shared).fillna(False).astype(bool).to_numpy()
    bulk_counts = np.asarray(S_sh.sum(0)).ravel()
    Pm = profiles.to_numpy()
    # RCTD's names: *_reg = regression set (0.0002, 0.75); gene_cutoff/fc_cutoff = bulk set (0.000125, 0.5)
    # (RCTD's create.RCTD names them the other way round; the values follow METHODS.md)
    bulk_mask = de_genes(Pm, shared, bulk_counts, params.fc_cutoff, params.gene_cutoff, min_obs, marker)
    reg_mask = de_genes(Pm, shared, bulk_counts, params.fc_cutoff_reg, params.gene_cutoff_reg, min_obs, marker)
    info["genes"] = {
        "n_slide": int(len(slide_genes)),
        "n_shared": int(len(shared)),
        "marker_column_used": marker is not None,
        "n_bulk": int(bulk_mask.sum()),
        "n_regression": int(reg_mask.sum()),
        "slide_log1p_input": slide_log,
    }
    if bulk_mask.sum() < 2 or reg_mask.sum() < 2:
        raise CellTypingInputError(
            f"genes: only {int(reg_mask.sum())} regression and {int(bulk_mask.sum())} bulk informative genes among "
            f"the {len(shared)} shared ones (DE thresholds gene_cutoff_reg/fc_cutoff_reg, min_obs={min_obs}); expected >= 2"
        )
    timings["reference_and_genes"] = time.perf_counter() - t

    # ---- platform effect --------------------------------------------------------------------------
    t = time.perf_counter()
    # SpatialScope's estimated_be: library sizes over the shared genes on both sides
    ref_lib_shared = np.asarray(ref_X[:, ref_genes.get_indexer(shared)][ok].sum(1)).ravel()
    pe: PlatformEffect = fit_platform_effect(
        S_sh, shared, profiles, shared[bulk_mask], reference_mean_umi=float(ref_lib_shared.mean())
    )
    info["platform_effect"] = {**pe.info, "bulk_proportions": {k: float(v) for k, v in pe.proportions.items()}}
    genes_used = shared[reg_mask]
    P_used = profiles.loc[genes_used].to_numpy() * pe.ratio.loc[genes_used].to_numpy()[:, None]
    timings["platform_effect"] = time.perf_counter() - t

    # ---- spots: skips, sigma, weights ---------------------------------------------------------------
    t = time.perf_counter()
    Y_all = S_sh[:, np.flatnonzero(reg_mask)].toarray()
    reg_tot = Y_all.sum(1)
    skipped = {}
    for i in np.flatnonzero(numi_all <= 0):
        skipped[spot_names[i]] = "zero counts"
    for i in np.flatnonzero((numi_all > 0) & (reg_tot <= 0)):
        skipped[spot_names[i]] = f"no counts on the {len(genes_used)} informative genes"
    fit_rows = np.flatnonzero((numi_all > 0) & (reg_tot > 0))
    if len(fit_rows) == 0:
        raise CellTypingInputError("slide.X: no spot has counts on the informative genes")
    Y = Y_all[fit_rows]
    numi = numi_all[fit_rows]
    hi = np.flatnonzero(numi > params.sigma_fit_min_umi)
    if len(hi) >= min_sigma_fit_spots:
        pool = hi
        note = f"{len(hi)} spots with UMI > {params.sigma_fit_min_umi:g}"
    else:
        pool = np.argsort(-numi, kind="stable")[: params.sigma_fit_spots]
        note = (
            f"only {len(hi)} spots with UMI > {params.sigma_fit_min_umi:g} (< {min_sigma_fit_spots}); "
            f"fell back to the {len(pool)} highest-UMI spots (UMI >= {numi[pool].min():g})"
        )
    sig_rows = np.sort(rng.choice(pool, size=min(params.sigma_fit_spots, len(pool)), replace=False))
    sf = fit_sigma(Y, numi, P_used, sig_rows, seed=seed)
    info["sigma_fit"] = {
        "n_spots": int(len(sig_rows)),
        "note": note,
        "history": sf.history,
        "fallback": len(hi) < min_sigma_fit_spots,
    }
    timings["sigma_fit"] = time.perf_counter() - t
    t = time.perf_counter()
    wf = fit_spot_weights(Y, numi, P_used, sf.sigma)
    # spots whose weights cannot be used are skipped with their reason, never labelled
    why = weights_unusable(wf.weights)
    bad = why != ""
    if bad.any():
        for i in np.flatnonzero(bad):
            skipped[spot_names[fit_rows[i]]] = str(why[i])
        good = np.flatnonzero(~bad)
        if len(good) == 0:
            raise CellTypingInputError("slide: no spot has usable weights (all-zero or non-finite for every spot)")
        new_of_old = np.full(len(fit_rows), -1, dtype=np.int64)
        new_of_old[good] = np.arange(len(good))
        sig_rows = new_of_old[sig_rows][new_of_old[sig_rows] >= 0]
        fit_rows, Y, numi = fit_rows[good], Y[good], numi[good]
        wf = type(wf)(wf.weights[good], wf.nll[good], wf.n_iter[good], wf.converged[good])
    info["weights"] = {
        "n_spots_fitted": int(len(fit_rows)),
        "newton_iterations_mean": float(wf.n_iter.mean()),
        "newton_iterations_max": int(wf.n_iter.max()),
        "not_converged": int((~wf.converged).sum()),
    }
    timings["spot_weights"] = time.perf_counter() - t
    fitted_names = spot_names[fit_rows]
    weights_raw = pd.DataFrame(wf.weights, index=fitted_names, columns=type_names)
    tot = weights_raw.sum(1).to_numpy()
    weights = weights_raw.div(np.where(tot > 0, tot, 1.0), axis=0)

    if mode == "doublet":
        return _doublet_mode(
            slide,
            reference,
            cell_type_key,
            class_key,
            cells,
            ref_rows,
            codes,
            type_names,
            Y,
            numi,
            P_used,
            sf.sigma,
            wf,
            fit_rows,
            fitted_names,
            weights,
            weights_raw,
            pe,
            profiles,
            genes_used,
            skipped,
            info,
            timings,
            seed,
            params.doublet_confidence_threshold,
            params.doublet_threshold,
            params.doublet_offset,
        )

    # ---- cells ----------------------------------------------------------------------------------
    t = time.perf_counter()
    row_of_slide = np.full(len(spot_names), -1, dtype=np.int64)
    row_of_slide[fit_rows] = np.arange(len(fit_rows))
    cspot = np.where(blank, -1, row_of_slide[np.maximum(pos_slide, 0)])
    lab = cspot >= 0
    reasons = np.where(blank, "outside every spot", np.where(lab, "", "spot skipped"))
    ncell_spot = np.bincount(cspot[lab], minlength=len(fit_rows))
    no_cells = fitted_names[ncell_spot == 0]
    out = cells.copy()
    out["cell_type"] = UNASSIGNED
    out["initial_type"] = UNASSIGNED
    out["confidence"] = np.nan
    out["n_candidates"] = 0
    out["potts_type"] = UNASSIGNED
    out["potts_confidence"] = np.nan
    skip_spot = np.array([skipped.get(str(x), "") for x in sname], dtype=object)
    out["skip_reason"] = np.where(
        blank, "outside every spot", np.where(lab, "", "spot skipped: " + skip_spot.astype(str))
    )
    sigma_final = sf.sigma
    potts_info = {}
    morph_info = {"used": False, "reason": "no labelled cells"}
    if lab.any():
        xy = cells[["x", "y", "z"] if "z" in cells.columns else ["x", "y"]].to_numpy(dtype=float)[lab]
        sig_spots = np.intersect1d(sig_rows, np.flatnonzero(ncell_spot > 0))
        pr = potts_labels(
            Y,
            numi,
            wf.weights,
            P_used,
            cspot[lab],
            xy,
            sf.sigma,
            nu=params.nu,
            n_neighbors=params.n_neighbors,
            max_sweeps=params.max_sweeps,
            max_cells_per_spot=max_cells_per_spot,
            seed=seed,
            sigma_spots=sig_spots,
            refit_sigma=refit_sigma,
            log=log,
        )
        tn = np.asarray(type_names, dtype=object)
        idx = np.flatnonzero(lab)
        out.iloc[idx, out.columns.get_loc("cell_type")] = tn[pr.labels]
        out.iloc[idx, out.columns.get_loc("initial_type")] = tn[pr.initial]
        out.iloc[idx, out.columns.get_loc("confidence")] = pr.confidence
        out.iloc[idx, out.columns.get_loc("n_candidates")] = pr.candidates.sum(1)[cspot[lab]]
        sigma_final = pr.sigma
        potts_info = pr.info
        morph_info = _apply_morphology(out, cells, idx, cspot[lab], wf.weights, pr, tn, params)
    timings["cell_labels"] = time.perf_counter() - t
    info.update(
        {
            "n_spots": int(len(spot_names)),
            "n_spots_fitted": int(len(fit_rows)),
            "skipped_spots": skipped,
            "n_spots_without_cells": int(len(no_cells)),
            "spots_without_cells": [str(s) for s in no_cells],
            "n_cells": int(len(cells)),
            "n_cells_labelled": int(lab.sum()),
            "cells_unassigned": {
                r: int((reasons == r).sum()) for r in ("outside every spot", "spot skipped") if (reasons == r).any()
            },
            "sigma_rctd": float(sf.sigma),
            "sigma": float(sigma_final),
            "potts": potts_info,
            "morphology": morph_info,
            "timings_s": timings,
        }
    )
    return CellTypingResult(
        cells=out,
        weights=weights,
        weights_raw=weights_raw,
        platform_effect=pe.estimated_be,
        profiles=profiles,
        genes_used=list(genes_used),
        sigma=float(sigma_final),
        info=info,
    )


def _apply_morphology(
    out: pd.DataFrame,
    cells: pd.DataFrame,
    idx: np.ndarray,
    cell_spot: np.ndarray,
    weights: np.ndarray,
    pr: PottsResult,
    tn: np.ndarray,
    params: CellTypingParams,
) -> dict:
    """Morphology-aware labels (:func:`morphology_labels`) for the labelled cells ``idx`` of ``out``, in place;
    keeps the Potts labels in ``potts_type`` / ``potts_confidence``. Returns the step's info."""
    out["potts_type"] = out["cell_type"]
    out["potts_confidence"] = out["confidence"]
    feats = list(params.morphology_features)
    missing = [c for c in feats if c not in cells.columns]
    if params.morphology == "off":
        return {"used": False, "reason": "morphology off"}
    if missing:
        if params.morphology == "on":
            raise CellTypingInputError(
                f"cells: morphology='on' needs the nucleus feature column(s) {missing} "
                f"(cell_typing.morphology_features); found columns {list(cells.columns)}"
            )
        return {"used": False, "reason": f"cells table has no column(s) {missing}"}
    F = cells[feats].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)[idx]
    mr = morphology_labels(
        F,
        feats,
        cell_spot,
        weights,
        pr.labels,
        pr.confidence,
        mode=params.morphology,
        potts_mix=params.morphology_potts_mix,
        prior_floor=params.morphology_prior_floor,
        min_z=params.morphology_min_z,
        shrinkage=params.morphology_shrinkage,
        seed=params.seed,
        assignment=params.morphology_assignment,
        n_permutations=params.morphology_permutations,
        min_gain=params.morphology_min_gain,
    )
    if mr.used:
        out.iloc[idx, out.columns.get_loc("cell_type")] = tn[mr.labels]
        out.iloc[idx, out.columns.get_loc("confidence")] = mr.confidence
    return mr.info


def _doublet_mode(
    slide,
    reference,
    cell_type_key,
    class_key,
    cells,
    ref_rows,
    codes,
    type_names,
    Y,
    numi,
    P_used,
    sigma,
    wf,
    fit_rows,
    fitted_names,
    weights,
    weights_raw,
    pe,
    profiles,
    genes_used,
    skipped,
    info,
    timings,
    seed,
    confidence_threshold,
    doublet_threshold,
    doublet_offset,
) -> CellTypingResult:
    """The end of :func:`identify_cell_types` in doublet mode: RCTD's bead calls, then 1 or 2 cells per bead."""
    from ..platforms._slideseq import cells_from_beads
    from ._doublets import classify_beads

    t = time.perf_counter()
    tn = np.asarray(type_names, dtype=object)
    type_class = None
    if class_key is not None:  # RCTD's class_df: each type's most frequent class in the reference
        tab = pd.crosstab(tn[codes], reference.obs[class_key].astype(str).to_numpy()[ref_rows])
        type_class = {str(k): str(v) for k, v in tab.idxmax(axis=1).items()}
    dr = classify_beads(
        Y,
        numi,
        P_used,
        sigma,
        type_names,
        weights=wf.weights,
        converged=wf.converged,
        type_class=type_class,
        confidence_threshold=confidence_threshold,
        doublet_threshold=doublet_threshold,
        bead_names=fitted_names,
    )
    # bead positions (and heights) in the cells' unit: the mean of the bead's input cells, else the slide's
    cols = ["x", "y", "z"] if "z" in cells.columns else ["x", "y"]
    has_spot = cells["spot"].notna() & (cells["spot"].astype(str).str.len() > 0)
    pos = cells.loc[has_spot, cols].astype(float).groupby(cells.loc[has_spot, "spot"].astype(str)).mean()
    pos = pos.reindex(pd.Index(fitted_names, dtype=str))
    if pos[["x", "y"]].isna().any().any():
        if "spatial" not in slide.obsm:
            raise CellTypingInputError("cells / slide.obsm['spatial']: no position for some beads")
        sxy = np.asarray(slide.obsm["spatial"], dtype=float)[fit_rows, :2]
        miss = pos["x"].isna().to_numpy()
        pos.loc[miss, ["x", "y"]] = sxy[miss]
    bead_z = None
    if "z" in cols:
        if pos["z"].isna().any():
            raise CellTypingInputError(f"cells['z']: {int(pos['z'].isna().sum())} beads have no cell with a height")
        bead_z = pos["z"].to_numpy()
    out, cinfo = cells_from_beads(dr.beads, pos[["x", "y"]].to_numpy(), offset=doublet_offset, seed=seed, bead_z=bead_z)
    init = pd.Series(tn[wf.weights.argmax(1)], index=pd.Index(fitted_names, dtype=str))
    out.insert(out.columns.get_loc("confidence") + 1, "initial_type", init.reindex(out["spot"]).to_numpy())
    timings["cell_labels"] = time.perf_counter() - t
    info.update(
        {
            "n_spots": int(slide.n_obs),
            "n_spots_fitted": int(len(fit_rows)),
            "skipped_spots": skipped,
            "n_cells": int(len(out)),
            "n_cells_labelled": int(len(out)),
            "n_input_cells": int(len(cells)),
            "doublet_mode": dr.info,
            "bead_cells": cinfo,
            "type_classes": type_class,
            "sigma_rctd": float(sigma),
            "sigma": float(sigma),
            "timings_s": timings,
        }
    )
    return CellTypingResult(
        cells=out,
        weights=weights,
        weights_raw=weights_raw,
        platform_effect=pe.estimated_be,
        profiles=profiles,
        genes_used=list(genes_used),
        sigma=float(sigma),
        info=info,
        beads=dr.beads,
    )
