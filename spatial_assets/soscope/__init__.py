"""soScope resolution enhancement (Li et al., Nat Commun 2024): spot profiles -> sub-spot profiles.

A graph VAE encodes every spot (TransformerConv over the spot graph A) into a latent z; a decoder maps each
sub-spot's [z_parent / K, (2 - 1/K) y_subspot] to likelihood parameters; training asks the sum of a spot's K
sub-spot means to explain the observed spot (NB / Poisson / Gaussian / joint), with beta x KL and an image
regulariser that makes neighbouring sub-spots' residual profiles agree with their morphological similarity W.

Unlike the original, the block sum is a reshape-sum and the regulariser runs on W's sparse edges plus sampled
non-edges, so time and memory grow linearly with the number of sub-spots.

Geometry and inputs: sub-spots, the spot graph A, sub-spot image features Y and the similarity graph W.

Sub-spots are stored spot-major: sub-spot ``i * K + k`` is sub-spot ``k``
(offset ``geometry.subspot_offsets(...)[k]``) of spot ``i``, so a (N K, G) array reshapes to (N, K, G).
"""

from ._baselines import baseline_idw, baseline_split
from ._enhance import EnhancementResult, check_values, conserve_spot_sums, enhance, feature_kinds, select_genes
from ._features import (
    SQUIDPY_FEATURES,
    cnn_features,
    extract_patches,
    image_features,
    nuclei_features,
    nuclei_subspots,
    pooled_morphology,
    positional_features,
    squidpy_features,
    standardise,
    type_profiles,
    typed_shares,
    typed_subspot_profiles,
)
from ._geometry import (
    SubspotGeometry,
    build_subspots,
    check_spot_graph,
    edge_distances,
    expected_subspots,
    kernel_weights,
    spot_graph,
    spot_pitch,
    subspot_graph,
)
from ._model import SoScopeNet

__all__ = [
    "SQUIDPY_FEATURES",
    "EnhancementResult",
    "SoScopeNet",
    "SubspotGeometry",
    "baseline_idw",
    "baseline_split",
    "build_subspots",
    "check_spot_graph",
    "check_values",
    "cnn_features",
    "conserve_spot_sums",
    "edge_distances",
    "enhance",
    "expected_subspots",
    "extract_patches",
    "feature_kinds",
    "image_features",
    "kernel_weights",
    "nuclei_features",
    "nuclei_subspots",
    "pooled_morphology",
    "positional_features",
    "select_genes",
    "spot_graph",
    "spot_pitch",
    "squidpy_features",
    "standardise",
    "subspot_graph",
    "type_profiles",
    "typed_shares",
    "typed_subspot_profiles",
]
