"""Readers: h5ad, AnnData zarr, Space Ranger folders, lazy TIFF images, and their error messages."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
import zarr

from spatial_assets import io as readers
from spatial_assets import io as storage
from spatial_assets.io import InputError

DATA = Path(__file__).resolve().parents[2] / "data"


def test_h5ad_and_zarr_round_trip(demo_small, tmp_path):
    a = readers.read_spatial(demo_small.slide)
    storage.write_anndata(a, tmp_path / "slide.zarr")
    b = readers.read_spatial(tmp_path / "slide.zarr")
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    assert readers.scalefactors(b)["spot_diameter_fullres"] == pytest.approx(55 / 0.8)


def test_spaceranger_folder():
    a = readers.read_spatial(DATA / "squidpy-visium-mousebrain")
    assert a.n_obs == 100 and a.n_vars == 100
    assert a.obsm["spatial"].shape == (100, 2)
    sf = readers.scalefactors(a)
    assert sf["spot_diameter_fullres"] > 0
    readers.validate_counts(a, "spaceranger", require_integer=True)


def test_real_he_jpg_and_coverage():
    img = readers.read_image(DATA / "squidpy-visium-mousebrain" / "test_img.jpg")
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    slide = ad.read_h5ad(DATA / "squidpy-visium-mousebrain" / "test_data.h5ad")
    readers.check_image_covers_spots(img.shape[:2], slide)  # the 49 spots lie inside the crop
    with pytest.raises(InputError, match=r"width 300 x height 300 px.*spot extent x"):
        readers.check_image_covers_spots((300, 300), slide)


def test_tiff_is_lazy(demo_small):
    img = readers.read_image(demo_small.image)
    assert isinstance(img, zarr.Array)
    full = tifffile.imread(demo_small.image)
    assert img.shape == full.shape
    np.testing.assert_array_equal(np.asarray(img[100:200, 300:400]), full[100:200, 300:400])
    assert readers.image_shape(demo_small.image) == full.shape


def test_bad_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"x\.jpg: unreadable image"):
        readers.read_image(tmp_path / "x.jpg")
    gray = tmp_path / "g.tif"
    tifffile.imwrite(gray, np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match=r"g\.tif: image has shape \(20, 20\); expected an RGB image"):
        readers.read_image(gray)
    with pytest.raises(InputError, match="unsupported image format"):
        readers.read_image(tmp_path / "x.bmp") if (tmp_path / "x.bmp").write_bytes(b"") is not None else None
    with pytest.raises(InputError, match="image not found"):
        readers.read_image(tmp_path / "missing.png")


def test_spatial_errors(tmp_path, demo_small):
    a = ad.read_h5ad(demo_small.slide)
    b = a.copy()
    del b.obsm["spatial"]
    b.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(InputError, match=r"nospatial\.h5ad: obsm\['spatial'\] is missing"):
        readers.read_spatial(tmp_path / "nospatial.h5ad")
    c = a.copy()
    del c.uns["spatial"]
    with pytest.raises(InputError, match=r"uns\['spatial'\] is missing"):
        readers.scalefactors(c, "slide.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"junk\.h5ad: could not be read"):
        readers.read_spatial(tmp_path / "junk.h5ad")


def test_count_validation_messages(demo_small):
    a = ad.read_h5ad(demo_small.slide)
    readers.validate_counts(a, "slide.h5ad")
    b = a.copy()
    b.X = b.X.toarray()
    b.X[0, 0] = np.nan
    with pytest.raises(InputError, match=r"slide\.h5ad: X has 1 NaN"):
        readers.validate_counts(b, "slide.h5ad")
    b.X[0, 0] = -2
    with pytest.raises(InputError, match=r"negative values \(min -2\)"):
        readers.validate_counts(b, "slide.h5ad")
    b.X = np.log1p(np.abs(b.X))
    with pytest.raises(InputError, match=r"non-integer values"):
        readers.validate_counts(b, "slide.h5ad")
