"""spatial_assets: SpatialScope and soScope as plain functions, plus the Dagster assets that run them.

Notebook use, scanpy-style (namespaces are imported lazily, on first use; importing ``spatial_assets`` itself is
cheap and never imports dagster)::

    import spatial_assets as sa

    inputs = sa.io.load_slide("slide.h5ad", "visium", "he.tif")          # read + validate
    seg = sa.seg.segment_sample(inputs.slide, inputs.image)               # nuclei -> cells per spot
    typed = sa.tl.cell_types(inputs.slide, reference, "cell_type", seg)   # RCTD + Potts
    cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")  # Langevin decomposition
    sub = sa.tl.enhance(inputs.slide, nuclei=seg.cells)                   # soScope sub-spots
    fig = sa.pl.cell_types(typed.cells)                                   # Matplotlib figures

``sa.io`` readers / stores / SpatialData, ``sa.seg`` segmentation, ``sa.tl`` the tools, ``sa.pl`` figures, and
the stage packages themselves (``sa.celltyping``, ``sa.decomposition``, ``sa.generative``, ``sa.soscope``,
``sa.platforms``, ``sa.datasets``). The outputs of ``sa.tl`` are scanpy-ready (``obsm['spatial']``,
``uns['spatial']``, ``layers['counts']``), so ``sc.pl.spatial`` and ``sq.pl.spatial_scatter`` work on them.
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
