"""The bundled H&E (RGB) StarDist model and the renders it was trained on."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from spatial_assets import segmentation as seg
from spatial_assets.params import SegmentationParams
from spatial_assets.segmentation._he_training import TRAIN_Y_UM, random_layout, render_he_like
from tests.helpers import DATA

HE_DIR = seg.bundled_models()["stardist_he"]
HE = SegmentationParams(model=seg.BUNDLED_HE_MODEL, min_umi=0, max_umi=1e12)
OLD = SegmentationParams(model=seg.BUNDLED_MODEL, min_umi=0, max_umi=1e12)


def test_renders_are_seeded_and_nuclei_carry_the_hematoxylin():
    lab = random_layout(np.random.default_rng(0), 128)
    a = render_he_like(lab, np.random.default_rng(1))
    b = render_he_like(lab, np.random.default_rng(1))
    c = render_he_like(lab, np.random.default_rng(2))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for img in (a, c):
        h = seg.hematoxylin(img)
        assert h[lab > 0].mean() > 1.5 * h[lab == 0].mean()
    assert lab.max() > 5


def test_bundled_he_model_folder_is_small_rgb_and_records_its_command():
    cfg = json.loads((HE_DIR / "config.json").read_text())
    info = json.loads((HE_DIR / "training_info.json").read_text())
    assert cfg["n_channel_in"] == 3 and info["seed"] == 0 and "train-he" in info["command"]
    assert (HE_DIR / "README.md").exists()
    assert sum(f.stat().st_size for f in HE_DIR.iterdir()) < 3_000_000


@pytest.fixture(scope="module")
def heldout_realistic(tmp_path_factory):
    """Seed-1 realistic slide, the rows the H&E model never saw (y >= TRAIN_Y_UM), ~900 rows."""
    import tifffile

    from spatial_assets.datasets import build_realistic_slide

    p = build_realistic_slide(tmp_path_factory.mktemp("realistic") / "s1", seed=1)
    r0 = int(TRAIN_Y_UM / 0.8)
    r1 = r0 + 900
    img = tifffile.imread(p.image)[r0:r1, :, :3]
    truth = tifffile.imread(p.nuclei_labels)[r0:r1]
    slide = ad.read_h5ad(p.slide)
    rad = seg.spot_diameter_px(slide) / 2
    y = slide.obsm["spatial"][:, 1]
    slide = slide[(y - rad >= r0) & (y + rad < r1)].copy()
    slide.obsm["spatial"] = slide.obsm["spatial"] - np.array([0, r0])
    tc = ad.read_h5ad(p.truth_cells).obs
    return img, truth, slide, tc[tc["label"].isin(np.unique(truth))]


@pytest.mark.slow
def test_he_model_finds_the_nuclei_of_crowded_spots(heldout_realistic):
    img, truth, slide, tc = heldout_realistic
    true_n = slide.obs["n_cells_true"].to_numpy()
    crowded = set(slide.obs_names[true_n >= 8].astype(str))  # the realistic slides' 75th percentile
    assert len(crowded) >= 5
    res = seg.segment_nuclei(img, HE)
    assert res.info["channel"] == "rgb"
    want = tc.loc[tc["spot"].astype(str).isin(crowded), "label"].astype(int).to_numpy()
    rec = np.isin(want, seg.matched_true_labels(res.labels, truth)).mean()
    assert len(want) > 50 and rec >= 0.9, rec
    _, spots, _ = seg.assign_cells_to_spots(res.nuclei, slide, HE)
    mae = np.abs(spots["n_cells_raw"].to_numpy() - true_n).mean()
    assert mae < 1.0, mae


@pytest.mark.slow
def test_he_model_density_on_real_visium_crop_is_plausible_unlike_the_fluorescence_model():
    from spatial_assets.io import read_image

    img = read_image(DATA / "squidpy-visium-mousebrain" / "test_img.jpg")
    slide = ad.read_h5ad(DATA / "squidpy-visium-mousebrain" / "test_data.h5ad")
    per_spot = {}
    for name, p in (("he", HE), ("old", OLD)):
        res = seg.segment_nuclei(img, p)
        with pytest.warns(seg.CellCapWarning) if name == "old" else _no_cap_warning():
            _, spots, summ = seg.assign_cells_to_spots(res.nuclei, slide, p)
        per_spot[name] = spots["n_cells_raw"].to_numpy()
    he, old = per_spot["he"], per_spot["old"]
    assert 1 <= np.median(he) <= 15 and np.mean(he <= 20) >= 0.8, he
    assert np.median(old) > 20  # the baseline over-segments the tissue texture


def _no_cap_warning():
    import warnings
    from contextlib import contextmanager

    @contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error", seg.CellCapWarning)
            yield

    return cm()
