"""Cell-type identification (SpatialScope step 2): RCTD full-mode spot weights, then per-cell labels by a Potts
model (iterated conditional modes), all spots batched.

Pipeline of :func:`identify_cell_types`:

1. reference per-type profiles (per-cell-normalised means; types need ``min_cells_per_type`` cells, at most
   ``max_cells_per_type`` are used, seeded subsample), RCTD's DE gene sets (bulk and regression);
2. platform effect from the pooled slide (:func:`fit_platform_effect`), kept per gene as
   ``estimated_be``;
3. sigma of the Poisson-lognormal likelihood (RCTD's search), then non-negative weights for every spot;
4. per-cell labels: each cell of a spot takes one of the spot's candidate types so as to minimise
   -log P(spot counts | sum of its cells' profiles x spot weight total x nUMI / n cells)
   + (nu / 2) x sum over cells of the fraction of the cell's k nearest cells (symmetrised) with another label.
   Iterated conditional modes over random pairs of cells of a spot (pairs chosen jointly over candidate pairs,
   single cells over candidates), all spots of one colour class of the spot-contact graph at once, up to
   ``max_sweeps`` sweeps, sigma refitted after each;
5. confidence of a cell: softmax of minus the energies of its candidate labels with all other labels fixed;
6. morphology-aware labels (:func:`morphology_labels`), when the cells table carries nucleus features
   (``CellTypingParams.morphology_features``) and they tell the spot's types apart (a permutation test): per-type
   nucleus Gaussians learnt by EM with the spots' compositions as priors; a cell's label and confidence become
   the posterior mode and its probability (the Potts ones stay in ``potts_type`` / ``potts_confidence``).

The reference's final type list comes from :func:`prepare_reference_types` (``small_types`` policy: error, drop,
or merge into the reference's class column); spots that cannot be fitted (zero counts, no informative counts,
all-zero or non-finite weights) are skipped with their reason and their cells flagged, never labelled.
:func:`evaluate_typing` scores labels against truth (accuracy, macro-F1, composition, calibration).

RCTD's doublet mode for Slide-seq beads: :func:`classify_beads`.
"""

from ._doublets import SPOT_CLASSES, DoubletResult, classify_beads, fit_subset_weights
from ._evaluation import composition_rmse, evaluate_typing, macro_f1
from ._identify import CellTypingResult, identify_cell_types, weights_unusable
from ._morphology import (
    MorphologyInputError,
    MorphologyModel,
    MorphologyResult,
    fit_morphology_model,
    measure_nucleus_features,
    morphology_gain,
    morphology_labels,
    reliability_table,
    sinkhorn_posteriors,
    standardise_features,
)
from ._potts import PottsResult, colour_spots, knn_graph, potts_labels
from ._rctd import (
    SIGMA_GRID,
    CellTypingInputError,
    PlatformEffect,
    PoissonLognormal,
    SigmaFit,
    WeightFit,
    as_counts,
    choose_sigma,
    de_genes,
    fit_platform_effect,
    fit_sigma,
    fit_spot_weights,
    get_likelihood,
    maybe_expm1,
    nnqp,
    reference_profiles,
)
from ._reference_types import SmallTypesError, SmallTypesWarning, prepare_reference_types
from ._sample import type_sample, type_slice_jointly, typing_inputs

__all__ = [
    "MorphologyInputError",
    "MorphologyModel",
    "MorphologyResult",
    "SmallTypesError",
    "SmallTypesWarning",
    "composition_rmse",
    "evaluate_typing",
    "fit_morphology_model",
    "macro_f1",
    "measure_nucleus_features",
    "morphology_gain",
    "morphology_labels",
    "prepare_reference_types",
    "reliability_table",
    "sinkhorn_posteriors",
    "standardise_features",
    "weights_unusable",
    "SIGMA_GRID",
    "SPOT_CLASSES",
    "CellTypingInputError",
    "CellTypingResult",
    "DoubletResult",
    "PlatformEffect",
    "PoissonLognormal",
    "PottsResult",
    "SigmaFit",
    "WeightFit",
    "as_counts",
    "choose_sigma",
    "classify_beads",
    "colour_spots",
    "de_genes",
    "fit_platform_effect",
    "fit_sigma",
    "fit_spot_weights",
    "fit_subset_weights",
    "get_likelihood",
    "identify_cell_types",
    "knn_graph",
    "maybe_expm1",
    "nnqp",
    "potts_labels",
    "reference_profiles",
    "type_sample",
    "type_slice_jointly",
    "typing_inputs",
]
