"""Figures of every stage, as Matplotlib figures (scanpy-style ``sa.pl``).

Each function returns a :class:`matplotlib.figure.Figure`; the single-panel ones also draw into a given ``ax``.
Figures are built without pyplot, so importing this module never selects a backend: in a notebook they display
inline, and the Dagster assets turn them into PNG metadata (``spatial_assets.orchestration``).
"""

from ._base import new_figure, type_palette
from ._celltyping import cell_types, slices_side_by_side, spot_proportions
from ._decomposition import decomposed_maps, decomposition_summary, truth_comparison
from ._generative import real_vs_generated
from ._segmentation import segmentation_qc
from ._soscope import enhanced_maps, loss_curves, pick_markers

__all__ = [
    "cell_types",
    "decomposed_maps",
    "decomposition_summary",
    "enhanced_maps",
    "loss_curves",
    "new_figure",
    "pick_markers",
    "real_vs_generated",
    "segmentation_qc",
    "slices_side_by_side",
    "spot_proportions",
    "truth_comparison",
    "type_palette",
]
