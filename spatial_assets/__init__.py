"""spatial_assets: SpatialScope and soScope rebuilt as tested science functions and Dagster data assets.

Notebook use, scanpy-style (namespaces are imported lazily, on first use; importing ``spatial_assets`` itself is
cheap and never imports dagster)::

    import spatial_assets as sa

    inputs = sa.io.load_slide("slide.h5ad", "visium", "he.tif")          # read + validate
    seg = sa.seg.segment_sample(inputs.slide, inputs.image)               # nuclei -> cells per spot
    typed = sa.tl.cell_types(inputs.slide, reference, "cell_type", seg)   # RCTD + Potts / morphology labels
    cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")  # cells' expression per spot
    sub = sa.tl.enhance(inputs.slide, nuclei=seg.cells)                   # soScope sub-spots
    fig = sa.pl.cell_types(typed.cells)                                   # Matplotlib figures

The outputs of ``sa.tl`` are scanpy-ready (``obsm['spatial']``, ``uns['spatial']``, ``layers['counts']``), so
``sc.pl.spatial`` and ``sq.pl.spatial_scatter`` work on them. Science subpackages (plain functions over AnnData /
numpy / torch, no dagster import):

- :mod:`spatial_assets.io` (``sa.io``) -- readers (spatialdata-io), validation, atomic stores, SpatialData out;
- :mod:`spatial_assets.segmentation` (``sa.seg``) -- StarDist nuclei, nucleus features, cells per spot (step 1);
- :mod:`spatial_assets.celltyping` -- RCTD weights, Potts and morphology-aware per-cell labels, RCTD doublet
  mode (step 2);
- :mod:`spatial_assets.generative` -- the cell-type-conditioned score model of a reference;
- :mod:`spatial_assets.decomposition` -- decomposition of spot counts into cells (mixture prior, or annealed
  Langevin with the score model);
- :mod:`spatial_assets.soscope` -- soScope sub-spot enhancement;
- :mod:`spatial_assets.platforms` -- Slide-seq beads, imaging panels (MERFISH, Xenium), Visium HD bins, 3D slices;
- :mod:`spatial_assets.datasets` -- the demo and realistic benchmark slides with ground truth, simulators;
- :mod:`spatial_assets.pl` -- figures of every stage; ``sa.tl`` -- the tools in one namespace;
- :mod:`spatial_assets.params` (every hyper-parameter), :mod:`spatial_assets.constants`,
  :mod:`spatial_assets.geometry`, :mod:`spatial_assets.metrics`.

:mod:`spatial_assets.orchestration` holds the Dagster definitions (the only place that imports dagster). See
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMESPACES = {
    "io": "spatial_assets.io",
    "seg": "spatial_assets.segmentation",
    "tl": "spatial_assets.tl",
    "pl": "spatial_assets.pl",
    "celltyping": "spatial_assets.celltyping",
    "datasets": "spatial_assets.datasets",
    "decomposition": "spatial_assets.decomposition",
    "generative": "spatial_assets.generative",
    "platforms": "spatial_assets.platforms",
    "segmentation": "spatial_assets.segmentation",
    "soscope": "spatial_assets.soscope",
    "params": "spatial_assets.params",
}

__all__ = [
    "celltyping",
    "datasets",
    "decomposition",
    "generative",
    "io",
    "params",
    "pl",
    "platforms",
    "seg",
    "segmentation",
    "soscope",
    "tl",
]

if TYPE_CHECKING:  # for editors and type checkers only
    from . import celltyping, datasets, decomposition, generative, io, params, pl, platforms, segmentation, soscope, tl
    from . import segmentation as seg


def __getattr__(name: str) -> Any:
    if name in _NAMESPACES:
        module = importlib.import_module(_NAMESPACES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'spatial_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMESPACES))
