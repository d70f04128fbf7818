"""Shared fixtures: demo slides built once per test session (seeded, from the real osmFISH cells)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO_CROP_UM = (0.0, 1200.0, 900.0, 2100.0)


@pytest.fixture(scope="session")
def demo_full(tmp_path_factory):
    """The whole demo slide (~250 spots, ~2,400 tissue cells, 33 genes); builds in a few seconds."""
    from spatial_assets.datasets import build_demo

    return build_demo(tmp_path_factory.mktemp("demo_full") / "demo", seed=0)


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """A 900 x 900 um window of the demo (~36 spots): for fast tests."""
    from spatial_assets.datasets import build_demo

    return build_demo(tmp_path_factory.mktemp("demo_small") / "demo", seed=0, crop_um=DEMO_CROP_UM)
