"""Zarr storage: round trips, partition layout, atomicity (a failed write leaves no store, keeps the previous)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from spatial_assets import io as storage


def _adata(n=30, g=8, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.4, random_state=seed, format="csr", dtype=np.float32)
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["a", "b"], n)), "x": rng.random(n)},
            index=[f"c{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    a.obsm["spatial"] = rng.random((n, 2))
    a.uns["params"] = {"seed": 3, "nothing": None}
    return a


def test_anndata_round_trip_readable_by_plain_anndata(tmp_path):
    a = _adata()
    p = storage.store_path(tmp_path, "typed_cells", "s1")
    storage.write_anndata(a, p)
    assert p == tmp_path / "typed_cells" / "s1.zarr"
    b = ad.read_zarr(p)  # plain anndata, no project code
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    assert list(b.obs["cell_type"]) == list(a.obs["cell_type"])
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert storage.is_complete(p)
    d = storage.describe(p)
    assert d["shape"] == [30, 8] and d["size_bytes"] > 0 and d["path"] == str(p)


def test_partition_layout_and_dataframe_round_trip(tmp_path):
    df = pd.DataFrame({"spot": ["a", "b"], "n": [1, 2]}, index=["c0", "c1"])
    p = storage.store_path(tmp_path, "decomposed_cells", "s1", "0003")
    assert p == tmp_path / "decomposed_cells" / "s1" / "0003.zarr"
    storage.write_dataframe(df, p)
    back = storage.read_dataframe(p)
    assert list(back["n"]) == [1, 2] and list(back.index) == ["c0", "c1"]


def test_dataframe_columns_with_slashes_round_trip(tmp_path):
    df = pd.DataFrame({"L2/3 IT": [0.25, 0.5], "Astro": [0.75, 0.5]}, index=["s0", "s1"])
    p = storage.write_dataframe(df, tmp_path / "w.zarr")
    back = storage.read_dataframe(p)
    assert list(back.columns) == ["L2/3 IT", "Astro"]
    np.testing.assert_array_equal(back.to_numpy(), df.to_numpy())


def test_arrays_round_trip_chunked_and_lazy(tmp_path):
    labels = np.arange(600 * 500, dtype=np.int32).reshape(600, 500)
    p = tmp_path / "seg.zarr"
    storage.write_arrays({"labels": labels, "names": np.array(["x", "y"])}, p, chunks=256, attrs={"method": "m"})
    z = zarr.open_group(str(p), mode="r")  # plain zarr
    assert z["labels"].chunks == (256, 256)
    np.testing.assert_array_equal(z["labels"][...], labels)
    assert z.attrs["method"] == "m"
    lazy = storage.read_arrays(p, ["labels"], lazy=True)["labels"]
    assert isinstance(lazy, zarr.Array) and int(lazy[599, 499]) == labels[599, 499]
    # zarr-to-zarr copy block by block
    storage.write_arrays({"labels": lazy}, tmp_path / "copy.zarr", chunks=128)
    np.testing.assert_array_equal(storage.read_arrays(tmp_path / "copy.zarr")["labels"], labels)


class Boom(RuntimeError):
    pass


def test_failed_write_leaves_no_store(tmp_path):
    p = tmp_path / "a" / "s.zarr"
    with pytest.raises(Boom):
        with storage.atomic_path(p) as tmp:
            ad.AnnData(X=np.ones((3, 3))).write_zarr(tmp)
            raise Boom("crash mid-write")
    assert not p.exists()
    assert not list(p.parent.glob(".s.zarr.tmp-*"))  # temporary removed
    with pytest.raises(FileNotFoundError, match="no such store"):
        storage.read_anndata(p)


def test_failed_rewrite_keeps_previous_store(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    storage.write_anndata(_adata(seed=1), p)
    before = ad.read_zarr(p).X.toarray()

    real = ad.AnnData.write_zarr

    def half_then_crash(self, store, *a, **k):
        real(self, store, *a, **k)
        raise Boom("disk full")

    monkeypatch.setattr(ad.AnnData, "write_zarr", half_then_crash)
    with pytest.raises(Boom):
        storage.write_anndata(_adata(seed=2), p)
    monkeypatch.undo()
    np.testing.assert_array_equal(ad.read_zarr(p).X.toarray(), before)
    assert storage.is_complete(p)
    assert [x.name for x in tmp_path.iterdir()] == ["s.zarr"]


def test_incomplete_store_is_detected(tmp_path):
    p = tmp_path / "s.zarr"
    ad.AnnData(X=np.ones((2, 2))).write_zarr(p)  # written without the project's completion marker
    assert not storage.is_complete(p)
    with pytest.raises(RuntimeError, match="incomplete"):
        storage.read_anndata(p)


def test_crash_between_renames_restores_old_store(tmp_path):
    p = tmp_path / "s.zarr"
    storage.write_anndata(_adata(seed=1), p)
    moved = tmp_path / ".s.zarr.old-deadbeef"
    p.rename(moved)  # as if the process died right after moving the old store aside
    storage.write_anndata(_adata(seed=5, n=4), tmp_path / "s.zarr")  # next write cleans up first
    assert ad.read_zarr(p).n_obs == 4
    assert not moved.exists()


def test_write_directory_atomic(tmp_path):
    p = tmp_path / "ckpt"

    def writer(d):
        (d / "model.safetensors").write_bytes(b"w")

    storage.write_directory(p, writer)
    assert storage.is_complete(p) and (p / "model.safetensors").read_bytes() == b"w"

    def bad(d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise Boom("killed")

    with pytest.raises(Boom):
        storage.write_directory(p, bad)
    assert (p / "model.safetensors").read_bytes() == b"w"
