"""Fixtures of the io tests: the small demo run through the notebook API (segmentation, typing, decomposition)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import spatial_assets as sa
from spatial_assets.params import CellTypingParams, SegmentationParams

SEG = SegmentationParams(method="stardist", model="bundled:stardist_nuclei", min_umi=20)
TYPING = CellTypingParams(min_cells_per_type=5, sigma_fit_min_umi=50, small_types="drop")


@pytest.fixture(scope="package")
def api_run(demo_small):
    inputs = sa.io.load_slide(demo_small.slide, "visium", demo_small.image, name="demo")
    reference = sa.io.load_reference(demo_small.reference, "cell_type")
    seg = sa.seg.segment_sample(inputs.slide, inputs.image, "visium", SEG)
    typed = sa.tl.cell_types(inputs.slide, reference, "cell_type", seg, TYPING)
    cells = sa.tl.decompose(inputs.slide, typed, reference, "cell_type")
    return inputs, seg, typed, cells


def rendered_png(plot) -> np.ndarray:
    """Render with pyplot on Agg, return the RGB pixels of the saved PNG."""
    import matplotlib.pyplot as plt
    from PIL import Image

    plt.close("all")
    plot()
    buf = io.BytesIO()
    plt.gcf().savefig(buf, format="png", dpi=60)
    plt.close("all")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=float)


def assert_not_blank(px: np.ndarray) -> None:
    # a blank figure is (almost) one colour; the H&E under coloured spots gives many distinct colours
    assert px.std() > 10
    assert len(np.unique(px.reshape(-1, 3).round(-1), axis=0)) > 50
