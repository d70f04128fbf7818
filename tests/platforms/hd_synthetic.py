"""Synthetic Visium HD slides with known cells, written in the on-disk layout spatialdata-io 0.7.1 reads.

:func:`simulate_hd_bins` lays 2 / 8 / 16-um bins over the demo's H&E: a bin inside the body of true cell i (its
true nucleus grown by ``body_um``) draws Poisson(counts_i / bins of cell i), every bin also draws ambient RNA.
:func:`write_visium_hd_folder` writes bins as Space Ranger 3 does (``feature_slice.h5``,
``binned_outputs/square_<bin>um/filtered_feature_bc_matrix.h5`` in 10x's matrix layout,
``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``). :func:`write_xenium_folder` writes
cells as Xenium does (``experiment.xenium``, ``cells.parquet``, ``cell_feature_matrix.h5``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def write_10x_h5(path: Path, X, barcodes, genes, *, gene_ids=None, attrs: dict | None = None) -> None:
    """Cells x genes counts in 10x's HDF5 matrix layout (``matrix/`` with CSC genes x barcodes, ``features/``)."""
    Xc = sp.csr_matrix(X).astype(np.int32)  # cells x genes CSR = genes x cells CSC
    path.parent.mkdir(parents=True, exist_ok=True)
    genes = np.asarray(genes, dtype=str)
    ids = np.asarray(gene_ids if gene_ids is not None else [f"ENSG{i:011d}" for i in range(len(genes))], dtype=str)
    with h5py.File(path, "w") as f:
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        m.create_dataset("data", data=Xc.data)
        m.create_dataset("indices", data=Xc.indices.astype(np.int64))
        m.create_dataset("indptr", data=Xc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([Xc.shape[1], Xc.shape[0]], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("id", data=ids.astype("S"))
        feat.create_dataset("name", data=genes.astype("S"))
        feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
        feat.create_dataset("genome", data=np.array(["synthetic"] * len(genes), dtype="S"))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def simulate_hd_bins(
    demo, *, bin_um: float = 2.0, body_um: float = 2.0, ambient: float = 0.05, seed: int = 0
) -> tuple[ad.AnnData, ad.AnnData]:
    """Bins over a demo slide (``build_demo`` paths) from its true cells and nuclei.

    Returns the bins (raw counts, ``obsm['spatial']`` centres in the H&E's pixels, ``obs`` ``array_row`` /
    ``array_col`` and ``true_cell`` (-1: ambient only)) and the demo's true cells.
    """
    import tifffile
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    truth = ad.read_h5ad(demo.truth_cells)
    labels = tifffile.imread(demo.nuclei_labels).astype(np.int64)
    um_per_px = float(json.loads(Path(demo.info).read_text())["um_per_px"])
    body = expand_labels(labels, distance=int(round(body_um / um_per_px))) if body_um > 0 else labels
    pitch = bin_um / um_per_px
    H, W = labels.shape
    rows, cols = np.arange(int(H // pitch)), np.arange(int(W // pitch))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    y, x = (rr + 0.5) * pitch, (cc + 0.5) * pitch
    owner = body[np.minimum(np.rint(y).astype(int), H - 1), np.minimum(np.rint(x).astype(int), W - 1)] - 1
    n_cells = truth.n_obs
    counts = sp.csr_matrix(truth.X).toarray().astype(float)
    n_bins = np.bincount(owner[owner >= 0], minlength=n_cells).astype(float)
    lam = np.zeros((len(owner), truth.n_vars))
    own = owner >= 0
    lam[own] = counts[owner[own]] / np.maximum(n_bins[owner[own]], 1)[:, None]
    lam += ambient * counts.mean(0) / max(float(np.median(n_bins[n_bins > 0])), 1.0)
    X = rng.poisson(lam)
    keep = X.sum(1) > 0  # the filtered matrix: bins with counts
    bins = ad.AnnData(X=sp.csr_matrix(X[keep].astype(np.float32)), var=pd.DataFrame(index=truth.var_names.copy()))
    bins.obs_names = [f"s_{int(bin_um):03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rr[keep], cc[keep])]
    bins.obs["array_row"] = rr[keep]
    bins.obs["array_col"] = cc[keep]
    bins.obs["true_cell"] = owner[keep]
    bins.obsm["spatial"] = np.c_[x[keep], y[keep]]
    bins.uns["microns_per_pixel"] = um_per_px
    bins.uns["bin_um"] = bin_um
    return bins, truth


def write_visium_hd_folder(folder: Path, bins: ad.AnnData, *, hires_png: np.ndarray | None = None) -> Path:
    """``bins`` (from :func:`simulate_hd_bins`) as a Space Ranger 3 Visium HD ``outs/`` folder."""
    folder = Path(folder)
    bin_um = float(bins.uns["bin_um"])
    um_per_px = float(bins.uns["microns_per_pixel"])
    sub = folder / "binned_outputs" / f"square_{int(bin_um):03d}um"
    (sub / "spatial").mkdir(parents=True, exist_ok=True)
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    write_10x_h5(sub / "filtered_feature_bc_matrix.h5", bins.X, bins.obs_names, bins.var_names)
    xy = np.asarray(bins.obsm["spatial"], dtype=float)
    pd.DataFrame(
        {
            "barcode": bins.obs_names.astype(str),
            "in_tissue": np.ones(bins.n_obs, dtype=np.int32),
            "array_row": bins.obs["array_row"].to_numpy(np.int32),
            "array_col": bins.obs["array_col"].to_numpy(np.int32),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_parquet(sub / "spatial" / "tissue_positions.parquet", index=False)
    hires = 0.5
    sf = {
        "tissue_hires_scalef": hires,
        "tissue_lowres_scalef": hires / 4,
        "spot_diameter_fullres": bin_um / um_per_px,
        "bin_size_um": bin_um,
        "microns_per_pixel": um_per_px,
        "regist_target_img_scalef": hires,
        "fiducial_diameter_fullres": 100.0,
    }
    (sub / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({**sf, "bin_size_um": 2.0}))
    layout = {"file_format": "1.0", "schema_version": "1.0", "transform": list(np.eye(3).ravel())}
    with h5py.File(folder / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout)})
    if hires_png is not None:
        import imageio.v3 as iio

        iio.imwrite(folder / "spatial" / "tissue_hires_image.png", hires_png)
    return folder


def write_xenium_folder(folder: Path, cells: ad.AnnData, *, pixel_size: float = 0.2125) -> Path:
    """Cells x panel genes (``obsm['spatial']`` in micrometres) as a minimal Xenium (XOA 2) output folder:
    ``experiment.xenium``, ``cells.zarr.zip`` (``cell_id`` as uint32 prefix / suffix pairs, ``cell_summary``),
    ``cells.parquet`` and ``cell_feature_matrix.h5`` (no boundaries, transcripts or images)."""
    import zarr
    from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_cells = cells.n_obs
    prefix = np.arange(1, n_cells + 1, dtype=np.uint32) * np.uint32(7919)
    ids = cell_id_str_from_prefix_suffix_uint32(prefix, np.ones(n_cells, dtype=np.uint32))
    xy = np.asarray(cells.obsm["spatial"], dtype=float)[:, :2]
    n = np.rint(np.asarray(cells.X.sum(1)).ravel()).astype(np.int64)
    area = np.full(n_cells, 80.0)
    write_10x_h5(
        folder / "cell_feature_matrix.h5",
        sp.csr_matrix(np.rint(sp.csr_matrix(cells.X).toarray())),
        ids,
        cells.var_names,
    )
    pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": xy[:, 0],
            "y_centroid": xy[:, 1],
            "transcript_counts": n,
            "control_probe_counts": np.zeros(n_cells, np.int64),
            "control_codeword_counts": np.zeros(n_cells, np.int64),
            "unassigned_codeword_counts": np.zeros(n_cells, np.int64),
            "total_counts": n,
            "cell_area": area,
            "nucleus_area": area / 2.5,
            "nucleus_count": np.ones(n_cells, np.int64),
        }
    ).to_parquet(folder / "cells.parquet", index=False)
    store = zarr.storage.ZipStore(folder / "cells.zarr.zip", mode="w")
    g = zarr.open_group(store, mode="w")
    g.create_array("cell_id", data=np.c_[prefix, np.ones(n_cells, dtype=np.uint32)])
    columns = [
        "cell_centroid_x",
        "cell_centroid_y",
        "cell_area",
        "nucleus_centroid_x",
        "nucleus_centroid_y",
        "nucleus_area",
        "z_level",
        "nucleus_count",
    ]
    summ = np.c_[xy, area, xy, area / 2.5, np.zeros(n_cells), np.ones(n_cells)]
    g.create_array("cell_summary", data=summ.astype(np.float64), attributes={"column_names": columns})
    store.close()
    spec = {"analysis_sw_version": "xenium-2.0.0.10", "pixel_size": pixel_size, "run_name": "synthetic"}
    (folder / "experiment.xenium").write_text(json.dumps(spec))
    return folder
