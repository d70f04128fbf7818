"""spatial_assets: SpatialScope and soScope rebuilt as tested science functions and Dagster data assets.

Science subpackages (plain functions over AnnData / numpy / torch, no dagster import; usable in a notebook):

- :mod:`spatial_assets.io` -- readers, validation and atomic stores;
- :mod:`spatial_assets.segmentation` -- StarDist nuclei and their spots (SpatialScope step 1);
- :mod:`spatial_assets.celltyping` -- RCTD weights, Potts and morphology-aware per-cell labels, RCTD doublet
  mode (step 2);
- :mod:`spatial_assets.generative` -- the cell-type-conditioned score model of a reference;
- :mod:`spatial_assets.decomposition` -- annealed Langevin decomposition of spot counts into cells (step 3);
- :mod:`spatial_assets.soscope` -- soScope sub-spot enhancement;
- :mod:`spatial_assets.platforms` -- Slide-seq beads, imaging panels, aligned 3D slices;
- :mod:`spatial_assets.datasets` -- the demo and realistic benchmark slides with ground truth, simulators;
- :mod:`spatial_assets.pl` -- figures of every stage;
- :mod:`spatial_assets.params` (every hyper-parameter), :mod:`spatial_assets.constants`,
  :mod:`spatial_assets.geometry`, :mod:`spatial_assets.metrics`.

:mod:`spatial_assets.orchestration` holds the Dagster definitions (the only place that imports dagster). See
``docs/ARCHITECTURE.md``.
"""
