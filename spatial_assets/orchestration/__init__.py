"""Dagster wiring of the pure methods: the only package of spatial_assets that imports dagster."""

import warnings

import dagster as _dg

warnings.filterwarnings("ignore", category=_dg.BetaWarning)
warnings.filterwarnings("ignore", category=_dg.PreviewWarning)
# anndata's zarr v3 writer warns on every array it writes (~200 lines per demo run); the stores are written with
# explicit chunks, so the coming autosharding default changes nothing here
warnings.filterwarnings("ignore", message="zarr v3 autosharding will be the default", category=UserWarning)
