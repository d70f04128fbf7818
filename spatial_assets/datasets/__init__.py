"""Datasets with ground truth, built from the real public data shipped with the package.

* :func:`build_demo`: the bundled demo, a Visium-like slide of real osmFISH cortex cells (33 genes) binned into spots.
* :func:`build_realistic_slide`: realistic benchmark slides, real MOp scRNA-seq cells (500 genes, 12 classes /
  44 subtypes) at real osmFISH positions, with nuclei whose morphology follows the type (or not).
* Simulators with truth for the other platforms and for tests: :func:`simulate_slide` (spots from a reference
  pool), :func:`simulate_beads` (Slide-seq), :func:`simulate_imaging_sample` (MERFISH-like panels).
* :func:`read_soscope_humanskin`: soScope's Spatial-CITE-seq skin data (proteins + genes).
"""

from ._demo import OSMFISH_UM_PER_PX, DemoPaths, build_demo, ensure_demo, render_he
from ._paths import data_path
from ._realistic import NUCLEUS_MORPHOLOGY, OSMFISH_TO_MOP_CLASS, build_realistic_slide, nucleus_morphology
from ._soscope_humanskin import read_soscope_humanskin
from ._synthetic_platforms import simulate_beads, simulate_imaging_sample
from ._synthetic_spots import extend_genes, simulate_slide

__all__ = [
    "NUCLEUS_MORPHOLOGY",
    "OSMFISH_TO_MOP_CLASS",
    "OSMFISH_UM_PER_PX",
    "DemoPaths",
    "build_demo",
    "build_realistic_slide",
    "data_path",
    "ensure_demo",
    "extend_genes",
    "nucleus_morphology",
    "read_soscope_humanskin",
    "render_he",
    "simulate_beads",
    "simulate_imaging_sample",
    "simulate_slide",
]
