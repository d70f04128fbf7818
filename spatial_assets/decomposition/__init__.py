"""SpatialScope step 3: decompose spots into single cells by annealed Langevin dynamics (Wan et al. 2023).

Every cell of a spot gets a log1p expression profile ``x + mu_type`` sampled from the cell-type-conditioned score
model (the prior), constrained so that the spot's cells sum to the spot (the likelihood). Spots are processed all
at once: spot sums are segment sums over cells (``torch.index_add_``), replicates are extra rows of one batch.

Scale: the slide is divided gene-wise by the platform effect and every spot is scaled to ``n_cells x`` the
reference's mean library size, so decomposed cells are in the reference's normalised scale (``expm1`` of its log1p
data). ``obs['spot_scale']`` maps raw slide counts into that scale: ``counts / platform_effect * spot_scale``.

The score model is duck-typed (see :class:`spatial_assets.generative.GaussianScoreModel` for the attributes used).
"""

from ._baselines import baseline_type_mean, reference_type_profiles
from ._decompose import DecompositionResult, decompose
from ._evaluation import evaluate_against_truth
from ._inputs import DecompositionInput, prepare_spots
from ._langevin import annealed_langevin, noise_levels, spot_term
from ._mixture import (
    MixturePrior,
    binomial_log1p_moments,
    decompose_mixture,
    fit_mixture_prior,
    mixture_posterior,
)
from ._sample import combine_ranges, decompose_range

__all__ = [
    "DecompositionInput",
    "DecompositionResult",
    "MixturePrior",
    "annealed_langevin",
    "baseline_type_mean",
    "binomial_log1p_moments",
    "combine_ranges",
    "decompose",
    "decompose_mixture",
    "decompose_range",
    "fit_mixture_prior",
    "mixture_posterior",
    "evaluate_against_truth",
    "noise_levels",
    "prepare_spots",
    "reference_type_profiles",
    "spot_term",
]
