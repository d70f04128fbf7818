"""SpatialScope's other platforms: Slide-seq beads, MERFISH-like imaging, several aligned slices (3D).

* Image-free platforms: :func:`cells_from_spots` (one cell per spot / bead / imaged cell).
* Slide-seq: :func:`cells_from_beads` turns RCTD doublet-mode calls
  (:func:`spatial_assets.celltyping.classify_beads`) into 1 or 2 cells per bead (rejected beads give none);
  :func:`evaluate_beads` scores the calls against a simulation's truth.
* Imaging (MERFISH and alike): every cell is its own spot with a small measured panel; model genes absent from the
  slide get no spot term in the decomposition and are imputed.
  :func:`imputation_scores` compares imputed genes with the real counts (and two baselines);
  :func:`integer_counts` rounds non-integer (e.g. volume-normalised) imaging counts for RCTD.
* 3D: :func:`stack_slices` joins the slices of a group into one slide / cells table in micrometres with a ``z``
  column (cell typing then finds its Potts neighbours in 3D), :func:`unstack_result` takes one slice back out,
  :func:`combined_view` is the 3D table of all slices, :func:`cross_slice_fraction` measures 3D neighbourhoods.

All vectorised (KD-trees, bincount, sparse products). Randomness is seeded and recorded.

* Visium HD: :func:`bins_to_cells` sums 2 / 8 / 16-um bins under segmented nuclei into imaging-like cells,
  :func:`segment_bins` segments the H&E and does so in one step (platform ``visium_hd`` in the asset graph; the
  cells are then typed / decomposed as an imaging panel, each cell its own spot); Xenium cells come segmented
  (:func:`spatial_assets.io.read_xenium`).

Simulators of these platforms with ground truth live in :mod:`spatial_assets.datasets`.
"""

from ._imaging import PlatformInputError, cells_from_spots, imputation_scores, integer_counts, microns_per_pixel
from ._slices import SLICE_SEP, combined_view, cross_slice_fraction, stack_slices, unstack_result
from ._slideseq import cells_from_beads, evaluate_beads
from ._visium_hd import bins_to_cells, segment_bins

__all__ = [
    "SLICE_SEP",
    "PlatformInputError",
    "bins_to_cells",
    "segment_bins",
    "cells_from_beads",
    "cells_from_spots",
    "combined_view",
    "cross_slice_fraction",
    "evaluate_beads",
    "imputation_scores",
    "integer_counts",
    "microns_per_pixel",
    "stack_slices",
    "unstack_result",
]
