"""Dagster wiring of the pure methods: the only package of spatial_assets that imports dagster."""

import warnings

import dagster as _dg

warnings.filterwarnings("ignore", category=_dg.BetaWarning)
warnings.filterwarnings("ignore", category=_dg.PreviewWarning)
