"""Per-nucleus features (shape, stain, texture) against label images of known shapes; the cap warning."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets import segmentation as seg
from spatial_assets.io import InputError
from spatial_assets.params import CellTypingParams, SegmentationParams

PINK = (235, 200, 225)  # eosin-like background
PURPLE = (110, 60, 150)  # hematoxylin-like nucleus
DARK = (40, 20, 90)


def _grid(shape=(120, 160)):
    return np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)


def _known_shapes():
    """Disc, axis-aligned ellipse, square, L-shape, a checkerboard-textured and a speckled disc."""
    yy, xx = _grid()
    lab = np.zeros(yy.shape, np.int32)
    img = np.empty(yy.shape + (3,), np.uint8)
    img[:] = PINK
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2] = 1  # disc r = 10
    lab[((yy - 20) / 6) ** 2 + ((xx - 70) / 15) ** 2 <= 1] = 2  # ellipse a = 15, b = 6
    lab[10:30, 110:130] = 3  # 20 x 20 square
    L = np.zeros_like(lab, bool)
    L[60:100, 10:50] = True
    L[60:80, 30:50] = False  # 40 x 40 minus a 20 x 20 corner: area 1200, hull 1400
    lab[L] = 4
    lab[(yy - 80) ** 2 + (xx - 80) ** 2 <= 12**2] = 5  # checkerboard disc
    lab[(yy - 80) ** 2 + (xx - 130) ** 2 <= 12**2] = 6  # 1 in 10 pixels dark
    for k in (1, 2, 3, 4, 6):
        img[lab == k] = PURPLE
    checker = ((yy.astype(int) + xx.astype(int)) % 2 == 0) & (lab == 5)
    img[lab == 5] = PURPLE
    img[checker] = DARK
    idx6 = np.flatnonzero((lab == 6).ravel())
    dark6 = idx6[np.random.default_rng(0).permutation(len(idx6))[: len(idx6) // 10]]
    img.reshape(-1, 3)[dark6] = DARK
    return lab, img


def _h(rgb):
    return float(seg.hematoxylin(np.array([[rgb]], np.uint8))[0, 0])


def test_feature_columns_are_the_canonical_list_and_typing_uses_them():
    lab, img = _known_shapes()
    f = seg.nucleus_features(lab, img)
    assert tuple(f.columns) == seg.FEATURE_COLUMNS and f.index.name == "label"
    assert set(CellTypingParams().morphology_features) <= set(seg.FEATURE_COLUMNS)


def test_shapes_of_known_nuclei():
    lab, img = _known_shapes()
    f = seg.nucleus_features(lab, img)
    assert f.loc[3, "nucleus_area"] == 400 and f.loc[4, "nucleus_area"] == 1200
    np.testing.assert_allclose(f.loc[1, "nucleus_area"], np.pi * 10**2, rtol=0.02)
    np.testing.assert_allclose(f.loc[[1, 3], "nucleus_axis_ratio"], 1.0, atol=0.01)
    np.testing.assert_allclose(f.loc[[1, 3], "nucleus_eccentricity"], 0.0, atol=0.15)
    np.testing.assert_allclose(f.loc[2, "nucleus_axis_ratio"], 6 / 15, atol=0.02)
    np.testing.assert_allclose(f.loc[2, "nucleus_eccentricity"], np.sqrt(1 - (6 / 15) ** 2), atol=0.01)
    assert f.loc[3, "nucleus_solidity"] == pytest.approx(1.0)
    np.testing.assert_allclose(f.loc[[1, 2], "nucleus_solidity"], 1.0, atol=0.01)  # digital disc / ellipse
    np.testing.assert_allclose(f.loc[4, "nucleus_solidity"], 1200 / 1410, rtol=0.02)  # hull: + 210 px
    assert f.loc[4, "nucleus_solidity"] < f.loc[[1, 2, 3], "nucleus_solidity"].min() - 0.05


def test_stain_and_texture_of_known_nuclei():
    lab, img = _known_shapes()
    f = seg.nucleus_features(lab, img)
    hp, hd = _h(PURPLE), _h(DARK)
    np.testing.assert_allclose(f.loc[[1, 2, 3, 4], "nucleus_h_mean"], hp, rtol=1e-5)
    np.testing.assert_allclose(f.loc[[1, 2, 3, 4], "nucleus_h_sd"], 0.0, atol=1e-6)
    n5 = int((lab == 5).sum())
    n_dark5 = int(((lab == 5) & (img == DARK).all(-1)).sum())
    p5 = n_dark5 / n5
    np.testing.assert_allclose(f.loc[5, "nucleus_h_mean"], hp + p5 * (hd - hp), rtol=1e-4)
    np.testing.assert_allclose(f.loc[5, "nucleus_h_sd"], abs(hd - hp) * np.sqrt(p5 * (1 - p5)), rtol=1e-3)
    # speckled disc: 10% dark pixels -> skewness of a Bernoulli(p) variable, (1 - 2p) / sqrt(p (1 - p))
    p6 = int(((lab == 6) & (img == DARK).all(-1)).sum()) / int((lab == 6).sum())
    np.testing.assert_allclose(f.loc[6, "nucleus_h_skew"], (1 - 2 * p6) / np.sqrt(p6 * (1 - p6)), rtol=1e-3)
    # texture: the checkerboard has far more fine-scale contrast and gradient than the uniform disc
    assert f.loc[5, "nucleus_h_contrast"] > 3 * f.loc[1, "nucleus_h_contrast"]
    assert f.loc[5, "nucleus_h_gradient"] > 1.2 * f.loc[1, "nucleus_h_gradient"]  # smoothed at 0.7 px
    assert f.loc[6, "nucleus_h_gradient"] > 1.5 * f.loc[1, "nucleus_h_gradient"]
    assert f.loc[6, "nucleus_h_contrast"] > 1.5 * f.loc[1, "nucleus_h_contrast"]


def test_bands_zarr_and_label_order_do_not_change_features():
    import zarr

    lab, img = _known_shapes()
    full = seg.nucleus_features(lab, img)
    z = zarr.create_array(store=zarr.storage.MemoryStore(), shape=lab.shape, chunks=(32, 64), dtype="int32")
    z[:] = lab
    banded = seg.nucleus_features(z, img, block_rows=17, margin=45)
    pd.testing.assert_frame_equal(full, banded, rtol=1e-5)
    picked = seg.nucleus_features(lab, img, [4, 99, 1])
    assert picked.index.tolist() == [4, 99, 1] and picked.loc[99].isna().all()
    pd.testing.assert_frame_equal(picked.loc[[4, 1]], full.loc[[4, 1]])


def test_feature_input_errors():
    lab, img = _known_shapes()
    with pytest.raises(InputError, match=r"image: shape \(120, 150, 3\); expected an RGB image of the labels' "):
        seg.nucleus_features(lab, img[:, :150])
    with pytest.raises(InputError, match=r"labels: shape \(120, 160, 3\); expected a 2-D"):
        seg.nucleus_features(img, img)


def test_morphology_stand_in_delegates_to_canonical_features():
    from spatial_assets.celltyping import measure_nucleus_features

    lab, img = _known_shapes()
    pd.testing.assert_frame_equal(measure_nucleus_features(lab, img), seg.nucleus_features(lab, img))


def _slide(xy, umi, diameter):
    n = len(xy)
    a = ad.AnnData(
        X=sp.csr_matrix(np.asarray(umi, float).reshape(n, 1)), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)])
    )
    a.obsm["spatial"] = np.asarray(xy, float)
    a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": diameter}}}
    return a


def test_segment_sample_adds_features_of_the_kept_cells():
    from spatial_assets.datasets import render_he

    rng = np.random.default_rng(2)
    centres = np.stack(np.meshgrid(np.arange(20, 200, 20.0), np.arange(20, 200, 20.0)), -1).reshape(-1, 2)
    centres += rng.uniform(-3, 3, centres.shape)
    radii = rng.uniform(4, 7, len(centres))
    img, truth = render_he(centres, radii, (220, 220), rng)
    slide = _slide([[60, 60], [150, 150]], [1000, 1000], diameter=80)
    sc = seg.segment_sample(slide, img, "visium", SegmentationParams(method="watershed"))
    assert set(seg.FEATURE_COLUMNS) <= set(sc.cells.columns) and len(sc.cells) > 20
    ref = seg.nucleus_features(sc.labels, img, sc.cells["label"].to_numpy())
    np.testing.assert_allclose(sc.cells[list(seg.FEATURE_COLUMNS)].to_numpy(), ref.to_numpy())
    assert (sc.cells["nucleus_area"] == sc.cells["area"]).all()
    # the measured areas follow the rendered nuclei's (watershed on a clean render: within 35 %)
    true_area = pd.Series(np.bincount(truth.ravel())[1:], index=np.arange(1, len(centres) + 1))
    match = truth[sc.cells["y"].round().astype(int), sc.cells["x"].round().astype(int)]
    ok = match > 0
    ratio = sc.cells["nucleus_area"].to_numpy()[ok] / true_area.loc[match[ok]].to_numpy()
    assert ok.mean() > 0.9 and 0.65 < np.median(ratio) < 1.35
    off = seg.segment_sample(slide, img, "visium", SegmentationParams(method="watershed", nucleus_features=False))
    assert not set(seg.FEATURE_COLUMNS) & set(off.cells.columns)


# --- cap warning -------------------------------------------------------------------------------------------------
def _crowded(n_per_spot, cap):
    """Spots 100 px apart, spot k with n_per_spot[k] nuclei on a ring inside it."""
    xy, rows = [], []
    for k, n in enumerate(n_per_spot):
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        xy.append([100.0 * k + 50, 50.0])
        rows.append(pd.DataFrame({"x": 100.0 * k + 50 + 20 * np.cos(a), "y": 50 + 20 * np.sin(a)}))
    nuclei = pd.concat(rows, ignore_index=True)
    nuclei["label"] = np.arange(1, len(nuclei) + 1)
    nuclei["area"] = 30
    return nuclei, _slide(xy, [1000] * len(n_per_spot), diameter=60)


def test_cap_warning_names_fraction_threshold_and_spots(caplog):
    nuclei, slide = _crowded([30, 25, 5, 4, 3, 8, 6, 2, 22, 1], cap=20)  # 3 of 10 spots over 20
    with caplog.at_level(logging.WARNING), pytest.warns(seg.CellCapWarning) as rec:
        cells, spots, summary = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(max_cells_per_spot=20))
    msg = str(rec[0].message)
    assert msg.startswith("3 of 10 spots (30%) hold more nuclei than max_cells_per_spot=20")
    assert "max_capped_fraction=20%" in msg and "s0 (30 nuclei), s1 (25 nuclei), s8 (22 nuclei)" in msg
    assert msg in caplog.text
    assert summary["cap_warning"] == msg and summary["fraction_spots_capped"] == pytest.approx(0.3)
    assert summary["capped_spots_first"] == ["s0 (30 nuclei)", "s1 (25 nuclei)", "s8 (22 nuclei)"]
    assert spots["n_cells"].max() == 20 and summary["n_dropped_over_cap"] == 10 + 5 + 2


def test_no_cap_warning_at_or_below_the_threshold():
    nuclei, slide = _crowded([30, 25, 5, 4, 3, 8, 6, 2, 12, 1], cap=20)  # 2 of 10 = 20 %: not above
    with warnings.catch_warnings():
        warnings.simplefilter("error", seg.CellCapWarning)
        _, _, summary = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(max_cells_per_spot=20))
    assert summary["cap_warning"] is None and summary["fraction_spots_capped"] == pytest.approx(0.2)
    with pytest.warns(seg.CellCapWarning, match=r"2 of 10 spots \(20%\).*max_capped_fraction=10%"):
        seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(max_cells_per_spot=20, max_capped_fraction=0.1))


def test_matched_true_labels_finds_the_overlapping_nuclei():
    truth = np.zeros((40, 40), np.int32)
    truth[2:10, 2:10], truth[20:30, 20:30], truth[32:38, 2:8] = 1, 2, 3
    pred = np.zeros_like(truth)
    pred[2:10, 3:10] = 5  # IoU 56 / 64 with 1
    pred[20:25, 20:30] = 7  # IoU 0.5 with 2: matched at 0.5 (>=), not at 0.6
    pred[0:2, 30:40] = 9  # false positive
    assert seg.matched_true_labels(pred, truth).tolist() == [1, 2]
    assert seg.matched_true_labels(pred, truth, iou=0.6).tolist() == [1]
    with pytest.raises(InputError, match=r"predicted labels shape \(40, 39\) differs"):
        seg.matched_true_labels(pred[:, :39], truth)
