"""Visium HD: cell-type accuracy of bins summed per segmented nucleus (``bins_to_cells``), against the same bins
and nuclei assigned by Voronoi (every bin to its nearest nucleus centre), on synthetic HD slides over the demo's
H&E (tests/platforms/hd_synthetic.py: true cells' counts spread over their bodies, plus ambient RNA).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_visium_hd.py [--seeds 0 1 2] [--ambient 0.005 0.05]

Every assignment is typed by the same function (``sa.tl.cell_types``, platform ``merfish``: each cell its own
spot); a typed cell is matched to the nearest true cell within 6 px (4.8 um) of its centre. Rows: the demo seed,
the ambient level, the assignment; ``true cell bodies`` uses the demo's true nuclei grown by the simulated 2 um instead of StarDist's
(an oracle segmentation; not an upper bound: typing also gains from more counts per cell).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

import spatial_assets as sa
from spatial_assets.params import CellTypingParams, SegmentationParams
from tests.platforms.hd_synthetic import simulate_hd_bins

TYPE_KEY = "cell_class"
UM_PER_PX = 0.8  # the demo's pixel size
#: 900 x 900 um windows of the demo tissue, one per seed (seed i takes window i mod 3)
CROPS = ((0.0, 1200.0, 900.0, 2100.0), (450.0, 1800.0, 1350.0, 2700.0), (900.0, 0.0, 1800.0, 900.0))


def accuracy(cells_xy, types, truth, radius_px=6.0):
    d, j = cKDTree(np.c_[truth.obs["x"], truth.obs["y"]]).query(cells_xy)
    ok = d <= radius_px
    true = truth.obs[TYPE_KEY].astype(str).to_numpy()[j[ok]]
    return float((types[ok] == true).mean()), float(len(np.unique(j[ok])) / truth.n_obs)


def voronoi(bins, centres, names):
    near = cKDTree(centres).query(np.asarray(bins.obsm["spatial"])[:, :2])[1]
    A = sp.csr_matrix((np.ones(bins.n_obs), (near, np.arange(bins.n_obs))), shape=(len(centres), bins.n_obs))
    out = ad.AnnData(X=(A @ sp.csr_matrix(bins.X)).astype(np.float32), var=bins.var.copy())
    out.obs_names = list(names)
    out.obsm["spatial"] = np.asarray(centres)
    out.uns["spatial"] = bins.uns["spatial"]
    return out


def type_cells(cells, ref, typing):
    seg = sa.seg.segment_sample(cells, None, "merfish", SegmentationParams(min_umi=0))
    res = sa.tl.cell_types(cells, ref, TYPE_KEY, seg, typing, platform="merfish")
    return res.cells[["x", "y"]].to_numpy(float), res.cells["cell_type"].astype(str).to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ambient", type=float, nargs="+", default=[0.005, 0.05])
    ap.add_argument("--bin-um", type=float, default=2.0)
    ap.add_argument("--expand-um", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    args = ap.parse_args()
    import tifffile

    out = Path(tempfile.mkdtemp(prefix="bench_hd_"))
    typing = CellTypingParams(min_cells_per_type=2, sigma_fit_min_umi=50, small_types="drop")
    seg_params = SegmentationParams(model="bundled:stardist_nuclei", channel="hematoxylin", min_umi=0)
    rows = []
    for seed in args.seeds:
        demo = sa.datasets.build_demo(out / f"demo{seed}", seed=seed, crop_um=CROPS[seed % len(CROPS)])
        ref = ad.read_h5ad(demo.reference)
        truth = ad.read_h5ad(demo.truth_cells)
        print(f"seed {seed}: window {CROPS[seed % len(CROPS)]} um, {truth.n_obs} true cells", flush=True)
        t0 = time.time()
        nuclei = sa.seg.segment_nuclei(demo.image, seg_params).labels
        t_seg = time.time() - t0
        true_nuclei = tifffile.imread(demo.nuclei_labels)
        for amb in args.ambient:
            bins, _ = simulate_hd_bins(demo, bin_um=args.bin_um, body_um=2.0, ambient=amb, seed=seed)
            bins.uns["spatial"] = {
                "hd": {
                    "scalefactors": {"microns_per_pixel": UM_PER_PX, "spot_diameter_fullres": args.bin_um / UM_PER_PX}
                }
            }
            t0 = time.time()
            cells = sa.platforms.bins_to_cells(bins, nuclei)
            t_assign = time.time() - t0
            variants = {"bins_to_cells, nuclei only": cells}
            for um in args.expand_um:
                variants[f"bins_to_cells, nuclei + {um:g} um"] = sa.platforms.bins_to_cells(
                    bins, nuclei, expand_px=int(round(um / UM_PER_PX))
                )
            variants["Voronoi baseline (same nuclei)"] = voronoi(bins, cells.obsm["spatial"], cells.obs_names)
            variants["true cell bodies (oracle nuclei)"] = sa.platforms.bins_to_cells(
                bins, true_nuclei, expand_px=int(round(2.0 / UM_PER_PX))
            )
            for name, c in variants.items():
                acc, found = accuracy(*type_cells(c, ref, typing), truth)
                rows.append((seed, amb, name, acc, found, c.n_obs))
                print(
                    f"seed {seed} ambient {amb:g} | {name:34s} accuracy {acc:.3f}  true cells found {found:.2f}  "
                    f"cells {c.n_obs}  (bins {bins.n_obs}, segmentation {t_seg:.1f} s, assignment {t_assign:.2f} s)",
                    flush=True,
                )
    print("\nmean over seeds")
    for amb in args.ambient:
        for name in dict.fromkeys(r[2] for r in rows):
            accs = [r[3] for r in rows if r[1] == amb and r[2] == name]
            print(f"ambient {amb:g} | {name:34s} accuracy {np.mean(accs):.3f} (min {np.min(accs):.3f}, n={len(accs)})")


if __name__ == "__main__":
    main()
