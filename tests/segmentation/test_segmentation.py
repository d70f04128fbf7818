"""Nuclei segmentation (SpatialScope step 1): bundled StarDist model, watershed, spot assignment, errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets import segmentation as seg
from spatial_assets.io import InputError
from spatial_assets.params import SegmentationParams
from tests.helpers import DATA

MODEL = seg.BUNDLED_MODEL
MODEL_DIR = seg.bundled_models()["stardist_nuclei"]
STARDIST = SegmentationParams(method="stardist", model=str(MODEL))
CROP_UM = (600, 1850, 1000, 2250)  # a 500 x 500 px window of the demo (~170 cells)


@pytest.fixture(scope="module")
def demo_crop(tmp_path_factory):
    from spatial_assets.datasets import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "crop", seed=0, crop_um=CROP_UM)


@pytest.fixture(scope="module")
def demo_arrays(demo_crop):
    import tifffile

    return (tifffile.imread(demo_crop.image), tifffile.imread(demo_crop.nuclei_labels), ad.read_h5ad(demo_crop.slide))


def _slide(xy, umi, diameter=20.0, names=None):
    n = len(xy)
    X = sp.csr_matrix(np.asarray(umi, float).reshape(n, 1))
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=names or [f"s{i}" for i in range(n)]))
    a.obsm["spatial"] = np.asarray(xy, float)
    a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": diameter}}}
    return a


# --- the bundled trained model -----------------------------------------------------------------------------------
def test_bundled_model_folder_is_small_and_records_seed_and_split():
    info = json.loads((MODEL_DIR / "training_info.json").read_text())
    assert info["seed"] == 0 and info["split"]["test"] == ["rows 256:512, cols 256:512"]
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 3_000_000, size


def test_bundled_model_f1_on_heldout_img2d_quarter():
    from spatial_assets.segmentation._training import heldout_test_region

    img, truth = heldout_test_region()
    rgb_like = np.repeat(img[..., None], 3, axis=2)  # fluorescence as an RGB array; use the 'gray' channel
    res = seg.segment_nuclei(rgb_like, STARDIST.model_copy(update={"channel": "gray"}))
    assert res.info["method"] == "stardist" and res.info["model_source"] == "folder"
    m = seg.match_f1(res.labels, truth, iou=0.5)
    assert m["f1"] > 0.75, m  # gray of a fluorescence image = the image itself (bright nuclei)


def test_stardist_on_demo_hematoxylin(demo_arrays):
    img, truth, slide = demo_arrays
    res = seg.segment_nuclei(img, STARDIST)
    assert res.info["channel"] == "hematoxylin"
    m = seg.match_f1(res.labels, truth)
    assert m["f1"] > 0.8, m
    cells, spots, summary = seg.assign_cells_to_spots(res.nuclei, slide, STARDIST.model_copy(update={"min_umi": 0}))
    err = np.abs(spots["n_cells_raw"].to_numpy() - slide.obs["n_cells_true"].to_numpy())
    assert err.mean() < 0.5, err


def test_big_path_writes_zarr_blockwise_and_matches_direct(demo_arrays):
    import re

    import zarr

    img = demo_arrays[0][:480, :480]
    tiles_log, blocks_log = [], []
    direct = seg.segment_nuclei(img, STARDIST.model_copy(update={"tile_size": 256}), log=tiles_log.append)
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=img.shape[:2], chunks=(128, 128), dtype="int32")
    big = seg.segment_nuclei(
        zarr.array(img, chunks=(100, 100, 3)),
        STARDIST,
        labels_out=out,
        big_pixels=0,
        block_size=256,
        min_overlap=48,
        log=blocks_log.append,
    )
    # progress: the 2 x 2 tiles of the direct prediction, every block of the block-wise one, ending at 100%
    assert re.fullmatch(r"StarDist tiles: 4/4 \(100%\) in \d+ s", tiles_log[-1]), tiles_log
    last = re.fullmatch(r"StarDist blocks: (\d+)/\1 \(100%\) in \d+ s", blocks_log[-1])
    assert last and int(last[1]) >= 4, blocks_log
    for line in tiles_log + blocks_log:
        done, total = map(int, re.search(r": (\d+)/(\d+) ", line).groups())
        assert 0 < done <= total, line

    bs = re.match(r"predict_instances_big, block_size \[(\d+), (\d+)\]", big.info["prediction"])
    assert bs and max(int(bs[1]), int(bs[2])) < 480  # at least one block boundary in each axis
    assert big.labels is out and "predict_instances_big" in big.info["prediction"]
    m = seg.match_f1(np.asarray(out[:]), direct.labels)
    assert m["f1"] > 0.97, m
    assert abs(len(big.nuclei) - len(direct.nuclei)) <= 3


# --- watershed -------------------------------------------------------------------------------------------------
def test_watershed_counts_on_demo_crop(demo_arrays):
    img, truth, slide = demo_arrays
    res = seg.segment_nuclei(img, SegmentationParams(method="watershed"))
    assert res.info["method"] == "watershed" and "fallback" not in res.info
    m = seg.match_f1(res.labels, truth)
    assert m["f1"] > 0.85, m
    assert abs(res.info["n_nuclei"] - int(truth.max())) / truth.max() < 0.15
    _, spots, _ = seg.assign_cells_to_spots(res.nuclei, slide, SegmentationParams(min_umi=0))
    true_n = slide.obs["n_cells_true"].to_numpy()
    assert np.abs(spots["n_cells_raw"].to_numpy() - true_n).mean() < 0.8
    assert np.corrcoef(spots["n_cells_raw"], true_n)[0, 1] > 0.7


# --- no silent fallback ----------------------------------------------------------------------------------------
def test_unobtainable_model_raises_with_guidance():
    with pytest.raises(seg.ModelUnavailableError) as e:
        seg.segment_nuclei(np.zeros((64, 64, 3), np.uint8), SegmentationParams(model="no_such_model_xyz"))
    msg = str(e.value)
    assert "no_such_model_xyz" in msg and "parameters.segmentation.model: path/to/folder" in msg
    assert "method: watershed" in msg


def test_registry_download_failure_raises_and_cleans_empty_cache(monkeypatch, tmp_path):
    from stardist.models import StarDist2D

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = tmp_path / "models" / "StarDist2D" / "2D_versatile_he"

    def offline(name):
        cache.mkdir(parents=True)  # what keras' get_file leaves behind offline
        raise Exception("URL fetch failure on https://...: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(StarDist2D, "from_pretrained", staticmethod(offline))
    with pytest.raises(seg.ModelUnavailableError, match="URL fetch failure") as e:
        seg.load_stardist_model("2D_versatile_he")
    assert "parameters.segmentation.model: path/to/folder" in str(e.value)
    assert not cache.exists()


def test_fallback_to_watershed_only_when_opted_in(demo_arrays):
    img, truth = demo_arrays[0][:300, :300], demo_arrays[1][:300, :300]
    res = seg.segment_nuclei(img, SegmentationParams(model="no_such_model_xyz", fallback="watershed"))
    assert res.info["method"] == "watershed" and res.info["requested_method"] == "stardist"
    assert "fell back to watershed" in res.info["fallback"] and "no_such_model_xyz" in res.info["fallback"]
    assert seg.match_f1(res.labels, truth)["f1"] > 0.8


# --- spot assignment ---------------------------------------------------------------------------------------------
def test_assign_cells_to_spots_synthetic():
    slide = _slide([[100, 100], [200, 100], [300, 100]], umi=[1000, 1000, 100], diameter=20)
    nuclei = pd.DataFrame(
        {
            "label": [1, 2, 3, 4, 5, 6],
            "area": [10] * 6,
            "x": [103, 100, 150, 209.9, 300, 211.0],
            "y": [100, 96, 100, 100, 100, 100],
        }
    )
    cells, spots, summary = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams())
    # label 1 is 3 px from s0, label 2 is 4 px: k follows the distance
    assert cells.loc["s0_0", "label"] == 1 and cells.loc["s0_1", "label"] == 2
    assert cells.loc["s1_0", "label"] == 4 and np.isclose(cells.loc["s1_0", "spot_distance"], 9.9)
    assert list(cells.index) == ["s0_0", "s0_1", "s1_0"]  # label 3 outside, 6 at 11 px > radius 10, s2 fails QC
    assert spots["n_cells_raw"].tolist() == [2, 1, 1] and spots["n_cells"].tolist() == [2, 1, 0]
    assert spots["qc_pass"].tolist() == [True, True, False] and spots.loc["s2", "qc_reason"] == "umi<500"
    assert summary["n_outside_spots"] == 2 and summary["n_dropped_in_filtered_spots"] == 1
    assert summary["n_spots_filtered"] == 1 and summary["n_cells_kept"] == 3
    assert cells["spot_n_cells"].tolist() == [2, 2, 1]


def test_cap_keeps_the_closest_cells():
    rng = np.random.default_rng(3)
    r = rng.uniform(0, 29, 40)
    a = rng.uniform(0, 2 * np.pi, 40)
    nuclei = pd.DataFrame({"label": np.arange(1, 41), "area": 50, "x": 500 + r * np.cos(a), "y": 400 + r * np.sin(a)})
    slide = _slide([[500, 400]], umi=[5000], diameter=60)
    with pytest.warns(seg.CellCapWarning, match=r"1 of 1 spots \(100%\)"):
        cells, spots, summary = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(max_cells_per_spot=7))
    closest = np.argsort(r)[:7] + 1
    assert cells["label"].tolist() == closest.tolist()
    assert list(cells.index) == [f"s0_{k}" for k in range(7)]
    assert np.all(np.diff(cells["spot_distance"]) >= 0)
    assert spots.loc["s0", "n_cells_raw"] == 40 and spots.loc["s0", "n_cells"] == 7
    assert summary["n_dropped_over_cap"] == 33 and summary["n_spots_capped"] == 1


def test_high_umi_spot_filtered():
    slide = _slide([[50, 50]], umi=[60_000], diameter=20)
    nuclei = pd.DataFrame({"label": [1], "area": [5], "x": [50.0], "y": [50.0]})
    cells, spots, summary = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(max_umi=50_000))
    assert len(cells) == 0 and spots.loc["s0", "qc_reason"] == "umi>50000" and summary["n_spots_high_umi"] == 1


# --- helpers -------------------------------------------------------------------------------------------------------
def test_hematoxylin_equals_rgb2hed():
    from skimage.color import rgb2hed

    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    np.testing.assert_allclose(seg.hematoxylin(rgb), rgb2hed(rgb)[..., 0], atol=1e-5)


def test_nuclei_table_matches_regionprops():
    from skimage.measure import regionprops

    lab = np.zeros((300, 200), np.int32)
    lab[10:20, 30:45] = 1
    lab[250:290, 5:9] = 3  # label 2 absent
    lab[100:103, 150:199] = 4
    tab = seg.nuclei_table(lab, block_rows=64)  # several row bands
    assert tab["label"].tolist() == [1, 3, 4]
    for p, (_, r) in zip(regionprops(lab), tab.iterrows()):
        assert np.isclose(r.y, p.centroid[0]) and np.isclose(r.x, p.centroid[1]) and r.area == p.area


def test_match_f1_counts():
    a = np.zeros((50, 50), np.int32)
    a[5:15, 5:15] = 1
    a[30:40, 30:40] = 2
    b = np.zeros_like(a)
    b[5:15, 6:16] = 7  # IoU 0.82 -> match
    b[20:25, 0:5] = 8  # false positive
    m = seg.match_f1(b, a)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1) and np.isclose(m["f1"], 0.5)


def test_qc_figure_png(demo_arrays):
    from spatial_assets import pl as _pl
    from tests.helpers import png_of

    segmentation_qc_png = png_of(_pl.segmentation_qc)

    img, truth, slide = demo_arrays
    nuclei = seg.nuclei_table(truth)
    cells, spots, _ = seg.assign_cells_to_spots(nuclei, slide, SegmentationParams(min_umi=0))
    png = segmentation_qc_png(img, truth, spots, seg.spot_diameter_px(slide), cells)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# --- bad input -----------------------------------------------------------------------------------------------------
def test_image_not_covering_spots_gives_both_extents():
    slide = _slide([[50, 50], [900, 40]], umi=[1000, 1000], diameter=20)
    with pytest.raises(InputError) as e:
        seg.check_image_covers_spots((500, 600, 3), slide)
    msg = str(e.value)
    assert "width 600 x height 500" in msg and "x 40..910" in msg and "y 30..60" in msg


def test_segment_slide_checks_coverage_before_segmenting():
    slide = _slide([[50, 50], [900, 40]], umi=[1000, 1000], diameter=20)
    with pytest.raises(InputError, match="does not cover the spots"):
        seg.segment_slide(np.zeros((500, 600, 3), np.uint8), slide, SegmentationParams(method="watershed"))


def test_non_rgb_and_unreadable_images(tmp_path):
    with pytest.raises(InputError, match=r"image has shape \(64, 64\); expected an RGB image"):
        seg.segment_nuclei(np.zeros((64, 64), np.uint8), SegmentationParams(method="watershed"))
    with pytest.raises(InputError, match=r"expected an RGB image array \(H, W, 3\) or a path, found list"):
        seg.segment_nuclei([[1, 2]], SegmentationParams(method="watershed"))
    bad = tmp_path / "he.tif"
    bad.write_text("not a tiff")
    with pytest.raises(InputError, match="he.tif: unreadable image"):
        seg.segment_nuclei(bad, SegmentationParams(method="watershed"))
    import tifffile

    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match=r"gray.tif: image has shape \(64, 64\); expected an RGB image"):
        seg.segment_nuclei(gray, SegmentationParams(method="watershed"))


def test_missing_spatial_and_scalefactors():
    slide = _slide([[50, 50]], umi=[1000])
    nuclei = pd.DataFrame({"label": [1], "area": [5], "x": [50.0], "y": [50.0]})
    no_xy = slide.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(InputError, match=r"slide: obsm\['spatial'\] is missing"):
        seg.assign_cells_to_spots(nuclei, no_xy)
    no_sf = slide.copy()
    no_sf.uns["spatial"]["lib"] = {"images": {}}
    with pytest.raises(InputError, match=r"\['scalefactors'\]\['spot_diameter_fullres'\] is missing"):
        seg.assign_cells_to_spots(nuclei, no_sf)
    no_uns = slide.copy()
    del no_uns.uns["spatial"]
    with pytest.raises(InputError, match=r"uns\['spatial'\] is missing"):
        seg.spot_diameter_px(no_uns)
    with pytest.raises(InputError, match=r"nuclei table: columns \['y'\] missing"):
        seg.assign_cells_to_spots(nuclei.drop(columns="y"), slide)


def test_model_folder_that_is_not_stardist(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(seg.ModelUnavailableError, match="not a StarDist model \\(no config.json"):
        seg.load_stardist_model(str(empty))
    (empty / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    with pytest.raises(seg.ModelUnavailableError, match="no weights"):
        seg.load_stardist_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(seg.ModelUnavailableError, match="not a StarDist2D config"):
        seg.load_stardist_model(str(empty))


def test_channel_mismatch_with_model():
    with pytest.raises(InputError, match="'rgb' given, but the model takes 1 channel"):
        seg.segment_nuclei(np.zeros((64, 64, 3), np.uint8), STARDIST.model_copy(update={"channel": "rgb"}))


def test_real_one_channel_folder_loads():
    folder = DATA / "stardist-weights-napari-bruce" / "stardist_th"
    model, info = seg.load_stardist_model(str(folder))
    assert info["n_channel_in"] == 1 and info["n_rays"] == 32 and info["model_source"] == "folder"
    assert model.basedir is None  # never writes into the folder
